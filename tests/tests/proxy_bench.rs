//! Benchmark of the data path: HTTP/1.1 keep-alive requests and unary
//! gRPC calls with 1 KiB bodies, client → proxy → proxy → server over
//! mutual TLS between injected pods on the test node, in the same run as
//! three baselines: the same traffic between two pods without the mesh
//! (direct), and through the same proxies on a Service port declared
//! `tcp-…` (the L4 relay) against one declared `http`/`grpc` (the L7
//! path). Prints added latency (p50/p90/p99) at fixed 1,000 and 3,000
//! requests/s, CPU seconds per 1,000 requests of each proxy (and L7/L4),
//! throughput at maximum rate with one and two proxy workers, peak RSS
//! and the memory of 1,000 idle connections; and the latency a
//! VirtualService with retries and a timeout adds to the L7 path (a
//! Service routed by one, against the plain Service, at 1,000
//! requests/s). Figures are printed, not
//! asserted (the machine is shared); what is asserted is that every
//! request succeeded and really crossed both proxies.
//!
//! The proxies are the release build (`target/release/mizzen-proxy`;
//! `scripts/test.sh` builds it). Run alone with
//! `cargo test -p mizzen-tests --test proxy_bench -- --nocapture`.

use std::time::Duration;

use anyhow::{Context, bail};
use mizzen_tests::daemon::{http_get, metric, metric_where};
use mizzen_tests::k8s::service_account;
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{Node, create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually, workspace_bin};

const TIMEOUT: Duration = Duration::from_secs(90);
const NODE: &str = "bench-node";
const APP_UID: u32 = 1000;
const CONNS: &str = "4";

fn release_proxy() -> anyhow::Result<std::path::PathBuf> {
    mizzen_tests::release_bin("mizzen-proxy")
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

/// Which load: `http-load` (HTTP/1.1) or `grpc-load` (unary gRPC, h2c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Http,
    Grpc,
}

impl Load {
    fn command(self) -> &'static str {
        match self {
            Load::Http => "http-load",
            Load::Grpc => "grpc-load",
        }
    }
}

async fn load(
    node: &Node,
    ns: &str,
    pod: &str,
    what: Load,
    target: &str,
    rate: &str,
    secs: &str,
) -> anyhow::Result<Run> {
    let out = node
        .command_as(ns, pod, APP_UID, workspace_bin("mizzen-testapp"))?
        .args([what.command(), target, rate, secs, CONNS])
        .output()
        .await?;
    if !out.status.success() {
        bail!("{}: {}", what.command(), String::from_utf8_lossy(&out.stderr));
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

/// A Service in `ns` selecting `app`, port 80 named `port_name`.
async fn service(client: &kube::Client, ns: &str, name: &str, app: &str, port_name: &str) -> anyhow::Result<String> {
    let spec = serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"name": port_name, "port": 80, "targetPort": "http"}]},
    });
    Ok(format!(
        "{}:80",
        mizzen_tests::k8s::create_service(client, ns, spec).await?
    ))
}

fn client_pod(name: &str, annotations: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let mut c = pod(name, serde_json::json!({}), serde_json::json!([]));
    c["metadata"]["annotations"] = annotations;
    c["spec"]["containers"][0]["command"] = serde_json::json!(["sleep", "3600"]);
    c["spec"]["containers"][0]
        .as_object_mut()
        .context("container")?
        .remove("readinessProbe");
    Ok(c)
}

/// Where each kind of traffic goes, per path.
#[derive(Debug)]
struct Targets {
    direct: String,
    l4: String,
    l7: String,
}

/// A VirtualService routing `host` (the HTTP server's second Service)
/// with a timeout and retries: what the routed path costs. The load's
/// requests are POSTs with bodies, which are never retried, so this
/// measures deciding the route and arming its timers.
fn routed_service(host: &str) -> String {
    format!(
        "apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
  - match:
    - uri: {{prefix: /}}
    route:
    - destination: {{host: {host}}}
    timeout: 5s
    retries: {{attempts: 2, perTryTimeout: 2s, retryOn: \"5xx,connect-failure\"}}
"
    )
}

/// The benchmark's pods: in the mesh namespace a server, a gRPC server,
/// `client` (one proxy worker) and `client2` (two); the same servers and
/// a client without the mesh.
struct Bench {
    mesh_node: MeshNode,
    mesh: String,
    plain: String,
    http: Targets,
    grpc: Targets,
    /// The HTTP server behind a Service a VirtualService routes.
    routed: String,
}

impl Bench {
    async fn start(proxy: &std::path::Path) -> anyhow::Result<Self> {
        let cluster = Cluster::get();
        let client = cluster.client().await?;
        let mesh_node = MeshNode::start(cluster, NODE, proxy, &[]).await?;
        let mesh = cluster
            .namespace(&client, "bench-mesh", &[("mizzen.dev/inject", "enabled")])
            .await?;
        let plain = cluster.namespace(&client, "bench-plain", &[]).await?;
        for ns in [&mesh, &plain] {
            service_account(&client, ns, "bench").await?;
            for (name, args) in [("server", "http-server"), ("grpc", "grpc-server")] {
                let p = pod(
                    name,
                    serde_json::json!({"app": name}),
                    serde_json::json!([args, "0.0.0.0:8080"]),
                );
                create_pod(&client, ns, p).await?;
            }
            create_pod(&client, ns, client_pod("client", serde_json::json!({}))?).await?;
        }
        create_pod(
            &client,
            &mesh,
            client_pod("client2", serde_json::json!({"mizzen.dev/proxy-workers": "2"}))?,
        )
        .await?;
        let http = Targets {
            direct: String::new(),
            l4: service(&client, &mesh, "server-tcp", "server", "tcp-http").await?,
            l7: service(&client, &mesh, "server", "server", "http").await?,
        };
        let grpc = Targets {
            direct: String::new(),
            l4: service(&client, &mesh, "grpc-tcp", "grpc", "tcp-grpc").await?,
            l7: service(&client, &mesh, "grpc", "grpc", "grpc").await?,
        };
        let routed = service(&client, &mesh, "server-routed", "server", "http").await?;
        cluster.apply(&mesh, &routed_service("server-routed")).await?;
        for (ns, names) in [
            (&mesh, &["server", "grpc", "client", "client2"][..]),
            (&plain, &["server", "grpc", "client"][..]),
        ] {
            for name in names {
                wait_ready(&client, ns, name, TIMEOUT).await?;
            }
        }
        // No kube-proxy: the baseline goes to the server pods' IPs directly.
        let node = &mesh_node.node;
        let direct = |name: &str| -> anyhow::Result<String> { Ok(format!("{}:8080", node.pod(&plain, name)?.1)) };
        let b = Self {
            http: Targets {
                direct: direct("server")?,
                ..http
            },
            grpc: Targets {
                direct: direct("grpc")?,
                ..grpc
            },
            mesh_node,
            mesh,
            plain,
            routed,
        };
        for (what, target) in [
            (Load::Http, b.routed.clone()),
            (Load::Http, b.http.l7.clone()),
            (Load::Http, b.http.l4.clone()),
            (Load::Grpc, b.grpc.l7.clone()),
            (Load::Grpc, b.grpc.l4.clone()),
        ] {
            let (node, mesh) = (&b.mesh_node.node, &b.mesh);
            eventually(TIMEOUT, "the mesh routes to the servers", || {
                let target = target.clone();
                async move { Ok(load(node, mesh, "client", what, &target, "100", "1").await?.errors == 0.0) }
            })
            .await?;
        }
        Ok(b)
    }

    fn node(&self) -> &Node {
        &self.mesh_node.node
    }

    fn pid(&self, ns: &str, pod: &str, container: &str) -> anyhow::Result<u32> {
        self.node().pid(ns, pod, container)
    }
}

/// One fixed-rate measurement of the mesh: its run and each proxy's CPU.
#[derive(Debug, Clone, Copy)]
struct Measured {
    run: Run,
    /// CPU seconds of the client's and the server's proxy.
    cpu: (f64, f64),
    /// The client proxy's CPU seconds in user space and in the kernel.
    client_split: (f64, f64),
}

impl Measured {
    fn per_1000(&self) -> (f64, f64) {
        let k = self.run.requests / 1000.0;
        (self.cpu.0 / k, self.cpu.1 / k)
    }
}

async fn measured(b: &Bench, what: Load, target: &str, rate: &str, server: &str) -> anyhow::Result<Measured> {
    let pids = (
        b.pid(&b.mesh, "client", "mizzen-proxy")?,
        b.pid(&b.mesh, server, "mizzen-proxy")?,
    );
    let before = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?, cpu_split(pids.0)?);
    let run = load(b.node(), &b.mesh, "client", what, target, rate, SECS).await?;
    let after = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?, cpu_split(pids.0)?);
    Ok(Measured {
        run,
        cpu: (after.0 - before.0, after.1 - before.1),
        client_split: (after.2.0 - before.2.0, after.2.1 - before.2.1),
    })
}

const SECS: &str = "5";

/// All figures of one traffic kind at one rate.
struct AtRate {
    what: Load,
    rate: &'static str,
    direct: Run,
    l4: Measured,
    l7: Measured,
}

impl AtRate {
    fn print(&self) {
        let ms = |us: f64| us / 1000.0;
        let added = |r: &Run| {
            format!(
                "{:.3} / {:.3} / {:.3}",
                ms(r.p50 - self.direct.p50),
                ms(r.p90 - self.direct.p90),
                ms(r.p99 - self.direct.p99)
            )
        };
        let (l4c, l4s) = self.l4.per_1000();
        let (l7c, l7s) = self.l7.per_1000();
        let split = |m: &Measured| {
            let k = m.run.requests / 1000.0;
            format!("{:.3} user + {:.3} kernel", m.client_split.0 / k, m.client_split.1 / k)
        };
        eprintln!(
            "{:?} at {} req/s: direct p50/p90/p99 {:.3} / {:.3} / {:.3} ms\n  added by the two proxies, L4 relay: {} ms; L7 path: {} ms\n  CPU s per 1000 requests (client proxy, server proxy): L4 {:.3}, {:.3}; L7 {:.3}, {:.3}; L7/L4 {:.2}x   (target <= 1.3x)\n  client proxy per 1000 requests: L4 {}; L7 {}",
            self.what,
            self.rate,
            ms(self.direct.p50),
            ms(self.direct.p90),
            ms(self.direct.p99),
            added(&self.l4.run),
            added(&self.l7.run),
            l4c,
            l4s,
            l7c,
            l7s,
            (l7c + l7s) / (l4c + l4s),
            split(&self.l4),
            split(&self.l7),
        );
    }
}

#[tokio::test]
async fn proxied_against_direct_http_and_grpc() -> anyhow::Result<()> {
    let proxy = release_proxy()?;
    let b = Bench::start(&proxy).await?;
    let (node, mesh, plain) = (b.node(), b.mesh.as_str(), b.plain.as_str());
    let (_, server_ip) = node.pod(mesh, "server")?;
    // Served to the `client` and `client2` pods, by the workload names
    // their proxies tell the server's proxy.
    let served = "mizzen_requests_total{reporter=\"destination\",source_workload=\"client";
    let served_before = metric_where(&http_get(&format!("http://{server_ip}:15020/metrics")).await?.1, served);

    let mut results = Vec::new();
    for rate in ["1000", "3000"] {
        for (what, targets, server) in [(Load::Http, &b.http, "server"), (Load::Grpc, &b.grpc, "grpc")] {
            // Warm up, then measure each path at the same rate.
            load(node, plain, "client", what, &targets.direct, rate, "1").await?;
            load(node, mesh, "client", what, &targets.l7, rate, "1").await?;
            let direct = load(node, plain, "client", what, &targets.direct, rate, SECS).await?;
            let l4 = measured(&b, what, &targets.l4, rate, server).await?;
            let l7 = measured(&b, what, &targets.l7, rate, server).await?;
            results.push(AtRate {
                what,
                rate,
                direct,
                l4,
                l7,
            });
        }
    }
    // The routed Service against the plain one, back to back at one rate.
    load(node, mesh, "client", Load::Http, &b.routed, "1000", "1").await?;
    let plain_l7 = load(node, mesh, "client", Load::Http, &b.http.l7, "1000", SECS).await?;
    let routed = measured(&b, Load::Http, &b.routed, "1000", "server").await?;
    let routed_retries = metric(
        &http_get(&format!("http://{}:15020/metrics", node.pod(mesh, "client")?.1))
            .await?
            .1,
        "mizzen_proxy_retries_total",
    );
    let direct_max = load(node, plain, "client", Load::Http, &b.http.direct, "0", SECS).await?;
    let one_worker = load(node, mesh, "client", Load::Http, &b.http.l7, "0", SECS).await?;
    let two_workers = load(node, mesh, "client2", Load::Http, &b.http.l7, "0", SECS).await?;
    for r in &results {
        for (path, run) in [("direct", r.direct), ("L4", r.l4.run), ("L7", r.l7.run)] {
            assert_eq!(run.errors, 0.0, "{:?} {} {path}: {run:?}", r.what, r.rate);
            assert!(run.requests > 1000.0, "{:?} {} {path}: {run:?}", r.what, r.rate);
        }
    }
    for (what, r) in [
        ("direct max", direct_max),
        ("1 worker max", one_worker),
        ("2 workers max", two_workers),
    ] {
        assert_eq!(r.errors, 0.0, "{what}: {r:?}");
    }
    // The HTTP requests on the L7 path crossed the server's proxy, from
    // the client's namespace.
    let l7_http: f64 = results
        .iter()
        .filter(|r| r.what == Load::Http)
        .map(|r| r.l7.run.requests)
        .sum::<f64>()
        + one_worker.requests
        + two_workers.requests
        + plain_l7.requests
        + routed.run.requests;
    for (what, run) in [("plain L7", plain_l7), ("routed", routed.run)] {
        assert_eq!(run.errors, 0.0, "{what}: {run:?}");
    }
    assert_eq!(routed_retries, 0.0, "nothing failed, so nothing was retried");
    eventually(
        TIMEOUT,
        "the server's proxy to have served every L7 request",
        || async {
            let (_, text) = http_get(&format!("http://{server_ip}:15020/metrics")).await?;
            Ok(metric_where(&text, served) - served_before >= l7_http)
        },
    )
    .await?;

    let client_proxy = b.pid(mesh, "client", "mizzen-proxy")?;
    let server_proxy = b.pid(mesh, "server", "mizzen-proxy")?;
    let peak = (memory_mib(client_proxy, "VmHWM:")?, memory_mib(server_proxy, "VmHWM:")?);

    // 1,000 idle connections through both proxies (the L4 port).
    let rss_before = (memory_mib(client_proxy, "VmRSS:")?, memory_mib(server_proxy, "VmRSS:")?);
    let mut holder = node
        .command_as(mesh, "client", APP_UID, workspace_bin("mizzen-testapp"))?
        .args(["hold", &b.http.l4, "1000", "60"])
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

    eprintln!(
        "\n== proxy benchmark: {CONNS} keep-alive connections, 1 KiB bodies, release proxies, {SECS} s per run =="
    );
    for r in &results {
        r.print();
    }
    eprintln!(
        "maximum rate, HTTP/1.1: direct {:.0} req/s; L7 path with 1 proxy worker {:.0} req/s ({:.2} of direct), with 2 workers {:.0} req/s ({:.2}x one worker; target >= 1.8x where cores allow)",
        direct_max.rps,
        one_worker.rps,
        one_worker.rps / direct_max.rps,
        two_workers.rps,
        two_workers.rps / one_worker.rps,
    );
    let ms = |us: f64| us / 1000.0;
    eprintln!(
        "VirtualService with a timeout and retries, HTTP/1.1 at 1000 req/s: p50/p90/p99 {:.3} / {:.3} / {:.3} ms against {:.3} / {:.3} / {:.3} ms for the plain Service: {:+.3} / {:+.3} / {:+.3} ms added",
        ms(routed.run.p50),
        ms(routed.run.p90),
        ms(routed.run.p99),
        ms(plain_l7.p50),
        ms(plain_l7.p90),
        ms(plain_l7.p99),
        ms(routed.run.p50 - plain_l7.p50),
        ms(routed.run.p90 - plain_l7.p90),
        ms(routed.run.p99 - plain_l7.p99),
    );
    eprintln!(
        "peak RSS: client proxy {:.1} MiB, server proxy {:.1} MiB   (target < 15 MB)",
        peak.0, peak.1
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
