//! The CA's issuance rate and its latency under a flood of bad tokens,
//! each against a baseline measured in the same run (printed, not
//! asserted: run with `--nocapture`).
//!
//! - Ceiling: `csr::check` (parse and verify the CSR) and `Authority::sign`
//!   in this process, one thread, no network.
//! - Over gRPC: the real `mizzen-ca` with cached token reviews, 8 calls in
//!   flight over TLS, as node agents call it.
//! - Under a flood: one agent issuing one certificate at a time while 8
//!   callers send random tokens (half not even JWTs, half JWT-shaped with
//!   the right audience and a forged signature), against the same agent
//!   with no flood.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use mizzen_api::{SpiffeId, TrustDomain};
use mizzen_ca::authority::Authority;
use mizzen_tests::ca_client::{ca_client, csr, request, uri};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::{Ca, SYSTEM, install_manifests, published_root};
use mizzen_tests::{Cluster, percentile};

const NODE: &str = "ca-bench-node";
const IN_FLIGHT: usize = 8;

fn pct(v: &[Duration], p: f64) -> Duration {
    percentile(v, p).expect("latencies were measured")
}

/// Certificates per second signed in-process for `id`, one thread.
fn ceiling(id: &SpiffeId, csrs: &[String], secs: u64) -> anyhow::Result<f64> {
    let td = TrustDomain::default();
    let authority = Authority::from_bundle(&Authority::generate(&td, Duration::from_secs(86_400))?, &td)?;
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs(secs) {
        let req = mizzen_ca::csr::check(&csrs[n % csrs.len()], id).map_err(|e| anyhow::anyhow!("{e}"))?;
        authority.sign(&req, Duration::from_secs(3600))?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A token that looks like a ServiceAccount token for `mizzen-ca` (header,
/// audience, expiry) but whose signature is random: it must be reviewed.
fn forged_jwt(i: usize) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"x"}"#),
        b64(&format!(
            r#"{{"aud":["mizzen-ca"],"exp":{exp},"sub":"system:serviceaccount:flood:sa-{i}"}}"#
        )),
        b64(&format!("forged-signature-{i}-{}", rand_suffix(i)))
    )
}

fn rand_suffix(i: usize) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    u64::from(t) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[tokio::test]
async fn issuance_rate_against_the_in_process_ceiling_and_latency_under_a_token_flood() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    cluster.register_node(&client, NODE).await?;
    let ns = cluster.namespace(&client, "ca-bench", &[]).await?;
    service_account(&client, &ns, "web").await?;
    let web = pod_on_node(&client, &ns, "web", "web", NODE).await?;
    let agent_pod = pod_on_node(&client, SYSTEM, &format!("agent-{ns}"), "mizzen-agent", NODE).await?;
    let workload_token = token(&client, &ns, "web", Some(&web), "mizzen-ca").await?;
    let agent_token = token(&client, SYSTEM, "mizzen-agent", Some(&agent_pod), "mizzen-ca").await?;
    let id = SpiffeId::workload(&TrustDomain::default(), &ns, "web")?;
    let csrs: Vec<String> = (0..64).map(|_| csr(vec![uri(id.as_str())], false).pem).collect();

    let ceiling = ceiling(&id, &csrs, 3)?;

    // Reviews cached for the whole run: the rate is the CA's own work.
    let ca = Ca::start(cluster, None, &["--token-review-cache-ttl=10m"]).await?;
    let root = published_root(&client, &ns, "mizzen-root-ca").await?;
    let issue = |n: usize| request(&csrs[n % csrs.len()], Some(&workload_token), Some(&agent_token));
    // Warm up (reviews cached, connections open).
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = ca_client(&ca, &root).await?;
        c.create_certificate(issue(0)).await.context("warm-up issuance")?;
        clients.push(c);
    }

    let issued = AtomicUsize::new(0);
    let start = Instant::now();
    let run_for = Duration::from_secs(5);
    let workers = (0..IN_FLIGHT).map(|w| {
        let mut c = clients[w % clients.len()].clone();
        let (issued, issue) = (&issued, &issue);
        async move {
            let mut n = w;
            while start.elapsed() < run_for {
                c.create_certificate(issue(n)).await?;
                issued.fetch_add(1, Ordering::Relaxed);
                n += IN_FLIGHT;
            }
            Ok::<_, anyhow::Error>(())
        }
    });
    for r in futures::future::join_all(workers).await {
        r?;
    }
    let rate = issued.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();

    // One agent issuing one certificate at a time, without and with a flood.
    let legit = |secs: u64| {
        let mut c = clients[0].clone();
        let issue = &issue;
        async move {
            let mut lat = Vec::new();
            let until = Instant::now() + Duration::from_secs(secs);
            let mut n = 0;
            while Instant::now() < until {
                let t = Instant::now();
                c.create_certificate(issue(n)).await?;
                lat.push(t.elapsed());
                n += 1;
            }
            lat.sort();
            Ok::<_, anyhow::Error>(lat)
        }
    };
    let quiet = legit(4).await?;
    let reviews_before = metric(
        &ca.daemon.metrics().await?,
        "mizzen_ca_token_review_duration_seconds_count",
    );
    let flooding = Arc::new(AtomicBool::new(true));
    let flood_sent = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for (f, pem) in csrs.iter().take(IN_FLIGHT).enumerate() {
        let mut c = ca_client(&ca, &root).await?;
        let (flooding, sent, pem) = (flooding.clone(), flood_sent.clone(), pem.clone());
        flood.push(tokio::spawn(async move {
            let mut i = f;
            while flooding.load(Ordering::Relaxed) {
                let bogus = if i % 2 == 0 {
                    format!("garbage-{i}-{}", rand_suffix(i))
                } else {
                    forged_jwt(i)
                };
                let refused = c
                    .create_certificate(request(&pem, Some(&bogus), Some(&bogus)))
                    .await
                    .is_err();
                if refused {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                i += IN_FLIGHT;
            }
        }));
    }
    let flood_start = Instant::now();
    let loud = legit(4).await?;
    flooding.store(false, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    let flood_rate = flood_sent.load(Ordering::Relaxed) as f64 / flood_start.elapsed().as_secs_f64();
    let reviews = metric(
        &ca.daemon.metrics().await?,
        "mizzen_ca_token_review_duration_seconds_count",
    ) - reviews_before;

    println!("CA issuance, in-process ceiling (parse + verify + sign, 1 thread): {ceiling:.0}/s");
    println!(
        "CA issuance over gRPC+TLS, cached reviews, {IN_FLIGHT} in flight: {rate:.0}/s = {:.2} of the ceiling (target >= 0.5)",
        rate / ceiling
    );
    println!(
        "one agent's issuance latency, quiet: p50 {:?} p99 {:?} ({} calls)",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        quiet.len()
    );
    println!(
        "  during a flood of {flood_rate:.0} bad-token calls/s: p50 {:?} p99 {:?} ({} calls), p99 ratio {:.2}; \
         TokenReviews the flood cost: {reviews:.0}",
        pct(&loud, 0.5),
        pct(&loud, 0.99),
        loud.len(),
        pct(&loud, 0.99).as_secs_f64() / pct(&quiet, 0.99).as_secs_f64()
    );
    assert!(!loud.is_empty(), "legitimate issuance went on during the flood");
    assert!(flood_rate > 0.0, "the flood was refused");
    Ok(())
}
