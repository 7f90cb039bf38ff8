//! The app's HTTP requests, each sent to the endpoint it picks.
//!
//! The app's connection is served by the proxy (HTTP/1.1 or HTTP/2, as the
//! app speaks). Each request resolves its destination again (discovery may
//! have changed since the connection opened), picks an endpoint with the
//! balancer (power of two choices on outstanding requests), and goes:
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

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mizzen_api::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::headers::{self, APP_PROTOCOL};
use super::pool::{H1Pool, H2Pool, SendError, handshake_h1, handshake_h2, send_h2};
use super::{Body, ResponseFlag};
use crate::balance::Load;
use crate::discovery::{Backend, Destination};
use crate::metrics::{Direction, RequestFacts};
use crate::outbound::{ATTEMPTS, Outbound, OutboundError, expected_identity};
use crate::tls::ALPN_HTTP;

/// Connections to endpoints kept for reuse.
#[derive(Debug, Default)]
pub struct Pools {
    /// One HTTP/2 mTLS connection per meshed endpoint and identity.
    mesh: H2Pool<(SocketAddr, SpiffeId)>,
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

/// Serves the app's HTTP connection `conn` (captured on its way to `dst`).
pub async fn serve<S>(outbound: Arc<Outbound>, conn: S, dst: SocketAddr) -> Result<(), OutboundError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let o = outbound.clone();
        async move { Ok::<_, Infallible>(request(&o, dst, req).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(conn), svc)
        .await
    {
        debug!(%dst, error = %e, "app HTTP connection ended with an error");
    }
    Ok(())
}

/// A request that got no response from upstream: the proxy answers.
#[derive(Debug)]
struct Refusal {
    flag: ResponseFlag,
    error: String,
}

/// Where a request was sent and what came back.
struct Forwarded {
    response: Response<Incoming>,
    backend: Backend,
    /// The request counts as outstanding on its endpoint until dropped.
    load: Load,
}

async fn request(o: &Arc<Outbound>, dst: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(APP_PROTOCOL);
    headers::ensure_request_id(&mut parts.headers);
    headers::ensure_forwarded_proto(&mut parts.headers);
    let grpc = super::is_grpc(&parts.headers);
    let (body, request_bytes) = super::counted(body);
    let req = Request::from_parts(parts, body);
    let service = o.routes.borrow().as_ref().and_then(|r| match r.resolve(dst) {
        Destination::Service(t) => Some(t.service.clone()),
        _ => None,
    });
    let mut facts = RequestFacts::new(Direction::Outbound, grpc);
    facts.destination_service = service;
    let (response, load) = match forward(o, dst, version, req).await {
        Ok(Forwarded {
            response,
            backend,
            load,
        }) => {
            facts.peer = backend.identity.and_then(Result::ok);
            facts.peer_pod = Some(backend.pod).filter(|p| !p.is_empty());
            let (mut parts, body) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            (Response::from_parts(parts, body.boxed()), Some(load))
        }
        Err(r) => {
            debug!(%dst, flag = r.flag.as_str(), error = %r.error, "answering the app with 503");
            facts.flag = Some(r.flag);
            (super::unavailable(r.flag, &r.error), None)
        }
    };
    facts.status = response.status().as_u16();
    facts.grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let metrics = o.metrics.clone();
    super::on_end(response, move |ended| {
        drop(load);
        let request_bytes = request_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut facts = facts;
        // A trailers-only answer carries grpc-status in its headers.
        facts.grpc_status = facts.grpc_status.or(ended.grpc_status);
        metrics.request(&facts, started.elapsed(), request_bytes, ended.bytes);
    })
}

/// Sends `req` to one of `dst`'s endpoints, trying another while nothing
/// was sent.
async fn forward(
    o: &Arc<Outbound>,
    dst: SocketAddr,
    version: Version,
    req: Request<Body>,
) -> Result<Forwarded, Refusal> {
    let routes = o.routes().await.map_err(|e| Refusal {
        flag: ResponseFlag::NotReady,
        error: e.to_string(),
    })?;
    let backends: Vec<Backend> = match routes.resolve(dst) {
        Destination::Service(t) => t.backends.clone(),
        Destination::Pod(b) => vec![b],
        Destination::Passthrough(addr) => vec![Backend {
            addr,
            identity: None,
            pod: String::new(),
        }],
    };
    if backends.is_empty() {
        return Err(Refusal {
            flag: ResponseFlag::NoHealthyUpstream,
            error: format!("no ready endpoint behind {dst}"),
        });
    }
    let mut req = req;
    let mut tried = Vec::with_capacity(ATTEMPTS);
    let mut last = String::new();
    while tried.len() < ATTEMPTS {
        let Some(b) = o.balancer.pick(&backends, &tried) else {
            break;
        };
        tried.push(b.addr);
        let load = o.balancer.load(b.addr);
        match send(o, b, version, req).await {
            Ok(response) => {
                return Ok(Forwarded {
                    response,
                    backend: b.clone(),
                    load,
                });
            }
            Err(Attempt::NotSent(back, e)) => {
                o.balancer.mark_failed(b.addr);
                o.metrics.refused(Direction::Outbound, e.reason());
                debug!(endpoint = %b.addr, reason = e.reason(), error = %e, "endpoint failed; trying another");
                last = e.to_string();
                req = *back;
            }
            Err(Attempt::Failed(e)) => {
                return Err(Refusal {
                    flag: ResponseFlag::UpstreamReset,
                    error: format!("{}: {e}", b.addr),
                });
            }
        }
    }
    Err(Refusal {
        flag: ResponseFlag::UpstreamConnectionFailure,
        error: last,
    })
}

/// What became of one attempt.
enum Attempt {
    /// Nothing was sent; the request comes back with why.
    NotSent(Box<Request<Body>>, AttemptError),
    /// The request may have reached the endpoint.
    Failed(hyper::Error),
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Connect(#[from] OutboundError),
    #[error("the connection closed before the request left: {0}")]
    Closed(hyper::Error),
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

async fn send(
    o: &Arc<Outbound>,
    b: &Backend,
    version: Version,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, Attempt> {
    let expected = match expected_identity(b) {
        Ok(e) => e,
        Err(e) => return Err(Attempt::NotSent(Box::new(req), e.into())),
    };
    match expected {
        Some(id) => {
            let key = (b.addr, id.clone());
            let conn = o
                .http
                .mesh
                .get(&key, || async {
                    let tcp = o.connect_tcp(b.addr).await?;
                    let tls = o.mesh_tls(tcp, b.addr, id.clone(), ALPN_HTTP).await?;
                    let _ = o.metrics.connection(Direction::Outbound, Some(&id));
                    handshake_h2(tls)
                        .await
                        .map_err(|source| OutboundError::HttpHandshake { addr: b.addr, source })
                })
                .await;
            let conn = match conn {
                Ok(c) => c,
                Err(e) => return Err(Attempt::NotSent(Box::new(req), e.into())),
            };
            req.headers_mut().insert(
                APP_PROTOCOL,
                hyper::header::HeaderValue::from_static(headers::version_name(version)),
            );
            super::into_h2_form(&mut req, b.addr);
            Ok(send_h2(conn, req).await?)
        }
        None if version == Version::HTTP_2 => {
            let conn = o
                .http
                .plain_h2
                .get(&b.addr, || async {
                    let tcp = o.connect_tcp(b.addr).await?;
                    let _ = o.metrics.connection(Direction::Outbound, None);
                    handshake_h2(tcp)
                        .await
                        .map_err(|source| OutboundError::HttpHandshake { addr: b.addr, source })
                })
                .await;
            let conn = match conn {
                Ok(c) => c,
                Err(e) => return Err(Attempt::NotSent(Box::new(req), e.into())),
            };
            super::into_h2_form(&mut req, b.addr);
            Ok(send_h2(conn, req).await?)
        }
        None => {
            let conn = o
                .http
                .plain_h1
                .get(&b.addr, || async {
                    let tcp = o.connect_tcp(b.addr).await?;
                    let _ = o.metrics.connection(Direction::Outbound, None);
                    handshake_h1(tcp)
                        .await
                        .map_err(|source| OutboundError::HttpHandshake { addr: b.addr, source })
                })
                .await;
            let conn = match conn {
                Ok(c) => c,
                Err(e) => return Err(Attempt::NotSent(Box::new(req), e.into())),
            };
            super::into_h1_form(&mut req, version);
            Ok(o.http.plain_h1.send(b.addr, conn, req).await?)
        }
    }
}
