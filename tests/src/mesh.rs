//! Mizzen's own components installed and running on the test cluster.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::daemon::Daemon;
use crate::{Cluster, eventually, eventually_some, free_port, k8s};

/// The namespace Mizzen's components live in.
pub const SYSTEM: &str = "mizzen-system";

static INSTALLED: OnceCell<()> = OnceCell::const_new();
/// Held while manifests are applied: `kubectl apply` reads, then creates,
/// so two tests applying the same object at once race to AlreadyExists.
static APPLYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Gateway API release's standard CRDs (`scripts/kube.sh gateway-api`).
pub fn gateway_api_crds() -> anyhow::Result<std::path::PathBuf> {
    let out = std::process::Command::new(crate::cluster::kube_sh())
        .arg("gateway-api")
        .output()
        .context("run scripts/kube.sh gateway-api")?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/kube.sh gateway-api: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Applies Mizzen's CRDs and the Gateway API's standard ones (server-side,
/// as the Gateway API's install instructions say: they are too large for
/// kubectl's last-applied annotation) and waits until they are served;
/// returns what kubectl apply said of Mizzen's.
pub async fn apply_crds(cluster: &Cluster) -> anyhow::Result<String> {
    let crds = crate::cluster::repo_root().join("manifests/crds.yaml");
    let out = cluster.kubectl(["apply", "-f"]).arg(&crds).run().await?;
    cluster
        .kubectl(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(gateway_api_crds()?)
        .run()
        .await?;
    cluster
        .kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/authorizationpolicies.security.mizzen.dev",
            "crd/peerauthentications.security.mizzen.dev",
            "crd/virtualservices.networking.mizzen.dev",
            "crd/destinationrules.networking.mizzen.dev",
            "crd/httproutes.gateway.networking.k8s.io",
            "crd/grpcroutes.gateway.networking.k8s.io",
        ])
        .run()
        .await?;
    Ok(out)
}

/// Applies the CRDs, the namespace, CA and agent manifests
/// (ServiceAccounts and RBAC) with kubectl, once per test binary.
pub async fn install_manifests(cluster: &Cluster) -> anyhow::Result<()> {
    INSTALLED
        .get_or_try_init(|| async {
            let _applying = APPLYING.lock().await;
            apply_crds(cluster).await?;
            let root = crate::cluster::repo_root();
            for m in ["manifests/namespace.yaml", "manifests/ca.yaml", "manifests/agent.yaml"] {
                cluster.kubectl(["apply", "-f"]).arg(root.join(m)).run().await?;
            }
            let client = cluster.client().await?;
            k8s::service_account(&client, SYSTEM, "mizzen-agent").await?;
            Ok::<_, anyhow::Error>(())
        })
        .await?;
    Ok(())
}

/// A running `mizzen-ca`.
#[derive(Debug)]
pub struct Ca {
    pub daemon: Daemon,
    pub grpc_port: u16,
}

impl Ca {
    /// Starts `mizzen-ca` as ServiceAccount `mizzen-system/mizzen-ca` (the
    /// manifests' RBAC) on `grpc_port` (a free one when `None`).
    pub async fn start(cluster: &Cluster, grpc_port: Option<u16>, extra: &[&str]) -> anyhow::Result<Self> {
        let client = cluster.client().await?;
        let kubeconfig = cluster
            .kubeconfig_for_service_account(&client, SYSTEM, "mizzen-ca")
            .await?;
        Self::start_with(&kubeconfig, grpc_port, extra).await
    }

    /// Starts `mizzen-ca` with the given kubeconfig.
    pub async fn start_with(
        kubeconfig: &std::path::Path,
        grpc_port: Option<u16>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let grpc_port = grpc_port.unwrap_or_else(free_port);
        let mut args = vec![format!("--grpc-addr=127.0.0.1:{grpc_port}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let daemon = Daemon::start("mizzen-ca", kubeconfig, free_port(), &args).await?;
        Ok(Self { daemon, grpc_port })
    }
}

/// The trust bundle published as ConfigMap `name` in `namespace`.
pub async fn published_root(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    eventually_some(
        Duration::from_secs(60),
        &format!("ConfigMap {namespace}/{name}"),
        || {
            let cms = cms.clone();
            async move {
                Ok(cms
                    .get_opt(name)
                    .await?
                    .and_then(|c| c.data)
                    .and_then(|mut d| d.remove("root-cert.pem")))
            }
        },
    )
    .await
}

/// A running `mizzen-agent` for one node.
#[derive(Debug)]
pub struct Agent {
    pub daemon: Daemon,
    pub socket: std::path::PathBuf,
    pub node: String,
}

impl Agent {
    /// Starts `mizzen-agent` for `node` as ServiceAccount
    /// `mizzen-system/mizzen-agent` (the manifests' RBAC), with the agent's
    /// own pod-bound token as its credential for the CA at `ca_port`.
    pub async fn start(cluster: &Cluster, node: &str, ca_port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_as(cluster, node, ca_port, extra, "mizzen-agent", None).await
    }

    /// [`Agent::start`], reading the API server as ServiceAccount
    /// `mizzen-system/<api_account>` (its token for the CA stays that of
    /// `mizzen-agent`), to run the agent with other RBAC than the
    /// manifests', and running `program` (a release build, say) when given.
    pub async fn start_as(
        cluster: &Cluster,
        node: &str,
        ca_port: u16,
        extra: &[&str],
        api_account: &str,
        program: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let client = cluster.client().await?;
        let pod_name = format!("mizzen-agent-{node}-{}", free_port());
        let pod = k8s::pod_on_node(&client, SYSTEM, &pod_name, "mizzen-agent", node).await?;
        let token = k8s::token(&client, SYSTEM, "mizzen-agent", Some(&pod), "mizzen-ca").await?;
        let dir = cluster.dir().join(&pod_name);
        std::fs::create_dir_all(&dir)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, token)?;
        let socket = dir.join("agent.sock");
        let kubeconfig = cluster
            .kubeconfig_for_service_account(&client, SYSTEM, api_account)
            .await?;
        let mut args = vec![
            format!("--socket={}", socket.display()),
            format!("--ca-addr=https://127.0.0.1:{ca_port}"),
            format!("--node-name={node}"),
            format!("--namespace={SYSTEM}"),
            format!("--agent-token-file={}", token_file.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let program = program.map_or_else(|| crate::workspace_bin("mizzen-agent"), ToOwned::to_owned);
        let daemon = Daemon::start_program(&program, &kubeconfig, free_port(), &args).await?;
        Ok(Self {
            daemon,
            socket,
            node: node.to_owned(),
        })
    }
}

/// A running `mizzen-injector`, registered through the manifest's own
/// MutatingWebhookConfiguration (pointed at its URL: no Service routing
/// without kube-proxy).
#[derive(Debug)]
pub struct Injector {
    pub daemon: Daemon,
    /// The webhook's HTTPS port on 127.0.0.1.
    pub port: u16,
}

impl Injector {
    /// The test binary's injector with the default configuration, started
    /// on first use and stopped when the binary exits. The webhook
    /// configuration names one injector, so tests that run at once and
    /// each started their own would send pods to each other's, and to
    /// ones already stopped; tests in one binary share this one instead.
    pub async fn shared(cluster: &Cluster) -> anyhow::Result<&'static Injector> {
        static SHARED: OnceCell<Injector> = OnceCell::const_new();
        SHARED
            .get_or_try_init(|| async {
                let injector = Self::start(cluster, "").await?;
                // Never dropped (a static): the reaper stops it.
                if let Some(pid) = injector.daemon.pid() {
                    crate::reaper::at_exit(&format!("kill {pid} 2>/dev/null"));
                }
                Ok(injector)
            })
            .await
    }

    /// Installs `manifests/injector.yaml`, starts `mizzen-injector serve` as
    /// ServiceAccount `mizzen-system/mizzen-injector` with `config` (the
    /// template YAML) and waits until it has set its webhooks' caBundle.
    pub async fn start(cluster: &Cluster, config: &str) -> anyhow::Result<Self> {
        let client = cluster.client().await?;
        let port = free_port();
        install_injector(cluster, port).await?;
        let file = cluster.dir().join(format!("injector-config-{port}.yaml"));
        std::fs::write(&file, config)?;
        let kubeconfig = cluster
            .kubeconfig_for_service_account(&client, SYSTEM, "mizzen-injector")
            .await?;
        let daemon = Daemon::start(
            "mizzen-injector",
            &kubeconfig,
            free_port(),
            &[
                "serve".into(),
                format!("--addr=127.0.0.1:{port}"),
                "--serving-ip=127.0.0.1".into(),
                format!("--config={}", file.display()),
            ],
        )
        .await?;
        let mwcs = Api::<MutatingWebhookConfiguration>::all(client);
        ca_bundle_set(&mwcs, "the injector to set the webhook caBundle").await?;
        Ok(Self { daemon, port })
    }
}

/// Installs manifests/injector.yaml, with its webhooks (injection, and
/// validation of traffic rules) pointed at `https://127.0.0.1:port` and
/// their path (no Service routing without kube-proxy).
async fn install_injector(cluster: &Cluster, port: u16) -> anyhow::Result<()> {
    let _applying = APPLYING.lock().await;
    let root = crate::cluster::repo_root();
    cluster
        .kubectl(["apply", "-f"])
        .arg(root.join("manifests/namespace.yaml"))
        .run()
        .await?;
    let text = std::fs::read_to_string(root.join("manifests/injector.yaml"))?;
    let mut rest = String::new();
    let mut webhooks = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(doc)?;
        if v["kind"] == "MutatingWebhookConfiguration" || v["kind"] == "ValidatingWebhookConfiguration" {
            webhooks.push(v);
        } else if !v.is_null() {
            rest.push_str("---\n");
            rest.push_str(&serde_yaml::to_string(&v)?);
        }
    }
    cluster.kubectl(["apply", "-f", "-"]).stdin(rest).run().await?;
    anyhow::ensure!(
        webhooks.iter().any(|w| w["kind"] == "MutatingWebhookConfiguration"),
        "the manifest has a MutatingWebhookConfiguration"
    );
    for mut config in webhooks {
        for hook in config["webhooks"].as_array_mut().context("webhooks")? {
            let path = hook["clientConfig"]["service"]["path"]
                .as_str()
                .unwrap_or("/inject")
                .to_owned();
            hook["clientConfig"] = serde_json::json!({"url": format!("https://127.0.0.1:{port}{path}")});
        }
        cluster
            .kubectl(["apply", "-f", "-"])
            .stdin(serde_json::to_string(&config)?)
            .run()
            .await?;
    }
    Ok(())
}

/// Waits until every webhook of `mizzen-injector` has a caBundle.
pub async fn ca_bundle_set(mwcs: &Api<MutatingWebhookConfiguration>, what: &str) -> anyhow::Result<()> {
    ca_bundles_set(mwcs, "mizzen-injector", Duration::from_secs(60), what).await
}

/// Waits (at most `within`) until every webhook of the webhook
/// configuration `name` (mutating or validating) has a caBundle.
pub async fn ca_bundles_set<K>(api: &Api<K>, name: &str, within: Duration, what: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    eventually(within, what, || async {
        let config = serde_json::to_value(api.get(name).await?)?;
        let hooks = config["webhooks"].as_array().cloned().unwrap_or_default();
        Ok(hooks
            .iter()
            .all(|w| w["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty())))
    })
    .await
}

/// The manifests installed, node `node` registered, and a CA with that
/// node's agent (started with `agent_args`) running.
pub async fn ca_and_agent(cluster: &Cluster, node: &str, agent_args: &[&str]) -> anyhow::Result<(Ca, Agent)> {
    install_manifests(cluster).await?;
    crate::cluster::register_node(&cluster.client().await?, node).await?;
    let ca = Ca::start(cluster, None, &[]).await?;
    let agent = Agent::start(cluster, node, ca.grpc_port, agent_args).await?;
    Ok((ca, agent))
}

/// The whole mesh on one test node: the CA, the node's agent, the injector
/// (default template) and a [`Node`](crate::node::Node) that runs pods
/// with `proxy` as the `mizzen-proxy` image and `mizzen-testapp` for
/// application images, the agent's socket directory mounted where the
/// injected pods expect it.
#[derive(Debug)]
pub struct MeshNode {
    pub ca: Ca,
    pub agent: Agent,
    /// An injector of its own when it asked for a particular configuration;
    /// otherwise the binary's [`Injector::shared`] one injects its pods.
    _own_injector: Option<Injector>,
    pub node: crate::node::Node,
}

impl MeshNode {
    pub async fn start(
        cluster: &Cluster,
        node: &str,
        proxy: &std::path::Path,
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(cluster, node, proxy, agent_args, "").await
    }

    /// [`MeshNode::start`] with the injector's configuration (YAML).
    pub async fn start_with(
        cluster: &Cluster,
        node: &str,
        proxy: &std::path::Path,
        agent_args: &[&str],
        injector_config: &str,
    ) -> anyhow::Result<Self> {
        let (ca, agent) = ca_and_agent(cluster, node, agent_args).await?;
        let own_injector = if injector_config.is_empty() {
            Injector::shared(cluster).await?;
            None
        } else {
            Some(Injector::start(cluster, injector_config).await?)
        };
        let images = crate::node::Images::new()
            .with("mizzen-proxy", proxy)
            .with("mizzen-testapp", crate::workspace_bin("mizzen-testapp"));
        let socket_dir = agent.socket.parent().context("agent socket dir")?.to_path_buf();
        let node = crate::node::Node::start(
            cluster,
            node,
            images,
            std::collections::HashMap::from([("/var/run/mizzen".to_string(), socket_dir)]),
        )
        .await?;
        Ok(Self {
            ca,
            agent,
            _own_injector: own_injector,
            node,
        })
    }
}

impl MeshNode {
    /// A `server` pod (the echo server, label `app: <server>`) behind a
    /// Service of that name (port 80 to 8080) and a `client` pod that
    /// sleeps, both on this node in namespace `ns` (meshed when `ns` is)
    /// and ready. Returns the Service's cluster IP.
    pub async fn server_and_client(&self, client: &kube::Client, ns: &str, server: &str) -> anyhow::Result<String> {
        use k8s_openapi::api::core::v1::Service;
        let mut pod = echo_pod(server, &self.node.name);
        pod["metadata"]["labels"] = serde_json::json!({"app": server});
        crate::node::create_pod(client, ns, pod).await?;
        crate::node::create_pod(client, ns, echo_pod("client", &self.node.name)).await?;
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": server},
            "spec": {"selector": {"app": server}, "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080}]},
        }))?;
        let vip = Api::<Service>::namespaced(client.clone(), ns)
            .create(&kube::api::PostParams::default(), &svc)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("cluster IP")?;
        for name in [server, "client"] {
            crate::node::wait_ready(client, ns, name, Duration::from_secs(90)).await?;
        }
        Ok(vip)
    }

    /// Sends `text` from pod `ns/from`'s app (UID 1000: its traffic is
    /// captured) to `target` with the test app, once it succeeds (a new
    /// Service reaches the client's proxy a moment after its pods are
    /// ready).
    pub async fn eventually_connects(&self, ns: &str, from: &str, target: &str, text: &str) -> anyhow::Result<()> {
        eventually_some(
            Duration::from_secs(30),
            &format!("{from} to reach {target}"),
            || async {
                let out = self
                    .node
                    .command_as(ns, from, 1000, crate::workspace_bin("mizzen-testapp"))?
                    .args(["connect", target, text])
                    .output()
                    .await?;
                Ok(out.status.success().then_some(()))
            },
        )
        .await
    }
}

/// A pod bound to `node` running the test app's echo server on 8080, with
/// a readiness probe on it; injected when its namespace is meshed.
pub fn echo_pod(name: &str, node: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app", "image": "mizzen-testapp",
                "args": ["echo-server", "0.0.0.0:8080"],
                "ports": [{"name": "echo", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "echo"}, "periodSeconds": 1},
            }],
        },
    })
}
