//! Discovery: the Services and ready endpoints proxies route to, served on
//! the agent's socket over Envoy's incremental (delta) aggregated discovery
//! protocol with Mizzen's own resource type
//! ([`SERVICE_TYPE`](mizzen_api::proto::discovery::SERVICE_TYPE)).
//!
//! The agent watches Services, EndpointSlices and Pods into an [`Index`],
//! and after each burst of changes rebuilds the resources of the Services
//! it touched ([`build_one`], pure): its
//! cluster IPs and ports, and its ready endpoints, each with whether its pod
//! is meshed and the SPIFFE ID the pod's ServiceAccount gives it. A resource
//! whose contents did not change keeps its version, so a stream only carries
//! what changed ([`crate::ads`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher;
use mizzen_api::mesh::{PROXY_CONTAINER, TLS_MODE_LABEL, TLS_MODE_MIZZEN};
use mizzen_api::proto::discovery::{self as pb, SERVICE_TYPE};
use mizzen_api::routing::gateway::HTTPRoute;
use mizzen_api::routing::gateway::grpc::GRPCRoute;
use mizzen_api::routing::spec::{DestinationRule, VirtualService};
use mizzen_api::{SpiffeId, TrustDomain};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use crate::metrics::Metrics;
pub use crate::xds::Snapshot;

mod addresses;
mod index;
mod rules;
pub use addresses::{Addresses, ByAddress};
pub use index::Index;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What discovery needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub meshed: bool,
    pub service_account: String,
    /// For DestinationRule subsets.
    pub labels: BTreeMap<String, String>,
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

/// The addresses `pod` holds (`status.podIPs`): none when it uses the
/// host's network or has finished.
pub fn held_ips(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true)
        || matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
    {
        return Vec::new();
    }
    status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
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
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

/// `<namespace>/<name>` of an object.
pub fn key_of(o: &impl kube::Resource) -> Option<String> {
    Some(format!(
        "{}/{}",
        o.meta().namespace.as_deref()?,
        o.meta().name.as_deref()?
    ))
}

/// The key of the Service an EndpointSlice belongs to (its
/// `kubernetes.io/service-name` label), if it lists IP addresses.
pub fn service_of(slice: &EndpointSlice) -> Option<String> {
    let ns = slice.metadata.namespace.as_deref()?;
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    matches!(slice.address_type.as_str(), "IPv4" | "IPv6").then(|| format!("{ns}/{name}"))
}

/// What discovery reads of a Service: its resource without endpoints.
pub fn shape_of(svc: &Service) -> pb::Service {
    let spec = svc.spec.as_ref();
    pb::Service {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        cluster_ips: spec
            .and_then(|s| {
                s.cluster_ips
                    .clone()
                    .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .collect(),
        ports: spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| pb::ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::try_from(p.port).unwrap_or(0),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            })
            .collect(),
        endpoints: Vec::new(),
        routing: None,
        destination_rule: None,
    }
}

/// What discovery reads of an EndpointSlice: its name (the order slices
/// are read in), its ports, and the addresses of each ready endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceShape {
    name: String,
    ports: Vec<(String, u32)>,
    /// Ready endpoints' IP addresses (an endpoint without one is left out).
    ready: Vec<Vec<String>>,
}

impl SliceShape {
    pub fn of(slice: &EndpointSlice) -> Self {
        Self {
            name: slice.metadata.name.clone().unwrap_or_default(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u32::try_from(p.port?).ok()?)))
                .collect(),
            ready: slice
                .endpoints
                .iter()
                // Unknown readiness counts as ready (the API's documented meaning).
                .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .map(|ep| {
                    ep.addresses
                        .iter()
                        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .filter(|addresses| !addresses.is_empty())
                .collect(),
        }
    }
}

/// The traffic rules of one Service.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceRules<'r> {
    /// The VirtualService that routes it.
    pub routing: Option<&'r pb::Routing>,
    /// Its DestinationRule's subsets.
    pub subsets: Option<&'r mizzen_api::routing::Subsets>,
    /// Its DestinationRule, as proxies get it.
    pub destination_rule: Option<&'r pb::DestinationPolicy>,
}

/// One Service's discovery resource: `shape` ([`shape_of`]) with the ready
/// endpoints of its `slices` and its `rules`; `owner` says which pod holds
/// an address. An endpoint's identity, whether it is meshed and which
/// subsets it is in come from that pod only, never from the slice's
/// `targetRef`.
pub fn build_one<'a>(
    shape: &pb::Service,
    slices: impl IntoIterator<Item = &'a SliceShape>,
    owner: impl Fn(&str) -> IpOwner,
    rules: ServiceRules<'_>,
    trust_domain: &TrustDomain,
) -> pb::Service {
    let mut slices: Vec<&SliceShape> = slices.into_iter().collect();
    slices.sort_by(|a, b| a.name.cmp(&b.name));
    let mut endpoints = Vec::new();
    for slice in slices {
        for addresses in &slice.ready {
            // Every address of an endpoint (dual stack) must be the
            // same pod's; anything else is a conflict.
            let mut owners = addresses.iter().map(|a| owner(a));
            let first = owners.next().unwrap_or(IpOwner::Unknown);
            let holder = if owners.all(|o| o == first) {
                first
            } else {
                IpOwner::Conflict
            };
            let (meshed, spiffe_id, pod, subsets) = match holder {
                IpOwner::Pod(f) => (
                    f.meshed,
                    SpiffeId::workload(trust_domain, &f.namespace, &f.service_account)
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    format!("{}/{}", f.namespace, f.name),
                    rules
                        .subsets
                        .map(|s| s.containing(&f.labels).map(str::to_owned).collect())
                        .unwrap_or_default(),
                ),
                IpOwner::Unknown => (false, String::new(), String::new(), Vec::new()),
                // Meshed without an identity: proxies refuse to connect.
                IpOwner::Conflict => (true, String::new(), String::new(), Vec::new()),
            };
            endpoints.push(pb::Endpoint {
                addresses: addresses.clone(),
                ports: slice.ports.iter().cloned().collect(),
                meshed,
                spiffe_id,
                pod,
                subsets,
            });
        }
    }
    endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    pb::Service {
        endpoints,
        routing: rules.routing.cloned(),
        destination_rule: rules.destination_rule.cloned(),
        ..shape.clone()
    }
}

/// Hands watch events to `apply` on the index, and says something changed.
fn feed<K: Send + 'static>(
    index: &Arc<Mutex<Index>>,
    changed: &Arc<Notify>,
    events: &Counter,
    apply: fn(&mut Index, watcher::Event<K>),
) -> impl FnMut(watcher::Event<K>) + Send + 'static {
    let (index, changed, events) = (index.clone(), changed.clone(), events.clone());
    move |ev| {
        apply(&mut index.lock().unwrap_or_else(|e| e.into_inner()), ev);
        events.inc();
        changed.notify_one();
    }
}

/// Watches Services, EndpointSlices, Pods, VirtualServices,
/// DestinationRules and (when the Gateway API is installed) HTTPRoutes
/// and GRPCRoutes cluster-wide into an
/// [`Index`] and, after each burst of changes (gathered for `debounce`),
/// rebuilds the Services the burst touched and publishes them on `tx`
/// ([`crate::xds::publish_changes`]). Nothing is published until all
/// watches have listed once, so proxies never see a partial cluster.
pub async fn follow(
    client: kube::Client,
    trust_domain: TrustDomain,
    debounce: Duration,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
) {
    let index = Arc::new(Mutex::new(Index::default()));
    let changed = Arc::new(Notify::new());
    let config = watcher::Config::default;
    tokio::spawn(crate::watch::follow(
        watcher(Api::<Service>::all(client.clone()), config()),
        "services",
        |_| {},
        feed(&index, &changed, &metrics.discovery_events, Index::service_event),
    ));
    tokio::spawn(crate::watch::follow(
        watcher(Api::<EndpointSlice>::all(client.clone()), config()),
        "endpointslices",
        |_| {},
        feed(&index, &changed, &metrics.discovery_events, Index::slice_event),
    ));
    tokio::spawn(crate::watch::follow(
        watcher(Api::<Pod>::all(client.clone()), config()),
        "pods",
        |_| {},
        feed(&index, &changed, &metrics.discovery_events, Index::pod_event),
    ));
    tokio::spawn(crate::watch::follow(
        watcher(Api::<VirtualService>::all(client.clone()), config()),
        "virtualservices",
        |_| {},
        feed(
            &index,
            &changed,
            &metrics.discovery_events,
            Index::virtual_service_event,
        ),
    ));
    tokio::spawn(crate::watch::follow(
        watcher(Api::<DestinationRule>::all(client.clone()), config()),
        "destinationrules",
        |_| {},
        feed(
            &index,
            &changed,
            &metrics.discovery_events,
            Index::destination_rule_event,
        ),
    ));
    let http_routes = Api::<HTTPRoute>::all(client.clone());
    if installed(&http_routes).await {
        tokio::spawn(crate::watch::follow(
            watcher(http_routes, config()),
            "httproutes",
            |_| {},
            feed(&index, &changed, &metrics.discovery_events, Index::http_route_event),
        ));
    } else {
        index.lock().unwrap_or_else(|e| e.into_inner()).synced.http_routes = true;
    }
    let grpc_routes = Api::<GRPCRoute>::all(client);
    if installed(&grpc_routes).await {
        tokio::spawn(crate::watch::follow(
            watcher(grpc_routes, config()),
            "grpcroutes",
            |_| {},
            feed(&index, &changed, &metrics.discovery_events, Index::grpc_route_event),
        ));
    } else {
        index.lock().unwrap_or_else(|e| e.into_inner()).synced.grpc_routes = true;
    }
    let mut synced = false;
    let mut addresses = Addresses::default();
    loop {
        changed.notified().await;
        tokio::time::sleep(debounce).await;
        let started = std::time::Instant::now();
        let (built, endpoints) = {
            let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
            if !index.synced.all() {
                continue;
            }
            (index.rebuild(&trust_domain), index.endpoints())
        };
        if !synced {
            synced = true;
            info!(services = built.len(), "discovery watches synced");
        }
        let rebuilt = built.len();
        metrics.discovery_rebuilds.inc_by(rebuilt as u64);
        for (key, svc) in &built {
            addresses.update(key, svc.as_ref());
        }
        let changes = built.into_iter().map(|(key, svc)| {
            let resource = svc.map(|s| crate::xds::resource(SERVICE_TYPE, key.clone(), s.encode_to_vec()));
            (key, resource)
        });
        let published = crate::xds::publish_changes(&tx, changes, addresses.snapshot());
        let services = tx.borrow().as_ref().map_or(0, |s| s.resources.len());
        metrics.discovery_services.set(services as i64);
        metrics.discovery_endpoints.set(endpoints as i64);
        debug!(rebuilt, published, took = ?started.elapsed(), "discovery rebuilt what changed");
    }
}

#[cfg(test)]
mod tests;

/// Whether the API server serves `api`'s kind (the Gateway API's CRDs
/// are optional); checked once, at start.
async fn installed<K>(api: &Api<K>) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            info!(
                kind = %K::kind(&()),
                "the Gateway API's CRDs are not installed: these routes are not followed (restart the agent once they are)"
            );
            false
        }
        _ => true,
    }
}
