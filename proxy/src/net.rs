//! Where a captured connection was going.
//!
//! The capture rules redirect a connection to one of the proxy's listeners
//! and the kernel remembers where it was going (`SO_ORIGINAL_DST`). A
//! connection that reaches a listener *without* being redirected (someone
//! dialled `podIP:15006` or `127.0.0.1:15001` directly) has the listener
//! itself as its original destination; forwarding it there would have the
//! proxy connect to itself for ever (one byte to a peer's `:15006` once made
//! a proxy open ~10,000 connections). [`captured_dst`] refuses those.
//!
//! Also here: the proxy's listeners ([`bind_listeners`]) and its
//! connections to the app ([`connect_app`]), from the sources the capture
//! rules never redirect again.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// The source address of connections to the app.
pub const APP_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 source address of connections to the app.
pub const APP_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Connects to the app at `dst` from 127.0.0.6 (IPv4) or ::6 (IPv6), the
/// sources the capture rules never redirect. `::6` is not configured on
/// loopback, so it is bound with IP_FREEBIND. TCP_NODELAY is set: HTTP
/// writes a request's head and body separately, and Nagle's algorithm
/// with the app's delayed ACK would hold the body back for 40 ms.
pub async fn connect_app(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::new(APP_SOURCE.into(), 0))?;
        s
    } else {
        let s = tokio::net::TcpSocket::new_v6()?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpFreebind, &true).map_err(std::io::Error::from)?;
        s.bind(SocketAddr::new(APP_SOURCE_V6.into(), 0))?;
        s
    };
    socket.set_nodelay(true)?;
    tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the app timed out"))?
}

/// Binds `port` on 0.0.0.0 and, when this network namespace has IPv6, on
/// `[::]` (IPv6 only, so each family has its own listener and original
/// destination).
pub fn bind_listeners(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let v4 = tokio::net::TcpSocket::new_v4()?;
    v4.set_reuseaddr(true)?;
    v4.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    let mut out = vec![v4.listen(1024)?];
    let v6 = tokio::net::TcpSocket::new_v6().and_then(|s| {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true).map_err(std::io::Error::from)?;
        s.set_reuseaddr(true)?;
        s.bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
        s.listen(1024)
    });
    match v6 {
        Ok(l) => out.push(l),
        Err(e) => debug!(port, error = %e, "no IPv6 listener (IPv6 is off here)"),
    }
    Ok(out)
}

/// Why a connection has no destination the proxy may forward to.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("no original destination (was the connection captured?): {0}")]
    NoOriginalDst(#[source] std::io::Error),
    #[error("connection made straight to the proxy's own listener {0}; forwarding it would loop")]
    ProxyListener(SocketAddr),
}

impl DestinationError {
    /// The metric label (`reason`) of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            DestinationError::NoOriginalDst(_) => "no_original_dst",
            DestinationError::ProxyListener(_) => "to_proxy_port",
        }
    }
}

/// The connection's destination before the capture rules redirected it
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on IPv6).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    if stream.local_addr()?.is_ipv6() {
        let a = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(std::io::Error::from)?;
        return Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            0,
            a.sin6_scope_id,
        )));
    }
    let a = getsockopt(stream, sockopt::OriginalDst).map_err(std::io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
}

/// The original destination of a connection the capture rules redirected
/// to us; refused when it is the listener it arrived on (not redirected).
pub fn captured_dst(stream: &TcpStream) -> Result<SocketAddr, DestinationError> {
    let dst = original_dst(stream).map_err(DestinationError::NoOriginalDst)?;
    let local = stream.local_addr().map_err(DestinationError::NoOriginalDst)?;
    if is_listener(dst, local) {
        return Err(DestinationError::ProxyListener(dst));
    }
    Ok(dst)
}

/// Whether original destination `dst` is `local`, the listener's own
/// address (scope IDs aside).
fn is_listener(dst: SocketAddr, local: SocketAddr) -> bool {
    dst.ip() == local.ip() && dst.port() == local.port()
}

/// A stream whose first bytes were already read: they are read again
/// first, then the stream itself. Writes go straight to the stream.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, pos: 0, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new(); // give the memory back
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listener_itself_is_a_loop() {
        let pod: SocketAddr = "10.1.0.5:15006".parse().expect("addr");
        // Dialled directly: the destination is the listener.
        assert!(is_listener(pod, pod));
        // Redirected from the app's port: forwarded.
        assert!(!is_listener("10.1.0.5:8080".parse().expect("addr"), pod));
        // The hairpin (the proxy to its own pod IP) arrives on 127.0.0.1.
        assert!(!is_listener(pod, "127.0.0.1:15006".parse().expect("addr")));
        let v6: SocketAddr = "[fd00::5]:15001".parse().expect("addr");
        assert!(is_listener(v6, v6));
    }

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_stream() {
        use tokio::io::AsyncReadExt;
        let rest: &[u8] = b" world";
        let mut r = Rewind::new(b"hello".to_vec(), rest);
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
