//! Benchmark: admission latency of the real injector over HTTPS at a fixed
//! 500 reviews/s and at maximum rate, for pods it injects against reviews
//! it passes through untouched (the baseline, same server, same run).
//! Figures are printed, not asserted; what is asserted is that every
//! review was answered as expected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use mizzen_tests::daemon::Daemon;
use mizzen_tests::k8s::secret_value;
use mizzen_tests::{Cluster, free_port};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const CONNECTIONS: usize = 4;

fn review(object: serde_json::Value, kind: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "bench", "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "bench", "operation": "CREATE", "userInfo": {"username": "bench"}, "object": object}
        }))
        .expect("json"),
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16, ca_pem: &str) -> anyhow::Result<Sender> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn one(sender: &mut Sender, body: &Bytes, expect: &str) -> anyhow::Result<Duration> {
    let req = hyper::Request::post("/inject")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?;
    let start = Instant::now();
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let bytes = resp.into_body().collect().await?.to_bytes();
    let took = start.elapsed();
    let text = std::str::from_utf8(&bytes)?;
    anyhow::ensure!(text.contains(expect), "unexpected answer: {text}");
    Ok(took)
}

/// Sends reviews over `CONNECTIONS` keep-alive connections for `secs`,
/// paced to `rate` per second in total (unpaced when `None`).
async fn drive(
    senders: &mut [Sender],
    body: &Bytes,
    expect: &str,
    rate: Option<u32>,
    secs: u64,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let tasks = senders.iter_mut().enumerate().map(|(i, s)| {
        let body = body.clone();
        async move {
            let mut lat = Vec::new();
            let per_conn = rate.map(|r| Duration::from_secs_f64(CONNECTIONS as f64 / f64::from(r)));
            let mut next = Instant::now()
                + per_conn
                    .map(|p| p.mul_f64(i as f64 / CONNECTIONS as f64))
                    .unwrap_or_default();
            while Instant::now() < deadline {
                if let Some(p) = per_conn {
                    tokio::time::sleep_until(next.into()).await;
                    next += p;
                }
                lat.push(one(s, &body, expect).await?);
            }
            Ok::<_, anyhow::Error>(lat)
        }
    });
    let mut all = Vec::new();
    for r in futures::future::join_all(tasks).await {
        all.extend(r?);
    }
    let rps = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    Ok((all, rps))
}

fn pct(v: &[Duration], p: f64) -> Duration {
    mizzen_tests::percentile(v, p).expect("latencies were measured")
}

#[tokio::test]
async fn admission_latency_over_https() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let home = cluster
        .namespace(&client, "injector-bench", &[("mizzen.dev/inject", "enabled")])
        .await?;
    let port = free_port();
    let _injector = Daemon::start(
        "mizzen-injector",
        cluster.kubeconfig(),
        free_port(),
        &[
            "serve".into(),
            format!("--addr=127.0.0.1:{port}"),
            "--serving-ip=127.0.0.1".into(),
            format!("--namespace={home}"),
        ],
    )
    .await?;
    let ca_pem = secret_value(
        &client,
        &home,
        "mizzen-injector-ca",
        "ca-cert.pem",
        Duration::from_secs(30),
    )
    .await?;
    let ca_pem = String::from_utf8(ca_pem).context("CA PEM")?;

    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": home, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}});
    let mut inject = review(pod, "Pod");
    // The review names the namespace the pod is in.
    inject = Bytes::from(
        String::from_utf8(inject.to_vec())?.replace("\"namespace\":\"bench\"", &format!("\"namespace\":\"{home}\"")),
    );
    let passthrough = review(
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        "ConfigMap",
    );

    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        senders.push(connect(port, &ca_pem).await?);
    }
    // Warm up both paths (namespace cache, allocator).
    drive(&mut senders, &inject, "\"patch\"", Some(200), 1).await?;
    drive(&mut senders, &passthrough, "\"allowed\":true", Some(200), 1).await?;

    let (base, _) = drive(&mut senders, &passthrough, "\"allowed\":true", Some(500), 4).await?;
    let (inj, _) = drive(&mut senders, &inject, "\"patch\"", Some(500), 4).await?;
    let (_, base_max) = drive(&mut senders, &passthrough, "\"allowed\":true", None, 3).await?;
    let (inj_max_lat, inj_max) = drive(&mut senders, &inject, "\"patch\"", None, 3).await?;
    println!(
        "injector over HTTPS, {CONNECTIONS} keep-alive connections: at 500 reviews/s injecting p50 {:?} p99 {:?} \
         ({} reviews); passthrough baseline p50 {:?} p99 {:?}; p99 ratio {:.2}. \
         Max rate: injecting {inj_max:.0} reviews/s (p99 {:?}), passthrough {base_max:.0}/s, ratio {:.2}",
        pct(&inj, 0.5),
        pct(&inj, 0.99),
        inj.len(),
        pct(&base, 0.5),
        pct(&base, 0.99),
        pct(&inj, 0.99).as_secs_f64() / pct(&base, 0.99).as_secs_f64(),
        pct(&inj_max_lat, 0.99),
        inj_max / base_max,
    );
    assert!(inj.len() >= 1500, "the paced run sent its reviews: {}", inj.len());
    Ok(())
}
