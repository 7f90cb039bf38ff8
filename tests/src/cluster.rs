//! A real kube-apiserver, etcd, controller manager and scheduler on loopback.
//!
//! One control plane is started per test binary, on first use, by
//! `scripts/kube.sh start`, and stopped by the [`reaper`](crate::reaper) when
//! the binary exits (also when a test fails or the binary is killed).
//! Tests share it and keep apart by using their own namespaces
//! ([`Cluster::namespace`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::AsyncWriteExt;

use crate::reaper::{self, shell_quote};
use crate::wait::eventually;

/// A running control plane.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// The repository root (the tests crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// `scripts/kube.sh` in this repository.
pub fn kube_sh() -> PathBuf {
    repo_root().join("scripts/kube.sh")
}

/// Runs `script args...` (a script of this repository), its stderr in the error.
fn run_script(script: &Path, args: &[&str], env: &[(&str, &str)], hint: &str) -> Result<String, String> {
    let out = std::process::Command::new(script)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} {}` failed ({}). {hint}\n{}",
            script.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn start() -> Result<Cluster, String> {
    let dir = std::env::temp_dir().join(format!("mizzen-cluster-{}", std::process::id()));
    start_in(dir, &[])
}

fn start_in(dir: PathBuf, env: &[(&str, &str)]) -> Result<Cluster, String> {
    let script = kube_sh();
    // Registered before starting, so a half-started control plane is stopped too.
    reaper::at_exit(&format!(
        "{} stop {} && rm -rf {dir}/etcd {dir}/pki",
        shell_quote(&script.display().to_string()),
        shell_quote(&dir.display().to_string()),
        dir = shell_quote(&dir.display().to_string()),
    ));
    let d = dir.display().to_string();
    run_script(
        &script,
        &["start", &d],
        env,
        "Install the control plane with `scripts/kube.sh install` (scripts/test.sh does it for you).",
    )?;
    let bin = PathBuf::from(run_script(&script, &["bin"], &[], "")?);
    Ok(Cluster {
        kubeconfig: dir.join("kubeconfig"),
        kubectl: bin.join("kubectl"),
        dir,
    })
}

/// A control plane advertising the host's address and a real node
/// (`scripts/node.sh`: kubelet, containerd, kube-proxy, CoreDNS) running the
/// images of `scripts/images.sh --node`.
fn start_with_real_node() -> Result<Cluster, String> {
    let dir = std::env::temp_dir().join(format!("mizzen-real-node-{}", std::process::id()));
    let node_sh = repo_root().join("scripts/node.sh");
    let ip = run_script(&node_sh, &["ip"], &[], "")?;
    if ip.is_empty() {
        return Err("the host has no IPv4 default route: a real node needs an address to advertise".into());
    }
    let cluster = start_in(dir.clone(), &[("MIZZEN_API_ADVERTISE", &ip)])?;
    // Runs before the control plane is stopped (the reaper runs newest first).
    let d = dir.display().to_string();
    reaper::at_exit(&format!(
        "{} down {}",
        shell_quote(&node_sh.display().to_string()),
        shell_quote(&d)
    ));
    run_script(
        &node_sh,
        &["up", &d],
        &[],
        "Build the node with `scripts/kube.sh install-node` and the images with `scripts/images.sh --node` \
         (scripts/test.sh does both).",
    )?;
    Ok(cluster)
}

static REAL_NODE: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The control plane of this test binary with a real node, started on
    /// first use. A test binary uses either this or [`Cluster::get`]; the
    /// node changes the host's iptables and sysctls while it runs (put back
    /// when the binary exits), so cargo's one-binary-at-a-time order keeps
    /// it apart from other tests.
    pub fn with_real_node() -> &'static Cluster {
        match REAL_NODE.get_or_init(start_with_real_node) {
            Ok(c) => c,
            Err(e) => panic!("the real node did not start: {e}"),
        }
    }

    /// The control plane of this test binary, started on first use.
    ///
    /// Panics, with the reason and how to fix it, when it cannot start.
    pub fn get() -> &'static Cluster {
        match CLUSTER.get_or_init(start) {
            Ok(c) => c,
            Err(e) => panic!("the test control plane did not start: {e}"),
        }
    }

    /// Directory holding the kubeconfig, PKI and logs (`logs/<component>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `kubectl` binary (see [`Cluster::kubectl`]).
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// Path of an admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A new client with admin rights. Each call builds a new client, so it
    /// belongs to the calling test's Tokio runtime.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc =
            Kubeconfig::read_from(&self.kubeconfig).with_context(|| format!("read {}", self.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .context("load kubeconfig")?;
        kube::Client::try_from(config).context("build kube client")
    }

    /// The real `kubectl`, built from the same Kubernetes release, bound to
    /// this cluster's kubeconfig.
    pub fn kubectl<I, S>(&self, args: I) -> Kubectl
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = tokio::process::Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        Kubectl { cmd, stdin: None }
    }

    /// Creates a fresh namespace `<prefix>-<n>` with the given labels and
    /// waits until its `default` ServiceAccount exists (made by the
    /// controller manager), so pods can be created in it at once.
    pub async fn namespace(
        &self,
        client: &kube::Client,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), &name);
        eventually(
            Duration::from_secs(30),
            "the namespace's default ServiceAccount",
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.is_some()) }
            },
        )
        .await?;
        Ok(name)
    }

    /// `kubectl apply -n <ns> -f -` of `yaml`, as an operator applies it.
    pub async fn apply(&self, ns: &str, yaml: &str) -> anyhow::Result<()> {
        self.kubectl(["apply", "-n", ns, "-f", "-"])
            .stdin(yaml)
            .run()
            .await
            .map(drop)
    }

    /// Writes a kubeconfig that authenticates as ServiceAccount
    /// `namespace/name` with a fresh one-hour token, so a component under
    /// test runs with exactly the RBAC its manifests grant. Returns its path.
    pub async fn kubeconfig_for_service_account(
        &self,
        client: &kube::Client,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        let token = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create_token_request(
                name,
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("token for ServiceAccount {namespace}/{name}"))?
            .status
            .context("token request without status")?
            .token;
        let admin = Kubeconfig::read_from(&self.kubeconfig)?;
        let cluster = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .context("kubeconfig has a cluster")?;
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": cluster.server,
                "certificate-authority-data": cluster.certificate_authority_data,
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}],
            "current-context": "test",
        });
        let path = self.dir.join(format!(
            "kubeconfig-{namespace}-{name}-{}",
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        Ok(path)
    }

    /// Registers a Node named `name` that reports Ready with room for pods,
    /// so the scheduler binds pods to it. Nothing runs pods on it; callers
    /// that need pods to run play the kubelet themselves.
    pub async fn register_node(&self, client: &kube::Client, name: &str) -> anyhow::Result<()> {
        register_node(client, name).await
    }

    /// Registers a mutating admission webhook served at `url` (an
    /// `https://127.0.0.1:PORT/path` URL) whose serving certificate chains to
    /// `ca_pem`. It applies to pod CREATE in `namespace` only, so tests
    /// sharing the cluster do not see each other's webhooks; `customize` may
    /// change anything before it is created. Returns the configuration name.
    pub async fn register_mutating_webhook(
        &self,
        client: &kube::Client,
        name: &str,
        url: &str,
        ca_pem: &str,
        namespace: &str,
        customize: impl FnOnce(&mut MutatingWebhook),
    ) -> anyhow::Result<String> {
        let mut hook = MutatingWebhook {
            name: format!("{name}.test.mizzen.dev"),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                url: Some(url.to_owned()),
                ca_bundle: Some(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())),
                service: None,
            },
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![namespace.to_owned()]),
                }]),
                match_labels: None,
            }),
            side_effects: "None".into(),
            failure_policy: Some("Fail".into()),
            timeout_seconds: Some(10),
            ..Default::default()
        };
        customize(&mut hook);
        let config_name = format!("{name}-{namespace}");
        let mut config = MutatingWebhookConfiguration::default();
        config.metadata.name = Some(config_name.clone());
        config.webhooks = Some(vec![hook]);
        let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
        api.patch(
            &config_name,
            &PatchParams::apply("mizzen-tests").force(),
            &Patch::Apply(&config),
        )
        .await
        .with_context(|| format!("register webhook {config_name}"))?;
        Ok(config_name)
    }
}

/// A `kubectl` invocation; see [`Cluster::kubectl`].
#[derive(Debug)]
pub struct Kubectl {
    cmd: tokio::process::Command,
    stdin: Option<Vec<u8>>,
}

impl Kubectl {
    /// Adds one more argument.
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    /// Feeds `data` to kubectl's standard input (for `-f -`).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Runs kubectl and returns its standard output; fails with its standard
    /// error when it exits non-zero.
    pub async fn run(self) -> anyhow::Result<String> {
        let (status, stdout, stderr) = self.output().await?;
        if !status.success() {
            bail!("kubectl failed ({status}): {stderr}");
        }
        Ok(stdout)
    }

    /// Runs kubectl and returns its exit status, standard output and error.
    pub async fn output(mut self) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
        self.cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = self.cmd.spawn().context("run kubectl")?;
        if let (Some(data), Some(mut pipe)) = (self.stdin.take(), child.stdin.take()) {
            pipe.write_all(&data).await.context("write kubectl stdin")?;
        }
        let out = child.wait_with_output().await.context("wait for kubectl")?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// Registers node `name` (Ready, with capacity), as a kubelet would.
pub async fn register_node(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context(format!("create node {name}")),
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({
        "status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "250"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "250"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "mizzen test node", "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("set status of node {name}"))?;
    Ok(())
}
