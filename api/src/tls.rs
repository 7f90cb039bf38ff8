//! A TLS serving certificate that can be replaced while serving: new
//! handshakes use the new certificate, open connections keep theirs. Used by
//! the CA and the injector for their self-issued serving certificates.

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("serving certificate PEM: {0}")]
    Certificate(String),
    #[error("serving key PEM: {0}")]
    Key(String),
    #[error("unsupported serving key: {0}")]
    KeyType(String),
    #[error("TLS settings: {0}")]
    Config(String),
}

/// Parses a PEM chain and PKCS#8/SEC1/PKCS#1 key into a rustls key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Key(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::KeyType(e.to_string()))?;
    Ok(CertifiedKey::new(certs, signer))
}

/// Serves whatever certificate was last [`set`](ReloadingResolver::set).
#[derive(Debug)]
pub struct ReloadingResolver(RwLock<Arc<CertifiedKey>>);

impl ReloadingResolver {
    pub fn new(first: CertifiedKey) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(first))))
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, ck: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A server configuration (TLS 1.2+, ring) presenting `resolver`'s
/// certificate and offering `alpn` protocols.
pub fn server_config(resolver: Arc<ReloadingResolver>, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
