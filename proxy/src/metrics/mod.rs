//! The proxy's Prometheus metrics: connections under `mizzen_proxy_`,
//! labelled by direction (`inbound`: peers to this pod's app; `outbound`:
//! this pod's app to others), and requests under Istio's standard names
//! and labels with our prefix (`mizzen_requests_total`,
//! `mizzen_request_duration_milliseconds`), so that dashboards written
//! for Istio need only the prefix changed.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use mizzen_api::SpiffeId;

mod requests;
pub use requests::{RequestFacts, RequestMetrics};

pub type Labels = Vec<(&'static str, String)>;

/// Which way a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Every metric the proxy exports; cheap to clone (shared families).
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    /// Connections by direction, TLS mode (`mtls`, `plaintext`) and peer
    /// SPIFFE ID (the client's inbound, the server's outbound; empty for
    /// plaintext).
    connections: Family<Labels, Counter>,
    /// Connections open now, by direction.
    open: Family<Labels, Gauge>,
    /// Connections refused or failed, by direction and reason.
    refused: Family<Labels, Counter>,
    /// TLS handshakes that failed, by direction and reason.
    handshake_failures: Family<Labels, Counter>,
    /// Bytes carried (both ways), by direction, TLS mode and peer, counted
    /// as they flow.
    bytes: Family<Labels, Counter>,
    /// Certificates received from the agent (the first and each renewal).
    certificate_updates: Counter,
    /// When the certificate in use expires, in Unix seconds.
    certificate_expiry: Gauge,
    /// Changes of the trust bundle after the first one received.
    trust_bundle_changes: Counter,
    /// Services the proxy has routes for.
    discovery_services: Gauge,
    discovery_endpoints: Gauge,
    /// Relayed connections that ended with an I/O error, by direction.
    relay_errors: Family<Labels, Counter>,
    /// Retries of HTTP requests that a route's `retries` made.
    retries: Counter,
    /// Endpoints ejected by a DestinationRule's outlier detection.
    ejections: Counter,
    /// Mirrored requests that were answered (the answers are dropped).
    mirrored: Counter,
    /// HTTP requests.
    requests: RequestMetrics,
    /// Authorization decisions.
    pub authz: crate::policy::AuthzMetrics,
}

impl ProxyMetrics {
    /// The metrics of a proxy serving `workload` in `namespace`.
    pub fn for_workload(workload: String, namespace: String) -> Self {
        Self {
            requests: RequestMetrics::for_workload(workload, namespace),
            ..Self::default()
        }
    }

    /// Registers every metric in a new registry.
    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        self.requests.register(&mut root);
        let r = root.sub_registry_with_prefix("mizzen_proxy");
        self.authz.register(r);
        r.register(
            "connections",
            "Connections by direction, TLS mode and peer identity",
            self.connections.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now, by direction",
            self.open.clone(),
        );
        r.register(
            "refused",
            "Connections refused or failed, by direction and reason",
            self.refused.clone(),
        );
        r.register(
            "handshake_failures",
            "Failed TLS handshakes, by direction and reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "bytes",
            "Bytes carried as they flow, by direction, TLS mode and peer identity",
            self.bytes.clone(),
        );
        r.register(
            "certificate_updates",
            "Certificates received from the node agent (the first and each renewal)",
            self.certificate_updates.clone(),
        );
        r.register(
            "certificate_expiry_seconds",
            "When the certificate in use expires, in Unix seconds",
            self.certificate_expiry.clone(),
        );
        r.register(
            "retries",
            "Retries of HTTP requests made under a VirtualService route's retries (each one a new attempt)",
            self.retries.clone(),
        );
        r.register(
            "mirrored_requests",
            "Copies of requests sent to a VirtualService route's mirror and answered (the answers are dropped)",
            self.mirrored.clone(),
        );
        r.register(
            "outlier_ejections",
            "Endpoints ejected by a DestinationRule's outlier detection",
            self.ejections.clone(),
        );
        r.register(
            "relay_errors",
            "Relayed connections that ended with an I/O error (a reset, a broken TLS stream), by direction",
            self.relay_errors.clone(),
        );
        r.register(
            "discovery_services",
            "Services the proxy has routes for (every Service, or those of its --discovery-namespaces)",
            self.discovery_services.clone(),
        );
        r.register(
            "discovery_endpoints",
            "Endpoint addresses (pod IPs) of those Services the proxy knows",
            self.discovery_endpoints.clone(),
        );
        r.register(
            "trust_bundle_changes",
            "Changes of the trust bundle the agent sent, after the first (CA rotations; anything else is suspect)",
            self.trust_bundle_changes.clone(),
        );
        root
    }

    /// Counts a request, its duration and body sizes.
    pub fn request(&self, f: &RequestFacts, elapsed: std::time::Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.record(f, elapsed, request_bytes, response_bytes);
    }

    /// Counts and logs how a relayed connection ended, if with an error.
    pub fn relay_ended(&self, d: Direction, result: std::io::Result<(u64, u64)>) {
        if let Err(e) = result {
            self.relay_errors
                .get_or_create(&vec![("direction", d.as_str().into())])
                .inc();
            tracing::debug!(direction = d.as_str(), error = %e, "relayed connection ended with an error");
        }
    }

    /// Records a change of the trust bundle.
    pub fn trust_bundle_changed(&self) {
        self.trust_bundle_changes.inc();
    }

    /// Records how many Services and endpoint addresses the proxy has
    /// routes for.
    pub fn discovery(&self, services: usize, endpoints: usize) {
        self.discovery_services.set(i64::try_from(services).unwrap_or(i64::MAX));
        self.discovery_endpoints
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
    }

    /// Records a new certificate for `id` that expires at `not_after`.
    pub fn certificate(&self, id: &SpiffeId, not_after: std::time::SystemTime) {
        self.certificate_updates.inc();
        self.requests.local_principal(id);
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.certificate_expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Counts a mirrored request that was answered.
    pub fn mirrored(&self) {
        self.mirrored.inc();
    }

    /// Counts an endpoint ejected by outlier detection.
    pub fn ejected(&self) {
        self.ejections.inc();
    }

    /// Counts a retry of an HTTP request.
    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn refused(&self, d: Direction, reason: &'static str) {
        self.refused
            .get_or_create(&vec![("direction", d.as_str().into()), ("reason", reason.into())])
            .inc();
    }

    pub fn handshake_failure(&self, d: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&vec![("direction", d.as_str().into()), ("reason", reason.into())])
            .inc();
    }

    /// Counts a connection with `peer` (its verified SPIFFE ID over mutual
    /// TLS, `None` for plaintext) and returns the counter its bytes go to.
    pub fn connection(&self, d: Direction, peer: Option<&mizzen_api::SpiffeId>) -> Counter {
        let (tls, peer) = match peer {
            Some(id) => ("mtls", id.to_string()),
            None => ("plaintext", String::new()),
        };
        let labels = vec![("direction", d.as_str().into()), ("tls", tls.into()), ("peer", peer)];
        self.connections.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).clone()
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self, d: Direction) -> OpenGuard {
        let g = self.open.get_or_create(&vec![("direction", d.as_str().into())]).clone();
        g.inc();
        OpenGuard(g)
    }
}

/// Decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A short reason for a failed handshake, from the error tokio-rustls returned.
pub fn handshake_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "peer_closed",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "identity_mismatch",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "protocol",
    }
}
