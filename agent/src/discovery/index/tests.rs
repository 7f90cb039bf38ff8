use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::discovery::tests::{build, ip_owners, pod, service, slice};

fn td() -> TrustDomain {
    TrustDomain::default()
}

/// An index that has listed `services`, `slices` and `pods`, rebuilt once.
fn listed(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>], pods: &[Pod]) -> Index {
    let mut index = Index::default();
    index.service_event(Event::Init);
    for s in services {
        index.service_event(Event::InitApply((**s).clone()));
    }
    index.service_event(Event::InitDone);
    index.slice_event(Event::Init);
    for s in slices {
        index.slice_event(Event::InitApply((**s).clone()));
    }
    index.slice_event(Event::InitDone);
    index.pod_event(Event::Init);
    for p in pods {
        index.pod_event(Event::InitApply(p.clone()));
    }
    index.pod_event(Event::InitDone);
    index.virtual_service_event(Event::Init);
    index.virtual_service_event(Event::InitDone);
    index.destination_rule_event(Event::Init);
    index.destination_rule_event(Event::InitDone);
    index.http_route_event(Event::Init);
    index.http_route_event(Event::InitDone);
    index.grpc_route_event(Event::Init);
    index.grpc_route_event(Event::InitDone);
    assert!(index.synced.all());
    index.rebuild(&td());
    index
}

fn web_slice(ips: &[&str]) -> Arc<EndpointSlice> {
    let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    slice("demo", "web", "web-a", json!(endpoints))
}

fn rebuilt(index: &mut Index) -> Vec<String> {
    let mut keys: Vec<String> = index.rebuild(&td()).into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys
}

#[test]
fn a_pod_change_discovery_does_not_read_rebuilds_nothing() {
    let web = service("demo", "web", "10.0.0.10");
    let api = service("demo", "api", "10.0.0.11");
    let mut index = listed(
        &[web, api],
        &[web_slice(&["10.200.0.3"])],
        &[pod("demo", "meshed", "10.200.0.3", true, "web")],
    );
    // A condition, a restart: not what discovery reads.
    let mut changed = pod("demo", "meshed", "10.200.0.3", true, "web");
    changed
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("restarted".into(), "1".into());
    changed.metadata.resource_version = Some("2".into());
    index.pod_event(Event::Apply(changed));
    // A pod whose address no endpoint lists.
    index.pod_event(Event::Apply(pod("demo", "elsewhere", "10.200.0.99", false, "x")));
    assert_eq!(index.dirty(), 0);
    assert!(index.rebuild(&td()).is_empty());
}

#[test]
fn a_pod_change_rebuilds_the_services_that_list_its_address() {
    let mut index = listed(
        &[
            service("demo", "web", "10.0.0.10"),
            service("demo", "api", "10.0.0.11"),
            service("other", "web", "10.0.0.12"),
        ],
        &[
            web_slice(&["10.200.0.3"]),
            slice("other", "web", "web-x", json!([{"addresses": ["10.200.0.3"]}])),
        ],
        &[pod("demo", "meshed", "10.200.0.3", false, "web")],
    );
    index.pod_event(Event::Apply(pod("demo", "meshed", "10.200.0.3", true, "web")));
    assert_eq!(rebuilt(&mut index), ["demo/web", "other/web"]);
    // The pod goes: its address has no owner any more.
    index.pod_event(Event::Delete(pod("demo", "meshed", "10.200.0.3", true, "web")));
    let out = index.rebuild(&td());
    assert_eq!(out.len(), 2);
    assert!(
        out.iter()
            .all(|(_, s)| s.as_ref().is_some_and(|s| !s.endpoints[0].meshed))
    );
}

#[test]
fn a_slice_that_changes_service_rebuilds_both() {
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10"), service("demo", "api", "10.0.0.11")],
        &[web_slice(&["10.200.0.3"])],
        &[],
    );
    index.slice_event(Event::Apply(
        (*slice("demo", "api", "web-a", json!([{"addresses": ["10.200.0.3"]}]))).clone(),
    ));
    let out: BTreeMap<String, Option<pb::Service>> = index.rebuild(&td()).into_iter().collect();
    assert_eq!(out.len(), 2);
    assert!(out["demo/web"].as_ref().is_some_and(|s| s.endpoints.is_empty()));
    assert_eq!(out["demo/api"].as_ref().map(|s| s.endpoints.len()), Some(1));
}

#[test]
fn a_relist_deletes_what_it_no_longer_lists() {
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10"), service("demo", "api", "10.0.0.11")],
        &[],
        &[],
    );
    index.service_event(Event::Init);
    index.service_event(Event::InitApply((*service("demo", "web", "10.0.0.10")).clone()));
    index.service_event(Event::InitDone);
    let out: BTreeMap<String, Option<pb::Service>> = index.rebuild(&td()).into_iter().collect();
    assert_eq!(out.get("demo/api"), Some(&None), "gone while the watch was down");
    assert!(out.get("demo/web").is_some_and(Option::is_some));
}

/// A small deterministic generator (no dependency for one test).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Whatever the events, building only what they mark gives what building
/// everything gives.
#[test]
fn incremental_rebuilds_equal_a_full_build() {
    let mut rng = Lcg(7);
    let mut index = listed(&[], &[], &[]);
    let mut held: BTreeMap<String, pb::Service> = BTreeMap::new();
    let mut services: BTreeMap<String, Arc<Service>> = BTreeMap::new();
    let mut slices: BTreeMap<String, Arc<EndpointSlice>> = BTreeMap::new();
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let ip = |i: u64| format!("10.200.0.{i}");
    for step in 0..2_000 {
        let n = rng.below(6);
        match rng.below(7) {
            0 => {
                let s = service("ns", &format!("svc-{n}"), &format!("10.0.0.{n}"));
                services.insert(format!("ns/svc-{n}"), s.clone());
                index.service_event(Event::Apply((*s).clone()));
            }
            1 => {
                if let Some(s) = services.remove(&format!("ns/svc-{n}")) {
                    index.service_event(Event::Delete((*s).clone()));
                }
            }
            2 | 3 => {
                let owner = format!("svc-{}", rng.below(6));
                let endpoints: Vec<_> = (0..rng.below(4))
                    .map(|_| json!({"addresses": [ip(rng.below(8))], "conditions": {"ready": rng.below(4) != 0}}))
                    .collect();
                let s = slice("ns", &owner, &format!("slice-{n}"), json!(endpoints));
                slices.insert(format!("ns/slice-{n}"), s.clone());
                index.slice_event(Event::Apply((*s).clone()));
            }
            4 => {
                if let Some(s) = slices.remove(&format!("ns/slice-{n}")) {
                    index.slice_event(Event::Delete((*s).clone()));
                }
            }
            5 => {
                let p = pod("ns", &format!("pod-{n}"), &ip(rng.below(8)), rng.below(2) == 0, "sa");
                pods.insert(format!("ns/pod-{n}"), p.clone());
                index.pod_event(Event::Apply(p));
            }
            _ => {
                if let Some(p) = pods.remove(&format!("ns/pod-{n}")) {
                    index.pod_event(Event::Delete(p));
                }
            }
        }
        if rng.below(3) == 0 {
            for (key, built) in index.rebuild(&td()) {
                match built {
                    Some(s) => held.insert(key, s),
                    None => held.remove(&key),
                };
            }
            let owners = ip_owners(pods.values());
            let services: Vec<_> = services.values().cloned().collect();
            let slices: Vec<_> = slices.values().cloned().collect();
            let full = build(
                &services,
                &slices,
                |ip| owners.get(ip).cloned().unwrap_or(IpOwner::Unknown),
                &td(),
            );
            assert_eq!(held, full, "step {step}");
            let endpoints: usize = full.values().map(|s| s.endpoints.len()).sum();
            assert_eq!(index.endpoints(), endpoints, "step {step}");
        }
    }
}

fn virtual_service(name: &str, created: &str, spec: serde_json::Value) -> VirtualService {
    serde_json::from_value(json!({
        "apiVersion": "networking.mizzen.dev/v1", "kind": "VirtualService",
        "metadata": {"namespace": "demo", "name": name, "creationTimestamp": created},
        "spec": spec,
    }))
    .expect("virtual service")
}

fn to_web(host: &str) -> serde_json::Value {
    json!({"hosts": [host], "http": [{"route": [{"destination": {"host": "web", "subset": "v1"}}]}]})
}

/// The routing each Service was last built with, by key.
fn routing(index: &mut Index) -> BTreeMap<String, Option<String>> {
    index
        .rebuild(&td())
        .into_iter()
        .map(|(k, svc)| (k, svc.and_then(|s| s.routing).map(|r| r.virtual_service)))
        .collect()
}

#[test]
fn a_virtual_service_routes_the_services_it_names_and_moving_it_rebuilds_both() {
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10"), service("demo", "api", "10.0.0.11")],
        &[],
        &[],
    );
    index.virtual_service_event(Event::Apply(virtual_service(
        "vs",
        "2026-01-01T00:00:00Z",
        to_web("web"),
    )));
    assert_eq!(
        routing(&mut index),
        BTreeMap::from([("demo/web".to_string(), Some("demo/vs".to_string()))])
    );
    index.virtual_service_event(Event::Apply(virtual_service(
        "vs",
        "2026-01-01T00:00:00Z",
        to_web("api"),
    )));
    assert_eq!(
        routing(&mut index),
        BTreeMap::from([
            ("demo/api".to_string(), Some("demo/vs".to_string())),
            ("demo/web".to_string(), None),
        ])
    );
}

#[test]
fn the_oldest_virtual_service_of_a_service_applies_until_it_is_deleted() {
    let mut index = listed(&[service("demo", "web", "10.0.0.10")], &[], &[]);
    let newer = virtual_service("b-newer", "2026-02-01T00:00:00Z", to_web("web"));
    let older = virtual_service("z-older", "2026-01-01T00:00:00Z", to_web("web"));
    index.virtual_service_event(Event::Apply(newer));
    index.virtual_service_event(Event::Apply(older.clone()));
    assert_eq!(routing(&mut index)["demo/web"].as_deref(), Some("demo/z-older"));
    index.virtual_service_event(Event::Delete(older));
    assert_eq!(routing(&mut index)["demo/web"].as_deref(), Some("demo/b-newer"));
}

#[test]
fn a_virtual_service_that_does_not_compile_routes_nothing() {
    let mut index = listed(&[service("demo", "web", "10.0.0.10")], &[], &[]);
    let bad = json!({"hosts": ["web"], "http": [{"route": [
        {"destination": {"host": "web"}, "weight": 60},
        {"destination": {"host": "api"}, "weight": 60}]}]});
    index.virtual_service_event(Event::Apply(virtual_service("vs", "2026-01-01T00:00:00Z", bad)));
    assert!(routing(&mut index).is_empty(), "no Service was touched");
    // Fixed, it applies.
    index.virtual_service_event(Event::Apply(virtual_service(
        "vs",
        "2026-01-01T00:00:00Z",
        to_web("web"),
    )));
    assert_eq!(routing(&mut index)["demo/web"].as_deref(), Some("demo/vs"));
}

#[test]
fn endpoints_carry_the_subsets_their_pods_labels_select() {
    let labelled = |version: &str| {
        let mut p = pod("demo", "meshed", "10.200.0.3", true, "web");
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("version".into(), version.into());
        p
    };
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10")],
        &[web_slice(&["10.200.0.3"])],
        &[labelled("v1")],
    );
    let dr: DestinationRule = serde_json::from_value(json!({
        "apiVersion": "networking.mizzen.dev/v1", "kind": "DestinationRule",
        "metadata": {"namespace": "demo", "name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"host": "web.demo.svc.cluster.local", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
            {"name": "all", "labels": {}}]},
    }))
    .expect("destination rule");
    index.destination_rule_event(Event::Apply(dr));
    let subsets = |index: &mut Index| -> Vec<Vec<String>> {
        let built = index.rebuild(&td());
        assert_eq!(built.len(), 1, "only web is rebuilt");
        let web = built.into_iter().next().and_then(|(_, s)| s).expect("web");
        web.endpoints.into_iter().map(|e| e.subsets).collect()
    };
    assert_eq!(subsets(&mut index), vec![vec!["all".to_string(), "v1".to_string()]]);
    // Relabelled, the pod moves to the other subset.
    index.pod_event(Event::Apply(labelled("v2")));
    assert_eq!(subsets(&mut index), vec![vec!["all".to_string(), "v2".to_string()]]);
}

fn http_route(name: &str, parent: &str) -> HTTPRoute {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"namespace": "demo", "name": name, "creationTimestamp": "2026-03-01T00:00:00Z"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                 "rules": [{"backendRefs": [{"name": "api", "port": 80}]}]},
    }))
    .expect("http route")
}

#[test]
fn http_routes_bound_to_a_service_take_precedence_over_its_virtual_service() {
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10"), service("demo", "api", "10.0.0.11")],
        &[],
        &[],
    );
    index.virtual_service_event(Event::Apply(virtual_service(
        "vs",
        "2026-01-01T00:00:00Z",
        to_web("web"),
    )));
    assert_eq!(routing(&mut index)["demo/web"].as_deref(), Some("demo/vs"));
    let route = http_route("r", "web");
    index.http_route_event(Event::Apply(route.clone()));
    assert_eq!(
        routing(&mut index),
        BTreeMap::from([("demo/web".to_string(), Some("demo/routes(demo/r)".to_string()))])
    );
    index.http_route_event(Event::Delete(route));
    assert_eq!(routing(&mut index)["demo/web"].as_deref(), Some("demo/vs"));
    // One the mesh cannot apply as written binds nothing.
    let mut unsupported = http_route("bad", "web");
    unsupported.spec.hostnames = vec!["web.example.com".into()];
    index.http_route_event(Event::Apply(unsupported));
    assert!(routing(&mut index).is_empty());
}

#[test]
fn grpc_routes_bind_like_http_routes_and_a_relist_of_one_kind_keeps_the_other() {
    let mut index = listed(
        &[service("demo", "web", "10.0.0.10"), service("demo", "api", "10.0.0.11")],
        &[],
        &[],
    );
    let grpc: GRPCRoute = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"namespace": "demo", "name": "g", "creationTimestamp": "2026-02-01T00:00:00Z"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                 "rules": [{"matches": [{"method": {"service": "demo.Echo"}}],
                            "backendRefs": [{"name": "api", "port": 80}]}]},
    }))
    .expect("grpc route");
    index.grpc_route_event(Event::Apply(grpc.clone()));
    index.http_route_event(Event::Apply(http_route("r", "web")));
    assert_eq!(
        routing(&mut index),
        BTreeMap::from([("demo/web".to_string(), Some("demo/routes(demo/g,demo/r)".to_string()))])
    );
    // HTTPRoutes relisted without any: the GRPCRoute stays.
    index.http_route_event(Event::Init);
    index.http_route_event(Event::InitDone);
    assert_eq!(
        routing(&mut index),
        BTreeMap::from([("demo/web".to_string(), Some("demo/routes(demo/g)".to_string()))])
    );
    index.grpc_route_event(Event::Delete(grpc));
    assert_eq!(routing(&mut index), BTreeMap::from([("demo/web".to_string(), None)]));
}
