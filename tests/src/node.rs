//! A node for the tests: plays the kubelet's part for pods the real
//! scheduler binds to it.
//!
//! [`Node::start`] registers a Node object (keeping its Lease and Ready
//! condition fresh, so the node lifecycle controller leaves it alone) and
//! watches pods bound to it. For each pod it creates a network namespace
//! ([`NetnsPod`]), reports the pod IP, prepares the volumes (projected
//! ServiceAccount tokens through the real TokenRequest API, ConfigMap and
//! downward-API files, emptyDirs, hostPaths mapped by the test), then runs
//! the init containers in order (native sidecars, `restartPolicy: Always`,
//! are started and left running) and the containers, each as a process in
//! the namespace, in its own mount namespace with its volumes bind-mounted
//! at their mount paths, as the container's UID/GID, with its environment
//! (literal values and the usual field references), honouring `postStart`
//! exec hooks and sidecars' startup probes (HTTP GET, TCP). Images map to local binaries ([`Images`]). Readiness probes
//! (HTTP GET, TCP) run from the node as the kubelet's do, and the pod's
//! Ready condition follows them, so the real EndpointSlice controller
//! publishes its endpoints. Deleting the pod stops its processes (SIGTERM,
//! then SIGKILL after the grace period), removes the namespace and
//! finishes the deletion. Each container's output goes to
//! `<cluster dir>/pods/<namespace>_<pod>/<container>.log`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;

use crate::{Cluster, NetnsPod};

/// Raises the open-files limit to the hard limit, as container runtimes do.
const NOFILE: &str = "ulimit -n \"$(ulimit -Hn)\"";

/// Annotation of pods that exist only for their identity (tokens bound to
/// them): the test node does not run them.
pub const UNMANAGED: &str = "test.mizzen.dev/unmanaged";

/// Which local binary runs for an image. An image matches an entry when
/// its repository (the part before `:tag` or `@digest`) ends with the
/// entry's name, e.g. `ghcr.io/mizzen-mesh/mizzen-proxy:0.1.0` matches
/// `mizzen-proxy`.
#[derive(Debug, Clone, Default)]
pub struct Images(Vec<(String, PathBuf)>);

impl Images {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, binary: impl Into<PathBuf>) -> Self {
        self.0.push((name.to_owned(), binary.into()));
        self
    }

    fn binary(&self, image: &str) -> Option<&Path> {
        let repo = image.split('@').next().unwrap_or(image);
        let repo = match repo.rfind(':') {
            Some(i) if !repo[i..].contains('/') => &repo[..i],
            _ => repo,
        };
        self.0
            .iter()
            .find(|(name, _)| repo == name || repo.ends_with(&format!("/{name}")))
            .map(|(_, p)| p.as_path())
    }

    /// A command's first word: a known image's entrypoint by its name
    /// (`mizzen-proxy`), else a program on the node's PATH.
    fn program(&self, word: &str) -> PathBuf {
        let base = word.rsplit('/').next().unwrap_or(word);
        self.0
            .iter()
            .find(|(_, p)| p.file_name().and_then(|f| f.to_str()) == Some(base))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| PathBuf::from(word))
    }
}

/// A running simulated node; dropping it stops every pod's processes.
pub struct Node {
    pub name: String,
    watch: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    pods: Arc<Mutex<HashMap<String, JoinHandle<()>>>>,
    netns: Arc<Mutex<HashMap<String, (String, std::net::Ipv4Addr)>>>,
    pids: Arc<Mutex<HashMap<String, u32>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.watch.abort();
        self.heartbeat.abort();
        for (_, task) in self.pods.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            task.abort();
        }
    }
}

/// What every pod on the node shares.
struct Context_ {
    client: kube::Client,
    node: String,
    images: Images,
    host_paths: HashMap<String, PathBuf>,
    dir: PathBuf,
    /// `<namespace>/<pod>` → network namespace and pod IP.
    netns: Arc<Mutex<HashMap<String, (String, std::net::Ipv4Addr)>>>,
    /// `<namespace>/<pod>/<container>` → process ID.
    pids: Arc<Mutex<HashMap<String, u32>>>,
}

impl Node {
    /// Registers node `name` and starts running the pods bound to it.
    /// `host_paths` maps hostPath volume paths to directories on this
    /// machine (e.g. the agent's socket directory).
    pub async fn start(
        cluster: &Cluster,
        name: &str,
        images: Images,
        host_paths: HashMap<String, PathBuf>,
    ) -> anyhow::Result<Node> {
        let client = cluster.client().await?;
        Self::start_with(client, name, images, host_paths, cluster.dir().join("pods")).await
    }

    /// [`start`](Self::start) against any cluster: `client` needs to manage
    /// nodes, leases, pods and their status, and request tokens; pod
    /// volumes and logs go under `pods_dir`.
    pub async fn start_with(
        client: kube::Client,
        name: &str,
        images: Images,
        host_paths: HashMap<String, PathBuf>,
        pods_dir: PathBuf,
    ) -> anyhow::Result<Node> {
        crate::cluster::register_node(&client, name).await?;
        let heartbeat = tokio::spawn(heartbeat(client.clone(), name.to_owned()));
        let netns: Arc<Mutex<HashMap<String, (String, std::net::Ipv4Addr)>>> = Arc::default();
        let pids: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let ctx = Arc::new(Context_ {
            netns: netns.clone(),
            pids: pids.clone(),
            client: client.clone(),
            node: name.to_owned(),
            images,
            host_paths,
            dir: pods_dir,
        });
        let pods: Arc<Mutex<HashMap<String, JoinHandle<()>>>> = Arc::default();
        let watch = {
            let pods = pods.clone();
            tokio::spawn(async move {
                let api = Api::<Pod>::all(ctx.client.clone());
                let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
                let mut events = watcher(api, config).default_backoff().applied_objects().boxed();
                while let Some(ev) = events.next().await {
                    let Ok(pod) = ev else { continue };
                    let Some(uid) = pod.metadata.uid.clone() else { continue };
                    if pod
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(UNMANAGED))
                    {
                        continue;
                    }
                    let mut running = pods.lock().unwrap_or_else(|p| p.into_inner());
                    running.retain(|_, t| !t.is_finished());
                    if !running.contains_key(&uid) && pod.metadata.deletion_timestamp.is_none() {
                        running.insert(uid, tokio::spawn(run_pod(ctx.clone(), pod)));
                    }
                }
            })
        };
        Ok(Node {
            name: name.to_owned(),
            watch,
            heartbeat,
            pods,
            netns,
            pids,
        })
    }

    /// A command running `program` in pod `ns/name`'s network namespace as
    /// `uid` (as another process of the pod would).
    pub fn command_as(
        &self,
        ns: &str,
        name: &str,
        uid: u32,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<tokio::process::Command> {
        let (netns, _) = self.pod(ns, name)?;
        let mut cmd = tokio::process::Command::new("ip");
        // A container's open-files limit, as container runtimes set it.
        cmd.args(["netns", "exec", &netns, "sh", "-c"])
            .arg(format!(
                "{NOFILE} && exec setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all -- \"$@\""
            ))
            .arg("sh")
            .arg(program)
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// The process ID of `container` in pod `ns/name`, while it runs here.
    pub fn pid(&self, ns: &str, name: &str, container: &str) -> anyhow::Result<u32> {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{ns}/{name}/{container}"))
            .copied()
            .with_context(|| format!("no process for {ns}/{name}/{container}"))
    }

    /// Pod `ns/name`'s network namespace and IP, while it runs here.
    pub fn pod(&self, ns: &str, name: &str) -> anyhow::Result<(String, std::net::Ipv4Addr)> {
        self.netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{ns}/{name}"))
            .cloned()
            .with_context(|| format!("pod {ns}/{name} is not running on this node"))
    }

    /// Where pod `ns/name`'s container logs go.
    pub fn log(cluster: &Cluster, ns: &str, name: &str, container: &str) -> PathBuf {
        cluster
            .dir()
            .join("pods")
            .join(format!("{ns}_{name}"))
            .join(format!("{container}.log"))
    }
}

/// Renews the node's Lease and Ready heartbeat every 10 s.
async fn heartbeat(client: kube::Client, node: String) {
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client);
    loop {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now_micro()},
        });
        let _ = leases
            .patch(
                &node,
                &PatchParams::apply("mizzen-test-node").force(),
                &Patch::Apply(&lease),
            )
            .await;
        let status = serde_json::json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "mizzen test node", "lastHeartbeatTime": now,
        }]}});
        let _ = nodes
            .patch_status(&node, &PatchParams::default(), &Patch::Strategic(&status))
            .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

fn now_micro() -> String {
    // MicroTime: RFC 3339 with microseconds.
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// One container's process.
struct Running {
    name: String,
    child: tokio::process::Child,
    readiness: Option<Probe>,
    ports: Vec<(String, i32)>,
}

async fn run_pod(ctx: Arc<Context_>, pod: Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = pod_lifecycle(&ctx, &api, pod).await {
        eprintln!("test node {}: pod {ns}/{name}: {e:#}", ctx.node);
        let status = serde_json::json!({"status": {"phase": "Failed", "reason": "TestNodeError",
            "message": format!("{e:#}")}});
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    }
}

fn conditions(initialized: bool, ready: bool) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let c = |t: &str, ok: bool| serde_json::json!({"type": t, "status": if ok {"True"} else {"False"}, "lastTransitionTime": now});
    serde_json::json!([
        c("PodScheduled", true),
        c("Initialized", initialized),
        c("ContainersReady", ready),
        c("Ready", ready),
    ])
}

async fn pod_lifecycle(ctx: &Arc<Context_>, api: &Api<Pod>, pod: Pod) -> anyhow::Result<()> {
    let name = pod.metadata.name.clone().context("pod name")?;
    let ns = pod.metadata.namespace.clone().context("pod namespace")?;
    let uid = pod.metadata.uid.clone().context("pod uid")?;
    let spec = pod.spec.clone().context("pod spec")?;
    // Like a kubelet that cannot pull an image: the pod stays Pending.
    let unknown: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter_map(|c| c.image.clone())
        .filter(|i| ctx.images.binary(i).is_none())
        .collect();
    if !unknown.is_empty() {
        let status = serde_json::json!({"status": {
            "phase": "Pending", "conditions": conditions(false, false),
            "reason": "ErrImageNeverPull",
            "message": format!("the test node has no local binary for {unknown:?}"),
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("report unknown images")?;
        return Ok(());
    }
    let net = NetnsPod::create(&format!("{ns}-{name}"))?;
    let pod_ip = net.ip().to_string();
    let key = format!("{ns}/{name}");
    ctx.netns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), (net.netns().to_owned(), net.ip()));
    let started = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({"status": {
        "phase": "Pending", "hostIP": net.gateway().to_string(), "hostIPs": [{"ip": net.gateway().to_string()}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": started,
        "conditions": conditions(false, false),
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("report the pod IP")?;

    let dir = ctx.dir.join(format!("{ns}_{name}"));
    std::fs::create_dir_all(&dir)?;
    let (volumes, tokens) = prepare_volumes(ctx, &pod, &dir).await?;
    let _rotation = TokenRotation::start(ctx.clone(), pod.clone(), tokens);
    let mut running: Vec<Running> = Vec::new();
    let fields = Fields {
        name: name.clone(),
        ns: ns.clone(),
        uid: uid.clone(),
        pod_ip: pod_ip.clone(),
        host_ip: net.gateway().to_string(),
        sa: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node: ctx.node.clone(),
    };
    let run = PodRun {
        net: &net,
        volumes: &volumes,
        fields: &fields,
        user: spec.security_context.as_ref().and_then(|s| s.run_as_user),
        group: spec.security_context.as_ref().and_then(|s| s.run_as_group),
    };
    for c in spec.init_containers.iter().flatten() {
        let mut cmd = container_command(ctx, &run, c, &dir)?;
        if c.restart_policy.as_deref() == Some("Always") {
            let mut child = cmd.spawn().with_context(|| format!("start sidecar {}", c.name))?;
            record_pid(ctx, &key, &c.name, &child);
            // The next containers start once the sidecar's startup probe passes.
            if let Some(p) = &c.startup_probe {
                let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
                let tries = p.failure_threshold.unwrap_or(3).max(1);
                let mut passed = false;
                for _ in 0..tries {
                    if probe(p, &pod_ip, &ports(c)).await {
                        passed = true;
                        break;
                    }
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    tokio::time::sleep(period.min(Duration::from_millis(500))).await;
                }
                if !passed {
                    bail!(
                        "sidecar {} did not pass its startup probe; see {}",
                        c.name,
                        dir.join(format!("{}.log", c.name)).display()
                    );
                }
            }
            running.push(Running {
                name: c.name.clone(),
                child,
                readiness: c.readiness_probe.clone(),
                ports: ports(c),
            });
        } else {
            let status = cmd
                .status()
                .await
                .with_context(|| format!("run init container {}", c.name))?;
            if !status.success() {
                bail!(
                    "init container {} failed: {status}; see {}",
                    c.name,
                    dir.join(format!("{}.log", c.name)).display()
                );
            }
        }
    }
    for c in &spec.containers {
        let mut cmd = container_command(ctx, &run, c, &dir)?;
        let child = cmd.spawn().with_context(|| format!("start container {}", c.name))?;
        record_pid(ctx, &key, &c.name, &child);
        running.push(Running {
            name: c.name.clone(),
            child,
            readiness: c.readiness_probe.clone(),
            ports: ports(c),
        });
        let hook = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone());
        if let Some(hook) = hook {
            let mut h = exec_in(ctx, &run, c, &hook)?;
            let out = h.output().await.with_context(|| format!("postStart of {}", c.name))?;
            if !out.status.success() {
                bail!(
                    "postStart hook of {} failed: {}",
                    c.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    // Native sidecars are reported with the init containers, as kubectl
    // counts them in READY.
    let sidecars: Vec<Container> = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .cloned()
        .collect();
    let statuses = |containers: &[Container], ready: &HashMap<String, bool>| -> serde_json::Value {
        serde_json::Value::Array(
            containers
                .iter()
                .map(|c| {
                    serde_json::json!({"name": c.name, "image": c.image, "imageID": "", "restartCount": 0,
                        "ready": ready.get(&c.name).copied().unwrap_or(false), "started": true,
                        "state": {"running": {"startedAt": started}}})
                })
                .collect(),
        )
    };
    let mut last_ready = None;
    let mut ready_by: HashMap<String, bool> = HashMap::new();
    let pods = api.clone();
    loop {
        // Deleted? Stop everything and finish the deletion.
        let current = match pods.get_opt(&name).await {
            Ok(p) => p,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let gone = match &current {
            None => true,
            Some(p) => p.metadata.uid.as_deref() != Some(uid.as_str()) || p.metadata.deletion_timestamp.is_some(),
        };
        if gone {
            let grace = current
                .as_ref()
                .and_then(|p| p.metadata.deletion_grace_period_seconds)
                .unwrap_or(5)
                .clamp(0, 10);
            stop(&mut running, Duration::from_secs(grace as u64)).await;
            ctx.netns.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            ctx.pids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|k, _| !k.starts_with(&format!("{key}/")));
            drop(net);
            if current.is_some() {
                let _ = pods
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            preconditions: Some(kube::api::Preconditions {
                                uid: Some(uid.clone()),
                                resource_version: None,
                            }),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            return Ok(());
        }
        for r in &mut running {
            let alive = matches!(r.child.try_wait(), Ok(None));
            let ok = alive
                && match &r.readiness {
                    None => true,
                    Some(p) => probe(p, &pod_ip, &r.ports).await,
                };
            ready_by.insert(r.name.clone(), ok);
        }
        let ready = ready_by.values().all(|v| *v);
        if last_ready != Some(ready) {
            let status = serde_json::json!({"status": {
                "phase": "Running", "conditions": conditions(true, ready),
                "containerStatuses": statuses(&spec.containers, &ready_by),
                "initContainerStatuses": statuses(&sidecars, &ready_by),
            }});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .context("report readiness")?;
            last_ready = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn record_pid(ctx: &Context_, pod: &str, container: &str, child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        ctx.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("{pod}/{container}"), pid);
    }
}

fn ports(c: &Container) -> Vec<(String, i32)> {
    c.ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect()
}

/// Runs a readiness probe from the node, as the kubelet does.
async fn probe(p: &Probe, pod_ip: &str, ports: &[(String, i32)]) -> bool {
    let port = |v: &IntOrString| match v {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(s) => ports.iter().find(|(n, _)| n == s).map(|(_, p)| *p),
    };
    if let Some(h) = &p.http_get {
        let Some(port) = port(&h.port) else { return false };
        let host = h.host.clone().unwrap_or_else(|| pod_ip.to_owned());
        let url = format!("http://{host}:{port}{}", h.path.as_deref().unwrap_or("/"));
        return matches!(
            tokio::time::timeout(Duration::from_secs(2), crate::daemon::http_get(&url)).await,
            Ok(Ok((200..=399, _)))
        );
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = port(&t.port) else { return false };
        return matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((pod_ip, port as u16))
            )
            .await,
            Ok(Ok(_))
        );
    }
    // exec and gRPC probes are not run: the process being alive counts.
    true
}

async fn stop(running: &mut [Running], grace: Duration) {
    for r in running.iter() {
        if let Some(pid) = r.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for r in running.iter_mut() {
        if tokio::time::timeout_at(deadline, r.child.wait()).await.is_err() {
            let _ = r.child.kill().await;
        }
    }
}

/// The values field references resolve to.
struct Fields {
    name: String,
    ns: String,
    uid: String,
    pod_ip: String,
    host_ip: String,
    sa: String,
    node: String,
}

fn env_value(e: &EnvVar, f: &Fields) -> anyhow::Result<String> {
    if let Some(v) = &e.value {
        return Ok(v.clone());
    }
    let Some(from) = &e.value_from else {
        return Ok(String::new());
    };
    let Some(field) = &from.field_ref else {
        bail!(
            "env {}: only literal values and fieldRef are supported by the test node",
            e.name
        );
    };
    Ok(match field.field_path.as_str() {
        "metadata.name" => f.name.clone(),
        "metadata.namespace" => f.ns.clone(),
        "metadata.uid" => f.uid.clone(),
        "status.podIP" => f.pod_ip.clone(),
        "status.hostIP" => f.host_ip.clone(),
        "spec.serviceAccountName" => f.sa.clone(),
        "spec.nodeName" => f.node.clone(),
        other => bail!("env {}: fieldRef {other} is not supported by the test node", e.name),
    })
}

/// A projected ServiceAccount token the node keeps fresh, as the kubelet
/// does: rewritten at 80 % of its lifetime.
#[derive(Debug, Clone)]
struct ProjectedToken {
    path: PathBuf,
    audience: String,
    seconds: i64,
}

/// The token of `pod` for `t`, written to its file (atomically, as the
/// kubelet swaps a projected volume's contents).
async fn write_token(ctx: &Context_, pod: &Pod, t: &ProjectedToken) -> anyhow::Result<()> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let token = crate::k8s::token_for(&ctx.client, &ns, &sa, Some(pod), &t.audience, t.seconds).await?;
    let tmp = t.path.with_extension("tmp");
    write_file(&tmp, token.as_bytes())?;
    std::fs::rename(&tmp, &t.path)?;
    Ok(())
}

/// Rewrites every projected token of `pod` at 80 % of its lifetime, until
/// dropped (the pod stops).
struct TokenRotation(JoinHandle<()>);

impl TokenRotation {
    fn start(ctx: Arc<Context_>, pod: Pod, tokens: Vec<ProjectedToken>) -> Self {
        Self(tokio::spawn(async move {
            let Some(shortest) = tokens.iter().map(|t| t.seconds).min() else {
                return;
            };
            let period = Duration::from_secs((shortest.max(1) as u64) * 8 / 10);
            loop {
                tokio::time::sleep(period).await;
                for t in &tokens {
                    if let Err(e) = write_token(&ctx, &pod, t).await {
                        eprintln!("test node {}: rotating {}: {e:#}", ctx.node, t.path.display());
                    }
                }
            }
        }))
    }
}

impl Drop for TokenRotation {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Volume name → directory on this machine, and the projected tokens to
/// keep fresh.
async fn prepare_volumes(
    ctx: &Context_,
    pod: &Pod,
    dir: &Path,
) -> anyhow::Result<(HashMap<String, PathBuf>, Vec<ProjectedToken>)> {
    use std::os::unix::fs::PermissionsExt;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().context("pod spec")?;
    let mut out = HashMap::new();
    let mut tokens = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let path = dir.join("volumes").join(&v.name);
        if let Some(h) = &v.host_path {
            let mapped = ctx
                .host_paths
                .get(&h.path)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(&h.path));
            out.insert(v.name.clone(), mapped);
            continue;
        }
        std::fs::create_dir_all(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        if v.empty_dir.is_some() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        } else if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(t) = &source.service_account_token {
                    let token = ProjectedToken {
                        path: path.join(&t.path),
                        audience: t
                            .audience
                            .clone()
                            .unwrap_or_else(|| "https://kubernetes.default.svc.cluster.local".into()),
                        seconds: t.expiration_seconds.unwrap_or(3600),
                    };
                    write_token(ctx, pod, &token).await?;
                    tokens.push(token);
                }
                if let Some(c) = &source.config_map {
                    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                        .get_opt(&c.name)
                        .await?;
                    let data = cm.and_then(|cm| cm.data).unwrap_or_default();
                    for (k, val) in data {
                        write_file(&path.join(k), val.as_bytes())?;
                    }
                }
                if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.namespace") => ns.clone(),
                            Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                            _ => continue,
                        };
                        write_file(&path.join(&item.path), value.as_bytes())?;
                    }
                }
            }
        } else {
            bail!(
                "volume {}: the test node supports hostPath, emptyDir and projected volumes only",
                v.name
            );
        }
        out.insert(v.name.clone(), path);
    }
    Ok((out, tokens))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What every container of one pod runs with.
struct PodRun<'a> {
    net: &'a NetnsPod,
    volumes: &'a HashMap<String, PathBuf>,
    fields: &'a Fields,
    /// The pod's securityContext runAsUser/runAsGroup.
    user: Option<i64>,
    group: Option<i64>,
}

/// `argv` run in the pod's network namespace, in a private mount namespace
/// with the container's volumes mounted, as the container's user.
fn exec_in(
    ctx: &Context_,
    pod: &PodRun<'_>,
    c: &Container,
    argv: &[String],
) -> anyhow::Result<tokio::process::Command> {
    let (net, volumes, fields, pod_user, pod_group) = (pod.net, pod.volumes, pod.fields, pod.user, pod.group);
    let sc = c.security_context.as_ref();
    let uid = sc.and_then(|s| s.run_as_user).or(pod_user).unwrap_or(0);
    let gid = sc.and_then(|s| s.run_as_group).or(pod_group).unwrap_or(uid);
    let mut script = format!("set -e\n{NOFILE}\n");
    for m in c.volume_mounts.iter().flatten() {
        let src = volumes
            .get(&m.name)
            .with_context(|| format!("container {}: no volume {}", c.name, m.name))?;
        if m.sub_path.as_deref().is_some_and(|s| !s.is_empty()) {
            bail!(
                "container {}: subPath mounts are not supported by the test node",
                c.name
            );
        }
        let target = shell_quote(&m.mount_path);
        script.push_str(&format!(
            "mkdir -p {target}\nmount --bind {} {target}\n",
            shell_quote(&src.to_string_lossy())
        ));
        if m.read_only == Some(true) {
            script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
        }
    }
    let (program, rest) = argv.split_first().context("empty command")?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        net.netns(),
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
    ]);
    if uid == 0 {
        script.push_str("exec \"$@\"\n");
    } else {
        script.push_str(&format!(
            "exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all -- \"$@\"\n"
        ));
    }
    cmd.arg(script).arg("sh").arg(ctx.images.program(program)).args(rest);
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for e in c.env.iter().flatten() {
        cmd.env(&e.name, env_value(e, fields)?);
    }
    cmd.env("HOSTNAME", &fields.name).kill_on_drop(true);
    Ok(cmd)
}

/// The container's process, its output to `<dir>/<container>.log`.
fn container_command(
    ctx: &Context_,
    pod: &PodRun<'_>,
    c: &Container,
    dir: &Path,
) -> anyhow::Result<tokio::process::Command> {
    let image = c.image.as_deref().unwrap_or_default();
    let binary = ctx
        .images
        .binary(image)
        .with_context(|| format!("container {}: no local binary for image {image:?}", c.name))?;
    let mut argv: Vec<String> = Vec::new();
    match &c.command {
        // The command's first word names the image's entrypoint or a program.
        Some(command) if !command.is_empty() => argv.extend(command.iter().cloned()),
        _ => argv.push(binary.to_string_lossy().into_owned()),
    }
    argv.extend(c.args.iter().flatten().cloned());
    let mut cmd = exec_in(ctx, pod, c, &argv)?;
    let log = std::fs::File::create(dir.join(format!("{}.log", c.name)))?;
    cmd.stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Waits until pod `ns/name` is Ready, and returns it.
pub async fn wait_ready(client: &kube::Client, ns: &str, name: &str, timeout: Duration) -> anyhow::Result<Pod> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    crate::eventually_some(timeout, &format!("pod {ns}/{name} to be Ready"), || {
        let api = api.clone();
        let name = name.to_owned();
        async move {
            let pod = api.get_opt(&name).await?;
            if let Some(msg) = pod
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .filter(|s| s.phase.as_deref() == Some("Failed"))
                .and_then(|s| s.message.clone())
            {
                bail!("pod {name} failed: {msg}");
            }
            let ready = pod
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok(pod.filter(|_| ready))
        }
    })
    .await
}

/// Creates `pod` in `ns` (through admission, so webhooks apply).
pub async fn create_pod(client: &kube::Client, ns: &str, pod: serde_json::Value) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod)?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .context("create pod")
}
