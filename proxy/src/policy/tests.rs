use futures::FutureExt;
use std::net::SocketAddr;

use mizzen_api::proto::discovery as pb;

use super::*;
use crate::drain::{ConnInfo, Connections, StreamInfo};

fn authz(name: &str, spec: serde_json::Value) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        name: name.into(),
        spec_json: spec.to_string(),
    }
}

fn wire(policies: Vec<pb::AuthorizationPolicy>, mtls: pb::MtlsMode) -> pb::WorkloadPolicy {
    pb::WorkloadPolicy {
        authorization: policies,
        mtls: mtls.into(),
        port_mtls: Default::default(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn deny_admin() -> pb::AuthorizationPolicy {
    authz(
        "demo/deny-admin",
        serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin*"]}}]}]}),
    )
}

#[test]
fn a_workload_policy_compiles_with_its_modes() {
    let mut w = wire(vec![deny_admin()], pb::MtlsMode::Permissive);
    w.port_mtls.insert(8443, pb::MtlsMode::Strict.into());
    let p = decode(&w).expect("valid");
    assert_eq!(p.authz.len(), 1);
    assert!(p.accepts_plaintext(8080));
    assert!(!p.accepts_plaintext(8443));
}

#[test]
fn what_cannot_be_enforced_is_rejected_whole() {
    let cases = [
        (
            "not JSON",
            wire(vec![authz("demo/x", serde_json::json!("{"))], pb::MtlsMode::Strict),
        ),
        (
            "CUSTOM",
            wire(
                vec![deny_admin(), authz("demo/c", serde_json::json!({"action": "CUSTOM"}))],
                pb::MtlsMode::Strict,
            ),
        ),
        ("no mode", wire(vec![], pb::MtlsMode::Unspecified)),
        (
            "unknown mode",
            pb::WorkloadPolicy {
                mtls: 42,
                ..Default::default()
            },
        ),
    ];
    for (what, w) in cases {
        assert!(decode(&w).is_err(), "{what}");
    }
}

fn request_info(method: &str, path: &str) -> StreamInfo {
    StreamInfo {
        direction: Direction::Inbound,
        peer: addr("10.0.0.1:40000"),
        dst: addr("10.0.0.2:8080"),
        identity: None,
        method: method.into(),
        path: path.into(),
        authority: Some("web".into()),
        facts: None,
    }
}

#[tokio::test]
async fn a_new_deny_closes_the_requests_and_connections_it_covers() {
    let registry = Connections::default();
    let admin = registry.open_stream(request_info("POST", "/admin/reset?now=1"));
    let encoded = registry.open_stream(request_info("POST", "/%61dmin/reset"));
    let public = registry.open_stream(request_info("GET", "/"));
    // Two TCP connections from a plaintext client.
    let tcp = registry.open(Direction::Inbound, addr("10.0.0.1:40001"));
    tcp.destined(addr("10.0.0.2:8080"));
    let other = registry.open(Direction::Inbound, addr("10.0.0.1:40002"));
    other.destined(addr("10.0.0.2:9000"));

    let metrics = AuthzMetrics::default();
    let w = wire(vec![deny_admin()], pb::MtlsMode::Permissive);
    let (conns, streams) = reevaluate(&decode(&w).expect("valid"), &registry, &metrics);
    assert_eq!(
        (conns, streams),
        (2, 2),
        "the admin requests, however spelt; and on TCP ports a DENY rule keeps only its TCP fields (Istio), so it covers every TCP connection"
    );
    let closed = |s: &crate::drain::StreamGuard| s.closed().now_or_never().is_some();
    assert!(closed(&admin) && closed(&encoded) && !closed(&public));

    let strict = wire(vec![], pb::MtlsMode::Strict);
    let (conns, _) = reevaluate(&decode(&strict).expect("valid"), &registry, &metrics);
    assert_eq!(conns, 2, "STRICT closes plaintext connections");
    let _ = (tcp, other);
}

#[test]
fn a_request_that_came_before_any_policy_is_decided_on_what_was_kept() {
    let p = decode(&wire(vec![deny_admin()], pb::MtlsMode::Permissive)).expect("valid");
    assert!(!still_allowed_request(&p, &request_info("POST", "/admin")));
    assert!(still_allowed_request(&p, &request_info("POST", "/public")));
    assert!(
        !still_allowed_request(&p, &request_info("POST", "/a%2Fb")),
        "a path that cannot be read is denied"
    );
    let none = decode(&wire(vec![], pb::MtlsMode::Permissive)).expect("valid");
    assert!(
        still_allowed_request(&none, &request_info("POST", "/a%2Fb")),
        "no policy: nothing to read"
    );
}

#[test]
fn tcp_connections_are_decided_on_their_port_and_peer() {
    let p = decode(&wire(
        vec![authz(
            "demo/deny-tcp-8080",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
        )],
        pb::MtlsMode::Permissive,
    ))
    .expect("valid");
    let info = |port: u16, http: bool| ConnInfo {
        direction: Direction::Inbound,
        peer: addr("10.0.0.1:40000"),
        identity: None,
        http,
        dst: Some(SocketAddr::new(addr("10.0.0.2:1").ip(), port)),
    };
    assert!(!still_allowed_connection(&p, &info(8080, false)));
    assert!(still_allowed_connection(&p, &info(9000, false)));
    assert!(
        still_allowed_connection(&p, &info(8080, true)),
        "HTTP is decided per request"
    );
}
