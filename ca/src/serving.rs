//! TLS for the CA's gRPC port, with a serving certificate issued by the CA
//! itself (so clients verify it against the mesh root) and renewed in place.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mizzen_api::tls::{ReloadingResolver, certified_key};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::authority::Authority;

/// What the serving certificate names.
#[derive(Debug, Clone)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub ttl: Duration,
}

/// The CA's serving certificate, issued by the CA itself.
#[derive(Debug, Clone)]
pub struct Resolver(Arc<ReloadingResolver>);

fn issue(authority: &Authority, names: &ServingNames) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let (chain, key, _) = authority.serving_cert(&names.dns, &names.ips, names.ttl)?;
    Ok(certified_key(&chain.concat(), &key)?)
}

impl Resolver {
    /// Issues the first serving certificate.
    pub fn new(authority: &Authority, names: &ServingNames) -> anyhow::Result<Self> {
        Ok(Self(ReloadingResolver::new(issue(authority, names)?)))
    }

    /// Re-issues the serving certificate at half its lifetime, forever.
    pub async fn renew_forever(self, authority: Arc<Authority>, names: ServingNames) {
        loop {
            tokio::time::sleep(names.ttl / 2).await;
            match issue(&authority, &names) {
                Ok(ck) => {
                    self.0.set(ck);
                    info!("renewed the CA's serving certificate");
                }
                Err(e) => warn!(error = %e, "cannot renew the CA's serving certificate"),
            }
        }
    }
}

/// A TLS server configuration for gRPC (TLS 1.2+, ALPN h2).
pub fn server_config(resolver: &Resolver) -> anyhow::Result<rustls::ServerConfig> {
    Ok(mizzen_api::tls::server_config(resolver.0.clone(), &[b"h2"])?)
}

/// An accepted TLS connection, as tonic wants it.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    /// Its place among the open connections, freed when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.inner.get_ref().0.local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How many connections the CA holds, and for how long before TLS.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections, handshakes included; more are closed at once.
    pub max: usize,
    /// A handshake that fails or takes longer is dropped.
    pub handshake_timeout: Duration,
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop,
/// yielding finished connections, at most `limits.max` at a time
/// (`refused` counts those closed for want of room).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl futures::Stream<Item = Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Small request/response exchanges: without this, delayed ACKs
            // and Nagle's algorithm add ~40 ms to every call.
            let _ = tcp.set_nodelay(true);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.inc();
                debug!(%peer, "too many connections: closing this one");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx
                            .send(TlsConn {
                                inner,
                                peer,
                                _slot: slot,
                            })
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}
