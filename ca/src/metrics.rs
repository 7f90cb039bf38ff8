//! Prometheus metrics of the CA.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric the CA exports, under the `mizzen_ca_` prefix.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub issued: Counter,
    rejected: Family<Labels, Counter>,
    pub token_review_seconds: Histogram,
    pub signing_seconds: Histogram,
    /// Unix time when the signing certificate (or one above it) expires.
    pub signing_expiry_timestamp: Gauge,
    /// 1 when the signing certificate expires within the warning window.
    pub signing_expiring: Gauge,
    pub root_configmaps_published: Counter,
    /// Connections closed at once because --max-connections were open.
    pub connections_refused: Counter,
    policy_status_writes: Family<Labels, Counter>,
    policy_status_errors: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mizzen_ca");
        let issued = Counter::default();
        registry.register("certificates_issued", "Workload certificates issued", issued.clone());
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "requests_rejected",
            "CreateCertificate requests refused, by reason",
            rejected.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let token_review_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "token_review_duration_seconds",
            "Latency of TokenReview calls to the API server (cache misses)",
            token_review_seconds.clone(),
        );
        let signing_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register(
            "signing_duration_seconds",
            "Time to check a CSR and sign it",
            signing_seconds.clone(),
        );
        let signing_expiry_timestamp = Gauge::default();
        registry.register(
            "signing_cert_expiry_timestamp_seconds",
            "Unix time at which the CA's signing chain expires",
            signing_expiry_timestamp.clone(),
        );
        let signing_expiring = Gauge::default();
        registry.register(
            "signing_cert_expiring",
            "1 when the signing chain expires within the warning window",
            signing_expiring.clone(),
        );
        let root_configmaps_published = Counter::default();
        registry.register(
            "root_configmaps_published",
            "Writes of the mizzen-root-ca ConfigMap into namespaces",
            root_configmaps_published.clone(),
        );
        let policy_status_writes = Family::<Labels, Counter>::default();
        registry.register(
            "policy_status_writes",
            "Status writes to policies, by kind and verdict (accepted or rejected)",
            policy_status_writes.clone(),
        );
        let policy_status_errors = Family::<Labels, Counter>::default();
        registry.register(
            "policy_status_write_errors",
            "Policy status writes the API server refused, by kind",
            policy_status_errors.clone(),
        );
        Self {
            registry,
            issued,
            rejected,
            token_review_seconds,
            signing_seconds,
            signing_expiry_timestamp,
            signing_expiring,
            root_configmaps_published,
            connections_refused,
            policy_status_writes,
            policy_status_errors,
        }
    }

    /// Counts a policy status written.
    pub fn policy_status_written(&self, kind: &'static str, verdict: &'static str) {
        self.policy_status_writes
            .get_or_create(&vec![("kind", kind), ("verdict", verdict)])
            .inc();
    }

    /// Counts a policy status write that failed.
    pub fn policy_status_failed(&self, kind: &'static str) {
        self.policy_status_errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Counts a refused request.
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        mizzen_api::runtime::encode_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
