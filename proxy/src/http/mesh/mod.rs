//! The pooled HTTP/2 mTLS connection between proxies (ALPN `mizzen-h2`),
//! both ends on the `h2` crate itself rather than hyper's HTTP/2 client
//! and server: [`client`] sends the requests of a client proxy's apps,
//! [`server`] serves them in the server proxy.
//!
//! Why not hyper's: each of its HTTP/2 ends hands every request between
//! tasks (the client spawns two per request, one to await the response
//! and one to pipe the body; the server spawns one per stream), and on
//! the proxy benchmark user-space CPU per request followed the task polls
//! (13 in the client proxy and 10 in the server proxy for a small POST,
//! where the L4 relay costs 2 each). Here a request's work stays in the
//! task that has it: the app connection's on the client side, the mesh
//! connection's on the server side.
//!
//! What both ends share is here: bodies read from a stream ([`H2Body`]),
//! bodies written to one ([`pipe`], with flow control as hyper has it),
//! CONNECT streams as byte streams ([`Tunnel`]) and keepalive PINGs
//! ([`Keepalive`]).

pub mod client;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::H2_KEEPALIVE;
use super::{Body, BodyError};

pub use client::{MeshConn, handshake};

/// A body's first bytes queued without waiting for the stream's window
/// (h2 sends them as the window allows): beyond this the body waits for
/// capacity like any stream.
const EAGER: usize = 64 * 1024;

/// Why a connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no PING answer within {0:?}")]
    PingTimeout(std::time::Duration),
}

/// Keepalive PINGs: every [`H2_KEEPALIVE`] a PING whose answer must come
/// within as long, so a peer that vanished (its node gone, a partition)
/// is noticed in seconds, not at TCP's retransmission timeout.
pub struct Keepalive {
    pings: h2::PingPong,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// A PING is out and its answer not in.
    waiting: bool,
}

impl Keepalive {
    pub fn new(pings: h2::PingPong) -> Self {
        Self {
            pings,
            timer: Box::pin(tokio::time::sleep(H2_KEEPALIVE)),
            waiting: false,
        }
    }

    /// Pending while the peer answers; ready with why the connection
    /// must close once it does not.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<DriveError> {
        loop {
            if self.waiting {
                match self.pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.rearm();
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e.into()),
                    Poll::Pending => {}
                }
            }
            std::task::ready!(self.timer.as_mut().poll(cx));
            if self.waiting {
                return Poll::Ready(DriveError::PingTimeout(H2_KEEPALIVE));
            }
            if let Err(e) = self.pings.send_ping(h2::Ping::opaque()) {
                return Poll::Ready(e.into());
            }
            self.waiting = true;
            self.rearm();
        }
    }

    fn rearm(&mut self) {
        self.timer.as_mut().reset(tokio::time::Instant::now() + H2_KEEPALIVE);
    }
}

impl std::fmt::Debug for Keepalive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keepalive").field("waiting", &self.waiting).finish()
    }
}

/// Carries `body` onto `stream`: its first [`EAGER`] bytes at once, the
/// rest as the stream's window allows; trailers at the end. A body that
/// fails resets the stream.
pub(super) async fn pipe(mut body: Body, mut stream: SendStream<Bytes>) {
    let mut eager = 0usize;
    loop {
        // A peer that resets the stream while the body waits for data
        // (an idle gRPC stream) ends the pipe and drops the body.
        let next = tokio::select! {
            biased;
            f = body.frame() => f,
            reason = std::future::poll_fn(|cx| stream.poll_reset(cx)) => {
                tracing::debug!(reason = ?reason.ok(), "the peer reset the stream");
                return;
            }
        };
        let frame = match next {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; resetting its stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(f)) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        eager += data.len();
        if eager > EAGER && !has_capacity(&mut stream).await {
            return;
        }
        if stream.send_data(data, body.is_end_stream()).is_err() || body.is_end_stream() {
            return;
        }
    }
}

/// Waits until `stream` may send more (hyper's rule: at least one byte of
/// window); false once the stream is gone.
async fn has_capacity(stream: &mut SendStream<Bytes>) -> bool {
    stream.reserve_capacity(1);
    loop {
        if stream.capacity() > 0 {
            return true;
        }
        match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            _ => return false,
        }
    }
}

/// The stream's next data chunk, its bytes' window given back to the peer.
fn poll_released(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
    let data = std::task::ready!(recv.poll_data(cx));
    if let Some(Ok(d)) = &data {
        let _ = recv.flow_control().release_capacity(d.len());
    }
    Poll::Ready(data)
}

/// A body read from its HTTP/2 stream (a response's on the client side,
/// a request's on the server side): window given back as data is taken,
/// trailers after the data.
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
}

impl H2Body {
    pub(super) fn new(recv: RecvStream) -> Self {
        Self { recv, data_done: false }
    }
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match std::task::ready!(poll_released(&mut self.recv, cx)) {
                Some(Ok(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// A value a request's or response's extensions carry for whoever takes
/// it first (extensions must be `Clone`; the value is taken once).
#[derive(Debug)]
pub struct TakeOnce<T>(Arc<std::sync::Mutex<Option<T>>>);

impl<T> Clone for TakeOnce<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> TakeOnce<T> {
    pub(super) fn new(value: T) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(value))))
    }

    /// The value, once.
    pub fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// An accepted CONNECT stream to a peer proxy, as a byte stream: what an
/// upgraded connection or a tunnel is carried on (a response's extensions
/// hold it for whoever bridges it).
pub type Tunnel = TakeOnce<TunnelIo>;

/// Reads and writes of a CONNECT stream.
#[derive(Debug)]
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
}

impl TunnelIo {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
        }
    }
}

fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::ErrorKind::BrokenPipe.into())
    } else {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, e)
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.unread.is_empty() {
            match std::task::ready!(poll_released(&mut self.recv, cx)) {
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        let n = loop {
            let available = self.send.capacity();
            if available > 0 {
                break available.min(data.len());
            }
            match std::task::ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        };
        self.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The stream's end; a stream already reset has nothing to end.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// What the CONNECT tests of both ends run over a tunnel.
#[cfg(test)]
mod tunnel_test {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// The far side: echoes four bytes, then ends the stream.
    pub(super) async fn echo_four(mut io: impl AsyncRead + AsyncWrite + Unpin) {
        let mut buf = [0u8; 4];
        if io.read_exact(&mut buf).await.is_ok() {
            let _ = io.write_all(&buf).await;
            let _ = io.shutdown().await;
        }
    }

    /// The near side: what comes back for `ping`.
    pub(super) async fn round_trip(mut io: impl AsyncRead + AsyncWrite + Unpin) -> Vec<u8> {
        io.write_all(b"ping").await.expect("write");
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.expect("read");
        back
    }
}
