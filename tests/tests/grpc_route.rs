//! Gateway API `GRPCRoute`s for the mesh, end to end on the real control
//! plane: grpcio (an independent gRPC implementation, `tests/grpc_echo.py`)
//! serves `mizzen.test.Echo` in pods `echo-v1` and `echo-v2` behind
//! Service `echo` (and one Service per version), and calls it from a
//! client pod, whose proxy routes each call as the route applied with the
//! real kubectl says.

use std::time::Duration;

use anyhow::bail;
use mizzen_tests::http_mesh::{MESHED, TIMEOUT};
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

/// How long a route may take to reach the client's proxy.
const ROLLOUT: Duration = Duration::from_secs(30);

struct GrpcMesh {
    mesh: MeshNode,
    ns: String,
    script: String,
    /// Service `echo`'s `<cluster IP>:80`.
    target: String,
}

impl GrpcMesh {
    async fn start(node: &str) -> anyhow::Result<Self> {
        let cluster = Cluster::get();
        let client = cluster.client().await?;
        let mesh = MeshNode::start(cluster, node, &workspace_bin("mizzen-proxy"), &[]).await?;
        let ns = cluster.namespace(&client, "grpc-route", MESHED).await?;
        let service = |name: &str, selector: serde_json::Value| {
            serde_json::json!({
                "metadata": {"name": name},
                "spec": {"selector": selector, "ports": [{"name": "grpc", "port": 80, "targetPort": 8080}]},
            })
        };
        let vip = mizzen_tests::k8s::create_service(&client, &ns, service("echo", serde_json::json!({"app": "echo"})))
            .await?;
        for version in ["v1", "v2"] {
            let selector = serde_json::json!({"app": "echo", "version": version});
            mizzen_tests::k8s::create_service(&client, &ns, service(&format!("echo-{version}"), selector)).await?;
        }
        let script = format!("{}/grpc_echo.py", env!("CARGO_MANIFEST_DIR"));
        let python = mizzen_tests::sds::python()?.display().to_string();
        for version in ["v1", "v2"] {
            create_pod(
                &client,
                &ns,
                serde_json::json!({
                    "metadata": {"name": format!("echo-{version}"), "labels": {"app": "echo", "version": version}},
                    "spec": {
                        "nodeName": node,
                        "containers": [{
                            "name": "app", "image": "mizzen-testapp",
                            "command": [python, script, "serve", "0.0.0.0:8080"],
                            "ports": [{"name": "serving", "containerPort": 8080}],
                            "readinessProbe": {"tcpSocket": {"port": "serving"}, "periodSeconds": 1},
                        }],
                    },
                }),
            )
            .await?;
        }
        create_pod(&client, &ns, mizzen_tests::mesh::echo_pod("client", node)).await?;
        for name in ["echo-v1", "echo-v2", "client"] {
            wait_ready(&client, &ns, name, TIMEOUT).await?;
        }
        Ok(Self {
            mesh,
            ns,
            script,
            target: format!("{vip}:80"),
        })
    }

    /// The pods that answered `n` unary calls in turn, made with metadata
    /// `header` (`key=value`) if given.
    async fn unary(&self, n: usize, header: Option<&str>) -> anyhow::Result<Vec<String>> {
        let count = n.to_string();
        let mut args = vec![self.script.as_str(), "unary", &self.target, "hi", &count];
        args.extend(header);
        let out = self
            .mesh
            .node
            .command_as(&self.ns, "client", 0, mizzen_tests::sds::python()?)?
            .args(&args)
            .output()
            .await?;
        if !out.status.success() {
            bail!("grpc_echo.py unary: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pods: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(" hi"))
            .map(str::to_owned)
            .collect();
        if pods.len() != n {
            bail!("{} answers to {n} calls", pods.len());
        }
        Ok(pods)
    }
}

#[tokio::test]
async fn a_grpc_route_sends_jasons_calls_to_v2_and_everyone_elses_to_v1() -> anyhow::Result<()> {
    let m = GrpcMesh::start("gamma-grpc").await?;
    Cluster::get()
        .apply(
            &m.ns,
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  rules:
  - matches:
    - method: {service: mizzen.test.Echo, method: Unary}
      headers:
      - {name: end-user, value: jason}
    backendRefs:
    - {name: echo-v2, port: 80}
  - backendRefs:
    - {name: echo-v1, port: 80}
"#,
        )
        .await?;
    // In place once both hold in one poll (the balancer alone could send
    // a run of calls to one pod, never jason's to one and the others' to
    // the other).
    eventually_some(ROLLOUT, "jason on v2 and the others on v1", || async {
        let jason = m.unary(10, Some("end-user=jason")).await;
        let others = m.unary(10, None).await;
        let (Ok(jason), Ok(others)) = (jason, others) else {
            return Ok(None);
        };
        Ok((jason.iter().all(|p| p == "echo-v2") && others.iter().all(|p| p == "echo-v1")).then_some(()))
    })
    .await?;
    assert_eq!(m.unary(20, Some("end-user=jason")).await?, vec!["echo-v2"; 20]);
    assert_eq!(m.unary(20, Some("end-user=mallory")).await?, vec!["echo-v1"; 20]);
    // The route's status says the mesh routes by it.
    let c = mizzen_tests::status::accepted("grpcroute", &m.ns, "echo", |_| true).await?;
    assert_eq!(c["status"], "True", "{c}");
    Ok(())
}

#[tokio::test]
async fn a_grpc_route_the_mesh_cannot_apply_says_why_and_applies_to_nothing() -> anyhow::Result<()> {
    let m = GrpcMesh::start("gamma-grpc-bad").await?;
    Cluster::get()
        .apply(
            &m.ns,
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo}
  hostnames: [echo.example.com]
  rules:
  - backendRefs:
    - {name: echo-v2, port: 80}
"#,
        )
        .await?;
    let c = mizzen_tests::status::accepted("grpcroute", &m.ns, "echo", |_| true).await?;
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("UnsupportedValue")),
        "{c}"
    );
    assert!(c["message"].as_str().unwrap_or("").contains("spec.hostnames"), "{c}");
    // Not applied: calls reach both versions, as without it.
    eventually_some(ROLLOUT, "both versions answering", || async {
        let pods = m.unary(20, None).await?;
        Ok((pods.iter().any(|p| p == "echo-v1") && pods.iter().any(|p| p == "echo-v2")).then_some(()))
    })
    .await?;
    Ok(())
}
