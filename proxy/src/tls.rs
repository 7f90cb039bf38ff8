//! The TLS configurations proxies use between each other, and the SPIFFE
//! verification behind them.
//!
//! Both sides speak TLS 1.3 only, present their SVID, and agree on one of
//! two ALPN values that say what the connection carries:
//! - [`ALPN_TCP`] (`mizzen`): one app connection's bytes, relayed as they
//!   are;
//! - [`ALPN_HTTP`] (`mizzen-h2`): HTTP/2 between the proxies, each stream one
//!   request of any app connection (HTTP/1.1 or HTTP/2), so that one
//!   connection per endpoint carries every request to it.
//!
//! The server verifies the client against the trust bundle (its identity
//! is then a matter for authorization); the client also requires the
//! server's single URI SAN to be exactly the identity discovery gives for
//! the endpoint (secure naming). No session is ever resumed: a resumption
//! after the trust bundle changed would skip validation.

use std::sync::Arc;

use mizzen_api::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tracing::warn;

use crate::identity::{TlsMaterial, spiffe_id_of};

/// ALPN of a connection relaying one app connection's bytes.
pub const ALPN_TCP: &[u8] = b"mizzen";
/// ALPN of a pooled HTTP/2 connection carrying the app's requests.
pub const ALPN_HTTP: &[u8] = b"mizzen-h2";

/// Whether a ClientHello's ALPN offer is a peer proxy's.
pub fn is_mesh_alpn(p: &[u8]) -> bool {
    p == ALPN_TCP || p == ALPN_HTTP
}

/// Why a TLS configuration could not be built from the certificate held.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("our private key: {0}")]
    Key(rustls::Error),
    #[error("our certificate: {0}")]
    Certificate(rustls::Error),
    #[error("TLS 1.3 with this provider: {0}")]
    Versions(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration for `m`: TLS 1.3, both mesh ALPN values,
/// client certificates required and verified against the trust bundle.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots.clone()), provider.clone())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(TlsError::Certificate)?;
    config.alpn_protocols = vec![ALPN_TCP.to_vec(), ALPN_HTTP.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Verifies a peer proxy's certificate: chains to the trust bundle, and its
/// single URI SAN is exactly the SPIFFE ID expected for the endpoint. DNS
/// names play no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id =
            spiffe_id_of(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if id != self.expected {
            warn!(expected = %self.expected, presented = %id, "peer proxy presented the wrong identity");
            return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct OurCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OurCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What client configurations are built from, derived once per certificate.
#[derive(Debug)]
pub struct ClientBase {
    pub material: Arc<TlsMaterial>,
    key: Arc<CertifiedKey>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientBase {
    pub fn new(material: Arc<TlsMaterial>) -> Result<Self, TlsError> {
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(material.key.clone_key())
            .map_err(TlsError::Key)?;
        Ok(Self {
            key: Arc::new(CertifiedKey::new(material.chain.clone(), signing)),
            roots: Arc::new(material.roots.clone()),
            material,
            provider,
        })
    }

    /// TLS 1.3 only, ALPN `alpn`, our SVID; the server must be `expected`.
    pub fn config(&self, expected: SpiffeId, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut c = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(OurCert(self.key.clone())));
        c.alpn_protocols = vec![alpn.to_vec()];
        c.enable_sni = false;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }
}
