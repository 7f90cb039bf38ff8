//! The agent's aggregated discovery stream (delta xDS), carrying two
//! resource types:
//! - `mizzen.discovery.v1.Service`: where outbound connections go, turned
//!   into [`Routes`] (every Service, or those of the namespaces of the
//!   proxy's [`Scope`]);
//! - `mizzen.discovery.v1.WorkloadPolicy`: this pod's authorization and
//!   peer authentication, compiled into a [`Policy`] (the agent sends this
//!   pod's only).
//!
//! Each response is applied whole or not at all (a resource that does not
//! decode or compile NACKs the response and changes nothing), what was
//! applied is ACKed, and the stream reconnects with backoff, telling the
//! agent which versions it already holds. A push the agent split over
//! several responses (all but the last say [`MORE`]) becomes routes once
//! its last response is applied: the proxy is not ready before it has the
//! whole first state.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mizzen_api::SpiffeId;
use mizzen_api::proto::discovery::{self as pb, ADDRESS_PREFIX, MORE, POLICY_TYPE, SERVICE_TYPE};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::identity::SdsSource;
use crate::policy::{self, Policy};
use mizzen_api::routing::traffic_policy::TrafficPolicy;
use mizzen_api::routing::{RouteTable, Subsets};

/// One place a connection can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `Some` when the endpoint is meshed: mutual TLS, and the server must
    /// prove this identity (an unparsable ID in discovery becomes
    /// `Some(Err)`, and connections to it fail closed).
    pub identity: Option<Result<SpiffeId, String>>,
    /// `<namespace>/<name>` of the pod, when known.
    pub pod: String,
}

/// A Service port's ready backends.
#[derive(Debug, Clone)]
pub struct Target {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// The Service port.
    pub port: u16,
    pub backends: Vec<Backend>,
    /// What the port carries (appProtocol, port name, or to be sniffed).
    pub protocol: crate::protocol::PortProtocol,
    /// The Service's HTTP routes, when a VirtualService routes it.
    pub routes: Option<Arc<RouteTable>>,
    /// The backends of each DestinationRule subset, by name (a subset no
    /// endpoint is in is absent).
    pub subsets: HashMap<String, Arc<Target>>,
    /// The DestinationRule's traffic policy for these backends.
    pub policy: TrafficPolicy,
    /// Where `ROUND_ROBIN` goes next.
    pub round_robin: Arc<std::sync::atomic::AtomicUsize>,
}

/// A Service as the proxy holds it: the version the agent gave it, the
/// resource, and its VirtualService compiled.
#[derive(Debug, Clone)]
pub struct HeldService {
    pub version: String,
    pub service: pb::Service,
    pub routes: Option<Arc<RouteTable>>,
    /// Its DestinationRule compiled.
    pub destination: Option<Arc<Subsets>>,
}

/// Why a Service's routing cannot be used (the response is refused).
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("VirtualService {name:?} is not <namespace>/<name>")]
    Name { name: String },
    #[error("VirtualService {name}: its spec does not parse: {source}")]
    Spec { name: String, source: serde_json::Error },
    #[error("VirtualService {name}: {source}")]
    Compile {
        name: String,
        source: mizzen_api::routing::RouteError,
    },
    #[error("DestinationRule {name:?} is not <namespace>/<name>")]
    RuleName { name: String },
    #[error("DestinationRule {name}: its spec does not parse: {source}")]
    RuleSpec { name: String, source: serde_json::Error },
    #[error("DestinationRule {name}: {source}")]
    RuleCompile {
        name: String,
        source: mizzen_api::routing::RouteError,
    },
}

/// `service`'s DestinationRule compiled.
fn destination_of(service: &pb::Service) -> Result<Option<Arc<Subsets>>, RoutingError> {
    let Some(d) = &service.destination_rule else {
        return Ok(None);
    };
    let name = d.name.clone();
    let Some((namespace, _)) = name.split_once('/') else {
        return Err(RoutingError::RuleName { name });
    };
    let spec = serde_json::from_str(&d.spec_json).map_err(|source| RoutingError::RuleSpec {
        name: name.clone(),
        source,
    })?;
    let compiled = mizzen_api::routing::compile_subsets(&spec, namespace)
        .map_err(|source| RoutingError::RuleCompile { name, source })?;
    Ok(Some(Arc::new(compiled)))
}

/// Equal when the agent sent the same: the routes follow from it.
impl PartialEq for HeldService {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.service == other.service
    }
}

impl HeldService {
    /// `service` at `version`, its routing compiled.
    pub fn new(version: String, service: pb::Service) -> Result<Self, RoutingError> {
        let routes = match &service.routing {
            None => None,
            Some(r) => {
                let name = r.virtual_service.clone();
                let Some((namespace, _)) = name.split_once('/') else {
                    return Err(RoutingError::Name { name });
                };
                let spec = serde_json::from_str(&r.spec_json).map_err(|source| RoutingError::Spec {
                    name: name.clone(),
                    source,
                })?;
                let compiled = mizzen_api::routing::compile(&spec, namespace)
                    .map_err(|source| RoutingError::Compile { name, source })?;
                Some(Arc::new(compiled.table))
            }
        };
        Ok(Self {
            version,
            destination: destination_of(&service)?,
            service,
            routes,
        })
    }
}

/// What the proxy knows of a pod IP.
#[derive(Debug, Clone)]
struct PodInfo {
    identity: Option<Result<SpiffeId, String>>,
    pod: String,
}

/// Where a connection to an original destination goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A Service's cluster IP and port: balance over its backends (empty
    /// when none is ready).
    Service(Arc<Target>),
    /// A known pod's IP: to that address, mTLS if it is meshed.
    Pod(Backend),
    /// Outside the mesh's knowledge: plaintext to the address as is.
    Passthrough(SocketAddr),
}

/// The index outbound connections are resolved in.
#[derive(Debug, Default)]
pub struct Routes {
    services: HashMap<SocketAddr, Arc<Target>>,
    pods: HashMap<IpAddr, PodInfo>,
    /// Every Service's cluster IPs.
    vips: std::collections::HashSet<IpAddr>,
    /// The Services (`<namespace>/<name>`) an endpoint address serves.
    serving: HashMap<SocketAddr, Vec<String>>,
    /// Each Service's targets (every port and cluster IP), by
    /// `<namespace>/<name>`: where routes send requests.
    by_service: HashMap<String, Vec<(SocketAddr, Arc<Target>)>>,
    /// How many Services were indexed.
    count: usize,
}

fn identity_of(ep: &pb::Endpoint) -> Option<Result<SpiffeId, String>> {
    ep.meshed.then(|| {
        SpiffeId::parse(&ep.spiffe_id).map_err(|e| format!("bad SPIFFE ID {:?} in discovery: {e}", ep.spiffe_id))
    })
}

impl Routes {
    /// Indexes `services`.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a HeldService>) -> Self {
        let mut routes = Routes::default();
        for held in services {
            let svc = &held.service;
            routes.count += 1;
            routes
                .vips
                .extend(svc.cluster_ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()));
            let name = format!("{}/{}", svc.namespace, svc.name);
            for ep in &svc.endpoints {
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        routes.pods.entry(ip).or_insert_with(|| PodInfo {
                            identity: identity_of(ep),
                            pod: ep.pod.clone(),
                        });
                    }
                }
            }
            for port in svc.ports.iter().filter(|p| p.protocol == "TCP") {
                let Ok(service_port) = u16::try_from(port.port) else {
                    continue;
                };
                let app_protocol = (!port.app_protocol.is_empty()).then_some(port.app_protocol.as_str());
                let protocol = crate::protocol::select(app_protocol, &port.name);
                for ip in &svc.cluster_ips {
                    let Ok(vip) = ip.parse::<IpAddr>() else { continue };
                    let backends: Vec<Backend> = svc
                        .endpoints
                        .iter()
                        .filter_map(|ep| {
                            let target = u16::try_from(*ep.ports.get(&port.name)?).ok()?;
                            // The endpoint's address of the VIP's family.
                            let addr = ep
                                .addresses
                                .iter()
                                .filter_map(|a| a.parse::<IpAddr>().ok())
                                .find(|a| a.is_ipv4() == vip.is_ipv4())?;
                            Some(Backend {
                                addr: SocketAddr::new(addr, target),
                                identity: identity_of(ep),
                                pod: ep.pod.clone(),
                            })
                        })
                        .collect();
                    for b in &backends {
                        let names: &mut Vec<String> = routes.serving.entry(b.addr).or_default();
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                    }
                    let target = Arc::new(Target {
                        service: name.clone(),
                        port: service_port,
                        subsets: subsets_of(
                            &name,
                            service_port,
                            &svc.endpoints,
                            &backends,
                            held.destination.as_deref(),
                        ),
                        backends,
                        protocol,
                        routes: held.routes.clone(),
                        policy: held
                            .destination
                            .as_ref()
                            .map(|d| d.policy_for(None, service_port))
                            .unwrap_or_default(),
                        round_robin: Default::default(),
                    });
                    let at = SocketAddr::new(vip, service_port);
                    routes
                        .by_service
                        .entry(name.clone())
                        .or_default()
                        .push((at, target.clone()));
                    routes.services.insert(at, target);
                }
            }
        }
        routes
    }

    /// Where a connection to `dst` goes.
    pub fn resolve(&self, dst: SocketAddr) -> Destination {
        if let Some(t) = self.services.get(&dst) {
            return Destination::Service(t.clone());
        }
        match self.pods.get(&dst.ip()) {
            Some(p) => Destination::Pod(Backend {
                addr: dst,
                identity: p.identity.clone(),
                pod: p.pod.clone(),
            }),
            None => Destination::Passthrough(dst),
        }
    }

    /// The Service (`<namespace>/<name>`) a request to endpoint `addr` was
    /// for: the one Service that has it, or, when several have it, the one
    /// `host` names (`name`, `name.namespace`, `name.namespace.svc…`, with
    /// or without a port), as Istio's server side names
    /// `destination_service`. `None` when neither says.
    pub fn service_at(&self, addr: SocketAddr, host: Option<&str>) -> Option<&str> {
        match self.serving.get(&addr)?.as_slice() {
            [one] => Some(one),
            several => {
                let host = host?;
                let host = host
                    .rsplit_once(':')
                    .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                    .map_or(host, |(h, _)| h);
                let mut labels = host.split('.');
                let name = labels.next()?;
                let namespace = labels.next();
                several.iter().map(String::as_str).find(|s| {
                    s.split_once('/')
                        .is_some_and(|(ns, n)| n == name && namespace.is_none_or(|want| want == ns))
                })
            }
        }
    }

    /// Where a route sends a request that came for `dst`: the target of
    /// `service` on `port`, or without one, on the port the request came
    /// to (else the Service's only port); of `dst`'s address family.
    pub fn target(&self, service: &str, port: Option<u16>, dst: SocketAddr) -> Option<&Arc<Target>> {
        let targets = self.by_service.get(service)?;
        let mut ports: Vec<u16> = targets.iter().map(|(at, _)| at.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        let port = match (port, ports.as_slice()) {
            (Some(p), _) => p,
            (None, [only]) => *only,
            (None, _) => dst.port(),
        };
        let on = |want_v4: Option<bool>| {
            targets
                .iter()
                .find(|(at, _)| at.port() == port && want_v4.is_none_or(|v4| at.is_ipv4() == v4))
        };
        on(Some(dst.is_ipv4())).or_else(|| on(None)).map(|(_, t)| t)
    }

    /// The target of `d`, a route's destination, for traffic that came
    /// for `dst`: its Service's, or its subset's (an empty one when no
    /// endpoint is in it); `None` when this proxy knows no such Service
    /// port.
    pub fn routed_target(&self, d: &mizzen_api::routing::Destination, dst: SocketAddr) -> Option<Arc<Target>> {
        let service = self.target(&d.service, d.port, dst)?;
        Some(match &d.subset {
            None => service.clone(),
            Some(name) => service.subsets.get(name).cloned().unwrap_or_else(|| {
                Arc::new(Target {
                    service: format!("{} subset {name}", d.service),
                    backends: Vec::new(),
                    ..(**service).clone()
                })
            }),
        })
    }

    /// How many Services the routes cover.
    pub fn service_count(&self) -> usize {
        self.count
    }

    /// How many endpoint addresses (pod IPs) the routes know.
    pub fn endpoint_count(&self) -> usize {
        self.pods.len()
    }

    /// Whether `ip` is a Service's cluster IP or a known endpoint's.
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.vips.contains(&ip) || self.pods.contains_key(&ip)
    }
}

/// Each subset's share of `backends` (one port's, in the order of
/// `endpoints`' addresses of the port's family).
fn subsets_of(
    service: &str,
    port: u16,
    endpoints: &[pb::Endpoint],
    backends: &[Backend],
    rule: Option<&Subsets>,
) -> HashMap<String, Arc<Target>> {
    let mut by_name: HashMap<String, Vec<Backend>> = HashMap::new();
    for ep in endpoints.iter().filter(|ep| !ep.subsets.is_empty()) {
        let ips: Vec<IpAddr> = ep.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        for b in backends.iter().filter(|b| ips.contains(&b.addr.ip())) {
            for name in &ep.subsets {
                by_name.entry(name.clone()).or_default().push(b.clone());
            }
        }
    }
    by_name
        .into_iter()
        .map(|(name, backends)| {
            let target = Target {
                service: format!("{service} subset {name}"),
                port,
                backends,
                protocol: crate::protocol::PortProtocol::Sniff,
                routes: None,
                subsets: HashMap::new(),
                policy: rule.map(|r| r.policy_for(Some(&name), port)).unwrap_or_default(),
                round_robin: Default::default(),
            };
            (name, Arc::new(target))
        })
        .collect()
}

/// The body of `r`, which must be a `type_url`.
fn body<'a>(
    r: &'a envoy_types::pb::envoy::service::discovery::v3::Resource,
    type_url: &str,
) -> Result<&'a [u8], String> {
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| format!("resource {:?} has no body", r.name))?;
    if any.type_url != type_url {
        return Err(format!("resource {:?} is a {:?}", r.name, any.type_url));
    }
    Ok(&any.value)
}

/// Applies one response of Services to `held`, all or nothing.
pub fn apply(held: &mut BTreeMap<String, HeldService>, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
    if resp.type_url != SERVICE_TYPE {
        return Err(format!("expected {SERVICE_TYPE}, got {:?}", resp.type_url));
    }
    let mut decoded = Vec::with_capacity(resp.resources.len());
    for r in &resp.resources {
        let svc = pb::Service::decode(body(r, SERVICE_TYPE)?).map_err(|e| format!("resource {:?}: {e}", r.name))?;
        let svc = HeldService::new(r.version.clone(), svc).map_err(|e| format!("resource {:?}: {e}", r.name))?;
        decoded.push((r.name.clone(), svc));
    }
    for name in &resp.removed_resources {
        held.remove(name);
    }
    held.extend(decoded);
    Ok(())
}

/// The workload policy held: its name and version, and what it compiled to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldPolicy {
    pub current: Option<(String, String, Arc<Policy>)>,
}

/// Applies one response of this pod's workload policy, all or nothing.
pub fn apply_policy(held: &mut HeldPolicy, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
    let [r] = resp.resources.as_slice() else {
        if resp.resources.is_empty() {
            if let Some((name, _, _)) = &held.current
                && resp.removed_resources.contains(name)
            {
                held.current = None;
            }
            return Ok(());
        }
        return Err(format!(
            "{} workload policies in one response: a proxy has one",
            resp.resources.len()
        ));
    };
    let wire = pb::WorkloadPolicy::decode(body(r, POLICY_TYPE)?).map_err(|e| format!("resource {:?}: {e}", r.name))?;
    let compiled = policy::decode(&wire).map_err(|e| e.to_string())?;
    held.current = Some((r.name.clone(), r.version.clone(), Arc::new(compiled)));
    Ok(())
}

/// Which Services the proxy follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Subscription names: `<namespace>/*` each, and `address/<ip>` for
    /// each address fetched on demand; none: every Service.
    names: Vec<String>,
}

impl Scope {
    /// The Services of `namespaces`, or every Service when there are none.
    pub fn of(namespaces: &[String]) -> Self {
        Self {
            names: namespaces.iter().map(|ns| format!("{ns}/*")).collect(),
        }
    }

    /// What a proxy follows: `namespaces` as configured; `*` among them
    /// means every Service; none means its own namespace's, when it knows
    /// it (an injected proxy does), else every Service.
    pub fn for_pod(namespaces: &[String], own: Option<&str>) -> Self {
        if namespaces.iter().any(|ns| ns == "*") {
            return Self::default();
        }
        match (namespaces, own) {
            ([], Some(own)) => Self::of(&[own.to_owned()]),
            _ => Self::of(namespaces),
        }
    }

    /// Whether only some Services are followed (others are fetched on
    /// demand).
    pub fn is_partial(&self) -> bool {
        !self.names.is_empty()
    }

    /// Adds `ip` to what is followed; the name to subscribe to. Past
    /// [`MAX_ON_DEMAND`] addresses (an app reaching many addresses outside
    /// the mesh), every Service is followed instead (`*`): the agent
    /// bounds the names one stream may follow, and a stream it refuses
    /// would carry no policy either.
    fn fetch(&mut self, ip: IpAddr) -> String {
        let asked = self.names.iter().filter(|n| n.starts_with(ADDRESS_PREFIX)).count();
        if asked >= MAX_ON_DEMAND {
            self.names.clear();
            return "*".to_owned();
        }
        let name = format!("{ADDRESS_PREFIX}{ip}");
        self.names.push(name.clone());
        name
    }
}

/// Addresses a proxy fetches on demand before it follows every Service.
pub const MAX_ON_DEMAND: usize = 1024;

/// Services fetched on first use, for a proxy that follows only some
/// namespaces: an outbound connection to an address the routes do not know
/// subscribes to `address/<ip>` and waits (at most its connect timeout)
/// until the routes know it or the agent says no Service has it.
#[derive(Debug)]
pub struct OnDemand {
    asks: mpsc::UnboundedSender<IpAddr>,
    /// Set once the proxy follows every Service: nothing to fetch.
    everything: std::sync::atomic::AtomicBool,
    asked: std::sync::Mutex<std::collections::HashSet<IpAddr>>,
    /// Addresses the agent said no Service has; bumped on each answer.
    unknown: watch::Sender<std::collections::HashSet<IpAddr>>,
}

impl OnDemand {
    /// The handle, and the requests for the discovery stream to send.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<IpAddr>) {
        let (asks, rx) = mpsc::unbounded_channel();
        let (unknown, _) = watch::channel(Default::default());
        let od = Self {
            asks,
            everything: Default::default(),
            asked: Default::default(),
            unknown,
        };
        (Arc::new(od), rx)
    }

    /// Waits until `routes` know `ip` or the agent says no Service has it,
    /// at most `limit`, asking the agent the first time.
    pub async fn fetch(
        &self,
        ip: IpAddr,
        mut routes: watch::Receiver<Option<Arc<Routes>>>,
        limit: std::time::Duration,
    ) {
        if self.everything.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let first = self.asked.lock().unwrap_or_else(|e| e.into_inner()).insert(ip);
        if first {
            let _ = self.asks.send(ip);
        } else if self.unknown.borrow().contains(&ip) {
            return;
        }
        let mut unknown = self.unknown.subscribe();
        let settled = async {
            loop {
                let known = routes.borrow_and_update().as_ref().is_some_and(|r| r.knows(ip));
                if known || unknown.borrow_and_update().contains(&ip) {
                    return;
                }
                tokio::select! {
                    r = routes.changed() => if r.is_err() { return },
                    u = unknown.changed() => if u.is_err() { return },
                }
            }
        };
        let _ = tokio::time::timeout(limit, settled).await;
    }

    /// The proxy now follows every Service: stop fetching.
    fn follow_everything(&self) {
        self.everything.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The agent's answers in a response: `address/<ip>` among the
    /// removed names means no Service has it.
    fn answered(&self, removed: &[String]) {
        let nobody: Vec<IpAddr> = removed
            .iter()
            .filter_map(|n| n.strip_prefix(ADDRESS_PREFIX)?.parse().ok())
            .collect();
        if !nobody.is_empty() {
            self.unknown.send_modify(|u| u.extend(nobody));
        }
    }
}

fn request(
    type_url: &str,
    initial: Option<HashMap<String, String>>,
    nonce: &str,
    error: Option<String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        initial_resource_versions: initial.unwrap_or_default(),
        response_nonce: nonce.into(),
        error_detail: error.map(crate::identity::nack_status),
        ..Default::default()
    }
}

fn publish(held: &BTreeMap<String, HeldService>, tx: &watch::Sender<Option<Arc<Routes>>>) {
    tx.send_replace(Some(Arc::new(Routes::new(held.values()))));
}

/// What the discovery stream keeps across reconnections: what it holds of
/// each type (sent as initial versions on reconnect) and where it goes.
struct Following {
    scope: Scope,
    /// Addresses to fetch on demand, and where answers go.
    on_demand: Option<(Arc<OnDemand>, mpsc::UnboundedReceiver<IpAddr>)>,
    held: BTreeMap<String, HeldService>,
    tx: watch::Sender<Option<Arc<Routes>>>,
    policy: HeldPolicy,
    policy_tx: watch::Sender<Option<Arc<Policy>>>,
}

impl Following {
    /// The first request of each type on a new stream.
    fn opening(&self) -> [DeltaDiscoveryRequest; 2] {
        let services = self.held.iter().map(|(k, h)| (k.clone(), h.version.clone())).collect();
        let policy = self
            .policy
            .current
            .iter()
            .map(|(name, version, _)| (name.clone(), version.clone()))
            .collect();
        let mut services = request(SERVICE_TYPE, Some(services), "", None);
        services.resource_names_subscribe = self.scope.names.clone();
        [services, request(POLICY_TYPE, Some(policy), "", None)]
    }

    /// Applies a response of either type; publishes what changed.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        match resp.type_url.as_str() {
            SERVICE_TYPE => {
                apply(&mut self.held, resp)?;
                if let Some((od, _)) = &self.on_demand {
                    od.answered(&resp.removed_resources);
                }
                let more = resp.system_version_info == MORE;
                // A push split over several responses is acted on whole:
                // routes (and readiness, at first) wait for its last part.
                if !more {
                    publish(&self.held, &self.tx);
                }
                debug!(
                    changed = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    services = self.held.len(),
                    more,
                    "discovery updated"
                );
            }
            POLICY_TYPE => {
                apply_policy(&mut self.policy, resp)?;
                let now = self.policy.current.as_ref().map(|(_, _, p)| p.clone());
                info!(
                    version = self.policy.current.as_ref().map(|(_, v, _)| v.as_str()),
                    authorization_policies = now.as_ref().map(|p| p.authz.len()),
                    "workload policy updated"
                );
                self.policy_tx.send_replace(now);
            }
            other => {
                return Err(format!(
                    "this proxy follows {SERVICE_TYPE} and {POLICY_TYPE}, not {other:?}"
                ));
            }
        }
        Ok(())
    }
}

async fn stream_once(src: &SdsSource, state: &mut Following, token: String) -> Result<(), String> {
    let channel = src.channel().await?;
    let (req_tx, req_rx) = mpsc::channel(4);
    for first in state.opening() {
        req_tx.send(first).await.map_err(|_| "send")?;
    }
    let req = src.request(&token, req_rx)?;
    let mut inbound = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .delta_aggregated_resources(req)
        .await
        .map_err(|s| format!("agent refused the discovery stream: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        let asked = async {
            match state.on_demand.as_mut() {
                Some((_, asks)) => asks.recv().await,
                None => std::future::pending().await,
            }
        };
        let resp = tokio::select! {
            msg = inbound.message() => msg
                .map_err(|s| format!("discovery stream failed: {:?}: {}", s.code(), s.message()))?
                .ok_or("the agent closed the discovery stream")?,
            Some(ip) = asked => {
                let mut ask = request(SERVICE_TYPE, None, "", None);
                ask.resource_names_subscribe = vec![state.scope.fetch(ip)];
                if state.scope.names.is_empty() {
                    // Too many addresses asked for: follow everything.
                    if let Some((od, _)) = &state.on_demand {
                        od.follow_everything();
                    }
                }
                req_tx.send(ask).await.map_err(|_| "send a subscription")?;
                continue;
            }
        };
        // `apply` changes nothing unless the whole response is usable.
        let answer = match state.apply(&resp) {
            Ok(()) => request(&resp.type_url, None, &resp.nonce, None),
            Err(e) => {
                warn!(type_url = %resp.type_url, error = %e, nonce = %resp.nonce, "rejecting an update (NACK)");
                request(&resp.type_url, None, &resp.nonce, Some(e))
            }
        };
        req_tx.send(answer).await.map_err(|_| "send ACK")?;
    }
}

/// Keeps `tx` (routes) and `policy_tx` (this pod's policy) fed from the
/// agent's discovery stream, forever: `None` until the first response of
/// each (the agent sends them once it has listed the cluster). Both are
/// kept across reconnects (the last known state beats none).
pub async fn follow(
    src: SdsSource,
    scope: Scope,
    on_demand: Option<(Arc<OnDemand>, mpsc::UnboundedReceiver<IpAddr>)>,
    tx: watch::Sender<Option<Arc<Routes>>>,
    policy_tx: watch::Sender<Option<Arc<Policy>>>,
) {
    let mut state = Following {
        scope,
        on_demand,
        held: BTreeMap::new(),
        tx,
        policy: HeldPolicy::default(),
        policy_tx,
    };
    src.follow("discovery", &mut state, |src, state, token| {
        Box::pin(stream_once(src, state, token))
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> pb::Service {
        pb::Service {
            namespace: "demo".into(),
            name: "web".into(),
            cluster_ips: vec!["10.0.0.10".into()],
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "TCP".into(),
                app_protocol: String::new(),
            }],
            endpoints: vec![
                pb::Endpoint {
                    addresses: vec!["10.200.0.2".into()],
                    ports: [("http".to_string(), 8080)].into(),
                    meshed: true,
                    spiffe_id: "spiffe://cluster.local/ns/demo/sa/web".into(),
                    pod: "demo/web-1".into(),
                    subsets: vec!["v1".into()],
                },
                pb::Endpoint {
                    addresses: vec!["10.200.0.3".into()],
                    ports: [("http".to_string(), 8081)].into(),
                    meshed: false,
                    spiffe_id: String::new(),
                    pod: "demo/web-2".into(),
                    subsets: vec!["v2".into()],
                },
                pb::Endpoint {
                    addresses: vec!["10.200.0.4".into()],
                    ports: [("metrics".to_string(), 9000)].into(),
                    meshed: true,
                    spiffe_id: "not a spiffe id".into(),
                    pod: "demo/web-3".into(),
                    subsets: vec!["v1".into()],
                },
            ],
            routing: None,
            destination_rule: None,
        }
    }

    fn resp(services: &[pb::Service], removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources: services
                .iter()
                .map(|s| envoy_types::pb::envoy::service::discovery::v3::Resource {
                    name: format!("{}/{}", s.namespace, s.name),
                    version: "1".into(),
                    resource: Some(envoy_types::pb::google::protobuf::Any {
                        type_url: SERVICE_TYPE.into(),
                        value: s.encode_to_vec(),
                    }),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    fn routes(held: &BTreeMap<String, HeldService>) -> Routes {
        Routes::new(held.values())
    }

    fn held(svc: pb::Service) -> HeldService {
        HeldService::new("1".into(), svc).expect("compiles")
    }

    #[test]
    fn a_subset_holds_the_backends_of_its_endpoints_on_each_port() {
        let r = Routes::new([&held(web())]);
        let dst: SocketAddr = "10.0.0.10:80".parse().expect("addr");
        let t = r.target("demo/web", None, dst).expect("the only port");
        let addrs =
            |name: &str| -> Vec<String> { t.subsets[name].backends.iter().map(|b| b.addr.to_string()).collect() };
        // web-3 is in v1 but has no `http` port.
        assert_eq!(addrs("v1"), ["10.200.0.2:8080"]);
        assert_eq!(addrs("v2"), ["10.200.0.3:8081"]);
        assert!(r.target("demo/web", Some(81), dst).is_none(), "no such port");
        assert!(r.target("demo/nothing", None, dst).is_none());
    }

    #[test]
    fn a_service_whose_virtual_service_does_not_compile_is_refused_whole() {
        let mut routed = web();
        routed.routing = Some(pb::Routing {
            virtual_service: "demo/web".into(),
            spec_json: r#"{"hosts":["web"],"http":[{"route":[{"destination":{"host":"web"},"weight":60},{"destination":{"host":"web"},"weight":60}]}]}"#.into(),
        });
        let mut held = BTreeMap::new();
        let err = apply(&mut held, &resp(&[routed.clone()], &[])).expect_err("refused");
        assert!(err.contains("weights"), "{err}");
        assert!(held.is_empty());
        routed.routing = Some(pb::Routing {
            virtual_service: "demo/web".into(),
            spec_json: r#"{"hosts":["web"],"http":[{"route":[{"destination":{"host":"web","subset":"v2"}}]}]}"#.into(),
        });
        apply(&mut held, &resp(&[routed], &[])).expect("applies");
        let dst: SocketAddr = "10.0.0.10:80".parse().expect("addr");
        let Destination::Service(t) = routes(&held).resolve(dst) else {
            panic!("a Service")
        };
        assert_eq!(t.routes.as_ref().map(|t| t.routes.len()), Some(1));
    }

    #[test]
    fn an_endpoint_names_the_service_it_serves_or_the_one_the_host_names() {
        let mut other = web();
        other.name = "web-canary".into();
        other.cluster_ips = vec!["10.0.0.11".into()];
        other.endpoints.truncate(1);
        let r = Routes::new([&held(web()), &held(other)]);
        let shared: SocketAddr = "10.200.0.2:8080".parse().expect("addr");
        let only_web: SocketAddr = "10.200.0.3:8081".parse().expect("addr");
        let table: [(SocketAddr, Option<&str>, Option<&str>); 8] = [
            (only_web, None, Some("demo/web")),
            (only_web, Some("anything"), Some("demo/web")),
            (shared, None, None),
            (shared, Some("web-canary"), Some("demo/web-canary")),
            (shared, Some("web.demo.svc.cluster.local:80"), Some("demo/web")),
            (shared, Some("web.other"), None),
            (shared, Some("unrelated"), None),
            ("10.200.0.9:8080".parse().expect("addr"), Some("web"), None),
        ];
        for (addr, host, want) in table {
            assert_eq!(r.service_at(addr, host), want, "{addr} host {host:?}");
        }
    }

    #[test]
    fn vips_resolve_to_ready_backends_with_their_identity() {
        let mut held = BTreeMap::new();
        apply(&mut held, &resp(&[web()], &[])).expect("applies");
        let r = routes(&held);
        let Destination::Service(t) = r.resolve("10.0.0.10:80".parse().expect("addr")) else {
            panic!("VIP not resolved");
        };
        assert_eq!(t.service, "demo/web");
        let addrs: Vec<String> = t.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.200.0.2:8080", "10.200.0.3:8081"],
            "an endpoint without the port is skipped"
        );
        assert_eq!(
            t.backends[0].identity.clone().expect("meshed").expect("valid").as_str(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert!(t.backends[1].identity.is_none(), "unmeshed: plaintext");
        // Pod IPs are known with their identity; the broken ID fails closed.
        match r.resolve("10.200.0.4:9000".parse().expect("addr")) {
            Destination::Pod(b) => assert!(matches!(b.identity, Some(Err(_)))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.resolve("10.0.0.10:81".parse().expect("addr")),
            Destination::Passthrough(_)
        ));
        assert!(matches!(
            r.resolve("192.0.2.1:80".parse().expect("addr")),
            Destination::Passthrough(_)
        ));
    }

    #[test]
    fn a_bad_resource_changes_nothing() {
        let mut held = BTreeMap::new();
        apply(&mut held, &resp(&[web()], &[])).expect("applies");
        let mut bad = resp(&[web()], &["demo/web"]);
        bad.resources[0].resource.as_mut().expect("any").value = vec![0xff, 0xff, 0xff];
        let before = held.clone();
        assert!(apply(&mut held, &bad).is_err());
        assert_eq!(held, before, "neither the removal nor the update applied");
        let mut wrong = resp(&[web()], &[]);
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(apply(&mut held, &wrong).is_err());
        apply(&mut held, &resp(&[], &["demo/web"])).expect("removal");
        assert!(held.is_empty());
    }

    #[test]
    fn a_push_in_several_responses_becomes_routes_after_its_last() {
        let (tx, rx) = watch::channel(None);
        let (policy_tx, _policy_rx) = watch::channel(None);
        let mut following = Following {
            scope: Scope::default(),
            on_demand: None,
            held: BTreeMap::new(),
            tx,
            policy: HeldPolicy::default(),
            policy_tx,
        };
        let mut other = web();
        other.name = "api".into();
        other.cluster_ips = vec!["10.0.0.11".into()];
        let mut first = resp(&[web()], &[]);
        first.system_version_info = MORE.into();
        following.apply(&first).expect("applies");
        assert!(rx.borrow().is_none(), "no routes from part of the first state");
        following.apply(&resp(&[other], &[])).expect("applies");
        let routes = rx.borrow().clone().expect("routes once the push is whole");
        assert_eq!(routes.service_count(), 2);
        assert_eq!(routes.endpoint_count(), 3, "the two Services share their three pods");
    }

    #[test]
    fn a_scoped_proxy_subscribes_to_its_namespaces_on_every_stream() {
        let (tx, _rx) = watch::channel(None);
        let (policy_tx, _policy_rx) = watch::channel(None);
        let mut following = Following {
            scope: Scope::of(&["demo".to_owned(), "shared".to_owned()]),
            on_demand: None,
            held: BTreeMap::new(),
            tx,
            policy: HeldPolicy::default(),
            policy_tx,
        };
        let [services, policy] = following.opening();
        assert_eq!(services.resource_names_subscribe, ["demo/*", "shared/*"]);
        assert!(policy.resource_names_subscribe.is_empty());
        following.apply(&resp(&[web()], &[])).expect("applies");
        let [again, _] = following.opening();
        assert_eq!(
            again.resource_names_subscribe,
            ["demo/*", "shared/*"],
            "after a reconnect too"
        );
        assert_eq!(again.initial_resource_versions.len(), 1, "with what it holds");
        let [everything, _] = Following {
            scope: Scope::default(),
            ..following
        }
        .opening();
        assert!(
            everything.resource_names_subscribe.is_empty(),
            "unscoped: every Service"
        );
    }

    #[tokio::test]
    async fn on_demand_asks_once_and_waits_for_the_routes_or_the_agents_no() {
        use std::time::{Duration, Instant};
        let (od, mut asks) = OnDemand::new();
        let (tx, rx) = watch::channel(Some(Arc::new(Routes::default())));
        let vip: IpAddr = "10.0.0.10".parse().expect("ip");
        let long = Duration::from_secs(30);

        // The routes learn the address while the connection waits.
        let waiting = tokio::spawn({
            let (od, rx) = (od.clone(), rx.clone());
            async move { od.fetch(vip, rx, long).await }
        });
        assert_eq!(asks.recv().await, Some(vip), "asked the agent");
        tx.send_replace(Some(Arc::new(Routes::new([&held(web())]))));
        let started = Instant::now();
        waiting.await.expect("fetch");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woke when the routes knew it"
        );

        // An address no Service has: the agent's answer ends the wait,
        // and later connections do not wait or ask again.
        let outside: IpAddr = "192.0.2.1".parse().expect("ip");
        let waiting = tokio::spawn({
            let (od, rx) = (od.clone(), rx.clone());
            async move { od.fetch(outside, rx, long).await }
        });
        assert_eq!(asks.recv().await, Some(outside));
        od.answered(&[format!("{ADDRESS_PREFIX}{outside}")]);
        let started = Instant::now();
        waiting.await.expect("fetch");
        assert!(started.elapsed() < Duration::from_secs(5), "woke on the agent's no");
        od.fetch(outside, rx, long).await;
        assert!(asks.try_recv().is_err(), "asked once");
    }

    #[test]
    fn a_proxy_follows_its_own_namespace_unless_told_otherwise() {
        let own = Some("demo");
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Scope::for_pod(&[], own), Scope::of(&list(&["demo"])));
        assert_eq!(Scope::for_pod(&list(&["a", "b"]), own), Scope::of(&list(&["a", "b"])));
        assert_eq!(
            Scope::for_pod(&list(&["*"]), own),
            Scope::default(),
            "* follows everything"
        );
        assert_eq!(Scope::for_pod(&list(&["a", "*"]), own), Scope::default());
        assert_eq!(
            Scope::for_pod(&[], None),
            Scope::default(),
            "no namespace known: everything"
        );
        assert!(!Scope::default().is_partial() && Scope::for_pod(&[], own).is_partial());
    }

    #[test]
    fn past_the_on_demand_bound_a_proxy_follows_every_service() {
        let mut scope = Scope::of(&["demo".to_owned()]);
        for i in 0..MAX_ON_DEMAND {
            let ip = IpAddr::from([192, 0, (i / 256) as u8, (i % 256) as u8]);
            assert_eq!(scope.fetch(ip), format!("{ADDRESS_PREFIX}{ip}"));
        }
        assert_eq!(scope.names.len(), MAX_ON_DEMAND + 1, "the namespace and each address");
        assert_eq!(scope.fetch(IpAddr::from([198, 51, 100, 1])), "*");
        assert!(!scope.is_partial(), "a reconnect asks for everything too");
    }
}
