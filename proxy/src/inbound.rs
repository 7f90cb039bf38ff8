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

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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
use crate::net::captured_dst;

/// The ALPN protocol proxies speak to each other.
pub const ALPN: &[u8] = b"mizzen";
/// The source address of connections to the app.
pub const APP_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 source address of connections to the app.
pub const APP_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

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

/// Connects to the app at `dst` from 127.0.0.6 (IPv4) or ::6 (IPv6), the
/// sources the capture rules never redirect. `::6` is not configured on
/// loopback, so it is bound with IP_FREEBIND.
async fn connect_app(dst: SocketAddr) -> std::io::Result<TcpStream> {
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
    tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
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
            if let Err(reason) = handle(accepted, config, trust_domain, mode, &metrics).await {
                metrics.refused(Direction::Inbound, reason.0);
                debug!(conn = n, %peer, reason = reason.0, detail = %reason.1, "inbound connection refused");
            }
        });
    }
}

struct Refused(&'static str, String);

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
) -> Result<(), Refused> {
    let Accepted {
        conn,
        peer,
        place,
        detect_timeout,
    } = accepted;
    let _ = conn.set_nodelay(true);
    let dst = captured_dst(&conn).map_err(|e| Refused(e.reason(), e.to_string()))?;
    let (protocol, conn) = detect(conn, place, detect_timeout)
        .await
        .map_err(|e| Refused(e.reason(), e.to_string()))?;
    if protocol == Protocol::MeshTls {
        let config = config
            .ok_or_else(|| Refused("no_certificate_yet", String::new()))?
            .map_err(|e| Refused("tls_config", e))?;
        let mut tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsAcceptor::from(config).accept(conn),
        )
        .await
        .map_err(|_| Refused("handshake_timeout", String::new()))?
        .map_err(|e| {
            metrics.handshake_failure(Direction::Inbound, handshake_reason(&e));
            Refused("handshake", e.to_string())
        })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN) {
            return Err(Refused("alpn", "peer did not negotiate ALPN mizzen".into()));
        }
        // Authorization runs only after the handshake verified the chain.
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| Refused("no_client_cert", String::new()))?;
        let peer_id: SpiffeId = spiffe_id_of(leaf).map_err(|e| Refused("peer_identity", e))?;
        // Only identities of our own trust domain: two clusters sharing a
        // root are still two identity spaces.
        if trust_domain.as_ref().map(TrustDomain::as_str) != Some(peer_id.trust_domain_name()) {
            return Err(Refused(
                "foreign_trust_domain",
                format!("{peer_id} is outside trust domain {trust_domain:?}"),
            ));
        }
        info!(%peer, peer_id = %peer_id, %dst, "inbound mTLS connection");
        let bytes = metrics.connection(Direction::Inbound, "mtls", peer_id.to_string());
        let mut app = connect_app(dst)
            .await
            .map_err(|e| Refused("app_unreachable", e.to_string()))?;
        let _ = crate::relay::relay(&mut tls, &mut app, &bytes).await;
        Ok(())
    } else {
        if mode == MtlsMode::Strict {
            return Err(Refused("plaintext_in_strict", String::new()));
        }
        info!(%peer, %dst, "inbound plaintext connection (passed through)");
        let bytes = metrics.connection(Direction::Inbound, "plaintext", String::new());
        let mut conn = conn;
        let mut app = connect_app(dst)
            .await
            .map_err(|e| Refused("app_unreachable", e.to_string()))?;
        let _ = crate::relay::relay(&mut conn, &mut app, &bytes).await;
        Ok(())
    }
}
