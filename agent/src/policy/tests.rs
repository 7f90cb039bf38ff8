use serde_json::json;

use super::*;

fn pod(ns: &str, name: &str, app: &str) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
        }))
        .expect("pod"),
    )
}

fn authz(ns: &str, name: &str, spec: serde_json::Value) -> Arc<AuthorizationPolicy> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "security.mizzen.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        }))
        .expect("policy"),
    )
}

fn peer_authn(ns: &str, name: &str, spec: serde_json::Value) -> Arc<PeerAuthentication> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "security.mizzen.dev/v1", "kind": "PeerAuthentication",
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
        }))
        .expect("peer authentication"),
    )
}

fn names(p: &pb::WorkloadPolicy) -> Vec<&str> {
    p.authorization.iter().map(|a| a.name.as_str()).collect()
}

#[test]
fn each_pod_gets_the_policies_that_select_it() {
    let policies = [
        authz("mizzen-system", "mesh-audit", json!({"action": "AUDIT", "rules": [{}]})),
        authz(
            "demo",
            "web-only",
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
        ),
        authz(
            "demo",
            "all-demo",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        ),
        authz("prod", "prod-only", json!({"rules": [{}]})),
    ];
    let pods = [
        pod("demo", "web-1", "web"),
        pod("demo", "db-1", "db"),
        pod("other", "x-1", "web"),
    ];
    let (built, rejected) = build(&policies, &[], &pods, "mizzen-system");
    assert!(rejected.is_empty());
    assert_eq!(
        names(&built["demo/web-1"]),
        ["demo/all-demo", "demo/web-only", "mizzen-system/mesh-audit"]
    );
    assert_eq!(
        names(&built["demo/db-1"]),
        ["demo/all-demo", "mizzen-system/mesh-audit"]
    );
    assert_eq!(names(&built["other/x-1"]), ["mizzen-system/mesh-audit"]);
    let sent: AuthorizationPolicySpec =
        serde_json::from_str(&built["demo/web-1"].authorization[1].spec_json).expect("the spec as JSON");
    assert_eq!(sent, policies[1].spec, "sent as written");
}

#[test]
fn a_pod_without_policies_still_gets_a_resource() {
    let (built, _) = build(&[], &[], &[pod("demo", "web-1", "web")], "mizzen-system");
    let p = &built["demo/web-1"];
    assert!(p.authorization.is_empty());
    assert_eq!(p.mtls(), pb::MtlsMode::Permissive, "PERMISSIVE by default");
}

#[test]
fn a_policy_that_cannot_be_compiled_fails_closed() {
    let policies = [
        authz(
            "demo",
            "allow-custom-key",
            json!({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
        ),
        authz(
            "demo",
            "deny-bad-ip",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["not-an-ip"]}}]}]}),
        ),
    ];
    let (built, rejected) = build(&policies, &[], &[pod("demo", "web-1", "web")], "mizzen-system");
    let reasons: Vec<_> = rejected.iter().map(|r| (r.policy.as_str(), r.error.reason())).collect();
    assert_eq!(
        reasons,
        [
            ("demo/allow-custom-key", "request_authentication_unsupported"),
            ("demo/deny-bad-ip", "bad_ip_block")
        ]
    );
    let specs: Vec<AuthorizationPolicySpec> = built["demo/web-1"]
        .authorization
        .iter()
        .map(|a| serde_json::from_str(&a.spec_json).expect("json"))
        .collect();
    assert_eq!(
        serde_json::to_value(&specs).expect("json"),
        json!([{"action": "ALLOW"}, {"action": "DENY", "rules": [{}]}]),
        "an ALLOW that allows nothing, a DENY of everything"
    );
}

#[test]
fn peer_authentication_is_resolved_per_pod() {
    let pas = [
        peer_authn("demo", "ns", json!({"mtls": {"mode": "STRICT"}})),
        peer_authn(
            "demo",
            "db",
            json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"},
                   "portLevelMtls": {"5432": {"mode": "STRICT"}}}),
        ),
    ];
    let pods = [pod("demo", "web-1", "web"), pod("demo", "db-1", "db")];
    let (built, _) = build(&[], &pas, &pods, "mizzen-system");
    assert_eq!(built["demo/web-1"].mtls(), pb::MtlsMode::Strict);
    let db = &built["demo/db-1"];
    assert_eq!(db.mtls(), pb::MtlsMode::Permissive);
    assert_eq!(db.port_mtls.get(&5432).copied(), Some(pb::MtlsMode::Strict as i32));
}
