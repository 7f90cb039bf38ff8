//! Requests arriving for the app: from peer proxies over HTTP/2 mTLS
//! (ALPN `mizzen-h2`), and plaintext HTTP from outside the mesh in
//! PERMISSIVE mode.
//!
//! Each request is handed to the app in the HTTP version the client app
//! spoke ([`APP_PROTOCOL`], which only a peer proxy can set), over
//! connections to the app that are kept for reuse (HTTP/1.1 pooled, one
//! shared HTTP/2 connection). On the way:
//! - `x-forwarded-client-cert` is dropped, then, for a peer proxy's
//!   request, set to Istio's `By=<this pod>;Hash=<client cert
//!   SHA-256>;Subject="";URI=<client>`: the app can trust it to name
//!   the calling workload;
//! - hop-by-hop headers go; `x-request-id` and `x-forwarded-proto` are
//!   added when missing.
//!
//! Every request is authorised first ([`crate::policy`]): a denied one gets
//! 403 `RBAC: access denied` (gRPC: PERMISSION_DENIED) with flag `RBAC`
//! and never reaches the app. When the app cannot be reached the client
//! gets a 503 with flag `LR`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mizzen_api::SpiffeId;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::body::Closable;
use super::headers::{self, XFCC};
use super::pool::{H1Pool, H2Pool, SendError, handshake_h1, handshake_h2, send_h1, send_h2};
use super::upgrade;
use super::{Body, Exchange, Recording, ResponseFlag};
use crate::coalesce::Coalesce;
use crate::drain::{ConnGuard, StreamInfo};
use crate::inbound::Inbound;
use crate::metrics::Direction;
use crate::policy::RequestFacts;

/// A peer proxy's verified client.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's SPIFFE ID.
    pub id: SpiffeId,
    /// The XFCC value its requests get, computed once per connection.
    xfcc: hyper::header::HeaderValue,
}

impl Client {
    /// The client `id` presenting `cert`, calling `server` (this pod).
    pub fn new(id: SpiffeId, cert: &CertificateDer<'_>, server: &SpiffeId) -> Self {
        Self {
            xfcc: headers::xfcc(server, cert, &id),
            id,
        }
    }
}

/// Connections to the app, by its address.
#[derive(Debug, Default)]
pub struct AppClients {
    h1: H1Pool<SocketAddr>,
    h2: H2Pool<SocketAddr>,
}

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("connect to the app: {0}")]
    Connect(std::io::Error),
    #[error("HTTP with the app: {0}")]
    Http(#[from] super::pool::ConnError),
}

/// Serves requests on `conn` for the app at `dst`; `client` is the peer
/// proxy's identity, `None` for plaintext from outside the mesh.
pub async fn serve<S>(inbound: &Arc<Inbound>, conn: S, at: Endpoints, client: Option<Client>, guard: &ConnGuard)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    guard.serving_http();
    let from_mesh = client.is_some();
    let dst = at.dst;
    let served = if from_mesh {
        // Each stream handled in the connection's task (`mesh::server`).
        let registry = guard.registry();
        let handle = |req: Request<Body>| {
            let on = Connection {
                at,
                client: client.as_ref(),
                registry: &registry,
            };
            request(inbound, on, req)
        };
        super::mesh::server::serve(conn, handle, guard.draining())
            .await
            .map_err(|e| e.to_string())
    } else {
        let inbound = inbound.clone();
        let registry = guard.registry();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (inbound, registry) = (inbound.clone(), registry.clone());
            async move {
                let on = Connection {
                    at,
                    client: None,
                    registry: &registry,
                };
                Ok::<_, Infallible>(request(&inbound, on, req).await)
            }
        });
        // Writes coalesced for plaintext clients (see `crate::coalesce`).
        let io = TokioIo::new(Coalesce::new(conn));
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        until_drained!(builder.serve_connection_with_upgrades(io, svc), guard.draining()).map_err(|e| e.to_string())
    };
    if let Err(e) = served {
        debug!(%dst, from_mesh, error = %e, "inbound HTTP connection ended with an error");
    }
}

/// The two ends of an inbound connection.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    /// The client's address.
    pub peer: SocketAddr,
    /// The app's address (the connection's original destination).
    pub dst: SocketAddr,
}

/// What a request knows of the connection it came on.
struct Connection<'a> {
    at: Endpoints,
    client: Option<&'a Client>,
    registry: &'a crate::drain::Connections,
}

async fn request<B>(inbound: &Inbound, on: Connection<'_>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<super::BodyError>,
{
    let Connection { at, client, registry } = on;
    let dst = at.dst;
    let mut req = req;
    let takeover = match client {
        Some(_) => upgrade::from_peer(&req),
        None => upgrade::requested(&req),
    };
    let client_side = takeover.as_ref().map(|_| upgrade::Downstream::of(&mut req));
    let (mut parts, body) = req.into_parts();
    // Decided on the request as it arrived, before anything is changed.
    let (facts, allowed) = authorize(inbound, at, client, &parts);
    let version = match (client, &takeover) {
        // The app's protocol takes an HTTP/1.1 connection over.
        (_, Some(_)) => Version::HTTP_11,
        (Some(_), None) => headers::app_version(&parts.headers),
        (None, None) => parts.version,
    };
    // Said by a peer proxy alone; removed with the other mesh headers.
    let peer_workload = client.and_then(|_| headers::peer_workload(&parts.headers));
    let service = inbound.routes.borrow().as_ref().and_then(|r| {
        r.service_at(dst, headers::authority(&parts.uri, &parts.headers))
            .map(str::to_owned)
    });
    headers::forwarded_request(&mut parts.headers);
    parts.headers.remove(XFCC);
    if let Some(c) = client {
        parts.headers.insert(XFCC, c.xfcc.clone());
    }
    let recording = Recording {
        direction: Direction::Inbound,
        tracing: inbound.tracing.as_deref(),
        access_log: inbound.access_log,
    };
    let (mut exchange, body) = Exchange::begin(recording, &mut parts, version, body);
    exchange.facts.peer = client.map(|c| c.id.clone());
    exchange.facts.peer_workload = peer_workload;
    exchange.facts.destination_service = service;
    exchange.upstream(dst);
    if !allowed {
        exchange.facts.flag = Some(ResponseFlag::RbacDenied);
        return super::recorded(
            super::denied(super::is_grpc(&parts.headers)),
            exchange,
            inbound.metrics.clone(),
            (),
        );
    }
    // Registered while the response lives, so a policy change can close it.
    let stream = registry.open_stream(StreamInfo {
        direction: Direction::Inbound,
        peer: at.peer,
        dst,
        identity: client.map(|c| c.id.clone()),
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or_else(String::new, |p| p.to_string()),
        authority: headers::authority(&parts.uri, &parts.headers).map(str::to_owned),
        facts,
    });
    let mut req = Request::from_parts(parts, body);
    if version == Version::HTTP_2 {
        super::into_h2_form(&mut req, dst);
    } else {
        super::into_h1_form(&mut req, version);
    }
    if let Some(t) = &takeover {
        upgrade::into_http1_request(&mut req, t);
    }
    let response = match to_app(inbound, dst, version, takeover.is_some(), req).await {
        Ok(mut r) => {
            headers::strip_hop_by_hop(r.headers_mut());
            if let (Some(t), Some(client_side)) = (&takeover, client_side)
                && upgrade::accepted(r.status(), t, false)
            {
                upgrade::bridge_when_switched(client_side, &mut r);
                match client {
                    Some(_) => upgrade::to_peer_response(&mut r),
                    None => upgrade::to_app_response(&mut r, t),
                }
            }
            r
        }
        Err(e) => {
            debug!(%dst, error = %e, "the app did not answer");
            exchange.facts.flag = Some(ResponseFlag::LocalReset);
            super::unavailable(ResponseFlag::LocalReset, "the app could not be reached")
        }
    };
    let response = response.map(|b| Closable::new(b, stream).boxed());
    super::recorded(response, exchange, inbound.metrics.clone(), ())
}

/// Decides a request under the pod's policy: what was read of it (when a
/// policy applies) and whether it may go on. A request whose path cannot
/// be normalised is denied; so is any request once the policy is gone.
fn authorize(
    inbound: &Inbound,
    at: Endpoints,
    client: Option<&Client>,
    parts: &hyper::http::request::Parts,
) -> (Option<RequestFacts>, bool) {
    let Some(policy) = inbound.policy.borrow().clone() else {
        return (None, false);
    };
    if !policy.authorizes() {
        return (None, true);
    }
    let id = client.map(|c| &c.id);
    let facts = match RequestFacts::of(parts) {
        Ok(f) => f,
        Err(e) => {
            debug!(peer = %at.peer, path = %parts.uri.path(), reason = e.reason(), "denied: the path cannot be read");
            inbound.metrics.authz.unreadable();
            return (None, false);
        }
    };
    let allowed = inbound
        .metrics
        .authz
        .decide(&policy, (at.peer, at.dst), id, Some(&facts))
        .allowed();
    (Some(facts), allowed)
}

/// A new TCP connection to the app at `dst`.
async fn app_tcp(dst: SocketAddr, timeout: std::time::Duration) -> Result<tokio::net::TcpStream, AppError> {
    crate::net::connect_app(dst, timeout).await.map_err(AppError::Connect)
}

/// Sends `req` to the app; a request that did not leave (a kept
/// connection the app had just closed) is sent once more on a new one.
async fn to_app(
    inbound: &Inbound,
    dst: SocketAddr,
    version: Version,
    takeover: bool,
    req: Request<Body>,
) -> Result<Response<Body>, AppError> {
    let timeout = inbound.timeouts.app_connect;
    let mut req = req;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = if takeover {
            // A connection of its own: the app's protocol takes it over.
            let mut conn = handshake_h1(app_tcp(dst, timeout).await?)
                .await
                .map_err(|e| AppError::Http(e.into()))?;
            send_h1(&mut conn, req).await
        } else if version == Version::HTTP_2 {
            let conn = inbound
                .app
                .h2
                .get(&dst, || async {
                    handshake_h2(app_tcp(dst, timeout).await?)
                        .await
                        .map_err(|e| AppError::Http(e.into()))
                })
                .await?;
            send_h2(conn, req).await
        } else {
            let conn = inbound
                .app
                .h1
                .get(&dst, || async {
                    handshake_h1(app_tcp(dst, timeout).await?)
                        .await
                        .map_err(|e| AppError::Http(e.into()))
                })
                .await?;
            inbound.app.h1.send(dst, conn, req).await
        };
        match sent {
            Ok(r) => return Ok(r),
            Err(SendError::NotSent(back, e)) if attempts < 2 => {
                debug!(%dst, error = %e, "kept connection to the app closed; retrying on a new one");
                req = *back;
            }
            Err(SendError::NotSent(_, e) | SendError::Failed(e)) => return Err(AppError::Http(e)),
        }
    }
}
