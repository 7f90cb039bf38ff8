//! The app's HTTP requests, each sent to the endpoint it picks.
//!
//! The app's connection is served by the proxy (HTTP/1.1 or HTTP/2, as the
//! app speaks). Each request resolves its destination again (discovery may
//! have changed since the connection opened), picks an endpoint with the
//! balancer (power of two choices on outstanding requests times latency,
//! see [`crate::balance`]), and goes:
//! - to a meshed endpoint over its one pooled HTTP/2 connection with ALPN
//!   `mizzen-h2`, carrying the app's HTTP version in
//!   [`APP_PROTOCOL`](super::headers::APP_PROTOCOL);
//! - to an unmeshed one in plaintext, in the app's version (HTTP/1.1
//!   connections pooled, HTTP/2 shared).
//!
//! An endpoint that cannot be reached is marked failed and the request
//! goes to another (up to three), which is safe because nothing of it was
//! sent; a request that may have reached an endpoint is never sent again.
//! When no endpoint answers the app gets a 503 with a response flag.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mizzen_api::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::headers::{self, APP_PROTOCOL};
use super::mesh::MeshConn;
use super::pool::{ConnError, H1Pool, H2Pool, SendError, handshake_h1, handshake_h2, send_h1, send_h2};
use super::upgrade::{self, Takeover};
use super::{Body, Exchange, Recording, ResponseFlag};
use crate::balance::{Choice, Load};
use crate::breaker::Place;
use crate::discovery::{Backend, Destination, Target};
use crate::drain::ConnGuard;
use crate::metrics::Direction;
use crate::outbound::{ATTEMPTS, Outbound, OutboundError, expected_identity};
use crate::tls::ALPN_HTTP;
use hyper::header::HeaderValue;
use mizzen_api::routing::traffic_policy::{HashKey, LoadBalancer, Outcome};

/// Connections to endpoints kept for reuse.
#[derive(Debug, Default)]
pub struct Pools {
    /// One HTTP/2 mTLS connection per meshed endpoint and identity.
    mesh: H2Pool<(SocketAddr, SpiffeId), MeshConn>,
    /// Unmeshed endpoints, for apps speaking HTTP/2.
    plain_h2: H2Pool<SocketAddr>,
    /// Unmeshed endpoints, for apps speaking HTTP/1.x.
    plain_h1: H1Pool<SocketAddr>,
}

impl Pools {
    /// Open HTTP/2 connections to meshed endpoints.
    pub fn mesh_connections(&self) -> usize {
        self.mesh.open()
    }
}

/// Serves the app's HTTP connection `conn` (captured on its way to `dst`)
/// until it ends or, once the proxy drains, finishes gracefully.
pub async fn serve<S>(outbound: Arc<Outbound>, conn: S, dst: SocketAddr, guard: &ConnGuard) -> Result<(), OutboundError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    guard.serving_http();
    let svc = hyper::service::service_fn(move |req| {
        let o = outbound.clone();
        async move { Ok::<_, Infallible>(request(&o, dst, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let served = until_drained!(
        builder.serve_connection_with_upgrades(TokioIo::new(conn), svc),
        guard.draining()
    );
    if let Err(e) = served {
        debug!(%dst, error = %e, "app HTTP connection ended with an error");
    }
    Ok(())
}

/// A request that got no response from upstream: the proxy answers
/// `status` (503 but for routing's answers) with `error` as the body,
/// and the flag (none for a route's redirect).
#[derive(Debug)]
pub(super) struct Refusal {
    pub status: hyper::StatusCode,
    pub flag: Option<ResponseFlag>,
    pub error: String,
    /// A redirect's `Location`.
    pub location: Option<HeaderValue>,
}

impl Refusal {
    fn unavailable(flag: ResponseFlag, error: String) -> Self {
        Self {
            status: hyper::StatusCode::SERVICE_UNAVAILABLE,
            flag: Some(flag),
            error,
            location: None,
        }
    }
}

/// Where a request was sent and what came back.
pub(super) struct Forwarded {
    pub response: Response<Body>,
    pub backend: Backend,
    /// The request counts as outstanding on its endpoint until dropped.
    pub load: Load,
    /// What routing did to it on the way (a delay, retries run out).
    pub flag: Option<ResponseFlag>,
    /// Its place under the destination's circuit breaker, held until the
    /// response ends.
    pub place: Option<Place>,
}

async fn request(o: &Arc<Outbound>, dst: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let mut req = req;
    let takeover = upgrade::requested(&req);
    let app_side = takeover.as_ref().map(|_| upgrade::Downstream::of(&mut req));
    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    headers::forwarded_request(&mut parts.headers);
    let recording = Recording {
        direction: Direction::Outbound,
        tracing: o.tracing.as_deref(),
        access_log: o.access_log,
    };
    let (mut exchange, body) = Exchange::begin(recording, &mut parts, version, body);
    let req = Request::from_parts(parts, body);
    let facts = &mut exchange.facts;
    // Resolved per request: discovery may have changed since the
    // connection opened.
    let routes = o.routes().await.ok();
    let destination = routes.as_ref().map(|r| r.resolve(dst));
    if let Some(Destination::Service(t)) = &destination {
        facts.destination_service = Some(t.service.clone());
    }
    let forwarded = match (&routes, &destination) {
        // A VirtualService with TCP routes only leaves HTTP alone.
        (Some(routes), Some(Destination::Service(t)))
            if let Some(table) = t.routes.as_ref().filter(|table| !table.routes.is_empty()) =>
        {
            super::route::routed(o, routes, t, table, dst, version, takeover.as_ref(), req).await
        }
        _ => forward(o, destination, version, takeover.as_ref(), req, &[]).await,
    };
    let (response, load) = match forwarded {
        Ok(Forwarded {
            mut response,
            backend,
            load,
            flag,
            place,
        }) => {
            facts.flag = flag;
            facts.peer = backend.identity.and_then(Result::ok);
            facts.peer_pod = Some(backend.pod).filter(|p| !p.is_empty());
            headers::strip_hop_by_hop(response.headers_mut());
            // A meshed endpoint answered on a CONNECT stream.
            let connect_stream = facts.peer.is_some();
            if let (Some(t), Some(app_side)) = (&takeover, app_side)
                && upgrade::accepted(response.status(), t, connect_stream)
            {
                upgrade::bridge_when_switched(app_side, &mut response);
                upgrade::to_app_response(&mut response, t);
            }
            exchange.upstream(backend.addr);
            (response, Some((load, place)))
        }
        Err(r) => {
            debug!(%dst, status = r.status.as_u16(), flag = r.flag.map(ResponseFlag::as_str), error = %r.error, "answering the app");
            facts.flag = r.flag;
            let mut answer = super::answer(r.status, r.flag, &r.error);
            if let Some(location) = r.location {
                answer.headers_mut().insert(hyper::header::LOCATION, location);
            }
            (answer, None)
        }
    };
    super::recorded(response, exchange, o.metrics.clone(), load)
}

/// Sends `req` to one of `dst`'s endpoints, trying another while nothing
/// was sent; endpoints in `avoid` (tried by earlier attempts) only when
/// no other is left.
pub(super) async fn forward(
    o: &Arc<Outbound>,
    destination: Option<Destination>,
    version: Version,
    takeover: Option<&Takeover>,
    req: Request<Body>,
    avoid: &[SocketAddr],
) -> Result<Forwarded, Refusal> {
    let destination = destination
        .ok_or_else(|| Refusal::unavailable(ResponseFlag::NotReady, OutboundError::NoRoutesYet.to_string()))?;
    let single;
    let backends: &[Backend] = match &destination {
        Destination::Service(t) => &t.backends,
        Destination::Pod(b) => std::slice::from_ref(b),
        Destination::Passthrough(addr) => {
            single = Backend {
                addr: *addr,
                identity: None,
                pod: String::new(),
            };
            std::slice::from_ref(&single)
        }
    };
    if backends.is_empty() {
        let service = match &destination {
            Destination::Service(t) => t.service.as_str(),
            _ => "the destination",
        };
        return Err(Refusal::unavailable(
            ResponseFlag::NoHealthyUpstream,
            format!("no ready endpoint behind {service}"),
        ));
    }
    let target = match &destination {
        Destination::Service(t) => Some(&**t),
        _ => None,
    };
    let place = match target.and_then(|t| Some((t.service.as_str(), t.policy.pool?))) {
        Some((name, pool)) => Some(
            o.breakers
                .enter(name, pool)
                .await
                .map_err(|e| Refusal::unavailable(ResponseFlag::UpstreamOverflow, format!("{name}: {e}")))?,
        ),
        None => None,
    };
    let outlier = target.and_then(|t| t.policy.outlier);
    let (key, set_cookie) = target.and_then(|t| hash_key(o, t, &req)).unzip();
    let set_cookie = set_cookie.flatten();
    let choice = match target.and_then(|t| t.policy.load_balancer.as_ref().map(|lb| (t, lb))) {
        None | Some((_, LoadBalancer::LeastRequest)) => Choice::LeastRequest,
        Some((_, LoadBalancer::Random)) => Choice::Random,
        Some((t, LoadBalancer::RoundRobin)) => Choice::RoundRobin(&t.round_robin),
        Some((_, LoadBalancer::ConsistentHash(_))) => key.as_deref().map_or(Choice::LeastRequest, Choice::Hash),
    };
    let observe = |addr: SocketAddr, outcome: Outcome| {
        if let Some(outlier) = &outlier
            && o.balancer.outcome(addr, outcome, outlier, backends)
        {
            o.metrics.ejected();
            debug!(endpoint = %addr, "ejected by outlier detection");
        }
    };
    let mut req = req;
    let mut tried = Vec::with_capacity(ATTEMPTS);
    let mut last = String::new();
    while tried.len() < ATTEMPTS {
        let picked = match avoid {
            [] => o.balancer.pick_by(backends, &tried, choice),
            _ => {
                let both: Vec<SocketAddr> = tried.iter().chain(avoid).copied().collect();
                o.balancer
                    .pick_by(backends, &both, choice)
                    .or_else(|| o.balancer.pick_by(backends, &tried, choice))
            }
        };
        let Some(b) = picked else {
            break;
        };
        tried.push(b.addr);
        let load = o.balancer.load(b.addr);
        match send(o, b, version, takeover, req).await {
            Ok((mut response, latency)) => {
                o.balancer.observe(b.addr, latency);
                observe(b.addr, Outcome::Status(response.status().as_u16()));
                if let Some(cookie) = &set_cookie {
                    response.headers_mut().append(hyper::header::SET_COOKIE, cookie.clone());
                }
                return Ok(Forwarded {
                    response,
                    backend: b.clone(),
                    load,
                    flag: None,
                    place,
                });
            }
            Err(Attempt::NotSent(back, e)) => {
                o.balancer.mark_failed(b.addr);
                observe(b.addr, Outcome::LocalFailure);
                o.metrics.refused(Direction::Outbound, e.reason());
                debug!(endpoint = %b.addr, reason = e.reason(), error = %e, "endpoint failed; trying another");
                last = e.to_string();
                req = *back;
            }
            Err(Attempt::Failed(e)) => {
                observe(b.addr, Outcome::LocalFailure);
                return Err(Refusal::unavailable(
                    ResponseFlag::UpstreamReset,
                    format!("{}: {e}", b.addr),
                ));
            }
        }
    }
    Err(Refusal::unavailable(ResponseFlag::UpstreamConnectionFailure, last))
}

/// The consistent hash key of `req` under `t`'s load balancer, if it
/// hashes one and the request has it (or, for a cookie the proxy sets, a
/// new one, with the `Set-Cookie` that gives it to the client).
fn hash_key(o: &Outbound, t: &Target, req: &Request<Body>) -> Option<(Vec<u8>, Option<HeaderValue>)> {
    let Some(LoadBalancer::ConsistentHash(key)) = &t.policy.load_balancer else {
        return None;
    };
    let found = |v: &[u8]| Some((v.to_vec(), None));
    match key {
        HashKey::Header(name) => req.headers().get(name.as_str()).and_then(|v| found(v.as_bytes())),
        HashKey::QueryParameter(name) => {
            mizzen_api::routing::decide::query_value(req.uri().query(), name).and_then(|v| found(v.as_bytes()))
        }
        HashKey::SourceIp => o.instance_ip.and_then(|ip| found(ip.to_string().as_bytes())),
        HashKey::Cookie(cookie) => {
            let sent = req
                .headers()
                .get_all(hyper::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok());
            if let Some(value) = cookie.find(sent) {
                return found(value.as_bytes());
            }
            let value = format!("{:016x}", rand::random::<u64>());
            let header = HeaderValue::try_from(cookie.set(&value)?).ok()?;
            Some((value.into_bytes(), Some(header)))
        }
    }
}

/// What became of one attempt.
enum Attempt {
    /// Nothing was sent; the request comes back with why.
    NotSent(Box<Request<Body>>, AttemptError),
    /// The request may have reached the endpoint.
    Failed(ConnError),
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Connect(#[from] OutboundError),
    #[error("the connection closed before the request left: {0}")]
    Closed(ConnError),
}

impl AttemptError {
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Connect(e) => e.reason(),
            AttemptError::Closed(_) => "connection_closed",
        }
    }
}

impl From<SendError> for Attempt {
    fn from(e: SendError) -> Self {
        match e {
            SendError::NotSent(req, e) => Attempt::NotSent(req, AttemptError::Closed(e)),
            SendError::Failed(e) => Attempt::Failed(e),
        }
    }
}

/// `Attempt::NotSent` with `req` when `$conn` failed, its value otherwise.
macro_rules! connected {
    ($req:ident, $conn:expr) => {
        match $conn {
            Ok(c) => c,
            Err(e) => return Err(Attempt::NotSent(Box::new($req), AttemptError::from(e))),
        }
    };
}

/// A TCP connection to an unmeshed endpoint, counted.
async fn plain_tcp(o: &Outbound, b: &Backend) -> Result<tokio::net::TcpStream, OutboundError> {
    let tcp = o.connect_tcp(b.addr).await?;
    let _ = o.metrics.connection(Direction::Outbound, None);
    Ok(tcp)
}

/// The pooled HTTP/2 mTLS connection's start: the endpoint must be `id`.
async fn mesh_h2(o: &Outbound, b: &Backend, id: &SpiffeId) -> Result<MeshConn, OutboundError> {
    let tcp = o.connect_tcp(b.addr).await?;
    let tls = o.mesh_tls(tcp, b.addr, id.clone(), ALPN_HTTP).await?;
    let _ = o.metrics.connection(Direction::Outbound, Some(id));
    super::mesh::handshake(tls).await.map_err(http_error(b))
}

fn http_error<E: Into<ConnError>>(b: &Backend) -> impl FnOnce(E) -> OutboundError + '_ {
    move |source| OutboundError::HttpHandshake {
        addr: b.addr,
        source: source.into(),
    }
}

/// Sends `req` to `b`; with the response, how long the endpoint took to
/// answer once the request had a connection (connecting is not the
/// endpoint's latency).
async fn send(
    o: &Arc<Outbound>,
    b: &Backend,
    version: Version,
    takeover: Option<&Takeover>,
    req: Request<Body>,
) -> Result<(Response<Body>, std::time::Duration), Attempt> {
    let mut req = req;
    let expected = connected!(req, expected_identity(b));
    let sent = match (expected, takeover) {
        (Some(id), _) => {
            let conn = connected!(req, o.http.mesh.get(&(b.addr, id.clone()), || mesh_h2(o, b, &id)).await);
            let app_version = HeaderValue::from_static(headers::version_name(version));
            req.headers_mut().insert(APP_PROTOCOL, app_version);
            if let Some(w) = &o.workload {
                req.headers_mut().insert(headers::PEER_WORKLOAD, w.clone());
            }
            super::into_h2_form(&mut req, b.addr);
            if let Some(t) = takeover {
                upgrade::into_connect_stream(&mut req, t);
            }
            return match timed(conn.send(req)).await {
                (Ok(response), took) => Ok((response, took)),
                (Err(e), _) => Err(e.into()),
            };
        }
        (None, Some(t)) => {
            // A connection of its own: the app's protocol takes it over.
            let mut conn = connected!(
                req,
                async { handshake_h1(plain_tcp(o, b).await?).await.map_err(http_error(b)) }.await
            );
            upgrade::into_http1_request(&mut req, t);
            super::into_h1_form(&mut req, Version::HTTP_11);
            timed(send_h1(&mut conn, req)).await
        }
        (None, None) if version == Version::HTTP_2 => {
            let open = || async { handshake_h2(plain_tcp(o, b).await?).await.map_err(http_error(b)) };
            let conn = connected!(req, o.http.plain_h2.get(&b.addr, open).await);
            super::into_h2_form(&mut req, b.addr);
            timed(send_h2(conn, req)).await
        }
        (None, None) => {
            let open = || async { handshake_h1(plain_tcp(o, b).await?).await.map_err(http_error(b)) };
            let conn = connected!(req, o.http.plain_h1.get(&b.addr, open).await);
            super::into_h1_form(&mut req, version);
            timed(o.http.plain_h1.send(b.addr, conn, req)).await
        }
    };
    let (response, took) = sent;
    Ok((response?, took))
}

/// `f`'s output and how long it took.
async fn timed<T>(f: impl Future<Output = T>) -> (T, std::time::Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}
