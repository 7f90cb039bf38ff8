//! Fewer, larger writes under HTTP/2: HEADERS and DATA of one request are
//! queued by two turns of hyper's connection task (DATA waits for send
//! capacity, assigned on the turn after HEADERS), and each turn flushes,
//! so a small request cost two TLS records and two system calls where the
//! relay used one. [`Coalesce`] buffers writes and, the first time it is
//! asked to flush a batch, yields one scheduler turn (waking itself) before
//! writing: whatever the next turn adds goes out in the same write. A
//! batch is never held longer than that one turn, nor beyond [`MAX_BUF`].
//!
//! Wrapped where a message's parts may be queued in different turns:
//! `http::pool::handshake_h2`'s connections (hyper's HTTP/2 client, as
//! above) and the plaintext connections `http::inbound::serve` serves
//! (from outside the mesh, either HTTP version). Not where the parts are
//! queued together, where waiting a turn would only cost a poll: both
//! ends of `http::mesh`'s connections between proxies (a request's
//! HEADERS and first DATA, a response's HEADERS and DATA, are queued in
//! one turn), the app's connections the outbound side serves, and
//! HTTP/1.1 client connections. Counted on the benchmark: the same writes per request
//! either way, one task poll fewer without.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered before they are written whatever the turn.
pub const MAX_BUF: usize = 64 * 1024;

/// `inner`, its writes coalesced across one scheduler turn.
#[derive(Debug)]
pub struct Coalesce<S> {
    inner: S,
    buf: Vec<u8>,
    /// Whether this batch already yielded its turn.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            yielded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes the buffer out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.buf.len() >= MAX_BUF {
            std::task::ready!(self.drain(cx))?;
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && !self.yielded && self.buf.len() < MAX_BUF {
            // One turn for the rest of the message to join this batch.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Counts the writes that reach it.
    #[derive(Debug, Default)]
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn two_parts_flushed_one_turn_apart_leave_in_one_write() {
        let mut c = Coalesce::new(Counting::default());
        c.write_all(b"HEADERS").await.expect("write");
        // The flush yields once; a write made meanwhile joins the batch.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut c).poll_flush(cx))).await;
        assert!(first.is_pending(), "the first flush yields a turn");
        c.write_all(b"DATA").await.expect("write");
        c.flush().await.expect("flush");
        assert_eq!(c.get_ref().writes, 1, "one write for both parts");
        assert_eq!(c.get_ref().bytes, b"HEADERSDATA");
    }

    #[tokio::test]
    async fn a_flush_never_waits_more_than_one_turn() {
        let mut c = Coalesce::new(Counting::default());
        c.write_all(b"alone").await.expect("write");
        tokio::time::timeout(std::time::Duration::from_secs(1), c.flush())
            .await
            .expect("done after one turn")
            .expect("flush");
        assert_eq!(c.get_ref().bytes, b"alone");
    }
}
