//! The HTTP data path: per-request proxying on ports that carry HTTP.
//!
//! - [`outbound`]: the app's HTTP connections are served by the proxy;
//!   each request picks its own endpoint and travels to a meshed one over
//!   that endpoint's single pooled HTTP/2 mTLS connection ([`pool`],
//!   driven with the `h2` crate in [`mesh`]).
//! - [`inbound`]: requests from peer proxies (and plaintext HTTP from
//!   outside the mesh, in PERMISSIVE mode) are handed to the app in the
//!   protocol the client app spoke, with the client's identity in
//!   `x-forwarded-client-cert`.
//! - [`headers`]: what the proxies add, strip and carry between them.

/// Runs the server connection future `$conn` to its end; once `$draining`
/// resolves, asks it to finish gracefully (HTTP/2 GOAWAY, HTTP/1.1
/// `Connection: close` on the next response) and waits for that.
macro_rules! until_drained {
    ($conn:expr, $draining:expr) => {{
        let conn = $conn;
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = $draining => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

pub mod access;
pub mod body;
pub mod headers;
pub mod inbound;
pub mod mesh;
pub mod outbound;
pub mod pool;
pub mod route;
pub mod trace;
pub mod upgrade;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// Why a body stopped: the peer's I/O, or the proxy closing the request.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends: the peer's streamed through, or its own.
pub type Body = BoxBody<Bytes, BodyError>;

/// A peer's body as the proxy forwards it.
pub fn boxed(b: hyper::body::Incoming) -> Body {
    b.map_err(BodyError::from).boxed()
}

/// `body`, its data bytes counted into the returned counter.
pub fn counted<B>(body: B) -> (Body, std::sync::Arc<std::sync::atomic::AtomicU64>)
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BodyError>,
{
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    (
        body::Observed::new(body, count.clone(), None)
            .map_err(Into::into)
            .boxed(),
        count,
    )
}

/// `resp` with `on_end` called once its body has been carried to the end
/// (or abandoned).
pub fn on_end(
    resp: hyper::Response<Body>,
    on_end: impl FnOnce(body::Ended) + Send + Sync + 'static,
) -> hyper::Response<Body> {
    let (parts, b) = resp.into_parts();
    let counted = body::Observed::new(
        b,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Some(Box::new(on_end)),
    );
    hyper::Response::from_parts(parts, counted.boxed())
}

/// One request as it is being proxied, for its metrics and access log.
#[derive(Debug)]
pub struct Exchange {
    pub facts: crate::metrics::RequestFacts,
    pub started: std::time::Instant,
    /// The request body's bytes, counted as they flow.
    pub request_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// `Some` when the access log is on.
    pub access: Option<access::AccessEntry>,
    /// `Some` when spans are exported.
    pub span: Option<trace::RequestSpan>,
}

/// What records an exchange: where metrics go and what else is kept.
#[derive(Debug, Clone, Copy)]
pub struct Recording<'a> {
    pub direction: crate::metrics::Direction,
    pub tracing: Option<&'a trace::Tracing>,
    pub access_log: bool,
}

impl Exchange {
    /// Starts recording the request whose head is `parts` (already as it
    /// will be forwarded): its span (which rewrites `traceparent`), its
    /// access log entry, and a count of its body's bytes. Returns the body
    /// to forward.
    pub fn begin<B>(
        r: Recording<'_>,
        parts: &mut hyper::http::request::Parts,
        version: hyper::Version,
        body: B,
    ) -> (Self, Body)
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<BodyError>,
    {
        let facts = crate::metrics::RequestFacts::new(r.direction, is_grpc(&parts.headers));
        let span = r.tracing.map(|t| t.start(r.direction, parts));
        let access = r.access_log.then(|| access::AccessEntry::new(parts, version));
        let (body, request_bytes) = counted(body);
        let exchange = Self {
            facts,
            started: std::time::Instant::now(),
            request_bytes,
            access,
            span,
        };
        (exchange, body)
    }

    /// Records where the request went, for the access log.
    pub fn upstream(&mut self, addr: std::net::SocketAddr) {
        if let Some(a) = self.access.as_mut() {
            a.upstream = Some(addr);
        }
    }
}

/// `response` with its exchange recorded (metrics and access log, the
/// facts completed by the response) once its body ends; `hold` (an
/// endpoint's outstanding request) is kept until then.
pub fn recorded<H: Send + Sync + 'static>(
    response: hyper::Response<Body>,
    exchange: Exchange,
    metrics: crate::metrics::ProxyMetrics,
    hold: H,
) -> hyper::Response<Body> {
    let Exchange {
        mut facts,
        started,
        request_bytes,
        access,
        span,
    } = exchange;
    facts.status = response.status().as_u16();
    facts.grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    on_end(response, move |ended| {
        drop(hold);
        let request_bytes = request_bytes.load(std::sync::atomic::Ordering::Relaxed);
        // A trailers-only answer carries grpc-status in its headers.
        facts.grpc_status = facts.grpc_status.or(ended.grpc_status);
        let elapsed = started.elapsed();
        metrics.request(&facts, elapsed, request_bytes, ended.bytes);
        if let Some(a) = access {
            a.write(&facts, elapsed, request_bytes, ended.bytes);
        }
        if let Some(s) = span {
            s.end(&facts);
        }
    })
}

/// A body the proxy writes itself.
pub fn full(text: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Why the proxy answered a request itself, Envoy's response flags: the
/// `response_flags` label of request metrics and the
/// `x-mizzen-response-flags` header of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// No healthy upstream: the Service has no ready endpoint.
    NoHealthyUpstream,
    /// Upstream connection failure: no endpoint could be reached.
    UpstreamConnectionFailure,
    /// The upstream reset or closed the stream before answering.
    UpstreamReset,
    /// The app behind this proxy could not be reached (inbound).
    LocalReset,
    /// The proxy cannot secure the request yet (no certificate or routes).
    NotReady,
    /// An authorization policy denied the request.
    RbacDenied,
    /// No route of the Service's VirtualService matches the request.
    NoRoute,
    /// A route's fault injection answered instead of the upstream.
    FaultInjected,
    /// A route's fault injection delayed the request.
    DelayInjected,
    /// The route's timeout (or a per-try timeout) passed.
    UpstreamRequestTimeout,
    /// The route's retries ran out on a retriable answer.
    RetryLimitExceeded,
    /// The destination's circuit breaker is full (connection pool limits).
    UpstreamOverflow,
}

impl ResponseFlag {
    /// Envoy's short name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamReset => "UR",
            ResponseFlag::LocalReset => "LR",
            ResponseFlag::NotReady => "NR",
            ResponseFlag::RbacDenied => "RBAC",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::UpstreamOverflow => "UO",
        }
    }
}

/// The proxy's own answer: 503 with the flag in a header and a short
/// reason in the body.
pub fn unavailable(flag: ResponseFlag, reason: &str) -> hyper::Response<Body> {
    answer(hyper::StatusCode::SERVICE_UNAVAILABLE, Some(flag), reason)
}

/// The proxy's own answer with `status`, the flag in a header and a short
/// reason in the body.
pub fn answer(status: hyper::StatusCode, flag: Option<ResponseFlag>, reason: &str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(format!("{reason}\n")));
    *r.status_mut() = status;
    if let Some(flag) = flag {
        r.headers_mut().insert(
            headers::RESPONSE_FLAGS,
            hyper::header::HeaderValue::from_static(flag.as_str()),
        );
    }
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// What a denied request gets, as Envoy's RBAC filter answers: 403 with
/// body `RBAC: access denied`; for gRPC, a trailers-only response with
/// status PERMISSION_DENIED (7).
pub fn denied(grpc: bool) -> hyper::Response<Body> {
    use hyper::header::{CONTENT_TYPE, HeaderValue};
    const BODY: &str = "RBAC: access denied";
    let mut r = if grpc {
        let mut r = hyper::Response::new(full(""));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from_static("7"));
        r.headers_mut().insert("grpc-message", HeaderValue::from_static(BODY));
        r
    } else {
        let mut r = hyper::Response::new(full(BODY));
        *r.status_mut() = hyper::StatusCode::FORBIDDEN;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    r.headers_mut().insert(
        headers::RESPONSE_FLAGS,
        HeaderValue::from_static(ResponseFlag::RbacDenied.as_str()),
    );
    r
}

/// `req` as a proxy sends it over HTTP/2: absolute URI (`:scheme`,
/// `:authority` from the URI, else `Host`, else `fallback`), no `Host`.
pub fn into_h2_form(req: &mut hyper::Request<Body>, fallback: std::net::SocketAddr) {
    let authority = headers::authority(req.uri(), req.headers())
        .map(str::to_owned)
        .unwrap_or_else(|| fallback.to_string());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if let Ok(uri) = hyper::Uri::builder()
        .scheme(req.uri().scheme_str().unwrap_or("http"))
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    req.headers_mut().remove(hyper::header::HOST);
    *req.version_mut() = hyper::Version::HTTP_2;
}

/// `req` as sent over HTTP/1.x in `version`: origin-form target
/// (authority-form for CONNECT), `Host` from the URI's authority when it
/// has none.
pub fn into_h1_form(req: &mut hyper::Request<Body>, version: hyper::Version) {
    if !req.headers().contains_key(hyper::header::HOST)
        && let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(hyper::header::HOST, v);
    }
    // CONNECT keeps its authority-form target (RFC 9112 3.2.3).
    let uri = if req.method() == hyper::Method::CONNECT {
        req.uri().authority().and_then(|a| a.as_str().parse().ok())
    } else {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        hyper::Uri::builder().path_and_query(path).build().ok()
    };
    if let Some(uri) = uri {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = version;
}

/// Whether a request is gRPC (`content-type: application/grpc…`).
pub fn is_grpc(h: &hyper::HeaderMap) -> bool {
    h.get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
