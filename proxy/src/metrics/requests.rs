//! HTTP request metrics under Istio's standard names and labels, with our
//! prefix: `mizzen_requests_total`, `mizzen_request_duration_milliseconds`,
//! `mizzen_request_bytes`, `mizzen_response_bytes`.
//!
//! A request's labels are derived from a small key (direction, peer,
//! Service, status, flags) whose metric handles are kept: the 13 label
//! strings are built once per distinct key, not per request. Labels come
//! from discovery and verified identities, never from request content, so
//! the keys are bounded; the cache is emptied past [`MAX_KEYS`] anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use mizzen_api::SpiffeId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Direction, Labels};
use crate::http::ResponseFlag;

/// Distinct label sets whose handles are kept.
const MAX_KEYS: usize = 4096;
/// Distinct client workloads named in labels. Peer proxies say which
/// workload they serve; past this many names, further ones are `unknown`,
/// so a peer that makes names up cannot grow the metrics without bound.
const MAX_PEER_WORKLOADS: usize = 256;
const UNKNOWN: &str = "unknown";

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

impl Local {
    fn new(workload: String, namespace: String) -> Self {
        Self {
            workload,
            namespace,
            principal: UNKNOWN.into(),
        }
    }
}

/// What a request's metrics are labelled with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestFacts {
    /// `Outbound`: reported by the client's proxy (`reporter="source"`).
    pub direction: Direction,
    pub grpc: bool,
    /// The other side's verified identity (the server's outbound, the
    /// client's inbound); `None` over plaintext.
    pub peer: Option<SpiffeId>,
    /// `<namespace>/<name>` of the server's pod, when discovery knows it.
    pub peer_pod: Option<String>,
    /// The client's workload, as its proxy said (inbound, over mutual TLS).
    pub peer_workload: Option<String>,
    /// The Service called (`<namespace>/<name>`), when known.
    pub destination_service: Option<String>,
    pub status: u16,
    pub grpc_status: Option<String>,
    /// Why the proxy answered itself, when it did.
    pub flag: Option<ResponseFlag>,
}

impl RequestFacts {
    pub fn new(direction: Direction, grpc: bool) -> Self {
        Self {
            direction,
            grpc,
            peer: None,
            peer_pod: None,
            peer_workload: None,
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

/// Istio's labels for `f`, reported by a proxy serving `local`.
fn labels(f: &RequestFacts, local: &Local) -> Labels {
    let local = local.clone();
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
                f.peer_workload.clone().unwrap_or_else(|| UNKNOWN.into()),
                peer_namespace.unwrap_or_else(|| UNKNOWN.into()),
                peer_principal,
            ),
            (local.workload, local.namespace, local.principal),
        ),
    };
    vec![
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
        ("response_flags", f.flag.map_or("-", ResponseFlag::as_str).into()),
        (
            "connection_security_policy",
            if f.peer.is_some() { "mutual_tls" } else { "none" }.into(),
        ),
    ]
}

/// One label set's metrics.
#[derive(Debug)]
struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The request metrics; cheap to clone (shared families).
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    request_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    response_bytes: Family<Labels, Histogram, fn() -> Histogram>,
    local: Arc<RwLock<Local>>,
    handles: Arc<Mutex<HashMap<RequestFacts, Arc<Handles>>>>,
    /// The client workloads labels have named ([`MAX_PEER_WORKLOADS`]).
    peer_workloads: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            local: Arc::new(RwLock::new(Local::new(UNKNOWN.into(), UNKNOWN.into()))),
            handles: Arc::default(),
            peer_workloads: Arc::default(),
        }
    }
}

impl RequestMetrics {
    /// Metrics of requests a proxy of `workload` in `namespace` carries.
    pub fn for_workload(workload: String, namespace: String) -> Self {
        Self {
            local: Arc::new(RwLock::new(Local::new(workload, namespace))),
            ..Self::default()
        }
    }

    /// Registers the families at the top of `root` (no `mizzen_proxy_`).
    pub fn register(&self, root: &mut Registry) {
        root.register(
            "mizzen_requests",
            "HTTP requests, by Istio's standard labels",
            self.requests.clone(),
        );
        root.register(
            "mizzen_request_duration_milliseconds",
            "HTTP request durations until the end of the response, by Istio's standard labels",
            self.duration.clone(),
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
    }

    /// This proxy's identity changed (its first certificate).
    pub fn local_principal(&self, id: &SpiffeId) {
        let id = id.to_string();
        let mut local = self.local.write().unwrap_or_else(|p| p.into_inner());
        if local.principal != id {
            local.principal = id;
            self.handles.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Whether `workload` may be a label: one already named, or one more
    /// while fewer than [`MAX_PEER_WORKLOADS`] are.
    fn admit_peer_workload(&self, workload: &str) -> bool {
        let mut seen = self.peer_workloads.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(workload) {
            return true;
        }
        if seen.len() >= MAX_PEER_WORKLOADS {
            return false;
        }
        seen.insert(workload.to_owned());
        true
    }

    fn handles(&self, f: &RequestFacts) -> Arc<Handles> {
        let mut cache = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = cache.get(f) {
            // Only admitted workloads are ever cached.
            return h.clone();
        }
        if f.peer_workload.as_deref().is_some_and(|w| !self.admit_peer_workload(w)) {
            drop(cache);
            let f = RequestFacts {
                peer_workload: None,
                ..f.clone()
            };
            return self.handles(&f);
        }
        if cache.len() >= MAX_KEYS {
            cache.clear();
        }
        let labels = labels(f, &self.local.read().unwrap_or_else(|p| p.into_inner()));
        let h = Arc::new(Handles {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
        });
        cache.insert(f.clone(), h.clone());
        h
    }

    /// Counts a request, its duration and body sizes.
    pub fn record(&self, f: &RequestFacts, elapsed: std::time::Duration, request_bytes: u64, response_bytes: u64) {
        let h = self.handles(f);
        h.requests.inc();
        h.duration.observe(elapsed.as_secs_f64() * 1000.0);
        h.request_bytes.observe(request_bytes as f64);
        h.response_bytes.observe(response_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &RequestMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    /// The one `mizzen_requests_total` sample of `m`.
    fn requests_line(m: &RequestMetrics) -> String {
        text(m)
            .lines()
            .find(|l| l.starts_with("mizzen_requests_total{"))
            .expect("counted")
            .to_owned()
    }

    #[test]
    fn a_request_is_counted_under_istios_labels_once_per_record() {
        let m = RequestMetrics::default();
        let mut f = RequestFacts::new(Direction::Outbound, true);
        f.peer = Some(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/reviews").expect("id"));
        f.peer_pod = Some("shop/reviews-v1-5d4c7b6f9-bcdfg".into());
        f.destination_service = Some("shop/reviews".into());
        f.status = 200;
        f.grpc_status = Some("0".into());
        for _ in 0..3 {
            m.record(&f, std::time::Duration::from_millis(3), 10, 20);
        }
        let line = requests_line(&m);
        for label in [
            "reporter=\"source\"",
            "destination_workload=\"reviews-v1\"",
            "destination_workload_namespace=\"shop\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/reviews\"",
            "destination_service=\"reviews.shop.svc.cluster.local\"",
            "request_protocol=\"grpc\"",
            "response_code=\"200\"",
            "grpc_response_status=\"0\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(label), "{label} in {line}");
        }
        assert!(line.ends_with(" 3"), "{line}");
    }

    #[test]
    fn the_server_side_names_the_client_workload_its_proxy_gave() {
        let m = RequestMetrics::for_workload("web".into(), "shop".into());
        let mut f = RequestFacts::new(Direction::Inbound, false);
        f.peer = Some(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/front").expect("id"));
        f.peer_workload = Some("frontend".into());
        f.destination_service = Some("shop/web".into());
        f.status = 200;
        m.record(&f, std::time::Duration::from_millis(1), 0, 0);
        let line = requests_line(&m);
        for label in [
            "reporter=\"destination\"",
            "source_workload=\"frontend\"",
            "source_workload_namespace=\"shop\"",
            "destination_workload=\"web\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
        ] {
            assert!(line.contains(label), "{label} in {line}");
        }
    }

    #[test]
    fn client_workload_names_past_the_bound_are_unknown() {
        let m = RequestMetrics::default();
        let mut f = RequestFacts::new(Direction::Inbound, false);
        f.status = 200;
        for i in 0..MAX_PEER_WORKLOADS + 10 {
            f.peer_workload = Some(format!("made-up-{i}"));
            m.record(&f, std::time::Duration::from_millis(1), 0, 0);
        }
        let out = text(&m);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("mizzen_requests_total{"))
            .collect();
        assert_eq!(lines.len(), MAX_PEER_WORKLOADS + 1, "the bound, and one unknown");
        let unknown = lines
            .iter()
            .find(|l| l.contains("source_workload=\"unknown\""))
            .expect("the rest are unknown");
        assert!(unknown.ends_with(" 10"), "{unknown}");
        // A name already admitted keeps being used.
        f.peer_workload = Some("made-up-0".into());
        m.record(&f, std::time::Duration::from_millis(1), 0, 0);
        assert!(text(&m).contains("source_workload=\"made-up-0\""));
    }

    #[test]
    fn a_new_local_identity_relabels_later_requests() {
        let m = RequestMetrics::default();
        let mut f = RequestFacts::new(Direction::Inbound, false);
        f.status = 503;
        f.flag = Some(ResponseFlag::LocalReset);
        m.record(&f, std::time::Duration::ZERO, 0, 0);
        m.local_principal(&SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").expect("id"));
        m.record(&f, std::time::Duration::ZERO, 0, 0);
        let out = text(&m);
        let counted: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("mizzen_requests_total{"))
            .collect();
        assert_eq!(counted.len(), 2, "{out}");
        assert!(
            counted.iter().any(
                |l| l.contains("destination_principal=\"spiffe://cluster.local/ns/a/sa/b\"")
                    && l.contains("response_flags=\"LR\"")
            ),
            "{out}"
        );
    }
}
