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

use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Body;

/// Idle HTTP/1.1 connections kept per key.
pub const MAX_IDLE_H1: usize = 32;
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

/// Starts an HTTP/2 client connection on `io`; its driver runs as a task.
pub async fn handshake_h2<IO>(io: IO) -> hyper::Result<http2::SendRequest<Body>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 client connection ended");
        }
    });
    Ok(send)
}

/// Starts an HTTP/1.1 client connection on `io`; its driver runs as a task.
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

/// A key's HTTP/2 connection, once opened; locked while it is opened.
type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// One shared HTTP/2 connection per key.
#[derive(Debug)]
pub struct H2Pool<K> {
    slots: Mutex<HashMap<K, H2Slot>>,
}

impl<K> Default for H2Pool<K> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> H2Pool<K> {
    /// The connection for `key`, opened with `connect` when there is none
    /// (or it closed).
    pub async fn get<E, F, Fut>(&self, key: &K, connect: F) -> Result<http2::SendRequest<Body>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<http2::SendRequest<Body>, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= SWEEP_AT {
                slots.retain(|_, s| {
                    s.try_lock()
                        .map_or(true, |c| c.as_ref().is_some_and(|c| !c.is_closed()))
                });
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut held = slot.lock().await;
        if let Some(c) = held.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = connect().await?;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Open connections (for tests and metrics).
    pub fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter(|s| {
                s.try_lock()
                    .map_or(true, |c| c.as_ref().is_some_and(|c| !c.is_closed()))
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
