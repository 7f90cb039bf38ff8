//! Discovery: the Services and ready endpoints proxies route to, served on
//! the agent's socket over Envoy's incremental (delta) aggregated discovery
//! protocol with Mizzen's own resource type
//! ([`SERVICE_TYPE`](mizzen_api::proto::discovery::SERVICE_TYPE)).
//!
//! The agent watches Services, EndpointSlices and Pods, and after each burst
//! of changes rebuilds one resource per Service ([`build`], pure): its
//! cluster IPs and ports, and its ready endpoints, each with whether its pod
//! is meshed and the SPIFFE ID the pod's ServiceAccount gives it. A resource
//! whose contents did not change keeps its version, so a stream only carries
//! what changed ([`crate::ads`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{reflector, watcher};
use mizzen_api::mesh::{PROXY_CONTAINER, TLS_MODE_LABEL, TLS_MODE_MIZZEN};
use mizzen_api::proto::discovery::{self as pb, SERVICE_TYPE};
use mizzen_api::{SpiffeId, TrustDomain};
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
pub use crate::xds::Snapshot;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What discovery needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub meshed: bool,
    pub service_account: String,
}

/// Who holds an endpoint's IP address, as the Pods say (`status.podIPs`),
/// whatever the EndpointSlice claims: anyone may write an EndpointSlice
/// listing another pod's IP, but not that pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpOwner {
    /// No pod holds it (an address outside the pod network, or a pod the
    /// agent has not seen yet).
    Unknown,
    Pod(PodFacts),
    /// Two pods claim it (one just replacing another): its identity is
    /// unknown, and meshed clients refuse to connect rather than guess.
    Conflict,
}

/// Pod IP → owner, from every pod that has one of its own (not host
/// network, not finished).
pub fn ip_owners<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashMap<String, IpOwner> {
    let mut owners: HashMap<String, IpOwner> = HashMap::new();
    for pod in pods {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        if spec.and_then(|s| s.host_network) == Some(true)
            || matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        {
            continue;
        }
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|i| i.ip.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        let facts = PodFacts::of(pod);
        for ip in ips {
            owners
                .entry(ip)
                .and_modify(|o| *o = IpOwner::Conflict)
                .or_insert_with(|| IpOwner::Pod(facts.clone()));
        }
    }
    owners
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        let labelled = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TLS_MODE_LABEL))
            .is_some_and(|v| v == TLS_MODE_MIZZEN);
        let spec = pod.spec.as_ref();
        let has_proxy = spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == PROXY_CONTAINER)
        });
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            meshed: labelled && has_proxy,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        }
    }
}

/// The discovery resource of every Service, by `<namespace>/<name>`.
/// Endpoints come from the Service's EndpointSlices: only ready ones, IP
/// addresses only; `owner` says which pod holds an address. An endpoint's
/// identity and whether it is meshed come from that pod only, never from
/// the slice's `targetRef`.
pub fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    owner: impl Fn(&str) -> IpOwner,
    trust_domain: &TrustDomain,
) -> BTreeMap<String, pb::Service> {
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let (Some(ns), Some(name)) = (
            slice.metadata.namespace.as_ref(),
            slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        by_service.entry((ns.clone(), name.clone())).or_default().push(slice);
    }
    let mut out = BTreeMap::new();
    for svc in services {
        let (Some(ns), Some(name)) = (svc.metadata.namespace.clone(), svc.metadata.name.clone()) else {
            continue;
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let cluster_ips = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .collect();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| pb::ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::try_from(p.port).unwrap_or(0),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            })
            .collect();
        let mut endpoints = Vec::new();
        let mut slices = by_service.remove(&(ns.clone(), name.clone())).unwrap_or_default();
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for slice in slices {
            let ports: BTreeMap<String, u32> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u32::try_from(p.port?).ok()?)))
                .collect();
            for ep in &slice.endpoints {
                // Unknown readiness counts as ready (the API's documented meaning).
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let addresses: Vec<String> = ep
                    .addresses
                    .iter()
                    .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                    .cloned()
                    .collect();
                if addresses.is_empty() {
                    continue;
                }
                // Every address of an endpoint (dual stack) must be the
                // same pod's; anything else is a conflict.
                let mut owners = addresses.iter().map(|a| owner(a));
                let first = owners.next().unwrap_or(IpOwner::Unknown);
                let holder = if owners.all(|o| o == first) {
                    first
                } else {
                    IpOwner::Conflict
                };
                let (meshed, spiffe_id, pod) = match holder {
                    IpOwner::Pod(f) => (
                        f.meshed,
                        SpiffeId::workload(trust_domain, &f.namespace, &f.service_account)
                            .map(|id| id.to_string())
                            .unwrap_or_default(),
                        format!("{}/{}", f.namespace, f.name),
                    ),
                    IpOwner::Unknown => (false, String::new(), String::new()),
                    // Meshed without an identity: proxies refuse to connect.
                    IpOwner::Conflict => (true, String::new(), String::new()),
                };
                endpoints.push(pb::Endpoint {
                    addresses,
                    ports: ports.clone().into_iter().collect(),
                    meshed,
                    spiffe_id,
                    pod,
                });
            }
        }
        endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        out.insert(
            format!("{ns}/{name}"),
            pb::Service {
                namespace: ns,
                name,
                cluster_ips,
                ports,
                endpoints,
            },
        );
    }
    out
}

/// Packs `services` as delta xDS resources whose version names their contents.
pub fn snapshot(services: BTreeMap<String, pb::Service>) -> Snapshot {
    crate::xds::pack(
        SERVICE_TYPE,
        services.into_iter().map(|(name, svc)| (name, svc.encode_to_vec())),
    )
}

/// Watches Services, EndpointSlices and Pods cluster-wide and publishes a
/// new [`Snapshot`] on `tx` after each burst of changes (bursts are
/// gathered for `debounce`). Nothing is published until all three watches
/// have listed once, so proxies never see a partial cluster.
pub async fn follow(
    client: kube::Client,
    trust_domain: TrustDomain,
    debounce: Duration,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
) {
    let changed = Arc::new(Notify::new());
    let (services, w1) = reflector::store::<Service>();
    let (slices, w2) = reflector::store::<EndpointSlice>();
    let (pods, w3) = reflector::store::<Pod>();
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client.clone()), watcher::Config::default()),
        w1,
        changed.clone(),
        "services",
        |s| {
            s.metadata.managed_fields = None;
            s.metadata.annotations = None;
            s.status = None;
        },
    ));
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client.clone()), watcher::Config::default()),
        w2,
        changed.clone(),
        "endpointslices",
        |s| {
            s.metadata.managed_fields = None;
            s.metadata.annotations = None;
        },
    ));
    tokio::spawn(crate::watch::reflect(
        watcher(Api::all(client), watcher::Config::default()),
        w3,
        changed.clone(),
        "pods",
        trim_pod,
    ));
    for (ready, what) in [
        (services.wait_until_ready().await.is_ok(), "services"),
        (slices.wait_until_ready().await.is_ok(), "endpointslices"),
        (pods.wait_until_ready().await.is_ok(), "pods"),
    ] {
        if !ready {
            warn!(what, "discovery store closed before it was ready");
            return;
        }
    }
    info!("discovery watches synced");
    loop {
        let started = std::time::Instant::now();
        let all_pods = pods.state();
        let owners = ip_owners(all_pods.iter().map(|p| &**p));
        let built = build(
            &services.state(),
            &slices.state(),
            |ip| owners.get(ip).cloned().unwrap_or(IpOwner::Unknown),
            &trust_domain,
        );
        let endpoints: usize = built.values().map(|s| s.endpoints.len()).sum();
        let next = snapshot(built);
        metrics.discovery_services.set(next.resources.len() as i64);
        metrics.discovery_endpoints.set(endpoints as i64);
        if crate::xds::publish(&tx, next) {
            debug!(took = ?started.elapsed(), "discovery snapshot rebuilt");
        }
        changed.notified().await;
        tokio::time::sleep(debounce).await;
    }
}

/// Keeps of a pod only what [`PodFacts`] reads: every agent holds every
/// pod of the cluster, so the rest (status, env, volumes, ...) is dropped.
fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    // Its IPs and phase say which addresses it holds.
    p.status = p.status.take().map(|s| k8s_openapi::api::core::v1::PodStatus {
        phase: s.phase,
        pod_ips: s.pod_ips,
        ..Default::default()
    });
    if let Some(spec) = p.spec.as_mut() {
        let keep = |c: &k8s_openapi::api::core::v1::Container| k8s_openapi::api::core::v1::Container {
            name: c.name.clone(),
            ..Default::default()
        };
        *spec = k8s_openapi::api::core::v1::PodSpec {
            service_account_name: spec.service_account_name.clone(),
            host_network: spec.host_network,
            containers: spec.containers.iter().map(keep).collect(),
            init_containers: spec.init_containers.as_ref().map(|cs| cs.iter().map(keep).collect()),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests;
