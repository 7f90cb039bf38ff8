//! The proxy's Prometheus metrics: connections under `mizzen_proxy_`,
//! labelled by direction (`inbound`: peers to this pod's app; `outbound`:
//! this pod's app to others), and requests under Istio's standard names
//! and labels with our prefix (`mizzen_requests_total`,
//! `mizzen_request_duration_milliseconds`), so that dashboards written
//! for Istio need only the prefix changed.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, RwLock};

use mizzen_api::SpiffeId;

pub type Labels = Vec<(&'static str, String)>;

/// Which way a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
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
    /// Relayed connections that ended with an I/O error, by direction.
    relay_errors: Family<Labels, Counter>,
    /// HTTP requests, by Istio's standard labels.
    requests: Family<Labels, Counter>,
    /// HTTP request durations, by the same labels.
    request_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// HTTP request body sizes, by the same labels.
    request_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    /// HTTP response body sizes, by the same labels.
    response_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    /// Who this proxy serves, for the labels of its requests.
    local: Arc<RwLock<Local>>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            open: Family::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            bytes: Family::default(),
            certificate_updates: Counter::default(),
            certificate_expiry: Gauge::default(),
            trust_bundle_changes: Counter::default(),
            relay_errors: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            local: Arc::new(RwLock::new(Local::from_env())),
        }
    }
}

/// Istio's buckets for request durations, in milliseconds.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
        300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

/// Istio's buckets for body sizes, in bytes: powers of ten to 100 MB.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 9))
}

/// This proxy's workload, as request labels name it.
#[derive(Debug, Clone)]
struct Local {
    workload: String,
    namespace: String,
    /// The SPIFFE ID of the certificate held; "unknown" before the first.
    principal: String,
}

const UNKNOWN: &str = "unknown";

impl Local {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            workload: var("POD_NAME").map_or_else(|| UNKNOWN.into(), |p| crate::workload::of_pod(&p).to_owned()),
            namespace: var("POD_NAMESPACE").unwrap_or_else(|| UNKNOWN.into()),
            principal: UNKNOWN.into(),
        }
    }
}

/// What a request's metrics are labelled with.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// `Outbound`: reported by the client's proxy (`reporter="source"`).
    pub direction: Direction,
    pub grpc: bool,
    /// The other side's verified identity (the server's outbound, the
    /// client's inbound); `None` over plaintext.
    pub peer: Option<SpiffeId>,
    /// `<namespace>/<name>` of the server's pod, when discovery knows it.
    pub peer_pod: Option<String>,
    /// The Service called (`<namespace>/<name>`), when known.
    pub destination_service: Option<String>,
    pub status: u16,
    pub grpc_status: Option<String>,
    /// Why the proxy answered itself, when it did.
    pub flag: Option<crate::http::ResponseFlag>,
}

impl RequestFacts {
    pub fn new(direction: Direction, grpc: bool) -> Self {
        Self {
            direction,
            grpc,
            peer: None,
            peer_pod: None,
            destination_service: None,
            status: 0,
            grpc_status: None,
            flag: None,
        }
    }
}

/// `ns` of a Kubernetes SPIFFE ID (`spiffe://td/ns/<ns>/sa/<sa>`).
fn namespace_of(id: &SpiffeId) -> Option<&str> {
    id.path().strip_prefix("/ns/")?.split('/').next()
}

/// `<name>.<namespace>.svc.cluster.local`, as Istio names a Service.
fn service_fqdn(service: &str) -> String {
    match service.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}.svc.cluster.local"),
        None => service.to_owned(),
    }
}

impl ProxyMetrics {
    /// Registers every metric in a new registry.
    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        root.register(
            "mizzen_requests",
            "HTTP requests, by Istio's standard labels",
            self.requests.clone(),
        );
        root.register(
            "mizzen_request_duration_milliseconds",
            "HTTP request durations until the end of the response, by Istio's standard labels",
            self.request_duration.clone(),
        );
        root.register(
            "mizzen_request_bytes",
            "HTTP request body sizes, by Istio's standard labels",
            self.request_bytes.clone(),
        );
        root.register(
            "mizzen_response_bytes",
            "HTTP response body sizes, by Istio's standard labels",
            self.response_bytes.clone(),
        );
        let r = root.sub_registry_with_prefix("mizzen_proxy");
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
            "relay_errors",
            "Relayed connections that ended with an I/O error (a reset, a broken TLS stream), by direction",
            self.relay_errors.clone(),
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
        let local = self.local.read().unwrap_or_else(|p| p.into_inner()).clone();
        let peer_principal = f.peer.as_ref().map_or_else(|| UNKNOWN.to_owned(), ToString::to_string);
        let peer_namespace = f.peer.as_ref().and_then(namespace_of).map(str::to_owned);
        let (reporter, src, dst) = match f.direction {
            Direction::Outbound => {
                let (pod_ns, pod) = f
                    .peer_pod
                    .as_deref()
                    .and_then(|p| p.split_once('/'))
                    .map_or((None, None), |(ns, name)| {
                        (Some(ns), Some(crate::workload::of_pod(name)))
                    });
                let dst_ns = pod_ns.map(str::to_owned).or(peer_namespace);
                (
                    "source",
                    (local.workload, local.namespace, local.principal),
                    (
                        pod.unwrap_or(UNKNOWN).to_owned(),
                        dst_ns.unwrap_or_else(|| UNKNOWN.into()),
                        peer_principal,
                    ),
                )
            }
            Direction::Inbound => (
                "destination",
                (
                    UNKNOWN.to_owned(),
                    peer_namespace.unwrap_or_else(|| UNKNOWN.into()),
                    peer_principal,
                ),
                (local.workload, local.namespace, local.principal),
            ),
        };
        let labels: Labels = vec![
            ("reporter", reporter.into()),
            ("source_workload", src.0),
            ("source_workload_namespace", src.1),
            ("source_principal", src.2),
            ("destination_workload", dst.0),
            ("destination_workload_namespace", dst.1),
            ("destination_principal", dst.2),
            (
                "destination_service",
                f.destination_service
                    .as_deref()
                    .map_or_else(|| UNKNOWN.into(), service_fqdn),
            ),
            ("request_protocol", if f.grpc { "grpc" } else { "http" }.into()),
            ("response_code", f.status.to_string()),
            ("grpc_response_status", f.grpc_status.clone().unwrap_or_default()),
            (
                "response_flags",
                f.flag.map_or("-", crate::http::ResponseFlag::as_str).into(),
            ),
            (
                "connection_security_policy",
                if f.peer.is_some() { "mutual_tls" } else { "none" }.into(),
            ),
        ];
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(&labels).observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(response_bytes as f64);
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

    /// Records a new certificate for `id` that expires at `not_after`.
    pub fn certificate(&self, id: &SpiffeId, not_after: std::time::SystemTime) {
        self.certificate_updates.inc();
        self.local.write().unwrap_or_else(|p| p.into_inner()).principal = id.to_string();
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.certificate_expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
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
