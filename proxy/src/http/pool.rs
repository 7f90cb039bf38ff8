//! Client connections kept for reuse, per key (an endpoint, or the app's
//! address).
//!
//! HTTP/2: one connection per key carries every request to it; the first
//! request to need one opens it while the others wait for it, so a burst
//! never opens more than one. HTTP/1.1: a connection is taken for one
//! request and comes back once its response has been read to the end; at
//! most [`MAX_IDLE_H1`] wait per key.
//!
//! Sending reports whether the request left: one that did not (the
//! connection was closing) comes back to be sent elsewhere, which is
//! always safe; one that did is never sent again by this module.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Body;
use crate::coalesce::Coalesce;

/// Idle HTTP/1.1 connections kept per key.
pub const MAX_IDLE_H1: usize = 32;
/// An HTTP/2 connection no request used for this long is let go.
pub const H2_IDLE: Duration = Duration::from_secs(300);
/// How often idle and closed HTTP/2 connections are looked for.
const H2_SWEEP_EVERY: Duration = Duration::from_secs(30);
/// HTTP/2 PING interval, and how long an answer may take before the
/// connection is closed: a peer that vanished (its node gone, a network
/// partition) is noticed in seconds, not at TCP's retransmission timeout.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(10);
/// Keys kept before closed connections are swept.
const SWEEP_AT: usize = 1024;

/// What failed on a client connection: hyper's (to apps) or h2's (to
/// peer proxies, see [`super::mesh`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// A request that could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// Nothing left: the request is given back.
    NotSent(Box<Request<Body>>, ConnError),
    /// It may have reached the server; it must not be sent again.
    Failed(ConnError),
}

impl SendError {
    fn from_try(e: hyper::client::conn::TrySendError<Request<Body>>) -> Self {
        let mut e = e;
        match e.take_message() {
            Some(req) => SendError::NotSent(Box::new(req), e.into_error().into()),
            None => SendError::Failed(e.into_error().into()),
        }
    }
}

/// Starts an HTTP/2 client connection on `io` (writes coalesced, see
/// [`Coalesce`]); its driver runs as a task.
pub async fn handshake_h2<IO>(io: IO) -> hyper::Result<http2::SendRequest<Body>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(Coalesce::new(io)))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 client connection ended");
        }
    });
    Ok(send)
}

/// Starts an HTTP/1.1 client connection on `io`; its driver runs as a
/// task. Writes are not coalesced: hyper writes a request's head and the
/// body it already has in one go, and a turn's wait would cost a poll.
pub async fn handshake_h1<IO>(io: IO) -> hyper::Result<http1::SendRequest<Body>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "HTTP/1.1 client connection ended");
        }
    });
    Ok(send)
}

/// A shared connection's handle, as the pool keeps it.
pub trait Shared: Clone {
    /// Whether the connection has ended.
    fn is_closed(&self) -> bool;
}

impl Shared for http2::SendRequest<Body> {
    fn is_closed(&self) -> bool {
        http2::SendRequest::is_closed(self)
    }
}

impl Shared for super::mesh::MeshConn {
    fn is_closed(&self) -> bool {
        super::mesh::MeshConn::is_closed(self)
    }
}

/// A pooled HTTP/2 connection and when a request last took it.
#[derive(Debug)]
struct Pooled<C> {
    send: C,
    used: Instant,
}

/// A key's HTTP/2 connection, once opened; locked while it is opened.
type H2Slot<C> = Arc<tokio::sync::Mutex<Option<Pooled<C>>>>;

/// One shared HTTP/2 connection per key; connections closed by the peer
/// or idle for [`H2_IDLE`] are let go (dropping the pool's handle closes
/// the connection once its last request is done), so endpoints that left
/// discovery do not keep connections open for days.
#[derive(Debug)]
pub struct H2Pool<K, C = http2::SendRequest<Body>> {
    slots: Mutex<HashMap<K, H2Slot<C>>>,
    swept: Mutex<Instant>,
}

impl<K, C> Default for H2Pool<K, C> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }
}

/// Whether a slot is worth keeping: in use right now (locked), or holding
/// an open connection used within [`H2_IDLE`].
fn keep<C: Shared>(slot: &H2Slot<C>, now: Instant) -> bool {
    slot.try_lock().map_or(true, |p| {
        p.as_ref()
            .is_some_and(|p| !p.send.is_closed() && now.duration_since(p.used) < H2_IDLE)
    })
}

impl<K: Hash + Eq + Clone, C: Shared> H2Pool<K, C> {
    /// The connection for `key`, opened with `connect` when there is none
    /// (or it closed).
    pub async fn get<E, F, Fut>(&self, key: &K, connect: F) -> Result<C, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let now = Instant::now();
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= SWEEP_AT || now.duration_since(*swept) >= H2_SWEEP_EVERY {
                slots.retain(|_, s| keep(s, now));
                *swept = now;
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut held = slot.lock().await;
        if let Some(p) = held.as_mut()
            && !p.send.is_closed()
        {
            p.used = now;
            return Ok(p.send.clone());
        }
        let send = connect().await?;
        *held = Some(Pooled {
            send: send.clone(),
            used: now,
        });
        Ok(send)
    }

    /// Open connections (for tests and metrics).
    pub fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter(|s| {
                s.try_lock()
                    .map_or(true, |p| p.as_ref().is_some_and(|p| !p.send.is_closed()))
            })
            .count()
    }
}

/// Sends `req` on `c` once it can take another stream.
pub async fn send_h2(mut c: http2::SendRequest<Body>, req: Request<Body>) -> Result<Response<Body>, SendError> {
    if let Err(e) = c.ready().await {
        return Err(SendError::NotSent(Box::new(req), e.into()));
    }
    let response = c.try_send_request(req).await.map_err(SendError::from_try)?;
    Ok(response.map(super::boxed))
}

/// Sends `req` on `c`, which is not kept afterwards (a request that takes
/// the connection over).
pub async fn send_h1(c: &mut http1::SendRequest<Body>, req: Request<Body>) -> Result<Response<Body>, SendError> {
    Ok(send_h1_incoming(c, req).await?.map(super::boxed))
}

async fn send_h1_incoming(
    c: &mut http1::SendRequest<Body>,
    req: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    if let Err(e) = c.ready().await {
        return Err(SendError::NotSent(Box::new(req), e.into()));
    }
    c.try_send_request(req).await.map_err(SendError::from_try)
}

/// Idle HTTP/1.1 connections per key.
type IdleH1<K> = HashMap<K, Vec<http1::SendRequest<Body>>>;

/// Idle HTTP/1.1 connections per key.
#[derive(Debug)]
pub struct H1Pool<K> {
    idle: Arc<Mutex<IdleH1<K>>>,
}

impl<K> Default for H1Pool<K> {
    fn default() -> Self {
        Self {
            idle: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + Unpin + 'static> H1Pool<K> {
    /// An idle connection for `key`, or one opened with `connect`.
    pub async fn get<E, F, Fut>(&self, key: &K, connect: F) -> Result<http1::SendRequest<Body>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<http1::SendRequest<Body>, E>>,
    {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = idle.get_mut(key) {
                while let Some(c) = list.pop() {
                    if c.is_ready() {
                        return Ok(c);
                    }
                }
                idle.remove(key);
            }
        }
        connect().await
    }

    /// Sends `req` on `c`; the connection comes back to the pool once the
    /// response has been read to the end (unless either side closes it).
    pub async fn send(
        &self,
        key: K,
        mut c: http1::SendRequest<Body>,
        req: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        let resp = send_h1_incoming(&mut c, req).await?;
        let back = Back {
            key,
            conn: c,
            idle: self.idle.clone(),
        };
        Ok(resp.map(|body| {
            Returning { body, back: Some(back) }
                .map_err(super::BodyError::from)
                .boxed()
        }))
    }
}

/// A connection on its way back to its pool.
struct Back<K> {
    key: K,
    conn: http1::SendRequest<Body>,
    idle: Arc<Mutex<IdleH1<K>>>,
}

impl<K: Hash + Eq + Send + 'static> Back<K> {
    /// Into the idle list once the connection can take the next request;
    /// it usually can at once (its task read the response's end before
    /// handing it over), else a task waits for it.
    fn give(self) {
        if self.conn.is_ready() {
            self.put();
            return;
        }
        let mut back = self;
        tokio::spawn(async move {
            if back.conn.ready().await.is_ok() {
                back.put();
            }
        });
    }

    fn put(self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= SWEEP_AT {
            idle.retain(|_, l| {
                l.retain(|c| !c.is_closed());
                !l.is_empty()
            });
        }
        let list = idle.entry(self.key).or_default();
        if list.len() < MAX_IDLE_H1 {
            list.push(self.conn);
        }
    }
}

/// A response body whose connection goes back to the pool when it ends:
/// read to the end, or dropped once at its end (a body known to be empty
/// is never polled); not when dropped before (a half-read response leaves
/// the connection unusable).
struct Returning<K: Hash + Eq + Send + 'static> {
    body: Incoming,
    back: Option<Back<K>>,
}

impl<K: Hash + Eq + Send + 'static> Drop for Returning<K> {
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.body)
            && let Some(back) = self.back.take()
        {
            back.give();
        }
    }
}

impl<K: Hash + Eq + Send + Unpin + 'static> hyper::body::Body for Returning<K> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.body).poll_frame(cx));
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => self.body.is_end_stream(),
            Some(Err(_)) => {
                self.back = None;
                false
            }
        };
        if ended && let Some(back) = self.back.take() {
            back.give();
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 server on one end of an in-memory pipe; the client's
    /// handshake on the other.
    async fn connection() -> hyper::Result<http2::SendRequest<Body>> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(super::super::full("ok")))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        handshake_h2(client).await
    }

    #[tokio::test(start_paused = true)]
    async fn one_connection_per_key_reused_then_let_go_when_idle() {
        let pool: H2Pool<u8> = H2Pool::default();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let open = || async {
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            connection().await
        };
        pool.get(&1, open).await.expect("first");
        pool.get(&1, open).await.expect("reused");
        assert_eq!(
            opened.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one connection per key"
        );
        assert_eq!(pool.open(), 1);
        // Key 2 keeps being used; key 1 sits idle past H2_IDLE.
        let mut waited = Duration::ZERO;
        while waited <= H2_IDLE {
            tokio::time::advance(H2_SWEEP_EVERY).await;
            waited += H2_SWEEP_EVERY;
            pool.get(&2, open).await.expect("busy key");
        }
        assert_eq!(pool.open(), 1, "the idle connection was let go, the busy one kept");
        pool.get(&1, open).await.expect("reopened");
        assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// An HTTP/1.1 server answering `size` bytes to every request, on one
    /// end of an in-memory pipe; the client's handshake on the other.
    async fn h1_connection(size: usize) -> hyper::Result<http1::SendRequest<Body>> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(Response::new(super::super::full(vec![b'x'; size])))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        handshake_h1(client).await
    }

    fn get_request() -> Request<Body> {
        let mut r = Request::new(super::super::full(""));
        *r.uri_mut() = "/".parse().expect("uri");
        r
    }

    #[tokio::test]
    async fn an_h1_connection_comes_back_once_its_response_was_read_to_the_end() {
        let pool: H1Pool<u8> = H1Pool::default();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let open = || async {
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            h1_connection(100).await
        };
        for _ in 0..3 {
            let c = pool.get(&1, open).await.expect("connection");
            let response = pool.send(1, c, get_request()).await.expect("sent");
            let body = response.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body.len(), 100);
        }
        assert_eq!(
            opened.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one connection carried all three requests"
        );
    }

    #[tokio::test]
    async fn an_h1_connection_whose_response_was_dropped_unread_is_not_reused() {
        let pool: H1Pool<u8> = H1Pool::default();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let open = || async {
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            h1_connection(256 * 1024).await
        };
        let c = pool.get(&1, open).await.expect("connection");
        let response = pool.send(1, c, get_request()).await.expect("sent");
        let mut body = response.into_body();
        body.frame().await.expect("a first frame").expect("data");
        drop(body);
        pool.get(&1, open).await.expect("another connection");
        assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn an_h1_connection_comes_back_after_an_empty_response_nobody_polled() {
        let pool: H1Pool<u8> = H1Pool::default();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let open = || async {
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            h1_connection(0).await
        };
        for _ in 0..3 {
            let c = pool.get(&1, open).await.expect("connection");
            let response = pool.send(1, c, get_request()).await.expect("sent");
            assert!(hyper::body::Body::is_end_stream(response.body()), "an empty body");
            drop(response);
            // The connection task may take a turn to want the next request.
            tokio::task::yield_now().await;
        }
        assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
