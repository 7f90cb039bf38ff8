//! The inbound listener (15006): terminates mutual TLS from peer proxies,
//! learns the peer's SPIFFE ID, and forwards to the app.
//!
//! The ClientHello is read without consuming it: one offering ALPN `mizzen`
//! comes from a peer proxy and is terminated with TLS 1.3 only and a client
//! certificate that must chain to the trust bundle and carry exactly one
//! SPIFFE ID. Anything else (plaintext, or the app's own TLS) is passed
//! through untouched in PERMISSIVE mode and refused in STRICT. The app
//! is reached at the connection's original destination (the pod's own IP
//! and port, from SO_ORIGINAL_DST) from source 127.0.0.6 (::6 on IPv6), which the capture
//! rules never redirect again; an app listening only on localhost is
//! therefore not exposed through the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mizzen_api::{SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::detect::{Place, Protocol, Undecided, detect};
use crate::identity::{TlsMaterial, spiffe_id_of};
use crate::metrics::{Direction, ProxyMetrics, handshake_reason};
use crate::net::{captured_dst, connect_app};

/// The ALPN protocol proxies speak to each other.
pub const ALPN: &[u8] = b"mizzen";
/// Whether plaintext is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MtlsMode {
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

/// The server configuration for `m`: TLS 1.3, ALPN mizzen, client
/// certificates required and verified against the trust bundle.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots.clone()), provider.clone())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| format!("our certificate: {e}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // A session resumed after the trust bundle changed would skip validation.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The server configuration for the current certificate, or why it
/// could not be built.
type ServerTls = Result<Arc<rustls::ServerConfig>, String>;

/// How new connections are sorted before anything else happens to them.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The connections being sorted, bounded.
    pub undecided: Arc<Undecided>,
    /// How long a client has to make clear what it speaks.
    pub timeout: Duration,
}

/// Serves inbound connections until the process ends.
pub async fn serve(
    listener: TcpListener,
    material: watch::Receiver<Option<Arc<TlsMaterial>>>,
    mode: MtlsMode,
    metrics: ProxyMetrics,
    connections: crate::drain::Connections,
    detection: Detection,
) {
    let ids = AtomicU64::new(0);
    // Built once per certificate (rotation), not per connection.
    let mut cached: Option<(Arc<TlsMaterial>, ServerTls)> = None;
    loop {
        let (conn, peer, guard) = connections.accept(&listener).await;
        // Taken at once, so a flood of undecided connections is bounded
        // before their tasks even run.
        let place = detection.undecided.enter();
        let current = material.borrow().clone();
        let trust_domain = current.as_ref().map(|m| m.id.trust_domain());
        let config = current.map(|m| match &cached {
            Some((built_for, config)) if Arc::ptr_eq(built_for, &m) => config.clone(),
            _ => {
                let config = server_config(&m);
                cached = Some((m, config.clone()));
                config
            }
        });
        let metrics = metrics.clone();
        let n = ids.fetch_add(1, Ordering::Relaxed);
        let open = metrics.open(Direction::Inbound);
        let timeout = detection.timeout;
        tokio::spawn(async move {
            let (_guard, _open) = (guard, open);
            let accepted = Accepted {
                conn,
                peer,
                place,
                detect_timeout: timeout,
            };
            if let Err(e) = handle(accepted, config, trust_domain, mode, &metrics).await {
                metrics.refused(Direction::Inbound, e.reason());
                debug!(conn = n, %peer, reason = e.reason(), error = %e, "inbound connection refused");
            }
        });
    }
}

/// Why an inbound connection was refused. [`InboundError::reason`] is the
/// `reason` label of `mizzen_proxy_refused_total`; the peer sees the
/// connection closed (before TLS completes, or after it without app data).
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error(transparent)]
    Destination(#[from] crate::net::DestinationError),
    #[error(transparent)]
    Detect(#[from] crate::detect::DetectError),
    #[error("a peer proxy connected before this proxy had a certificate")]
    NoCertificateYet,
    #[error("cannot build the TLS configuration: {0}")]
    TlsConfig(String),
    #[error("the TLS handshake did not finish in time")]
    HandshakeTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the peer did not negotiate ALPN mizzen")]
    Alpn,
    #[error("the peer sent no client certificate")]
    NoClientCert,
    #[error("the peer's certificate carries no usable SPIFFE ID: {0}")]
    PeerIdentity(String),
    #[error("{peer} is outside trust domain {ours:?}")]
    ForeignTrustDomain { peer: SpiffeId, ours: Option<TrustDomain> },
    #[error("plaintext refused: this pod requires mutual TLS (STRICT)")]
    PlaintextInStrict,
    #[error("cannot reach the app: {0}")]
    AppUnreachable(std::io::Error),
}

impl InboundError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            InboundError::Destination(e) => e.reason(),
            InboundError::Detect(e) => e.reason(),
            InboundError::NoCertificateYet => "no_certificate_yet",
            InboundError::TlsConfig(_) => "tls_config",
            InboundError::HandshakeTimeout => "handshake_timeout",
            InboundError::Handshake(_) => "handshake",
            InboundError::Alpn => "alpn",
            InboundError::NoClientCert => "no_client_cert",
            InboundError::PeerIdentity(_) => "peer_identity",
            InboundError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            InboundError::PlaintextInStrict => "plaintext_in_strict",
            InboundError::AppUnreachable(_) => "app_unreachable",
        }
    }
}

/// A new connection and its place among those being sorted.
struct Accepted {
    conn: TcpStream,
    peer: SocketAddr,
    place: Place,
    detect_timeout: Duration,
}

async fn handle(
    accepted: Accepted,
    config: Option<ServerTls>,
    trust_domain: Option<TrustDomain>,
    mode: MtlsMode,
    metrics: &ProxyMetrics,
) -> Result<(), InboundError> {
    let Accepted {
        conn,
        peer,
        place,
        detect_timeout,
    } = accepted;
    let _ = conn.set_nodelay(true);
    let dst = captured_dst(&conn)?;
    let (protocol, conn) = detect(conn, place, detect_timeout).await?;
    if protocol == Protocol::MeshTls {
        let config = config
            .ok_or(InboundError::NoCertificateYet)?
            .map_err(InboundError::TlsConfig)?;
        let mut tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsAcceptor::from(config).accept(conn),
        )
        .await
        .map_err(|_| InboundError::HandshakeTimeout)?
        .map_err(|e| {
            metrics.handshake_failure(Direction::Inbound, handshake_reason(&e));
            InboundError::Handshake(e)
        })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN) {
            return Err(InboundError::Alpn);
        }
        // Authorization runs only after the handshake verified the chain.
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(InboundError::NoClientCert)?;
        let peer_id: SpiffeId = spiffe_id_of(leaf).map_err(InboundError::PeerIdentity)?;
        // Only identities of our own trust domain: two clusters sharing a
        // root are still two identity spaces.
        if trust_domain.as_ref().map(TrustDomain::as_str) != Some(peer_id.trust_domain_name()) {
            return Err(InboundError::ForeignTrustDomain {
                peer: peer_id,
                ours: trust_domain,
            });
        }
        info!(%peer, peer_id = %peer_id, %dst, "inbound mTLS connection");
        let bytes = metrics.connection(Direction::Inbound, Some(&peer_id));
        let mut app = connect_app(dst).await.map_err(InboundError::AppUnreachable)?;
        metrics.relay_ended(
            Direction::Inbound,
            crate::relay::relay(&mut tls, &mut app, &bytes).await,
        );
        Ok(())
    } else {
        if mode == MtlsMode::Strict {
            return Err(InboundError::PlaintextInStrict);
        }
        info!(%peer, %dst, "inbound plaintext connection (passed through)");
        let bytes = metrics.connection(Direction::Inbound, None);
        let mut conn = conn;
        let mut app = connect_app(dst).await.map_err(InboundError::AppUnreachable)?;
        metrics.relay_ended(
            Direction::Inbound,
            crate::relay::relay(&mut conn, &mut app, &bytes).await,
        );
        Ok(())
    }
}
