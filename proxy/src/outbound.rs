//! The outbound listener (15001): the pod's own connections, redirected by
//! the capture rules, leave here for their destination.
//!
//! The original destination (`SO_ORIGINAL_DST`) is resolved in the
//! discovery [`Routes`]: a Service's cluster IP and port is balanced over
//! its ready endpoints (power of two choices on open connections, skipping
//! endpoints that recently failed, up to three attempts); a known pod's IP
//! is used as is; anything else passes through untouched. A meshed
//! endpoint is reached over TLS 1.3 with ALPN `mizzen`, presenting our SVID,
//! and the server must prove the SPIFFE ID discovery gives for that
//! endpoint (secure naming): a server holding any other mesh certificate is
//! refused before a byte of the app's data is sent. Unmeshed endpoints get
//! plaintext. The proxy's own connections are not captured again (UID 1337).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mizzen_api::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::balance::Balancer;
use crate::discovery::{Backend, Destination, Routes};
use crate::drain::ConnGuard;
use crate::identity::TlsMaterial;
use crate::metrics::{Direction, ProxyMetrics, handshake_reason};
use crate::net::captured_dst;
use crate::protocol::{PortProtocol, Sniffed};
use crate::tls::{ALPN_TCP, ClientBase, TlsError};

/// Endpoints tried per connection to a Service.
pub(crate) const ATTEMPTS: usize = 3;

/// The outbound side's shared state.
#[derive(Debug)]
pub struct Outbound {
    /// `None` until the first discovery response.
    pub routes: watch::Receiver<Option<Arc<Routes>>>,
    pub material: watch::Receiver<Option<Arc<TlsMaterial>>>,
    pub balancer: Balancer,
    pub metrics: ProxyMetrics,
    pub timeouts: crate::config::Timeouts,
    /// Connections kept for the HTTP path.
    pub(crate) http: crate::http::outbound::Pools,
    /// Whether each HTTP request gets an access log line.
    pub access_log: bool,
    /// Spans of HTTP requests, when exported.
    pub tracing: Option<Arc<crate::http::trace::Tracing>>,
    /// Services fetched on first use, when the proxy follows only some.
    pub on_demand: Option<Arc<crate::discovery::OnDemand>>,
    /// This pod's workload, told to server proxies with each request.
    pub workload: Option<hyper::header::HeaderValue>,
    /// This pod's labels, for routes' `sourceLabels`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// This pod's address, for consistent hashing by source IP.
    pub instance_ip: Option<std::net::IpAddr>,
    /// Bounds the retries routes make.
    pub(crate) retry_budget: crate::http::route::RetryBudget,
    /// DestinationRules' connection pool limits.
    pub(crate) breakers: crate::breaker::Breakers,
    /// Places for mirrored requests in flight.
    pub(crate) mirrors: Arc<tokio::sync::Semaphore>,
    base: Mutex<Option<Arc<ClientBase>>>,
}

/// Why an outbound connection failed. [`OutboundError::reason`] is the
/// `reason` label of `mizzen_proxy_refused_total`; the app sees its
/// connection closed.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Destination(#[from] crate::net::DestinationError),
    #[error("no discovery data from the agent yet")]
    NoRoutesYet,
    #[error("{0} has no ready endpoints")]
    NoEndpoints(String),
    #[error("no certificate from the agent yet")]
    NoCertificateYet,
    #[error("cannot build the TLS configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("{addr}: the endpoint's identity is not usable: {reason}")]
    BadIdentity { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connect {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} is {expected}, outside trust domain {ours}")]
    ForeignTrustDomain {
        addr: SocketAddr,
        expected: SpiffeId,
        ours: String,
    },
    #[error("TLS handshake with {addr} did not finish in time")]
    HandshakeTimeout { addr: SocketAddr },
    #[error("TLS handshake with {addr} ({reason}): {source}")]
    Handshake {
        addr: SocketAddr,
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("{addr} did not negotiate ALPN {}", String::from_utf8_lossy(alpn))]
    Alpn { addr: SocketAddr, alpn: &'static [u8] },
    #[error("reading the app's first bytes: {0}")]
    Sniff(std::io::Error),
    #[error("HTTP with {addr}: {source}")]
    HttpHandshake {
        addr: SocketAddr,
        source: crate::http::pool::ConnError,
    },
}

impl OutboundError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            OutboundError::Destination(e) => e.reason(),
            OutboundError::NoRoutesYet => "no_routes_yet",
            OutboundError::NoEndpoints(_) => "no_endpoints",
            OutboundError::NoCertificateYet => "no_certificate_yet",
            OutboundError::TlsConfig(_) => "tls_config",
            OutboundError::BadIdentity { .. } => "bad_identity",
            OutboundError::ConnectTimeout { .. } => "connect_timeout",
            OutboundError::Connect { .. } => "connect_error",
            OutboundError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            OutboundError::HandshakeTimeout { .. } => "handshake_timeout",
            OutboundError::Handshake { .. } => "handshake",
            OutboundError::Alpn { .. } => "alpn",
            OutboundError::Sniff(_) => "io",
            OutboundError::HttpHandshake { .. } => "http_handshake",
        }
    }
}

enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The identity `b` must prove, refused before connecting when discovery
/// gave one that cannot be verified.
pub(crate) fn expected_identity(b: &Backend) -> Result<Option<SpiffeId>, OutboundError> {
    match &b.identity {
        None => Ok(None),
        Some(Ok(id)) => Ok(Some(id.clone())),
        Some(Err(e)) => Err(OutboundError::BadIdentity {
            addr: b.addr,
            reason: e.clone(),
        }),
    }
}

impl Outbound {
    pub fn new(
        routes: watch::Receiver<Option<Arc<Routes>>>,
        material: watch::Receiver<Option<Arc<TlsMaterial>>>,
        metrics: ProxyMetrics,
        timeouts: crate::config::Timeouts,
    ) -> Self {
        Self {
            routes,
            material,
            balancer: Balancer::default(),
            metrics,
            timeouts,
            http: Default::default(),
            access_log: false,
            tracing: None,
            on_demand: None,
            workload: None,
            labels: Default::default(),
            instance_ip: None,
            retry_budget: Default::default(),
            breakers: Default::default(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(crate::http::route::MAX_MIRRORS)),
            base: Mutex::new(None),
        }
    }

    /// The client base for the current certificate (rebuilt after rotation).
    fn base(&self) -> Result<Arc<ClientBase>, OutboundError> {
        let material = self.material.borrow().clone().ok_or(OutboundError::NoCertificateYet)?;
        let mut cached = self.base.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = cached.as_ref()
            && Arc::ptr_eq(&b.material, &material)
        {
            return Ok(b.clone());
        }
        let b = Arc::new(ClientBase::new(material)?);
        *cached = Some(b.clone());
        Ok(b)
    }

    /// A TCP connection to `addr`, within the connect timeout.
    pub(crate) async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, OutboundError> {
        let timeout = self.timeouts.connect;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| OutboundError::ConnectTimeout { addr, timeout })?
            .map_err(|source| OutboundError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Mutual TLS with the proxy at `addr`, which must prove `expected`,
    /// negotiating `alpn`.
    pub(crate) async fn mesh_tls(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        expected: SpiffeId,
        alpn: &'static [u8],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, OutboundError> {
        let base = self.base()?;
        // Only identities of our own trust domain: two clusters sharing a
        // root are still two identity spaces.
        if expected.trust_domain_name() != base.material.id.trust_domain_name() {
            return Err(OutboundError::ForeignTrustDomain {
                addr,
                expected,
                ours: base.material.id.trust_domain_name().to_owned(),
            });
        }
        let config = base.config(expected, alpn)?;
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            self.timeouts.connect,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| OutboundError::HandshakeTimeout { addr })?
        .map_err(|source| {
            let reason = handshake_reason(&source);
            self.metrics.handshake_failure(Direction::Outbound, reason);
            OutboundError::Handshake { addr, reason, source }
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(alpn) {
            return Err(OutboundError::Alpn { addr, alpn });
        }
        Ok(tls)
    }

    async fn connect(&self, b: &Backend) -> Result<(Upstream, Option<SpiffeId>), OutboundError> {
        // Refuse before connecting when the destination cannot be verified.
        let expected = expected_identity(b)?;
        let tcp = self.connect_tcp(b.addr).await?;
        let Some(expected) = expected else {
            return Ok((Upstream::Plain(tcp), None));
        };
        let tls = self.mesh_tls(tcp, b.addr, expected.clone(), ALPN_TCP).await?;
        Ok((Upstream::Tls(Box::new(tls)), Some(expected)))
    }

    /// The routes, waiting for the first discovery response (before it
    /// nothing is known to be outside the mesh: better wait than guess
    /// plaintext).
    pub(crate) async fn routes(&self) -> Result<Arc<Routes>, OutboundError> {
        let mut routes = self.routes.clone();
        match tokio::time::timeout(self.timeouts.connect, routes.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => r.clone().ok_or(OutboundError::NoRoutesYet),
            _ => Err(OutboundError::NoRoutesYet),
        }
    }

    async fn handle(
        self: &Arc<Self>,
        conn: TcpStream,
        peer: SocketAddr,
        guard: &ConnGuard,
    ) -> Result<(), OutboundError> {
        let _ = conn.set_nodelay(true);
        let dst = captured_dst(&conn)?;
        let mut routes = self.routes().await?;
        if let Some(od) = &self.on_demand
            && !routes.knows(dst.ip())
        {
            // Not followed: ask the agent, and wait for its answer rather
            // than send plaintext to what may be a meshed Service.
            od.fetch(dst.ip(), self.routes.clone(), self.timeouts.connect).await;
            routes = self.routes().await?;
        }
        let destination = routes.resolve(dst);
        let protocol = match &destination {
            Destination::Service(t) => t.protocol,
            _ => PortProtocol::Tcp,
        };
        match protocol {
            PortProtocol::Tcp => {
                let destination = self.tcp_routed(&routes, destination, dst)?;
                self.relay(conn, peer, dst, destination).await
            }
            PortProtocol::Http => crate::http::outbound::serve(self.clone(), conn, dst, guard).await,
            PortProtocol::Sniff => {
                let (sniffed, conn) = crate::protocol::sniff(conn, self.timeouts.sniff)
                    .await
                    .map_err(OutboundError::Sniff)?;
                match sniffed {
                    Sniffed::Other => {
                        let destination = self.tcp_routed(&routes, destination, dst)?;
                        self.relay(conn, peer, dst, destination).await
                    }
                    Sniffed::Http1 | Sniffed::Http2 => {
                        crate::http::outbound::serve(self.clone(), conn, dst, guard).await
                    }
                }
            }
        }
    }

    /// Where the TCP routes of `destination`'s VirtualService send a
    /// connection that came for `dst`: the first matching route's
    /// destination (by weight), or `destination` itself when no TCP route
    /// matches.
    fn tcp_routed(
        &self,
        routes: &Routes,
        destination: Destination,
        dst: SocketAddr,
    ) -> Result<Destination, OutboundError> {
        let Destination::Service(t) = &destination else {
            return Ok(destination);
        };
        let Some(table) = t.routes.as_deref().filter(|table| !table.tcp.is_empty()) else {
            return Ok(destination);
        };
        let Some(d) = mizzen_api::routing::decide::decide_tcp(table, t.port, &self.labels, rand::random()) else {
            return Ok(destination);
        };
        debug!(service = %t.service, to = %d.service, subset = ?d.subset, "tcp route");
        routes
            .routed_target(d, dst)
            .map(Destination::Service)
            .ok_or_else(|| OutboundError::NoEndpoints(d.service.clone()))
    }

    /// Relays the app's connection as bytes to one endpoint.
    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut conn: S,
        peer: SocketAddr,
        dst: SocketAddr,
        destination: Destination,
    ) -> Result<(), OutboundError> {
        let (backend, upstream, peer_id) = match destination {
            Destination::Passthrough(addr) => {
                let b = Backend {
                    addr,
                    identity: None,
                    pod: String::new(),
                };
                let (u, id) = self.connect(&b).await?;
                (b, u, id)
            }
            Destination::Pod(b) => {
                let (u, id) = self.connect(&b).await?;
                (b, u, id)
            }
            Destination::Service(target) => {
                if target.backends.is_empty() {
                    return Err(OutboundError::NoEndpoints(target.service.to_string()));
                }
                let mut tried = Vec::with_capacity(ATTEMPTS);
                let mut last = OutboundError::NoEndpoints(target.service.to_string());
                let mut found = None;
                while tried.len() < ATTEMPTS {
                    let Some(b) = self.balancer.pick(&target.backends, &tried) else {
                        break;
                    };
                    tried.push(b.addr);
                    match self.connect(b).await {
                        Ok((u, id)) => {
                            found = Some((b.clone(), u, id));
                            break;
                        }
                        Err(e) => {
                            self.balancer.mark_failed(b.addr);
                            debug!(service = %target.service, endpoint = %b.addr, reason = e.reason(), error = %e, "endpoint failed; trying another");
                            last = e;
                        }
                    }
                }
                found.ok_or(last)?
            }
        };
        let _load = self.balancer.load(backend.addr);
        let tls = if peer_id.is_some() { "mtls" } else { "plaintext" };
        debug!(%peer, %dst, endpoint = %backend.addr, pod = %backend.pod, tls, peer_id = ?peer_id, "outbound connection");
        let bytes = self.metrics.connection(Direction::Outbound, peer_id.as_ref());
        let ended = match upstream {
            Upstream::Plain(mut u) => crate::relay::relay(&mut conn, &mut u, &bytes).await,
            Upstream::Tls(mut u) => crate::relay::relay(&mut conn, &mut *u, &bytes).await,
        };
        self.metrics.relay_ended(Direction::Outbound, ended);
        Ok(())
    }
}

/// Serves outbound connections until the process ends.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>, connections: crate::drain::Connections) {
    info!(addr = ?listener.local_addr().ok(), "outbound listening");
    loop {
        let (conn, peer, guard) = connections.accept(&listener, Direction::Outbound).await;
        let open = outbound.metrics.open(Direction::Outbound);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let _open = open;
            let closed = guard.closed();
            tokio::select! {
                r = outbound.handle(conn, peer, &guard) => if let Err(e) = r {
                    outbound.metrics.refused(Direction::Outbound, e.reason());
                    info!(%peer, reason = e.reason(), error = %e, "outbound connection failed");
                },
                () = closed => debug!(%peer, "outbound connection closed by the proxy"),
            }
        });
    }
}
