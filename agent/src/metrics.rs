//! Prometheus metrics of the node agent, under `mizzen_agent_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub streams_open: Gauge,
    pub certificates_cached: Gauge,
    /// Seconds until the soonest-expiring cached certificate expires.
    pub oldest_cert_expiry_seconds: Gauge,
    pub ca_calls: Counter,
    ca_errors: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    pub nacks: Counter,
    pub pushes: Counter,
    /// From a new secret being available to it being sent on a stream.
    pub push_seconds: Histogram,
    pub discovery_streams_open: Gauge,
    pub discovery_pushes: Counter,
    pub discovery_nacks: Counter,
    /// Services and ready endpoints in the latest discovery snapshot.
    pub discovery_services: Gauge,
    pub discovery_endpoints: Gauge,
    /// Watch events (Services, EndpointSlices, Pods) discovery applied.
    pub discovery_events: Counter,
    /// Services discovery rebuilt because an event touched them.
    pub discovery_rebuilds: Counter,
    pub policy_pushes: Counter,
    pub policy_nacks: Counter,
    /// Authorization policies replaced by their fail-closed stand-in.
    pub policies_rejected: Gauge,
    /// Local pods with a workload policy.
    pub policy_workloads: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mizzen_agent");
        let streams_open = Gauge::default();
        registry.register("sds_streams_open", "Open SDS streams", streams_open.clone());
        let certificates_cached = Gauge::default();
        registry.register(
            "certificates_cached",
            "Identities with a cached certificate",
            certificates_cached.clone(),
        );
        let oldest_cert_expiry_seconds = Gauge::default();
        registry.register(
            "oldest_cert_expiry_seconds",
            "Seconds until the soonest-expiring cached certificate expires",
            oldest_cert_expiry_seconds.clone(),
        );
        let ca_calls = Counter::default();
        registry.register("ca_calls", "CreateCertificate calls made to the CA", ca_calls.clone());
        let ca_errors = Family::<Labels, Counter>::default();
        registry.register("ca_errors", "Failed CA calls, by kind", ca_errors.clone());
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "sds_rejected",
            "Socket callers (SDS and discovery) refused, by reason",
            rejected.clone(),
        );
        let nacks = Counter::default();
        registry.register("sds_nacks", "Responses a proxy rejected (NACK)", nacks.clone());
        let pushes = Counter::default();
        registry.register("sds_pushes", "SDS responses sent", pushes.clone());
        let push_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "sds_push_duration_seconds",
            "Time from a secret being available to its push on a stream",
            push_seconds.clone(),
        );
        let discovery_streams_open = Gauge::default();
        registry.register(
            "discovery_streams_open",
            "Open discovery streams",
            discovery_streams_open.clone(),
        );
        let discovery_pushes = Counter::default();
        registry.register("discovery_pushes", "Discovery responses sent", discovery_pushes.clone());
        let discovery_nacks = Counter::default();
        registry.register(
            "discovery_nacks",
            "Discovery responses a proxy rejected (NACK)",
            discovery_nacks.clone(),
        );
        let discovery_services = Gauge::default();
        registry.register(
            "discovery_services",
            "Services in the latest discovery snapshot",
            discovery_services.clone(),
        );
        let discovery_events = Counter::default();
        registry.register(
            "discovery_events",
            "Watch events (Services, EndpointSlices, Pods) discovery applied",
            discovery_events.clone(),
        );
        let discovery_rebuilds = Counter::default();
        registry.register(
            "discovery_rebuilds",
            "Services discovery rebuilt because a watch event touched them",
            discovery_rebuilds.clone(),
        );
        let discovery_endpoints = Gauge::default();
        registry.register(
            "discovery_endpoints",
            "Ready endpoints in the latest discovery snapshot",
            discovery_endpoints.clone(),
        );
        let policy_pushes = Counter::default();
        registry.register("policy_pushes", "Workload policy responses sent", policy_pushes.clone());
        let policy_nacks = Counter::default();
        registry.register(
            "policy_nacks",
            "Workload policy responses a proxy rejected (NACK)",
            policy_nacks.clone(),
        );
        let policies_rejected = Gauge::default();
        registry.register(
            "policies_rejected",
            "Authorization policies that cannot be compiled and are enforced as their fail-closed stand-in",
            policies_rejected.clone(),
        );
        let policy_workloads = Gauge::default();
        registry.register(
            "policy_workloads",
            "Pods on this node with a workload policy",
            policy_workloads.clone(),
        );
        Self {
            registry,
            streams_open,
            certificates_cached,
            oldest_cert_expiry_seconds,
            ca_calls,
            ca_errors,
            rejected,
            nacks,
            pushes,
            push_seconds,
            discovery_streams_open,
            discovery_pushes,
            discovery_nacks,
            discovery_services,
            discovery_endpoints,
            discovery_events,
            discovery_rebuilds,
            policy_pushes,
            policy_nacks,
            policies_rejected,
            policy_workloads,
        }
    }

    pub fn ca_error(&self, kind: &'static str) {
        self.ca_errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn encode(&self) -> String {
        mizzen_api::runtime::encode_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
