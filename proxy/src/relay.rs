//! Bidirectional relay between two streams, in one task.
//!
//! Each direction borrows a 16 KiB buffer from a per-thread pool only for
//! the moment it reads and holds it while those bytes wait to be written;
//! a read that finds nothing returns the buffer at once. An idle connection
//! therefore holds no relay buffer at all (1,000 idle connections cost
//! their sockets and TLS state, not 32 MiB of buffers), and busy ones reuse
//! the same few buffers: nothing is allocated per chunk. End of stream in
//! one direction shuts down the write side of the other stream (half
//! close: TLS sends close_notify) while the other direction goes on.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept per thread for reuse.
const POOL_MAX: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// One direction's state.
#[derive(Default)]
struct Half {
    /// Holds bytes read and not yet written; `None` while empty.
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    eof: bool,
    need_flush: bool,
    done: bool,
    copied: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
    }
}

impl Half {
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W, bytes: &Counter) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.buf.is_none() && !self.eof {
                let mut buf = take();
                let mut rb = ReadBuf::new(&mut buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        give(buf);
                        // Going idle: push out what the writer still buffers.
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        give(buf);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                            give(buf);
                        } else {
                            (self.pos, self.end) = (0, n);
                            self.buf = Some(buf);
                        }
                    }
                }
            }
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.copied += n as u64;
                    bytes.inc_by(n as u64);
                    self.need_flush = true;
                }
                if let Some(b) = self.buf.take() {
                    give(b);
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions reach end of
/// stream; returns the bytes copied each way and adds them to `bytes` as
/// they are written. An error in either direction ends the relay.
pub async fn relay<A, B>(a: &mut A, b: &mut B, bytes: &Counter) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Half::default(), Half::default());
    poll_fn(|cx| {
        if !ab.done {
            match ab.poll_copy(cx, a, b, bytes) {
                Poll::Ready(Ok(())) => ab.done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !ba.done {
            match ba.poll_copy(cx, b, a, bytes) {
                Poll::Ready(Ok(())) => ba.done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if ab.done && ba.done {
            Poll::Ready(Ok((ab.copied, ba.copied)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut app, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let bytes = Counter::default();
        let counted = bytes.clone();
        let relay = tokio::spawn(async move { relay(&mut proxy_a, &mut proxy_b, &counted).await });
        // More than one buffer's worth, through a small pipe.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.expect("write");
            app.shutdown().await.expect("half close");
            let mut back = Vec::new();
            app.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, big, "every byte, in order, then EOF");
        // The other direction still works after the half close.
        server.write_all(b"reply after half close").await.expect("reply");
        server.shutdown().await.expect("close");
        assert_eq!(writer.await.expect("join"), b"reply after half close");
        let (ab, ba) = relay.await.expect("join").expect("relay");
        assert_eq!((ab, ba), (100_000, 22));
        assert_eq!(bytes.get(), 100_022, "the counter saw every byte");
    }

    #[tokio::test]
    async fn idle_directions_hold_no_buffer() {
        POOL.with(|p| p.borrow_mut().clear());
        let (mut app, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move { relay(&mut proxy_a, &mut proxy_b, &Counter::default()).await });
        app.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        // Current-thread runtime: the relay ran on this thread and, idle
        // again, returned both buffers it borrowed to this thread's pool.
        tokio::task::yield_now().await;
        let pooled = POOL.with(|p| p.borrow().len());
        assert!(pooled >= 1, "buffers are returned when idle ({pooled} pooled)");
        drop((app, server));
        let _ = relay.await;
    }
}
