//! Benchmark: 200 pods on one node start at once. Reports how long each
//! waits for its first certificate (p50/p99) and how many CA calls that
//! costs. Timings are printed, not asserted (shared machines are noisy);
//! what is asserted is that every pod gets its own identity and that the
//! CA is called once per identity, not once per pod.

use std::time::{Duration, Instant};

use futures::future::join_all;
use mizzen_tests::Cluster;
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::ca_and_agent;
use mizzen_tests::sds::{SdsStream, decode};

const PODS: usize = 200;
const IDENTITIES: usize = 10;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    mizzen_tests::percentile(sorted, p).expect("latencies were measured")
}

#[tokio::test]
async fn two_hundred_pods_starting_at_once() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let node = "burst-node";
    let (ca, agent) = ca_and_agent(cluster, node, &[]).await?;

    // Pods and their projected-style tokens exist before the burst starts.
    let ns = cluster.namespace(&client, "burst", &[]).await?;
    for i in 0..IDENTITIES {
        service_account(&client, &ns, &format!("sa-{i}")).await?;
    }
    let mut tokens = Vec::new();
    for i in 0..PODS {
        let sa = format!("sa-{}", i % IDENTITIES);
        let pod = pod_on_node(&client, &ns, &format!("pod-{i}"), &sa, node).await?;
        tokens.push((sa.clone(), token(&client, &ns, &sa, Some(&pod), "mizzen-ca").await?));
    }
    // Baseline, same run: one pod alone, with an identity of its own.
    service_account(&client, &ns, "lone").await?;
    let lone_pod = pod_on_node(&client, &ns, "lone", "lone", node).await?;
    let lone_token = token(&client, &ns, "lone", Some(&lone_pod), "mizzen-ca").await?;
    let opened = Instant::now();
    let mut lone = SdsStream::open(&agent.socket, &lone_token, &["default"]).await?;
    while decode(&lone.next().await?)?.certificate.is_none() {}
    let baseline = opened.elapsed();

    let calls_before = metric(&agent.daemon.metrics().await?, "mizzen_agent_ca_calls_total");

    let start = Instant::now();
    let waits = join_all(tokens.iter().map(|(sa, t)| {
        let socket = agent.socket.clone();
        async move {
            let opened = Instant::now();
            let mut stream = SdsStream::open(&socket, t, &["default"]).await?;
            loop {
                let resp = tokio::time::timeout(Duration::from_secs(120), stream.next()).await??;
                if let Some((chain, _)) = decode(&resp)?.certificate {
                    return Ok::<_, anyhow::Error>((sa.clone(), chain, opened.elapsed()));
                }
            }
        }
    }))
    .await;
    let total = start.elapsed();

    let mut latencies = Vec::new();
    for w in waits {
        let (sa, chain, waited) = w?;
        let (_, block) = x509_parser::pem::parse_x509_pem(chain.as_bytes())?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&block.contents)?;
        let san = format!(
            "{:?}",
            leaf.subject_alternative_name()?.map(|s| s.value.general_names.clone())
        );
        assert!(san.contains(&format!("/ns/{ns}/sa/{sa}\"")), "pod of {sa} got {san}");
        latencies.push(waited);
    }
    latencies.sort();
    let agent_metrics = agent.daemon.metrics().await?;
    let ca_calls = metric(&agent_metrics, "mizzen_agent_ca_calls_total") - calls_before;
    let issued = metric(&ca.daemon.metrics().await?, "mizzen_ca_certificates_issued_total");
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "agent burst: {PODS} pods, {IDENTITIES} identities: first certificate p50 {p50:?}, p99 {p99:?}, max {:?}, \
         all served in {total:?}; one pod alone (baseline, same run) {baseline:?}; \
         p50/baseline {:.2}, p99/baseline {:.2}; {ca_calls} CA calls ({issued} issued by the CA in all), \
         {:.1} pods per CA call",
        latencies[latencies.len() - 1],
        p50.as_secs_f64() / baseline.as_secs_f64(),
        p99.as_secs_f64() / baseline.as_secs_f64(),
        PODS as f64 / ca_calls.max(1.0),
    );
    assert_eq!(latencies.len(), PODS);
    assert_eq!(ca_calls as usize, IDENTITIES, "one CA call per identity, not per pod");
    Ok(())
}
