//! Policy propagation, printed (run with `--nocapture`), not asserted
//! against a time: with 50 workloads on the node, the time from
//! `kubectl apply` (or `kubectl delete`) returning to the first request
//! that sees the new decision, over repeated flips of a DENY policy.
//!
//! The workloads: the HTTP mesh's three injected pods (two `web` replicas
//! and a client) and 47 more pods bound to the node that nothing runs, so
//! that the agent selects and builds policy for 50 pods on every change.
//! Requests go straight to one `web` replica's pod IP in plaintext (the
//! namespace is PERMISSIVE), one new connection each, so that the server
//! proxy's decision is all that is measured. The evaluation cost of 100
//! rules against no policy is `mizzen-api`'s `authz_bench`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mizzen_tests::daemon::{http_get, metric};
use mizzen_tests::http_mesh::HttpMesh;
use mizzen_tests::k8s::pod_on_node;
use mizzen_tests::{Cluster, eventually, percentile};

const WORKLOADS: usize = 50;
/// Flips: DENY applied, then deleted, alternately.
const FLIPS: usize = 30;
/// A flip not seen within this long fails the benchmark.
const GIVE_UP: Duration = Duration::from_secs(30);

fn deny_bench(ns: &str) -> String {
    format!(
        "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {{name: deny-bench, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - to:
    - operation: {{paths: [\"/bench\"]}}
"
    )
}

/// Requests `url` until it answers `code`; how long that took from `since`.
async fn until(url: &str, code: u16, since: Instant) -> anyhow::Result<Duration> {
    loop {
        if let Ok((got, _)) = http_get(url).await
            && got == code
        {
            return Ok(since.elapsed());
        }
        if since.elapsed() > GIVE_UP {
            bail!("{url} did not answer {code} within {GIVE_UP:?}");
        }
    }
}

#[tokio::test]
async fn policy_propagation_with_fifty_workloads_on_the_node() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let m = HttpMesh::start("policy-bench", true).await?;
    let client = cluster.client().await?;
    for i in 3..WORKLOADS {
        pod_on_node(&client, &m.ns, &format!("idle-{i}"), "default", &m.mesh.node.name).await?;
    }
    let agent = &m.mesh.agent.daemon;
    eventually(
        Duration::from_secs(30),
        "the agent to build policy for 50 pods",
        || async { Ok(metric(&agent.metrics().await?, "mizzen_agent_policy_workloads") >= WORKLOADS as f64) },
    )
    .await?;
    let url = format!("http://{}:8080/bench", m.web_ips.first().context("a web replica")?);
    until(&url, 200, Instant::now()).await?;

    let pushes_before = metric(&agent.metrics().await?, "mizzen_agent_policy_pushes_total");
    let (mut deny, mut allow) = (Vec::new(), Vec::new());
    for flip in 0..FLIPS {
        if flip % 2 == 0 {
            cluster
                .kubectl(["apply", "-f", "-"])
                .stdin(deny_bench(&m.ns))
                .run()
                .await?;
            deny.push(until(&url, 403, Instant::now()).await?);
        } else {
            cluster
                .kubectl(["delete", "-n", &m.ns, "authorizationpolicy", "deny-bench"])
                .run()
                .await?;
            allow.push(until(&url, 200, Instant::now()).await?);
        }
    }
    let pushes = metric(&agent.metrics().await?, "mizzen_agent_policy_pushes_total") - pushes_before;

    let mut all: Vec<Duration> = deny.iter().chain(&allow).copied().collect();
    for v in [&mut deny, &mut allow, &mut all] {
        v.sort();
    }
    let ms = |v: &[Duration], p: f64| percentile(v, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    println!(
        "policy propagation, {WORKLOADS} workloads on the node, {FLIPS} flips (kubectl returned -> first request with the new decision):"
    );
    for (what, v) in [("DENY applied", &deny), ("DENY deleted", &allow), ("all", &all)] {
        println!(
            "  {what:<13} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  (n={})",
            ms(v, 0.5),
            ms(v, 0.99),
            ms(v, 1.0),
            v.len()
        );
    }
    println!(
        "  agent: {pushes} policy pushes for {FLIPS} flips ({:.1} per flip: the policy selects 2 of the 3 running proxies)",
        pushes / FLIPS as f64
    );
    assert_eq!(all.len(), FLIPS, "every flip was seen");
    Ok(())
}
