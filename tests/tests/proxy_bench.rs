//! Benchmark of the data path: HTTP/1.1 keep-alive traffic with 1 KiB
//! bodies, client → proxy → proxy → server over mutual TLS between
//! injected pods on the test node, against the same traffic between two
//! pods without the mesh, in the same run. Prints added latency
//! (p50/p90/p99) at a fixed 1,000 requests/s, throughput at maximum rate,
//! CPU seconds per 1,000 requests and peak RSS of each proxy, and the
//! memory of 1,000 idle connections. Figures are printed, not asserted
//! (the machine is shared); what is asserted is that every request
//! succeeded and really crossed both proxies.
//!
//! The proxies are the release build (`target/release/mizzen-proxy`;
//! `scripts/test.sh` builds it). Run alone with
//! `cargo test -p mizzen-tests --test proxy_bench -- --nocapture`.

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use mizzen_tests::daemon::{http_get, metric};
use mizzen_tests::k8s::service_account;
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{Node, create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually, workspace_bin};

const TIMEOUT: Duration = Duration::from_secs(90);
const NODE: &str = "bench-node";
const APP_UID: u32 = 1000;
const CONNS: &str = "4";

fn release_proxy() -> anyhow::Result<std::path::PathBuf> {
    let debug = workspace_bin("mizzen-proxy");
    let release = debug
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?
        .join("release/mizzen-proxy");
    if !release.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p mizzen-proxy` (scripts/test.sh does)",
            release.display()
        );
    }
    Ok(release)
}

fn pod(name: &str, labels: serde_json::Value, args: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceAccountName": "bench",
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "containers": [{"name": "app", "image": "mizzen-testapp:bench", "args": args,
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}}],
        },
    })
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// CPU seconds in user space and in the kernel.
fn cpu_split(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok((f[11].parse::<f64>()? / 100.0, f[12].parse::<f64>()? / 100.0))
}

/// A `/proc/<pid>/status` memory field, in MiB.
fn memory_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    Ok(mizzen_tests::proc_status_kib(pid, field)? / 1024.0)
}

#[derive(Debug, Clone, Copy)]
struct Run {
    requests: f64,
    errors: f64,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

async fn http_load(node: &Node, ns: &str, pod: &str, target: &str, rate: &str, secs: &str) -> anyhow::Result<Run> {
    let out = node
        .command_as(ns, pod, APP_UID, workspace_bin("mizzen-testapp"))?
        .args(["http-load", target, rate, secs, CONNS])
        .output()
        .await?;
    if !out.status.success() {
        bail!("http-load: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    let n = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        requests: n("requests"),
        errors: n("errors"),
        rps: n("rps"),
        p50: n("p50_us"),
        p90: n("p90_us"),
        p99: n("p99_us"),
    })
}

#[tokio::test]
async fn proxied_against_direct_http() -> anyhow::Result<()> {
    let proxy = release_proxy()?;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh_node = MeshNode::start(cluster, NODE, &proxy, &[]).await?;
    let node = &mesh_node.node;

    // The mesh: an injected namespace. The baseline: the same pods in a
    // namespace without injection.
    let mesh = cluster
        .namespace(&client, "bench-mesh", &[("mizzen.dev/inject", "enabled")])
        .await?;
    let plain = cluster.namespace(&client, "bench-plain", &[]).await?;
    for ns in [&mesh, &plain] {
        service_account(&client, ns, "bench").await?;
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "server"},
            "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))?;
        Api::<Service>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &svc)
            .await?;
        create_pod(
            &client,
            ns,
            pod(
                "server",
                serde_json::json!({"app": "server"}),
                serde_json::json!(["http-server", "0.0.0.0:8080"]),
            ),
        )
        .await?;
        let mut c = pod("client", serde_json::json!({}), serde_json::json!([]));
        c["spec"]["containers"][0]["command"] = serde_json::json!(["sleep", "3600"]);
        c["spec"]["containers"][0]
            .as_object_mut()
            .context("container")?
            .remove("readinessProbe");
        create_pod(&client, ns, c).await?;
    }
    for ns in [&mesh, &plain] {
        for name in ["server", "client"] {
            wait_ready(&client, ns, name, TIMEOUT).await?;
        }
    }
    let mesh_vip = Api::<Service>::namespaced(client.clone(), &mesh)
        .get("server")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("vip")?;
    let mesh_target = format!("{mesh_vip}:80");
    // No kube-proxy: the baseline goes to the server pod's IP directly.
    let (_, plain_server_ip) = node.pod(&plain, "server")?;
    let plain_target = format!("{plain_server_ip}:8080");
    eventually(TIMEOUT, "the mesh route to the server", || {
        let (node, mesh, t) = (&node, &mesh, &mesh_target);
        async move { Ok(http_load(node, mesh, "client", t, "100", "1").await?.errors == 0.0) }
    })
    .await?;

    let client_proxy = node.pid(&mesh, "client", "mizzen-proxy")?;
    let server_proxy = node.pid(&mesh, "server", "mizzen-proxy")?;
    let (_, server_ip) = node.pod(&mesh, "server")?;
    let (_, client_ip) = node.pod(&mesh, "client")?;
    let inbound_bytes = format!(
        "mizzen_proxy_bytes_total{{direction=\"inbound\",tls=\"mtls\",peer=\"spiffe://cluster.local/ns/{mesh}/sa/bench\"}}"
    );
    let inbound_before = metric(
        &http_get(&format!("http://{server_ip}:15020/metrics")).await?.1,
        &inbound_bytes,
    );

    // Warm up both paths, then measure: fixed rate, then maximum rate.
    http_load(node, &plain, "client", &plain_target, "1000", "2").await?;
    http_load(node, &mesh, "client", &mesh_target, "1000", "2").await?;
    // The direct server app's CPU is the baseline: the same requests, read
    // and answered once, on this machine, in this run.
    let plain_app = node.pid(&plain, "server", "app")?;
    let app0 = cpu_seconds(plain_app)?;
    let direct_fixed = http_load(node, &plain, "client", &plain_target, "1000", "10").await?;
    let app_cpu = cpu_seconds(plain_app)? - app0;
    let cpu0 = (cpu_seconds(client_proxy)?, cpu_seconds(server_proxy)?);
    let split0 = cpu_split(client_proxy)?;
    let mesh_fixed = http_load(node, &mesh, "client", &mesh_target, "1000", "10").await?;
    let cpu1 = (cpu_seconds(client_proxy)?, cpu_seconds(server_proxy)?);
    let split1 = cpu_split(client_proxy)?;
    let direct_max = http_load(node, &plain, "client", &plain_target, "0", "5").await?;
    let mesh_max = http_load(node, &mesh, "client", &mesh_target, "0", "5").await?;
    for (what, r) in [
        ("direct 1000/s", direct_fixed),
        ("mesh 1000/s", mesh_fixed),
        ("direct max", direct_max),
        ("mesh max", mesh_max),
    ] {
        assert_eq!(r.errors, 0.0, "{what}: {r:?}");
        assert!(r.requests > 1000.0, "{what}: {r:?}");
    }
    // The mesh traffic crossed the server's proxy, from the client's
    // identity: over 2 KiB per request.
    let crossed = (mesh_fixed.requests + mesh_max.requests) * 2048.0;
    eventually(TIMEOUT, "the server's proxy to have carried every request", || async {
        let (_, text) = http_get(&format!("http://{server_ip}:15020/metrics")).await?;
        Ok(metric(&text, &inbound_bytes) - inbound_before >= crossed)
    })
    .await?;
    let (_, text) = http_get(&format!("http://{client_ip}:15020/metrics")).await?;
    assert!(
        metric(
            &text,
            &format!(
                "mizzen_proxy_connections_total{{direction=\"outbound\",tls=\"mtls\",peer=\"spiffe://cluster.local/ns/{mesh}/sa/bench\"}}"
            )
        ) >= 4.0,
        "{text}"
    );

    let peak_load = (memory_mib(client_proxy, "VmHWM:")?, memory_mib(server_proxy, "VmHWM:")?);

    // 1,000 idle connections through both proxies.
    let rss_before = (memory_mib(client_proxy, "VmRSS:")?, memory_mib(server_proxy, "VmRSS:")?);
    let mut holder = node
        .command_as(&mesh, "client", APP_UID, workspace_bin("mizzen-testapp"))?
        .args(["hold", &mesh_target, "1000", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(holder.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(TIMEOUT, lines.next_line())
            .await??
            .unwrap_or_default();
        assert_eq!(line, "open 1000", "all idle connections opened");
    }
    eventually(TIMEOUT, "1,000 connections open through the server's proxy", || async {
        let (_, text) = http_get(&format!("http://{server_ip}:15020/metrics")).await?;
        Ok(metric(&text, "mizzen_proxy_connections_open{direction=\"inbound\"}") >= 1000.0)
    })
    .await?;
    let rss_idle = (memory_mib(client_proxy, "VmRSS:")?, memory_mib(server_proxy, "VmRSS:")?);
    let _ = holder.kill().await;

    let per_1000 = |cpu: f64| cpu / (mesh_fixed.requests / 1000.0);
    let ms = |us: f64| us / 1000.0;
    eprintln!("\n== proxy benchmark: HTTP/1.1 keep-alive, 1 KiB bodies, {CONNS} connections, release proxies ==");
    eprintln!(
        "fixed 1000 req/s for 10 s   p50 / p90 / p99 (ms)\n  direct                    {:.3} / {:.3} / {:.3}\n  client→proxy→proxy→server {:.3} / {:.3} / {:.3}\n  added by the two proxies  {:.3} / {:.3} / {:.3}   (target: p99 < 0.2 ms)",
        ms(direct_fixed.p50),
        ms(direct_fixed.p90),
        ms(direct_fixed.p99),
        ms(mesh_fixed.p50),
        ms(mesh_fixed.p90),
        ms(mesh_fixed.p99),
        ms(mesh_fixed.p50 - direct_fixed.p50),
        ms(mesh_fixed.p90 - direct_fixed.p90),
        ms(mesh_fixed.p99 - direct_fixed.p99),
    );
    eprintln!(
        "maximum rate for 5 s: direct {:.0} req/s, mesh {:.0} req/s (ratio {:.2})",
        direct_max.rps,
        mesh_max.rps,
        mesh_max.rps / direct_max.rps
    );
    let app_per_1000 = app_cpu / (direct_fixed.requests / 1000.0);
    eprintln!(
        "CPU per 1000 requests (= vCPU at 1000 req/s): client proxy {:.3} s, server proxy {:.3} s   (target < 0.05)\n  baseline: the direct server app {:.3} s (proxy/app {:.1}x, {:.1}x); /proc ticks are 10 ms",
        per_1000(cpu1.0 - cpu0.0),
        per_1000(cpu1.1 - cpu0.1),
        app_per_1000,
        per_1000(cpu1.0 - cpu0.0) / app_per_1000,
        per_1000(cpu1.1 - cpu0.1) / app_per_1000,
    );
    eprintln!(
        "  client proxy: {:.3} s user, {:.3} s kernel (TCP, veth and TLS syscalls) per 1000 requests",
        per_1000(split1.0 - split0.0),
        per_1000(split1.1 - split0.1)
    );
    eprintln!(
        "peak RSS under load: client proxy {:.1} MiB, server proxy {:.1} MiB   (target < 15 MB)",
        peak_load.0, peak_load.1
    );
    eprintln!(
        "1000 idle connections: client proxy {:.1} MiB (+{:.1} KiB/conn), server proxy {:.1} MiB (+{:.1} KiB/conn)",
        rss_idle.0,
        (rss_idle.0 - rss_before.0) * 1024.0 / 1000.0,
        rss_idle.1,
        (rss_idle.1 - rss_before.1) * 1024.0 / 1000.0,
    );
    Ok(())
}
