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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mizzen_api::SpiffeId;
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::discovery::{Backend, Destination, Routes};
use crate::identity::{TlsMaterial, spiffe_id_of};
use crate::inbound::ALPN;
use crate::metrics::{Direction, ProxyMetrics, handshake_reason};
use crate::net::captured_dst;

/// How long an endpoint that failed a connection is skipped.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// Endpoints tried per connection to a Service.
const ATTEMPTS: usize = 3;

/// Per-endpoint load and health, shared by all connections.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Open connections; each [`Load`] holds a reference.
    open: Arc<AtomicUsize>,
    failed_until: Option<Instant>,
}

/// Counts one open connection to an endpoint until dropped.
#[derive(Debug)]
pub struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            // Forget idle endpoints, which discovery may long have dropped.
            let now = Instant::now();
            map.retain(|_, e| Arc::strong_count(&e.open) > 1 || e.failed_until.is_some_and(|t| now < t));
        }
        map
    }

    /// Picks among `backends` not in `tried`: two at random, the one with
    /// fewer open connections; endpoints that failed recently only when
    /// nothing else is left.
    pub fn pick<'a>(&self, backends: &'a [Backend], tried: &[SocketAddr]) -> Option<&'a Backend> {
        let now = Instant::now();
        let map = self.entries();
        let failed = |b: &Backend| map.get(&b.addr).and_then(|e| e.failed_until).is_some_and(|t| now < t);
        let open = |b: &Backend| map.get(&b.addr).map_or(0, |e| e.open.load(Ordering::Relaxed));
        let left: Vec<&Backend> = backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
        let healthy: Vec<&Backend> = left.iter().copied().filter(|b| !failed(b)).collect();
        let pool = if healthy.is_empty() { left } else { healthy };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                Some(if open(pool[b]) < open(pool[a]) {
                    pool[b]
                } else {
                    pool[a]
                })
            }
        }
    }

    /// Counts a connection to `addr` as open.
    pub fn load(&self, addr: SocketAddr) -> Load {
        let open = self.entries().entry(addr).or_default().open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        Load(open)
    }

    /// Skips `addr` for a while.
    pub fn mark_failed(&self, addr: SocketAddr) {
        self.entries().entry(addr).or_default().failed_until = Some(Instant::now() + FAILURE_HOLD);
    }

    /// Open connections to `addr` (for tests and metrics).
    pub fn open(&self, addr: SocketAddr) -> usize {
        self.entries().get(&addr).map_or(0, |e| e.open.load(Ordering::Relaxed))
    }
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
struct ClientBase {
    material: Arc<TlsMaterial>,
    key: Arc<CertifiedKey>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientBase {
    fn new(material: Arc<TlsMaterial>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing = provider
            .key_provider
            .load_private_key(material.key.clone_key())
            .map_err(|e| format!("our key: {e}"))?;
        Ok(Self {
            key: Arc::new(CertifiedKey::new(material.chain.clone(), signing)),
            roots: Arc::new(material.roots.clone()),
            material,
            provider,
        })
    }

    /// TLS 1.3 only, ALPN `mizzen`, our SVID, the server must be `expected`.
    fn config(&self, expected: SpiffeId) -> Result<Arc<rustls::ClientConfig>, String> {
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut c = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(OurCert(self.key.clone())));
        c.alpn_protocols = vec![ALPN.to_vec()];
        c.enable_sni = false;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }
}

/// The outbound side's shared state.
#[derive(Debug)]
pub struct Outbound {
    /// `None` until the first discovery response.
    pub routes: watch::Receiver<Option<Arc<Routes>>>,
    pub material: watch::Receiver<Option<Arc<TlsMaterial>>>,
    pub balancer: Balancer,
    pub metrics: ProxyMetrics,
    pub connect_timeout: Duration,
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
    TlsConfig(String),
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
    #[error("{addr} did not negotiate ALPN mizzen")]
    Alpn { addr: SocketAddr },
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
        }
    }
}

enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Outbound {
    pub fn new(
        routes: watch::Receiver<Option<Arc<Routes>>>,
        material: watch::Receiver<Option<Arc<TlsMaterial>>>,
        metrics: ProxyMetrics,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            routes,
            material,
            balancer: Balancer::default(),
            metrics,
            connect_timeout,
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
        let b = Arc::new(ClientBase::new(material).map_err(OutboundError::TlsConfig)?);
        *cached = Some(b.clone());
        Ok(b)
    }

    async fn connect(&self, b: &Backend) -> Result<(Upstream, Option<SpiffeId>), OutboundError> {
        // Refuse before connecting when the destination cannot be verified.
        let expected = match &b.identity {
            None => None,
            Some(Ok(id)) => Some(id.clone()),
            Some(Err(e)) => {
                return Err(OutboundError::BadIdentity {
                    addr: b.addr,
                    reason: e.clone(),
                });
            }
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(b.addr))
            .await
            .map_err(|_| OutboundError::ConnectTimeout {
                addr: b.addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| OutboundError::Connect { addr: b.addr, source })?;
        let _ = tcp.set_nodelay(true);
        let Some(expected) = expected else {
            return Ok((Upstream::Plain(tcp), None));
        };
        let base = self.base()?;
        // Only identities of our own trust domain: two clusters sharing a
        // root are still two identity spaces.
        if expected.trust_domain_name() != base.material.id.trust_domain_name() {
            return Err(OutboundError::ForeignTrustDomain {
                addr: b.addr,
                expected,
                ours: base.material.id.trust_domain_name().to_owned(),
            });
        }
        let config = base.config(expected.clone()).map_err(OutboundError::TlsConfig)?;
        let name = ServerName::IpAddress(b.addr.ip().into());
        let tls = tokio::time::timeout(
            self.connect_timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| OutboundError::HandshakeTimeout { addr: b.addr })?
        .map_err(|source| {
            let reason = handshake_reason(&source);
            self.metrics.handshake_failure(Direction::Outbound, reason);
            OutboundError::Handshake {
                addr: b.addr,
                reason,
                source,
            }
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(OutboundError::Alpn { addr: b.addr });
        }
        Ok((Upstream::Tls(Box::new(tls)), Some(expected)))
    }

    async fn handle(&self, mut conn: TcpStream, peer: SocketAddr) -> Result<(), OutboundError> {
        let _ = conn.set_nodelay(true);
        let dst = captured_dst(&conn)?;
        // Before the first discovery response nothing is known to be
        // outside the mesh: wait for it rather than guess plaintext.
        let mut routes = self.routes.clone();
        let destination = match tokio::time::timeout(self.connect_timeout, routes.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => r.as_ref().map(|r| r.resolve(dst)),
            _ => None,
        }
        .ok_or(OutboundError::NoRoutesYet)?;
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
        let (conn, peer, guard) = connections.accept(&listener).await;
        let open = outbound.metrics.open(Direction::Outbound);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let (_guard, _open) = (guard, open);
            if let Err(e) = outbound.handle(conn, peer).await {
                outbound.metrics.refused(Direction::Outbound, e.reason());
                info!(%peer, reason = e.reason(), error = %e, "outbound connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                identity: None,
                pod: String::new(),
            })
            .collect()
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let b = Balancer::default();
        let all = backends(2);
        // Endpoint 0 is busy: with two endpoints both are always compared.
        let _busy: Vec<Load> = (0..5).map(|_| b.load(all[0].addr)).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(&all, &[]).expect("pick").addr, all[1].addr);
        }
        assert_eq!(b.open(all[0].addr), 5);
    }

    #[test]
    fn load_spreads_and_failed_endpoints_are_skipped() {
        let b = Balancer::default();
        let all = backends(4);
        let mut loads = Vec::new();
        for _ in 0..400 {
            let p = b.pick(&all, &[]).expect("pick");
            loads.push(b.load(p.addr));
        }
        for e in &all {
            let n = b.open(e.addr);
            assert!((60..=140).contains(&n), "{} got {n} of 400", e.addr);
        }
        drop(loads);
        b.mark_failed(all[2].addr);
        for _ in 0..100 {
            assert_ne!(b.pick(&all, &[]).expect("pick").addr, all[2].addr);
        }
        // Tried endpoints are excluded; a failed one is used when nothing else is left.
        let tried: Vec<SocketAddr> = [0, 1, 3].iter().map(|&i| all[i].addr).collect();
        assert_eq!(b.pick(&all, &tried).expect("last resort").addr, all[2].addr);
        let every: Vec<SocketAddr> = all.iter().map(|e| e.addr).collect();
        assert!(b.pick(&all, &every).is_none());
        let load = b.load(all[0].addr);
        drop(load);
        assert_eq!(b.open(all[0].addr), 0, "load released on drop");
    }
}
