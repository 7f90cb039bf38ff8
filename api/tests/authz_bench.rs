//! What authorization costs per request: 100 rules that do not match (the
//! worst case: every rule is tried) against no policy at all, in the same
//! run. Prints the figures and their ratio; asserts only that decisions
//! are what they must be (times are not asserted: the machine is shared).
//!
//! `cargo test --release -p mizzen-api --test authz_bench -- --nocapture`

use std::hint::black_box;
use std::time::Instant;

use mizzen_api::SpiffeId;
use mizzen_api::authz::compile::compile_spec;
use mizzen_api::authz::{Connection, Request, evaluate};
use mizzen_api::policy::AuthorizationPolicySpec;

fn per_call(n: u32, mut f: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    started.elapsed().as_nanos() as f64 / f64::from(n)
}

#[test]
fn evaluating_100_rules_against_none() {
    let rules: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({
                "from": [{"source": {"principals": [format!("cluster.local/ns/team-{i}/sa/*")]}}],
                "to": [{"operation": {"methods": ["GET", "POST"], "paths": [format!("/api/v{i}/*")]}}],
                "when": [{"key": "request.headers[x-tenant]", "values": [format!("tenant-{i}")]}],
            })
        })
        .collect();
    let spec: AuthorizationPolicySpec =
        serde_json::from_value(serde_json::json!({"action": "ALLOW", "rules": rules})).expect("spec");
    let policies = vec![compile_spec("bench/hundred".into(), &spec).expect("compiles")];
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/other/sa/client").expect("id");
    let conn = Connection {
        peer: Some(&peer),
        source_ip: "10.0.0.1".parse().expect("ip"),
        destination_ip: "10.0.0.2".parse().expect("ip"),
        destination_port: 8080,
        sni: None,
    };
    let headers = vec![
        ("x-tenant".to_string(), "tenant-7".to_string()),
        ("user-agent".to_string(), "curl/8".to_string()),
    ];
    let req = Request {
        method: "GET",
        path: "/api/v7/items",
        host: "web.demo.svc.cluster.local",
        headers: &headers,
    };
    assert!(
        !evaluate(&policies, &conn, Some(&req)).allowed(),
        "no rule matches: denied"
    );
    assert!(evaluate(&[], &conn, Some(&req)).allowed(), "no policy: allowed");
    let n = 200_000;
    // Warm up both, then measure in turns so that both see the same machine.
    per_call(n / 10, || evaluate(&policies, &conn, Some(&req)).allowed());
    per_call(n / 10, || evaluate(&[], &conn, Some(&req)).allowed());
    let mut hundred = f64::MAX;
    let mut none = f64::MAX;
    for _ in 0..5 {
        hundred = hundred.min(per_call(n, || evaluate(&policies, &conn, Some(&req)).allowed()));
        none = none.min(per_call(n, || evaluate(&[], &conn, Some(&req)).allowed()));
    }
    println!(
        "authorization per request: 100 rules {:.0} ns, no policy {:.0} ns, difference {:.2} µs ({:.1}×)",
        hundred,
        none,
        (hundred - none) / 1000.0,
        hundred / none.max(1.0)
    );
}
