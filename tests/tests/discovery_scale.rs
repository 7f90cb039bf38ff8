//! Discovery at scale, printed (run with `--nocapture`): the release agent
//! while the cluster grows to 1,000, 5,000 and 10,000 Services, against
//! the same figures at 100 Services measured first in the same run.
//!
//! Each Service (headless: the test cluster's Service range is a /24) has
//! one EndpointSlice of 5 ready endpoints and one Pod holding the first
//! endpoint's address (unscheduled: a scheduling gate keeps it Pending),
//! spread over 10 namespaces. Per step:
//! - the agent's RSS once it has published every Service;
//! - a new stream's first state: responses, bytes, the largest response;
//! - push latency, p50 and max of 20 flips of one Service's port, from the
//!   API server's answer to the patch to the stream receiving the change;
//! - agent CPU (all its threads' run time, from `/proc`) per Service
//!   change (those flips) and per Pod change discovery does not read (a
//!   label on 200 Pods, counted done by `mizzen_agent_discovery_events`);
//! - the agent's peak RSS while 50 streams connect at once.
//!
//! Asserted: every response is within the agent's message limit, every
//! stream gets every Service, and at the last step the independent grpcio
//! client (default limits: 4 MiB per message) syncs.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mizzen_api::proto::discovery::MORE;
use mizzen_tests::ads::{AdsStream, Received};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::{Agent, Ca, install_manifests};
use mizzen_tests::{Cluster, eventually, percentile, proc_status_kib, release_bin};
use tokio::io::{AsyncBufReadExt, BufReader};

const NODE: &str = "scale-node";
const STEPS: [usize; 4] = [100, 1_000, 5_000, 10_000];
const NAMESPACES: usize = 10;
const ENDPOINTS: usize = 5;
const FLIPS: usize = 20;
const POD_TOUCHES: usize = 200;
const STREAMS: usize = 50;
/// The agent's default `--max-discovery-message-bytes`.
const LIMIT: usize = 64 << 10;
const IN_FLIGHT: usize = 32;
const TIMEOUT: Duration = Duration::from_secs(600);

/// Endpoint `k` of Service `i`'s address: 10.100.0.0/16 and up.
fn address(i: usize, k: usize) -> String {
    let n = i * ENDPOINTS + k;
    format!("10.{}.{}.{}", 100 + n / 65_536, (n / 256) % 256, n % 256)
}

/// Service `i`, its slice and its pod, in `ns`.
async fn create(client: &kube::Client, ns: &str, i: usize) -> anyhow::Result<()> {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}")},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|k| serde_json::json!({"addresses": [address(i, k)], "conditions": {"ready": true}}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("pod-{i}")},
        "spec": {"schedulingGates": [{"name": "mizzen.dev/bench"}],
                 "containers": [{"name": "app", "image": "app"}]},
    }))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await?;
    let ip = address(i, 0);
    let status = serde_json::json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
    pods.patch_status(&format!("pod-{i}"), &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// The agent's threads' time on CPU so far (`/proc/<pid>/task/*/schedstat`).
fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += stat.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
    }
    Ok(Duration::from_nanos(ns))
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// One step's figures.
#[derive(Debug, Default)]
struct Figures {
    services: usize,
    rss_mib: f64,
    first: Received,
    push_p50_ms: f64,
    push_max_ms: f64,
    cpu_per_service_change_us: f64,
    cpu_per_pod_change_us: f64,
    peak_rss_50_streams_mib: f64,
}

struct Bench {
    client: kube::Client,
    namespaces: Vec<String>,
    agent: Agent,
    pid: u32,
    token: String,
    created: usize,
    /// Services in the cluster before the benchmark's own.
    others: usize,
}

impl Bench {
    async fn grow(&mut self, to: usize) -> anyhow::Result<()> {
        let (client, namespaces) = (&self.client, &self.namespaces);
        stream::iter(self.created..to)
            .map(|i| async move { create(client, &namespaces[i % NAMESPACES], i).await })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        self.created = to;
        let want = (self.others + to) as f64;
        let daemon = &self.agent.daemon;
        eventually(
            TIMEOUT,
            &format!("the agent to publish {want} Services"),
            || async move { Ok(metric(&daemon.metrics().await?, "mizzen_agent_discovery_services") >= want) },
        )
        .await
    }

    /// Flips Service 0's port `FLIPS` times; each time, how long until
    /// `stream` carries the change.
    async fn flips(&self, stream: &mut AdsStream) -> anyhow::Result<Vec<Duration>> {
        let ns = &self.namespaces[0];
        let name = format!("{ns}/svc-0");
        let services = Api::<Service>::namespaced(self.client.clone(), ns);
        let mut took = Vec::new();
        for flip in 0..FLIPS {
            let port = 81 + flip % 2;
            let patch = serde_json::json!({"spec": {"ports": [{"name": "http", "port": port}]}});
            services
                .patch("svc-0", &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            let since = Instant::now();
            loop {
                let resp = tokio::time::timeout(TIMEOUT, stream.next()).await??;
                if resp.resources.iter().any(|r| r.name == name) {
                    took.push(since.elapsed());
                    break;
                }
            }
        }
        Ok(took)
    }

    /// Agent CPU per label change on `POD_TOUCHES` Pods.
    async fn touch_pods(&self, round: usize) -> anyhow::Result<Duration> {
        let daemon = &self.agent.daemon;
        let before_events = metric(&daemon.metrics().await?, "mizzen_agent_discovery_events_total");
        let before = cpu(self.pid)?;
        let (client, namespaces, created) = (&self.client, &self.namespaces, self.created);
        stream::iter(0..POD_TOUCHES)
            .map(|n| async move {
                // Each patch changes the label, so each is an event.
                let i = n % created;
                let pods = Api::<Pod>::namespaced(client.clone(), &namespaces[i % NAMESPACES]);
                let patch = serde_json::json!({"metadata": {"labels": {"touched": format!("{round}-{n}")}}});
                pods.patch(&format!("pod-{i}"), &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        let want = before_events + POD_TOUCHES as f64;
        eventually(TIMEOUT, "the agent to see every Pod change", || async move {
            Ok(metric(&daemon.metrics().await?, "mizzen_agent_discovery_events_total") >= want)
        })
        .await?;
        Ok((cpu(self.pid)? - before) / POD_TOUCHES as u32)
    }

    /// The agent's peak RSS while `STREAMS` streams open at once and each
    /// receives its first state.
    async fn many_streams(&self) -> anyhow::Result<f64> {
        // Writing 5 resets the peak (VmHWM) to the current RSS.
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")?;
        let socket = &self.agent.socket;
        let token = &self.token;
        let want = self.others + self.created;
        let firsts = futures::future::try_join_all((0..STREAMS).map(|_| async move {
            let mut s = AdsStream::open(socket, token).await?;
            let got = s.push().await?;
            anyhow::ensure!(got.resources >= want, "{} of {want} Services", got.resources);
            anyhow::ensure!(got.largest <= LIMIT, "a response of {} bytes", got.largest);
            Ok::<_, anyhow::Error>(s)
        }))
        .await?;
        let peak = proc_status_kib(self.pid, "VmHWM:")?;
        drop(firsts);
        Ok(mib(peak))
    }

    async fn measure(&self, round: usize) -> anyhow::Result<Figures> {
        let mut stream = AdsStream::open(&self.agent.socket, &self.token).await?;
        let first = stream.push().await?;
        let services = self.others + self.created;
        assert!(
            first.resources >= services,
            "{} of {services} Services",
            first.resources
        );
        assert!(first.largest <= LIMIT, "a response of {} bytes", first.largest);
        let rss = proc_status_kib(self.pid, "VmRSS:")?;
        let cpu_before = cpu(self.pid)?;
        let mut took = self.flips(&mut stream).await?;
        let per_service_change = (cpu(self.pid)? - cpu_before) / FLIPS as u32;
        took.sort();
        let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let per_pod_change = self.touch_pods(round).await?;
        let peak = self.many_streams().await?;
        Ok(Figures {
            services: self.created,
            rss_mib: mib(rss),
            first,
            push_p50_ms: ms(percentile(&took, 0.5)),
            push_max_ms: ms(took.last().copied()),
            cpu_per_service_change_us: per_service_change.as_secs_f64() * 1e6,
            cpu_per_pod_change_us: per_pod_change.as_secs_f64() * 1e6,
            peak_rss_50_streams_mib: peak,
        })
    }

    /// The independent grpcio client, with gRPC's default limits, reads
    /// the whole first state.
    async fn grpcio_syncs(&self, token_file: &std::path::Path) -> anyhow::Result<usize> {
        let script = mizzen_tests::cluster::repo_root().join("tests/discovery_client.py");
        let mut child = tokio::process::Command::new(mizzen_tests::sds::python()?)
            .arg(script)
            .arg(&self.agent.socket)
            .arg(token_file)
            .arg(mizzen_api::proto::discovery::SERVICE_TYPE)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut resources = 0;
        loop {
            let line = tokio::time::timeout(TIMEOUT, lines.next_line())
                .await??
                .context("the grpcio client exited")?;
            let resp: serde_json::Value = serde_json::from_str(&line)?;
            anyhow::ensure!(resp.get("error").is_none(), "grpcio client: {resp}");
            resources += resp["resources"].as_array().map_or(0, Vec::len);
            if resp["system_version_info"] != MORE {
                return Ok(resources);
            }
            use tokio::io::AsyncWriteExt;
            let stdin = child.stdin.as_mut().context("stdin")?;
            stdin.write_all(b"ACK\n").await?;
        }
    }
}

#[tokio::test]
async fn discovery_from_100_to_10000_services() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    mizzen_tests::cluster::register_node(&client, NODE).await?;
    let ca = Ca::start(cluster, None, &[]).await?;
    let agent = Agent::start_as(
        cluster,
        NODE,
        ca.grpc_port,
        &[],
        "mizzen-agent",
        Some(&release_bin("mizzen-agent")?),
    )
    .await?;
    let pid = agent.daemon.pid().context("agent pid")?;
    let mut namespaces = Vec::new();
    for _ in 0..NAMESPACES {
        namespaces.push(cluster.namespace(&client, "scale", &[]).await?);
    }
    service_account(&client, &namespaces[0], "reader").await?;
    let reader = pod_on_node(&client, &namespaces[0], "reader", "reader", NODE).await?;
    let token = token(&client, &namespaces[0], "reader", Some(&reader), "mizzen-ca").await?;
    let token_file = cluster.dir().join("scale-reader-token");
    std::fs::write(&token_file, &token)?;
    let others = Api::<Service>::all(client.clone())
        .list(&Default::default())
        .await?
        .items
        .len();
    let mut bench = Bench {
        client,
        namespaces,
        agent,
        pid,
        token,
        created: 0,
        others,
    };
    let mut table = Vec::new();
    for (round, step) in STEPS.into_iter().enumerate() {
        let started = Instant::now();
        bench.grow(step).await?;
        let grown = started.elapsed();
        let figures = bench.measure(round).await?;
        println!("discovery scale: {step} Services created and published in {grown:.1?}: {figures:?}");
        table.push(figures);
    }
    let grpcio = bench.grpcio_syncs(&token_file).await?;
    assert!(
        grpcio >= bench.others + bench.created,
        "grpcio received {grpcio} Services"
    );

    let row = |what: &str, f: &dyn Fn(&Figures) -> String| {
        let cells: Vec<String> = table.iter().map(f).collect();
        println!("| {what} | {} |", cells.join(" | "));
    };
    println!("\ndiscovery scale, release agent ({ENDPOINTS} endpoints and 1 Pod per Service):");
    row("Services", &|f| format!("{}", f.services));
    row("agent RSS settled", &|f| format!("{:.1} MiB", f.rss_mib));
    row("agent RSS peak, 50 streams connecting", &|f| {
        format!("{:.1} MiB", f.peak_rss_50_streams_mib)
    });
    row("push p50 / max of 20, from the patch", &|f| {
        format!("{:.0} / {:.0} ms", f.push_p50_ms, f.push_max_ms)
    });
    row("first state: responses, bytes, largest", &|f| {
        format!(
            "{}, {} KB, {} KB",
            f.first.responses,
            f.first.bytes / 1000,
            f.first.largest / 1000
        )
    });
    row("agent CPU per Service change", &|f| {
        format!("{:.0} µs", f.cpu_per_service_change_us)
    });
    row("agent CPU per unrelated Pod change", &|f| {
        format!("{:.0} µs", f.cpu_per_pod_change_us)
    });
    let (base, last) = (&table[0], &table[table.len() - 1]);
    println!(
        "ratios {} to {} Services: push p50 {:.2}×, CPU per Service change {:.2}×, per Pod change {:.2}×; grpcio synced {grpcio} Services",
        base.services,
        last.services,
        last.push_p50_ms / base.push_p50_ms,
        last.cpu_per_service_change_us / base.cpu_per_service_change_us,
        last.cpu_per_pod_change_us / base.cpu_per_pod_change_us,
    );
    Ok(())
}
