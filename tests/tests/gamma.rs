//! Gateway API routes for the mesh (GAMMA), end to end on the real
//! control plane: `HTTPRoute`s bound to Service `web` (whose replicas
//! `web-a` and `web-b` are versions v1 and v2, with a Service of their
//! own each), and `GRPCRoute`s bound to a gRPC Service served by grpcio
//! (an independent gRPC implementation, `tests/grpc_echo.py`), applied
//! with the real kubectl; the client app's requests and calls are routed
//! by its proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use mizzen_tests::daemon::proxy_metric;
use mizzen_tests::http_mesh::{HttpMesh, MESHED, TIMEOUT};
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{create_pod, wait_ready};
use mizzen_tests::traffic::{ROLLOUT, all_under, apply, by_pod, get, routed_ab, until, versioned, versioned_services};
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

#[tokio::test]
async fn an_http_route_sends_jason_to_v2_and_everyone_else_to_v1() -> anyhow::Result<()> {
    let m = versioned("traffic-gamma-ab").await?;
    versioned_services(&m).await?;
    apply(
        &m,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
    port: 80
  rules:
  - matches:
    - headers:
      - name: end-user
        value: jason
    backendRefs:
    - name: web-v2
      port: 80
  - backendRefs:
    - name: web-v1
      port: 80
"#,
    )
    .await?;
    routed_ab(&m).await?;
    let jason = get(&m, "/", &["end-user: jason"], 20).await?;
    assert_eq!(by_pod(&jason), BTreeMap::from([("web-b".into(), 20)]), "{jason:?}");
    // The mesh says it routes by the route, in the route's status.
    let c = mizzen_tests::status::accepted("httproute", &m.ns, "web", |_| true).await?;
    assert_eq!(c["status"], "True", "{c}");
    Ok(())
}

#[tokio::test]
async fn an_http_route_splits_90_10_by_weight_over_2000_requests() -> anyhow::Result<()> {
    let m = versioned("traffic-gamma-split").await?;
    versioned_services(&m).await?;
    let split = |v1: u32, v2: u32| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs:
  - {{group: "", kind: Service, name: web}}
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: x-test-rule, value: split-{v1}-{v2}}}]
    backendRefs:
    - {{name: web-v1, port: 80, weight: {v1}}}
    - {{name: web-v2, port: 80, weight: {v2}}}
"#
        )
    };
    apply(&m, &split(9, 1)).await?;
    until(&m, "/", &[], "the split in place", all_under("split-9-1")).await?;
    let answers = get(&m, "/", &[], 2000).await?;
    let counts = by_pod(&answers);
    eprintln!("HTTPRoute 9:1 split over 2000 requests: {counts:?}");
    let v2 = counts.get("web-b").copied().unwrap_or(0) as f64 / 2000.0;
    assert_eq!(counts.values().sum::<usize>(), 2000);
    assert!(
        (v2 - 0.10).abs() <= 0.03,
        "v2 took {:.1} % of 2000: {counts:?}",
        v2 * 100.0
    );
    Ok(())
}

#[tokio::test]
async fn an_http_route_the_mesh_cannot_apply_says_why_in_its_status() -> anyhow::Result<()> {
    let m = versioned("traffic-gamma-bad").await?;
    apply(
        &m,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs:
  - {group: "", kind: Service, name: web}
  hostnames: [web.example.com]
  rules:
  - backendRefs:
    - {name: web, port: 80}
"#,
    )
    .await?;
    let c = mizzen_tests::status::accepted("httproute", &m.ns, "web", |_| true).await?;
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "UnsupportedValue", "{c}");
    assert!(c["message"].as_str().unwrap_or("").contains("spec.hostnames"), "{c}");
    // And the Service answers from both replicas, as without it (the
    // client's proxy may learn of the second replica after the status is
    // written, so this waits for both).
    let answers = eventually_some(ROLLOUT, "both replicas answering", || async {
        let answers = get(&m, "/", &[], 20).await?;
        Ok((by_pod(&answers).len() == 2).then_some(answers))
    })
    .await?;
    assert!(
        answers.iter().all(|a| a.status == 200 && a.flags.is_empty()),
        "{answers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_http_route_timeout_answers_504_ut_and_its_mirror_gets_copies() -> anyhow::Result<()> {
    let m = versioned("traffic-gamma-timeout").await?;
    versioned_services(&m).await?;
    apply(
        &m,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
spec:
  parentRefs:
  - {group: "", kind: Service, name: web}
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: web-v2, port: 80}
    backendRefs:
    - {name: web-v1, port: 80}
    timeouts: {request: 1s}
"#,
    )
    .await?;
    let answers = until(&m, "/sleep/2000", &[], "504 for a 2 s answer", |a| {
        a.iter().all(|a| a.status == 504)
    })
    .await?;
    assert!(answers.iter().all(|a| a.flags == "UT"), "{answers:?}");
    let quick = get(&m, "/", &[], 20).await?;
    assert_eq!(
        by_pod(&quick),
        BTreeMap::from([("web-a".into(), 20)]),
        "only v1 answers"
    );
    // Copies travel on their own: wait for them to be answered.
    eventually_some(Duration::from_secs(10), "20 copies answered", || async {
        let (mirrored, _) = proxy_metric(&m.client_ip, "mizzen_proxy_mirrored_requests_total").await?;
        Ok((mirrored >= 20.0).then_some(()))
    })
    .await?;
    Ok(())
}

/// The `Accepted` condition of VirtualService `name`, once its status is
/// `status`.
async fn vs_accepted(m: &HttpMesh, name: &str, status: &str) -> anyhow::Result<serde_json::Value> {
    let kind = "virtualservices.networking.mizzen.dev";
    mizzen_tests::status::accepted(kind, &m.ns, name, |c| c["status"] == status).await
}

#[tokio::test]
async fn an_http_route_overrides_a_virtual_service_which_says_so_until_the_route_goes() -> anyhow::Result<()> {
    let m = versioned("traffic-gamma-wins").await?;
    versioned_services(&m).await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - headers: {response: {set: {x-test-rule: virtual-service}}}
    route:
    - destination: {host: web, subset: v2}
"#,
    )
    .await?;
    until(
        &m,
        "/",
        &[],
        "the VirtualService in place",
        all_under("virtual-service"),
    )
    .await?;
    vs_accepted(&m, "web", "True").await?;
    apply(
        &m,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs:
  - {group: "", kind: Service, name: web}
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-test-rule, value: http-route}]
    backendRefs:
    - {name: web-v1, port: 80}
"#,
    )
    .await?;
    let answers = until(&m, "/", &[], "the HTTPRoute in place", all_under("http-route")).await?;
    assert!(answers.iter().all(|a| a.pod.as_deref() == Some("web-a")), "{answers:?}");
    // The VirtualService's status says which rule won.
    let c = vs_accepted(&m, "web", "False").await?;
    assert_eq!(c["reason"], "Overridden", "{c}");
    let message = c["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{ns}/web (HTTPRoute {ns}/web)", ns = m.ns)),
        "{message}"
    );
    // Once the route is gone, the VirtualService routes its Service again
    // and is accepted.
    Cluster::get()
        .kubectl(["delete", "httproute", "-n", &m.ns, "web"])
        .run()
        .await?;
    until(&m, "/", &[], "the VirtualService back", all_under("virtual-service")).await?;
    vs_accepted(&m, "web", "True").await?;
    Ok(())
}

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
