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

/// A request that could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// Nothing left: the request is given back.
    NotSent(Box<Request<Body>>, hyper::Error),
    /// It may have reached the server; it must not be sent again.
    Failed(hyper::Error),
}

impl SendError {
    fn from_try(e: hyper::client::conn::TrySendError<Request<Body>>) -> Self {
        let mut e = e;
        match e.take_message() {
            Some(req) => SendError::NotSent(Box::new(req), e.into_error()),
            None => SendError::Failed(e.into_error()),
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

/// Starts an HTTP/1.1 client connection on `io` (writes coalesced); its
/// driver runs as a task.
pub async fn handshake_h1<IO>(io: IO) -> hyper::Result<http1::SendRequest<Body>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new().handshake(TokioIo::new(Coalesce::new(io))).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "HTTP/1.1 client connection ended");
        }
    });
    Ok(send)
}

/// A pooled HTTP/2 connection and when a request last took it.
#[derive(Debug)]
struct Pooled {
    send: http2::SendRequest<Body>,
    used: Instant,
}

/// A key's HTTP/2 connection, once opened; locked while it is opened.
type H2Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// One shared HTTP/2 connection per key; connections closed by the peer
/// or idle for [`H2_IDLE`] are let go (dropping the pool's handle closes
/// the connection once its last request is done), so endpoints that left
/// discovery do not keep connections open for days.
#[derive(Debug)]
pub struct H2Pool<K> {
    slots: Mutex<HashMap<K, H2Slot>>,
    swept: Mutex<Instant>,
}

impl<K> Default for H2Pool<K> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }
}

/// Whether a slot is worth keeping: in use right now (locked), or holding
/// an open connection used within [`H2_IDLE`].
fn keep(slot: &H2Slot, now: Instant) -> bool {
    slot.try_lock().map_or(true, |p| {
        p.as_ref()
            .is_some_and(|p| !p.send.is_closed() && now.duration_since(p.used) < H2_IDLE)
    })
}

impl<K: Hash + Eq + Clone> H2Pool<K> {
    /// The connection for `key`, opened with `connect` when there is none
    /// (or it closed).
    pub async fn get<E, F, Fut>(&self, key: &K, connect: F) -> Result<http2::SendRequest<Body>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<http2::SendRequest<Body>, E>>,
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
pub async fn send_h2(mut c: http2::SendRequest<Body>, req: Request<Body>) -> Result<Response<Incoming>, SendError> {
    if let Err(e) = c.ready().await {
        return Err(SendError::NotSent(Box::new(req), e));
    }
    c.try_send_request(req).await.map_err(SendError::from_try)
}

/// Sends `req` on `c`, which is not kept afterwards (a request that takes
/// the connection over).
pub async fn send_h1(c: &mut http1::SendRequest<Body>, req: Request<Body>) -> Result<Response<Incoming>, SendError> {
    if let Err(e) = c.ready().await {
        return Err(SendError::NotSent(Box::new(req), e));
    }
    c.try_send_request(req).await.map_err(SendError::from_try)
}

/// Idle HTTP/1.1 connections per key.
#[derive(Debug)]
pub struct H1Pool<K> {
    idle: Arc<Mutex<HashMap<K, Vec<http1::SendRequest<Body>>>>>,
}

impl<K> Default for H1Pool<K> {
    fn default() -> Self {
        Self {
            idle: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + 'static> H1Pool<K> {
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
    ) -> Result<Response<Incoming>, SendError> {
        let resp = send_h1(&mut c, req).await?;
        let idle = self.idle.clone();
        tokio::spawn(async move {
            if c.ready().await.is_ok() {
                let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() >= SWEEP_AT {
                    idle.retain(|_, l| {
                        l.retain(|c| !c.is_closed());
                        !l.is_empty()
                    });
                }
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_H1 {
                    list.push(c);
                }
            }
        });
        Ok(resp)
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
}
