use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;

/// Pod IP → owner, from every pod's held addresses: the whole-cluster
/// reading that [`Index::owner`] keeps up to date event by event (the
/// reference the index's tests compare with).
pub(super) fn ip_owners<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashMap<String, IpOwner> {
    let mut owners: HashMap<String, IpOwner> = HashMap::new();
    for pod in pods {
        let facts = PodFacts::of(pod);
        for ip in held_ips(pod) {
            owners
                .entry(ip)
                .and_modify(|o| *o = IpOwner::Conflict)
                .or_insert_with(|| IpOwner::Pod(facts.clone()));
        }
    }
    owners
}

/// The discovery resource of every Service, built whole ([`build_one`]
/// for each): what [`Index::rebuild`] must add up to.
pub(super) fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    owner: impl Fn(&str) -> IpOwner,
    trust_domain: &TrustDomain,
) -> BTreeMap<String, pb::Service> {
    let mut by_service: HashMap<String, Vec<SliceShape>> = HashMap::new();
    for slice in slices {
        if let Some(key) = service_of(slice) {
            by_service.entry(key).or_default().push(SliceShape::of(slice));
        }
    }
    services
        .iter()
        .filter_map(|svc| {
            let key = key_of(&**svc)?;
            let slices = by_service.remove(&key).unwrap_or_default();
            Some((
                key,
                build_one(&shape_of(svc), &slices, &owner, ServiceRules::default(), trust_domain),
            ))
        })
        .collect()
}

pub(super) fn service(ns: &str, name: &str, ip: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
                               {"name": "admin", "port": 9000}]}
        }))
        .expect("service"),
    )
}

pub(super) fn slice(ns: &str, svc: &str, name: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "admin", "port": 9090}],
            "endpoints": endpoints,
        }))
        .expect("slice"),
    )
}

pub(super) fn pod(ns: &str, name: &str, ip: &str, meshed: bool, sa: &str) -> Pod {
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }))
    .expect("pod");
    if meshed {
        p.metadata.labels = Some([(TLS_MODE_LABEL.to_string(), TLS_MODE_MIZZEN.to_string())].into());
        if let Some(spec) = p.spec.as_mut() {
            spec.containers.push(k8s_openapi::api::core::v1::Container {
                name: PROXY_CONTAINER.into(),
                ..Default::default()
            });
        }
    }
    p
}

/// The pods holding the addresses the slices below list.
fn cluster_pods() -> Vec<Pod> {
    vec![
        pod("demo", "meshed", "10.200.0.3", true, "web"),
        pod("demo", "meshed-2", "10.200.0.4", true, "web"),
        pod("demo", "plain", "10.200.0.2", false, "default"),
    ]
}

fn build_with(pods: &[Pod], slices: &[Arc<EndpointSlice>]) -> BTreeMap<String, pb::Service> {
    let services = [
        service("demo", "web", "10.0.0.10"),
        service("other", "web", "10.0.0.11"),
        service("evil", "shadow", "10.0.0.12"),
    ];
    let owners = ip_owners(pods);
    build(
        &services,
        slices,
        |ip| owners.get(ip).cloned().unwrap_or(IpOwner::Unknown),
        &TrustDomain::default(),
    )
}

fn built() -> BTreeMap<String, pb::Service> {
    let slices = [
        slice(
            "demo",
            "web",
            "web-b",
            json!([
                {"addresses": ["10.200.0.3"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "namespace": "demo", "name": "meshed"}},
                {"addresses": ["10.200.0.4"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "namespace": "demo", "name": "meshed-2"}},
            ]),
        ),
        slice(
            "demo",
            "web",
            "web-a",
            json!([
                {"addresses": ["10.200.0.2"], "targetRef": {"kind": "Pod", "namespace": "demo", "name": "plain"}},
                {"addresses": ["10.200.0.9"], "conditions": {"ready": true}},
            ]),
        ),
    ];
    let mut all = build_with(&cluster_pods(), &slices);
    all.remove("evil/shadow");
    all
}

#[test]
fn services_carry_their_ready_endpoints_with_identity() {
    let all = built();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["demo/web", "other/web"]);
    let web = &all["demo/web"];
    assert_eq!(web.cluster_ips, ["10.0.0.10"]);
    assert_eq!(web.ports.len(), 2);
    assert_eq!((web.ports[0].name.as_str(), web.ports[0].port), ("http", 80));
    assert_eq!(web.ports[0].app_protocol, "http");
    assert_eq!(web.ports[1].protocol, "TCP", "protocol defaults to TCP");
    let addrs: Vec<_> = web.endpoints.iter().map(|e| e.addresses[0].as_str()).collect();
    assert_eq!(
        addrs,
        ["10.200.0.2", "10.200.0.3", "10.200.0.9"],
        "not-ready 10.200.0.4 left out"
    );
    let meshed = &web.endpoints[1];
    assert!(meshed.meshed);
    assert_eq!(meshed.spiffe_id, "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(meshed.ports["http"], 8080);
    assert_eq!(meshed.pod, "demo/meshed");
    let plain = &web.endpoints[0];
    assert!(!plain.meshed);
    assert_eq!(plain.spiffe_id, "spiffe://cluster.local/ns/demo/sa/default");
    let unknown = &web.endpoints[2];
    assert!(!unknown.meshed && unknown.spiffe_id.is_empty() && unknown.pod.is_empty());
    assert!(
        all["other/web"].endpoints.is_empty(),
        "slices of another namespace's Service are not mixed in"
    );
}

#[test]
fn meshed_needs_both_the_label_and_the_proxy_container() {
    let pod = |labels: serde_json::Value, containers: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": labels},
            "spec": {"serviceAccountName": "sa", "containers": containers},
        }))
        .expect("pod")
    };
    let proxy = json!([{"name": "app"}, {"name": "mizzen-proxy"}]);
    let label = json!({TLS_MODE_LABEL: "mizzen"});
    assert!(PodFacts::of(&pod(label.clone(), proxy.clone())).meshed);
    assert!(!PodFacts::of(&pod(json!({}), proxy.clone())).meshed);
    assert!(!PodFacts::of(&pod(label.clone(), json!([{"name": "app"}]))).meshed);
    assert!(!PodFacts::of(&pod(json!({TLS_MODE_LABEL: "disabled"}), proxy)).meshed);
    assert_eq!(PodFacts::of(&pod(label.clone(), json!([]))).service_account, "sa");
}

// Issue #10, item 7: anyone may write an EndpointSlice. One in namespace
// `evil` lists the meshed demo pod's IP and points its targetRef at an
// unmeshed pod of its own: the IP must keep its real pod's identity (no
// plaintext downgrade), whichever Service lists it.
#[test]
fn a_foreign_endpointslice_cannot_change_a_pod_ips_identity() {
    let mut pods = cluster_pods();
    pods.push(pod("evil", "decoy", "10.200.0.66", false, "evil"));
    let slices = [
        slice(
            "demo",
            "web",
            "web-a",
            json!([{"addresses": ["10.200.0.3"], "targetRef": {"kind": "Pod", "namespace": "demo", "name": "meshed"}}]),
        ),
        slice(
            "evil",
            "shadow",
            "shadow-a",
            json!([{"addresses": ["10.200.0.3"], "targetRef": {"kind": "Pod", "namespace": "evil", "name": "decoy"}}]),
        ),
    ];
    let all = build_with(&pods, &slices);
    for svc in ["demo/web", "evil/shadow"] {
        let ep = &all[svc].endpoints[0];
        assert!(ep.meshed, "{svc}: the IP's pod is meshed");
        assert_eq!(ep.spiffe_id, "spiffe://cluster.local/ns/demo/sa/web", "{svc}");
        assert_eq!(ep.pod, "demo/meshed", "{svc}");
    }
}

#[test]
fn an_ip_two_pods_claim_is_meshed_without_identity() {
    let mut pods = cluster_pods();
    pods.push(pod("evil", "twin", "10.200.0.3", false, "evil"));
    let slices = [slice("demo", "web", "web-a", json!([{"addresses": ["10.200.0.3"]}]))];
    let ep = &build_with(&pods, &slices)["demo/web"].endpoints[0];
    assert!(ep.meshed && ep.spiffe_id.is_empty(), "fails closed: {ep:?}");
}
