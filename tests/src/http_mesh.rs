//! A small HTTP mesh for end-to-end tests: two `web` replicas
//! (`mizzen-testapp http-echo`, which answers with its pod name, the HTTP
//! version it was spoken to in, and every header it received) behind
//! Service `web` (port 80, named `http`), and a `client` pod whose app's
//! requests are made with curl (an independent HTTP implementation) as the
//! app's UID, so that its traffic is captured.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::mesh::MeshNode;
use crate::node::{create_pod, wait_ready};
use crate::{Cluster, eventually_some, workspace_bin};

pub const TIMEOUT: Duration = Duration::from_secs(90);
pub const APP_UID: u32 = 1000;
pub const MESHED: &[(&str, &str)] = &[("mizzen.dev/inject", "enabled")];

/// Two `web` replicas behind Service `web` (port 80, named `http`), and a
/// `client` pod, in a namespace of their own on a node of their own.
#[derive(Debug)]
pub struct HttpMesh {
    pub mesh: MeshNode,
    pub ns: String,
    pub vip: String,
    /// Pod IPs of the replicas and of the client.
    pub web_ips: Vec<String>,
    pub client_ip: String,
    /// Whether the pods are injected (the client has a proxy).
    pub meshed: bool,
}

pub fn web_pod(name: &str, node: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app", "image": "mizzen-testapp",
                "args": ["http-echo", "0.0.0.0:8080"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
            }],
        },
    })
}

pub async fn service(
    client: &kube::Client,
    ns: &str,
    name: &str,
    app: &str,
    port_name: &str,
) -> anyhow::Result<String> {
    let spec = serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"name": port_name, "port": 80, "targetPort": 8080}]},
    });
    crate::k8s::create_service(client, ns, spec).await
}

impl HttpMesh {
    pub async fn start(node: &str, meshed_ns: bool) -> anyhow::Result<Self> {
        Self::start_with(node, meshed_ns, |_| {}).await
    }

    /// [`HttpMesh::start`], with `customise` applied to each replica's pod.
    pub async fn start_with(
        node: &str,
        meshed_ns: bool,
        customise: impl Fn(&mut serde_json::Value),
    ) -> anyhow::Result<Self> {
        let m = Self::deploy(node, meshed_ns, customise).await?;
        m.wait_answering().await?;
        Ok(m)
    }

    /// The pods ready, before any request.
    pub async fn deploy(
        node: &str,
        meshed_ns: bool,
        customise: impl Fn(&mut serde_json::Value),
    ) -> anyhow::Result<Self> {
        let cluster = Cluster::get();
        let client = cluster.client().await?;
        let mesh = MeshNode::start(cluster, node, &workspace_bin("mizzen-proxy"), &[]).await?;
        let labels = if meshed_ns { MESHED } else { &[] };
        let ns = cluster.namespace(&client, "http", labels).await?;
        let vip = service(&client, &ns, "web", "web", "http").await?;
        for name in ["web-a", "web-b"] {
            let mut pod = web_pod(name, node);
            customise(&mut pod);
            create_pod(&client, &ns, pod).await?;
        }
        create_pod(&client, &ns, crate::mesh::echo_pod("client", node)).await?;
        let mut ips = Vec::new();
        for name in ["web-a", "web-b", "client"] {
            let pod = wait_ready(&client, &ns, name, TIMEOUT).await?;
            ips.push(pod.status.and_then(|s| s.pod_ip).context("pod IP")?);
        }
        let client_ip = ips.pop().context("client IP")?;
        Ok(Self {
            mesh,
            ns,
            vip,
            web_ips: ips,
            client_ip,
            meshed: meshed_ns,
        })
    }

    /// Waits for the client's proxy to know both replicas' endpoints
    /// (discovery may bring them one at a time: a test balancing over them
    /// would see one) and for the Service to answer.
    pub async fn wait_answering(&self) -> anyhow::Result<()> {
        if self.meshed {
            eventually_some(
                Duration::from_secs(30),
                "the client's proxy to know both replicas",
                || async {
                    let known = crate::daemon::proxy_metric(&self.client_ip, "mizzen_proxy_discovery_endpoints").await;
                    Ok(known.is_ok_and(|(n, _)| n >= self.web_ips.len() as f64).then_some(()))
                },
            )
            .await?;
        }
        eventually_some(Duration::from_secs(30), "the Service to answer", || async {
            Ok(self.curl(&[&self.url("/")]).await.ok())
        })
        .await
        .map(drop)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.vip)
    }

    /// Runs curl in the client pod as its app; returns stdout.
    pub async fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        curl_in(&self.mesh, &self.ns, "client", args).await
    }
}

pub async fn curl_in(mesh: &MeshNode, ns: &str, pod: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = mesh
        .node
        .command_as(ns, pod, APP_UID, "curl")?
        .args(["-sS", "--fail-with-body", "--max-time", "10"])
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "curl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
