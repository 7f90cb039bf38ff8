//! The inbound listener (15006): terminates mutual TLS from peer proxies,
//! learns the peer's SPIFFE ID, and forwards to the app.
//!
//! The ClientHello is read without consuming it: one offering a mesh ALPN
//! comes from a peer proxy and is terminated with TLS 1.3 only and a client
//! certificate that must chain to the trust bundle and carry exactly one
//! SPIFFE ID. ALPN `mizzen` then carries one connection's bytes, relayed
//! to the app; `mizzen-h2` carries requests ([`crate::http::inbound`]).
//! Anything else is plaintext, refused on a port whose peer authentication
//! is STRICT; otherwise plaintext HTTP is served per request (a forged
//! `x-forwarded-client-cert` is dropped) and everything else (other
//! protocols, the app's own TLS) passed through untouched.
//!
//! Authorization ([`crate::policy`]) decides every connection on a TCP
//! port once the peer is known (after the handshake), and every request on
//! an HTTP connection. Before the agent sent this pod's first policy,
//! every connection is refused (fail closed). The app
//! is reached at the connection's original destination (the pod's own IP
//! and port, from SO_ORIGINAL_DST) from source 127.0.0.6 (::6 on IPv6), which the capture
//! rules never redirect again; an app listening only on localhost is
//! therefore not exposed through the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mizzen_api::{SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::detect::{Place, Protocol, Undecided, detect};
use crate::drain::ConnGuard;
use crate::identity::{TlsMaterial, spiffe_id_of};
use crate::metrics::{Direction, ProxyMetrics, handshake_reason};
use crate::net::{Rewind, captured_dst, connect_app};
use crate::tls::{ALPN_HTTP, ALPN_TCP, TlsError, server_config};

/// The server configuration for the current certificate, or why it
/// could not be built.
type ServerTls = Result<Arc<rustls::ServerConfig>, Arc<TlsError>>;

/// How new connections are sorted before anything else happens to them.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The connections being sorted, bounded.
    pub undecided: Arc<Undecided>,
}

/// The inbound side's shared state.
#[derive(Debug)]
pub struct Inbound {
    pub material: watch::Receiver<Option<Arc<TlsMaterial>>>,
    /// This pod's authorization and peer authentication.
    pub policy: crate::policy::PolicyRx,
    pub metrics: ProxyMetrics,
    pub detection: Detection,
    pub timeouts: crate::config::Timeouts,
    /// Connections to the app for the HTTP path.
    pub app: crate::http::inbound::AppClients,
    /// Whether each HTTP request gets an access log line.
    pub access_log: bool,
    /// Spans of HTTP requests, when exported.
    pub tracing: Option<Arc<crate::http::trace::Tracing>>,
    /// Discovery, for the Service a request was for (request metrics).
    pub routes: watch::Receiver<Option<Arc<crate::discovery::Routes>>>,
}

/// Serves inbound connections until the process ends.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, connections: crate::drain::Connections) {
    let ids = AtomicU64::new(0);
    // Built once per certificate (rotation), not per connection.
    let mut cached: Option<(Arc<TlsMaterial>, ServerTls)> = None;
    loop {
        let (conn, peer, guard) = connections.accept(&listener, Direction::Inbound).await;
        // Taken at once, so a flood of undecided connections is bounded
        // before their tasks even run.
        let place = inbound.detection.undecided.enter();
        let current = inbound.material.borrow().clone();
        let tls = current.map(|m| match &cached {
            Some((built_for, config)) if Arc::ptr_eq(built_for, &m) => (m, config.clone()),
            _ => {
                let config = server_config(&m).map_err(Arc::new);
                cached = Some((m.clone(), config.clone()));
                (m, config)
            }
        });
        let n = ids.fetch_add(1, Ordering::Relaxed);
        let open = inbound.metrics.open(Direction::Inbound);
        let inbound = inbound.clone();
        tokio::spawn(async move {
            let _open = open;
            let closed = guard.closed();
            let accepted = Accepted {
                conn,
                peer,
                place,
                guard: &guard,
            };
            tokio::select! {
                r = inbound.handle(accepted, tls) => if let Err(e) = r {
                    inbound.metrics.refused(Direction::Inbound, e.reason());
                    debug!(conn = n, %peer, reason = e.reason(), error = %e, "inbound connection refused");
                },
                () = closed => debug!(conn = n, %peer, "inbound connection closed by the proxy"),
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
    TlsConfig(Arc<TlsError>),
    #[error("the TLS handshake did not finish in time")]
    HandshakeTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the peer negotiated no mesh ALPN")]
    Alpn,
    #[error("the peer sent no client certificate")]
    NoClientCert,
    #[error("the peer's certificate carries no usable SPIFFE ID: {0}")]
    PeerIdentity(String),
    #[error("{peer} is outside trust domain {ours:?}")]
    ForeignTrustDomain { peer: SpiffeId, ours: Option<TrustDomain> },
    #[error("plaintext refused: this port requires mutual TLS (STRICT)")]
    PlaintextInStrict,
    #[error("no workload policy from the agent yet (fail closed)")]
    NoPolicyYet,
    #[error("denied by authorization policy {}", policy.as_deref().unwrap_or("(no ALLOW policy matched)"))]
    Denied { policy: Option<String> },
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
            InboundError::NoPolicyYet => "no_policy_yet",
            InboundError::Denied { .. } => "denied_by_policy",
            InboundError::AppUnreachable(_) => "app_unreachable",
        }
    }
}

/// A new connection and its place among those being sorted.
struct Accepted<'g> {
    conn: TcpStream,
    peer: SocketAddr,
    place: Place,
    guard: &'g ConnGuard,
}

impl Inbound {
    /// The policy in force (it may have gone since the connection came).
    fn current_policy(&self) -> Result<Arc<crate::policy::Policy>, InboundError> {
        self.policy.borrow().clone().ok_or(InboundError::NoPolicyYet)
    }

    /// Decides a connection on a TCP port.
    fn authorize_tcp(&self, peer: SocketAddr, dst: SocketAddr, id: Option<&SpiffeId>) -> Result<(), InboundError> {
        let policy = self.current_policy()?;
        if !policy.authorizes() {
            return Ok(());
        }
        match self.metrics.authz.decide(&policy, (peer, dst), id, None) {
            mizzen_api::authz::Decision::Deny { policy, .. } => Err(InboundError::Denied { policy }),
            mizzen_api::authz::Decision::Allow { .. } => Ok(()),
        }
    }

    async fn handle(
        self: &Arc<Self>,
        accepted: Accepted<'_>,
        tls: Option<(Arc<TlsMaterial>, ServerTls)>,
    ) -> Result<(), InboundError> {
        let Accepted {
            conn,
            peer,
            place,
            guard,
        } = accepted;
        let _ = conn.set_nodelay(true);
        let dst = captured_dst(&conn)?;
        guard.destined(dst);
        self.current_policy()?;
        let (protocol, conn) = detect(conn, place, self.timeouts.detect).await?;
        if protocol == Protocol::MeshTls {
            let (material, config) = tls.ok_or(InboundError::NoCertificateYet)?;
            let config = config.map_err(InboundError::TlsConfig)?;
            return self.mesh(conn, peer, dst, (&material, config), guard).await;
        }
        if !self.current_policy()?.accepts_plaintext(dst.port()) {
            return Err(InboundError::PlaintextInStrict);
        }
        // Plaintext from outside the mesh: HTTP is served (so that no
        // header claiming a mesh identity reaches the app), anything else
        // passed through.
        let (sniffed, conn) = crate::protocol::sniff(conn, self.timeouts.detect)
            .await
            .map_err(|e| InboundError::Detect(e.into()))?;
        if sniffed != crate::protocol::Sniffed::Other {
            debug!(%peer, %dst, "inbound plaintext HTTP connection");
            let at = crate::http::inbound::Endpoints { peer, dst };
            crate::http::inbound::serve(self, conn, at, None, guard).await;
            return Ok(());
        }
        self.authorize_tcp(peer, dst, None)?;
        info!(%peer, %dst, "inbound plaintext connection (passed through)");
        let bytes = self.metrics.connection(Direction::Inbound, None);
        let mut conn = conn;
        let mut app = connect_app(dst, self.timeouts.app_connect)
            .await
            .map_err(InboundError::AppUnreachable)?;
        self.metrics.relay_ended(
            Direction::Inbound,
            crate::relay::relay(&mut conn, &mut app, &bytes).await,
        );
        Ok(())
    }

    /// A peer proxy's connection: mutual TLS, then its bytes or its
    /// requests to the app.
    async fn mesh(
        self: &Arc<Self>,
        conn: Rewind<TcpStream>,
        peer: SocketAddr,
        dst: SocketAddr,
        (material, config): (&TlsMaterial, Arc<rustls::ServerConfig>),
        guard: &ConnGuard,
    ) -> Result<(), InboundError> {
        let mut tls = tokio::time::timeout(
            self.timeouts.handshake,
            tokio_rustls::TlsAcceptor::from(config).accept(conn),
        )
        .await
        .map_err(|_| InboundError::HandshakeTimeout)?
        .map_err(|e| {
            self.metrics.handshake_failure(Direction::Inbound, handshake_reason(&e));
            InboundError::Handshake(e)
        })?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        // Authorization runs only after the handshake verified the chain.
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(InboundError::NoClientCert)?
            .clone();
        let peer_id: SpiffeId = spiffe_id_of(&leaf).map_err(InboundError::PeerIdentity)?;
        // Only identities of our own trust domain: two clusters sharing a
        // root are still two identity spaces.
        let ours = material.id.trust_domain();
        if ours.as_str() != peer_id.trust_domain_name() {
            return Err(InboundError::ForeignTrustDomain {
                peer: peer_id,
                ours: Some(ours),
            });
        }
        guard.identified(&peer_id);
        let bytes = self.metrics.connection(Direction::Inbound, Some(&peer_id));
        match alpn.as_deref() {
            Some(ALPN_HTTP) => {
                debug!(%peer, peer_id = %peer_id, %dst, "inbound mTLS HTTP/2 connection");
                let client = crate::http::inbound::Client::new(peer_id, &leaf, &material.id);
                let at = crate::http::inbound::Endpoints { peer, dst };
                crate::http::inbound::serve(self, tls, at, Some(client), guard).await;
                Ok(())
            }
            Some(ALPN_TCP) => {
                self.authorize_tcp(peer, dst, Some(&peer_id))?;
                info!(%peer, peer_id = %peer_id, %dst, "inbound mTLS connection");
                let mut app = connect_app(dst, self.timeouts.app_connect)
                    .await
                    .map_err(InboundError::AppUnreachable)?;
                self.metrics.relay_ended(
                    Direction::Inbound,
                    crate::relay::relay(&mut tls, &mut app, &bytes).await,
                );
                Ok(())
            }
            _ => Err(InboundError::Alpn),
        }
    }
}
