//! The attacks of the hardening review, each run against the real control
//! plane (and the test node where the attack needs a running pod), and
//! shown to fail. Every one stays here as a regression test.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mizzen_tests::mesh::{Injector, MeshNode, install_manifests};
use mizzen_tests::node::{Node, UNMANAGED, create_pod, wait_ready};
use mizzen_tests::daemon::proxy_metric;
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

const INJECTED: &[(&str, &str)] = &[("mizzen.dev/inject", "enabled")];

/// The API server's refusal of creating `pod` (a dry run: admission runs
/// in full, nothing is stored), or `None` if it would be admitted.
async fn refusal(
    client: &kube::Client,
    ns: &str,
    pod: &serde_json::Value,
) -> anyhow::Result<Option<kube::core::Status>> {
    let pod: Pod = serde_json::from_value(pod.clone())?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match Api::<Pod>::namespaced(client.clone(), ns).create(&dry_run, &pod).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) => Ok(Some(*status)),
        Err(e) => Err(e.into()),
    }
}

/// The refusal of `pod`, waiting for a newly applied admission policy to
/// reach the API server's admission chain.
async fn eventually_refused(client: &kube::Client, ns: &str, pod: serde_json::Value) -> anyhow::Result<kube::core::Status> {
    eventually_some(Duration::from_secs(20), "the pod to be refused", || {
        let (client, ns, pod) = (client.clone(), ns.to_owned(), pod.clone());
        async move { refusal(&client, &ns, &pod).await }
    })
    .await
}

/// The number a container of the attack wrote to `file`.
async fn written_number(file: std::path::PathBuf) -> anyhow::Result<i32> {
    eventually_some(Duration::from_secs(20), "the attack to write its result", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        async move { Ok(text.trim().parse::<i32>().ok()) }
    })
    .await
}

/// A pod whose container mounts `mounts` (volumeMounts) of `volumes`.
fn pod_mounting(name: &str, volumes: serde_json::Value, mounts: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "annotations": {UNMANAGED: "true"}},
        "spec": {
            "containers": [{"name": "app", "image": "mizzen-testapp", "command": ["sleep", "3600"],
                            "volumeMounts": mounts}],
            "volumes": volumes,
        },
    })
}

// Issue #10, item 1: the reproduced hijack. A container in a meshed pod
// mounts the volume the injector adds, by name, to reach the agent's socket
// directory and put its own socket there.
#[tokio::test]
async fn an_app_container_cannot_mount_the_injected_agent_socket_volume() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let _injector = Injector::start(cluster, "").await?;
    let ns = cluster.namespace(&client, "hijack", INJECTED).await?;
    let status = eventually_refused(
        &client,
        &ns,
        pod_mounting(
            "thief",
            serde_json::json!([]),
            serde_json::json!([{"name": "mizzen-agent-socket", "mountPath": "/s"}]),
        ),
    )
    .await?;
    assert!(
        status.message.contains("mizzen sidecar injection") && status.message.contains("mizzen-agent-socket"),
        "the injector names the reserved volume: {status:?}"
    );
    Ok(())
}

// Item 1, without the injector: a pod in any namespace declares its own
// hostPath to the agent's directory, however the path is written.
#[tokio::test]
async fn a_writable_mount_of_the_agent_directory_is_refused_in_any_namespace() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    let ns = cluster.namespace(&client, "hostpath", &[]).await?;
    for (i, path) in ["/var/run/mizzen", "//var/run/./mizzen/", "/run/mizzen", "/var/run/mizzen/agent.sock"]
        .into_iter()
        .enumerate()
    {
        let pod = pod_mounting(
            &format!("thief-{i}"),
            serde_json::json!([{"name": "sock", "hostPath": {"path": path}}]),
            serde_json::json!([{"name": "sock", "mountPath": "/s"}]),
        );
        let status = eventually_refused(&client, &ns, pod)
            .await
            .with_context(|| format!("hostPath {path}"))?;
        assert_eq!(status.code, 403, "hostPath {path}: {status:?}");
        assert!(status.message.contains("readOnly"), "hostPath {path}: {status:?}");
    }
    Ok(())
}

// Item 1, the ephemeral-container route (`kubectl debug` and friends): the
// injector never sees it; the admission policy does.
#[tokio::test]
async fn an_ephemeral_container_cannot_mount_mizzen_volumes() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    let ns = cluster.namespace(&client, "debug", &[]).await?;
    create_pod(
        &client,
        &ns,
        pod_mounting(
            "target",
            serde_json::json!([{"name": "mizzen-agent-socket",
                                "hostPath": {"path": "/var/run/mizzen", "type": "Directory"}}]),
            serde_json::json!([]),
        ),
    )
    .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let debug = serde_json::json!({"spec": {"ephemeralContainers": [{
        "name": "debugger", "image": "mizzen-testapp", "command": ["sh"],
        "volumeMounts": [{"name": "mizzen-agent-socket", "mountPath": "/s", "readOnly": true}],
    }]}});
    let refused = eventually_some(Duration::from_secs(20), "the admission policy to refuse", || {
        let (pods, debug) = (pods.clone(), debug.clone());
        async move {
            let dry_run = PatchParams {
                dry_run: true,
                ..Default::default()
            };
            Ok(
                match pods
                    .patch_ephemeral_containers("target", &dry_run, &Patch::Strategic(debug))
                    .await
                {
                    Err(kube::Error::Api(s)) => Some(*s),
                    _ => None,
                },
            )
        }
    })
    .await?;
    assert_eq!(refused.code, 403, "{refused:?}");
    assert!(refused.message.contains("mizzen-*"), "{refused:?}");
    Ok(())
}

// Item 1 on a running node: a pod allowed to see the agent's directory
// (read-only, as the policy demands) tries the reproduced `mv` and fails;
// the socket stays where the agent made it.
#[tokio::test]
async fn a_read_only_mount_cannot_replace_the_agent_socket() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh = MeshNode::start(cluster, "node-ro", &workspace_bin("mizzen-proxy"), &[]).await?;
    let ns = cluster.namespace(&client, "ro", &[]).await?;
    let attack = "mv /s/agent.sock /s/real.sock; echo $? > /out/mv; touch /s/planted; echo $? > /out/touch; \
                  exec sleep 3600";
    create_pod(
        &client,
        &ns,
        serde_json::json!({
            "metadata": {"name": "thief"},
            "spec": {
                "nodeName": mesh.node.name,
                "containers": [{"name": "app", "image": "mizzen-testapp", "command": ["sh", "-c", attack],
                    "volumeMounts": [{"name": "sock", "mountPath": "/s", "readOnly": true},
                                     {"name": "out", "mountPath": "/out"}]}],
                "volumes": [{"name": "sock", "hostPath": {"path": "/var/run/mizzen", "type": "Directory"}},
                            {"name": "out", "emptyDir": {}}],
            },
        }),
    )
    .await?;
    wait_ready(&client, &ns, "thief", Duration::from_secs(60)).await?;
    let out = Node::log(cluster, &ns, "thief", "app")
        .parent()
        .context("pod dir")?
        .join("volumes/out");
    assert_ne!(written_number(out.join("mv")).await?, 0, "mv of the agent's socket must fail");
    assert_ne!(
        written_number(out.join("touch")).await?,
        0,
        "nothing may be created in the agent's directory"
    );
    let dir = mesh.agent.socket.parent().context("socket dir")?;
    assert!(mesh.agent.socket.exists(), "the agent's socket is still there");
    assert!(!dir.join("real.sock").exists() && !dir.join("planted").exists());
    Ok(())
}

/// A meshed pod on `node` running the test app's echo server on 8080.
fn meshed_app(name: &str, node: &str) -> serde_json::Value {
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

// Issue #10, item 5, as reproduced: one byte from a meshed pod to another
// pod's proxy port (:15006 inbound, :15001 outbound) made that proxy
// connect to itself until it ran out of file descriptors. Now each is one
// refused connection.
#[tokio::test]
async fn a_connection_to_a_proxy_port_is_refused_not_looped() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh = MeshNode::start(cluster, "node-loop", &workspace_bin("mizzen-proxy"), &[]).await?;
    let ns = cluster.namespace(&client, "loop", INJECTED).await?;
    for name in ["target", "sender"] {
        create_pod(&client, &ns, meshed_app(name, &mesh.node.name)).await?;
    }
    for name in ["target", "sender"] {
        wait_ready(&client, &ns, name, Duration::from_secs(90)).await?;
    }
    let (_, target_ip) = mesh.node.pod(&ns, "target")?;
    for (port, direction) in [(15006, "inbound"), (15001, "outbound")] {
        // The sender's app (not the proxy's UID: its traffic is captured).
        let out = mesh
            .node
            .command_as(&ns, "sender", 1000, workspace_bin("mizzen-testapp"))?
            .args(["connect", &format!("{target_ip}:{port}"), "x"])
            .output()
            .await?;
        assert!(!out.status.success(), "nothing answers on :{port}: {out:?}");
        let series = format!("mizzen_proxy_refused_total{{direction=\"{direction}\",reason=\"to_proxy_port\"}}");
        eventually_some(Duration::from_secs(20), &format!("the refusal on :{port}"), || {
            let series = series.clone();
            async move {
                let (n, _) = proxy_metric(target_ip, &series).await?;
                Ok((n >= 1.0).then_some(()))
            }
        })
        .await?;
    }
    // The loop would have shown as thousands of connections by now; the
    // readiness checks of the node add none (they go to the health port).
    let (opened, text) = proxy_metric(target_ip, "mizzen_proxy_connections_total").await?;
    assert!(opened <= 2.0, "the target proxy forwarded {opened} connections:\n{text}");
    let (refused, text) = proxy_metric(target_ip, "mizzen_proxy_refused_total").await?;
    assert_eq!(refused, 2.0, "one refusal per attempt:\n{text}");
    Ok(())
}
