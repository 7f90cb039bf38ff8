//! TLS for the CA's gRPC port, with a serving certificate issued by the CA
//! itself (so clients verify it against the mesh root) and renewed in place.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::authority::Authority;

/// Serves the current certificate; [`Resolver::set`] swaps it for new handshakes.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn certified_key(chain: &[String], key_pem: &str) -> anyhow::Result<CertifiedKey> {
    let certs = chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("parse serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parse serving key")?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).context("serving key type")?;
    Ok(CertifiedKey::new(certs, signer))
}

/// What the serving certificate names.
#[derive(Debug, Clone)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub ttl: Duration,
}

impl Resolver {
    /// Issues the first serving certificate.
    pub fn new(authority: &Authority, names: &ServingNames) -> anyhow::Result<Arc<Self>> {
        let (chain, key, _) = authority.serving_cert(&names.dns, &names.ips, names.ttl)?;
        Ok(Arc::new(Self(RwLock::new(Arc::new(certified_key(&chain, &key)?)))))
    }

    fn set(&self, ck: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
    }

    /// Re-issues the serving certificate at half its lifetime, forever.
    pub async fn renew_forever(self: Arc<Self>, authority: Arc<Authority>, names: ServingNames) {
        loop {
            tokio::time::sleep(names.ttl / 2).await;
            match authority
                .serving_cert(&names.dns, &names.ips, names.ttl)
                .map_err(anyhow::Error::from)
                .and_then(|(chain, key, _)| certified_key(&chain, &key))
            {
                Ok(ck) => {
                    self.set(ck);
                    info!("renewed the CA's serving certificate");
                }
                Err(e) => warn!(error = %e, "cannot renew the CA's serving certificate"),
            }
        }
    }
}

/// A TLS server configuration for gRPC (TLS 1.2+, ALPN h2).
pub fn server_config(resolver: Arc<Resolver>) -> anyhow::Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// An accepted TLS connection, as tonic wants it.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
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

/// Accepts TCP connections and completes TLS handshakes off the accept loop,
/// yielding finished connections. A handshake that fails or takes longer
/// than 10 s is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
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
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx.send(TlsConn { inner, peer }).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}
