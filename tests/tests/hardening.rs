//! The attacks of the hardening review, each run against the real control
//! plane (and the test node where the attack needs a running pod), and
//! shown to fail. Every one stays here as a regression test.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mizzen_tests::daemon::{metric_where, proxy_metric};
use mizzen_tests::k8s;
use mizzen_tests::mesh::{Injector, MeshNode, ca_and_agent, echo_pod, install_manifests};
use mizzen_tests::node::{Node, UNMANAGED, create_pod, wait_ready};
use mizzen_tests::sds::{SdsStream, decode};
use mizzen_tests::{Cluster, NetnsPod, eventually_some, workspace_bin};
use tokio::io::AsyncBufReadExt;

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
async fn eventually_refused(
    client: &kube::Client,
    ns: &str,
    pod: serde_json::Value,
) -> anyhow::Result<kube::core::Status> {
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
    Injector::shared(cluster).await?;
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
    for (i, path) in [
        "/var/run/mizzen",
        "//var/run/./mizzen/",
        "/run/mizzen",
        "/var/run/mizzen/agent.sock",
    ]
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
    assert_ne!(
        written_number(out.join("mv")).await?,
        0,
        "mv of the agent's socket must fail"
    );
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
        create_pod(&client, &ns, echo_pod(name, &mesh.node.name)).await?;
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
    assert!(
        opened <= 2.0,
        "the target proxy forwarded {opened} connections:\n{text}"
    );
    let (refused, text) = proxy_metric(target_ip, "mizzen_proxy_refused_total").await?;
    assert_eq!(refused, 2.0, "one refusal per attempt:\n{text}");
    Ok(())
}

// Item 2, the other half: the stream of a pod that is gone gets no new keys.
#[tokio::test]
async fn a_deleted_pods_sds_stream_gets_no_new_certificate() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let (_ca, agent) = ca_and_agent(cluster, "node-gone", &["--cert-ttl=4s"]).await?;
    let ns = cluster.namespace(&client, "gone", &[]).await?;
    let pod = k8s::pod_on_node(&client, &ns, "web", "default", &agent.node).await?;
    let token = k8s::token(&client, &ns, "default", Some(&pod), "mizzen-ca").await?;
    let names = ["default", "ROOTCA"];
    let mut stream = SdsStream::open(&agent.socket, &token, &names).await?;
    // Renewals arrive while the pod exists.
    let mut serials = std::collections::BTreeSet::new();
    while serials.len() < 2 {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.next()).await??;
        stream.ack(&resp, &names).await?;
        if let Some((chain, _)) = decode(&resp)?.certificate {
            serials.insert(chain);
        }
    }
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete("web", &DeleteParams::default().grace_period(0))
        .await?;
    // Within the agent's token-review cache (10 s) and one renewal, the
    // stream ends, refused; no certificate comes after that.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.next().await {
                Ok(resp) => stream.ack(&resp, &names).await?,
                Err(status) => return Ok::<_, anyhow::Error>(status),
            }
        }
    })
    .await
    .context("the stream of the deleted pod kept receiving certificates")??;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    Ok(())
}

// Issue #10, item 6: every undecided inbound connection cost 16 KiB and a
// 5 ms re-peek for up to 10 s. 20,000 connections that each send one 0x16
// byte (the start of a TLS record) and wait must not take the proxy's
// memory over 64 MiB, and a real client is still served meanwhile.
#[tokio::test]
async fn a_flood_of_partial_client_hellos_is_bounded_and_the_proxy_keeps_serving() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh = MeshNode::start(cluster, "node-flood", &workspace_bin("mizzen-proxy"), &[]).await?;
    let ns = cluster.namespace(&client, "flood", INJECTED).await?;
    let vip = mesh.server_and_client(&client, &ns, "target").await?;
    let (_, target_ip) = mesh.node.pod(&ns, "target")?;
    let proxy_pid = mesh.node.pid(&ns, "target", "mizzen-proxy")?;

    // Outside the mesh, on the same network: 20,000 connections to the
    // app's port (captured by the proxy), one 0x16 byte each, held; from
    // two processes, as a process may hold at most 20,000 files here.
    let flooder = NetnsPod::create("flooder")?;
    let mut floods = Vec::new();
    for _ in 0..2 {
        let mut flood = flooder
            .command("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n \"$(ulimit -Hn)\" && exec {} hold {target_ip}:8080 10000 120 16",
                workspace_bin("mizzen-testapp").display()
            ))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = flood.stdout.take().context("stdout")?;
        floods.push((flood, tokio::io::BufReader::new(stdout).lines()));
    }
    let mut opened = 0;
    for (flood, lines) in &mut floods {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("the flood did not finish connecting")??;
        let Some(line) = line else {
            anyhow::bail!("a flooder exited: {:?}", flood.try_wait());
        };
        opened += line.trim_start_matches("open ").parse::<usize>()?;
    }
    assert!(opened >= 19_000, "the flood connected: {opened}");

    // A meshed client is served over mTLS while the flood is held.
    mesh.eventually_connects(&ns, "client", &format!("{vip}:80"), "during-the-flood")
        .await?;
    let peak_mib = mizzen_tests::proc_status_kib(proxy_pid, "VmHWM:")? / 1024.0;
    assert!(peak_mib < 64.0, "the proxy's peak RSS was {peak_mib:.1} MiB");
    let (shed, text) = proxy_metric(
        target_ip,
        "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"detect_overload\"}",
    )
    .await?;
    assert!(shed >= 10_000.0, "the oldest undecided connections were shed:\n{text}");
    println!("20,000 partial ClientHellos: proxy peak RSS {peak_mib:.1} MiB, {shed} shed");
    for (mut flood, _) in floods {
        let _ = flood.kill().await;
    }
    Ok(())
}

/// A pod in a meshed namespace, not run by any node.
fn app_pod(name: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "app", "command": ["sleep", "3600"]}]},
    })
}

// Issue #10, item 11: `mizzen.dev/status` set by the pod's author skipped
// injection: a pod could leave the mesh in a meshed namespace.
#[tokio::test]
async fn a_forged_injection_status_does_not_skip_the_mesh() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    Injector::shared(cluster).await?;
    let ns = cluster.namespace(&client, "forged", INJECTED).await?;
    let mut pod = app_pod("forged");
    pod["metadata"]["annotations"] = serde_json::json!({
        "mizzen.dev/status": r#"{"initContainers":["mizzen-init","mizzen-proxy"],"containers":[],"volumes":["mizzen-agent-socket","mizzen-token"],"nativeSidecar":true}"#,
        UNMANAGED: "true",
    });
    let created = create_pod(&client, &ns, pod).await?;
    let spec = created.spec.context("spec")?;
    let names: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.name.clone())
        .collect();
    assert!(
        names.iter().any(|n| n == "mizzen-proxy") && names.iter().any(|n| n == "mizzen-init"),
        "injected despite the forged status: {names:?}"
    );
    Ok(())
}

// Item 11: the proxy's UID (1337) is exempt from capture, so an app
// running as it would bypass the mesh.
#[tokio::test]
async fn an_app_running_as_the_proxy_uid_is_refused() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    Injector::shared(cluster).await?;
    let ns = cluster.namespace(&client, "uid", INJECTED).await?;
    let mut pod = app_pod("sneaky");
    pod["spec"]["securityContext"] = serde_json::json!({"runAsUser": 1337});
    let status = eventually_refused(&client, &ns, pod).await?;
    assert!(status.message.contains("1337"), "{status:?}");
    Ok(())
}

// Item 11: `mizzen.dev/proxy-image` chose the image of a root init
// container with NET_ADMIN; off unless the mesh config allows it.
#[tokio::test]
async fn the_proxy_image_annotation_is_refused_by_default() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    Injector::shared(cluster).await?;
    let ns = cluster.namespace(&client, "image", INJECTED).await?;
    let mut pod = app_pod("custom");
    pod["metadata"]["annotations"] = serde_json::json!({"mizzen.dev/proxy-image": "evil.example/shell:1"});
    let status = eventually_refused(&client, &ns, pod).await?;
    assert!(status.message.contains("mizzen.dev/proxy-image"), "{status:?}");
    Ok(())
}

/// The injector's webhook CA, written to a file for curl and openssl.
async fn injector_ca_file(client: &kube::Client, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let pem = k8s::secret_value(
        client,
        "mizzen-system",
        "mizzen-injector-ca",
        "ca-cert.pem",
        Duration::from_secs(30),
    )
    .await?;
    let path = Cluster::get().dir().join(format!("{name}-injector-ca.pem"));
    std::fs::write(&path, pem)?;
    Ok(path)
}

// Issue #10, item 10: a client that sends its headers slowly held a
// webhook connection for ever. openssl completes the handshake, sends half
// a request and waits: the injector closes it.
#[tokio::test]
async fn the_injector_closes_a_connection_whose_headers_never_finish() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let injector = Injector::shared(cluster).await?;
    let ca = injector_ca_file(&client, "slow").await?;
    let mut s_client = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{}", injector.port),
        ])
        .arg("-CAfile")
        .arg(&ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = s_client.stdin.take().context("stdin")?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"POST /inject HTTP/1.1\r\nHost: injector\r\n").await?;
    // openssl exits when the server closes; stdin stays open meanwhile.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), s_client.wait())
        .await
        .context("the injector kept the half-sent request open for 30 s")??;
    println!("half-sent headers closed after {:?}", started.elapsed());
    drop(stdin);
    Ok(())
}

// Item 10: a review body that inflates when parsed into a generic JSON tree
// (2 MiB of `{}`s, about 35 times its size as a tree), 32 at once. The
// injector parses straight into a Pod, skips what a Pod does not have, and
// reviews at most 16 at once.
#[tokio::test]
async fn inflating_review_bodies_do_not_exhaust_the_injector() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let injector = Injector::shared(cluster).await?;
    let ns = cluster.namespace(&client, "inflate", INJECTED).await?;
    let ca = injector_ca_file(&client, "inflate").await?;
    let junk = vec!["{}"; 600_000].join(",");
    let body = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Pod"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"namespace":"{ns}","operation":"CREATE","userInfo":{{"username":"x"}},"object":{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"p","namespace":"{ns}"}},"spec":{{"containers":[{{"name":"app","image":"app"}}]}},"junk":[{junk}]}}}}}}"#
    );
    assert!(body.len() < 2 * 1024 * 1024, "within the size limit: {}", body.len());
    let file = Cluster::get().dir().join(format!("{ns}-inflate.json"));
    std::fs::write(&file, body)?;
    let pid = injector.daemon.pid().context("injector pid")?;
    let before = mizzen_tests::proc_status_kib(pid, "VmRSS:")? / 1024.0;
    let url = format!("https://127.0.0.1:{}/inject", injector.port);
    let mut answered = 0;
    for _ in 0..3 {
        let mut curls = Vec::new();
        for _ in 0..32 {
            curls.push(
                tokio::process::Command::new("curl")
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-H",
                        "content-type: application/json",
                    ])
                    .arg("--cacert")
                    .arg(&ca)
                    .arg("--data-binary")
                    .arg(format!("@{}", file.display()))
                    .arg(&url)
                    .output(),
            );
        }
        for out in futures::future::join_all(curls).await {
            if String::from_utf8_lossy(&out?.stdout) == "200" {
                answered += 1;
            }
        }
    }
    let peak = mizzen_tests::proc_status_kib(pid, "VmHWM:")? / 1024.0;
    println!("96 inflating reviews: injector RSS {before:.1} MiB before, peak {peak:.1} MiB, {answered} answered");
    assert!(
        answered >= 90,
        "the reviews were answered (and the pod injected): {answered}"
    );
    assert!(
        peak < before + 100.0,
        "the injector's peak RSS rose from {before:.1} to {peak:.1} MiB"
    );
    Ok(())
}

// Issue #10, item 13: any pod on the node holds a valid token, so the
// streams one identity may keep open on the agent's socket are bounded.
#[tokio::test]
async fn one_identity_cannot_open_unbounded_streams_on_the_agent() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let (_ca, agent) = ca_and_agent(cluster, "node-streams", &["--max-streams-per-identity=4"]).await?;
    let ns = cluster.namespace(&client, "streams", &[]).await?;
    let pod = k8s::pod_on_node(&client, &ns, "greedy", "default", &agent.node).await?;
    let token = k8s::token(&client, &ns, "default", Some(&pod), "mizzen-ca").await?;
    let names = ["ROOTCA"];
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut s = SdsStream::open(&agent.socket, &token, &names).await?;
        tokio::time::timeout(Duration::from_secs(30), s.next()).await??;
        open.push(s);
    }
    let refused = match SdsStream::open(&agent.socket, &token, &names).await {
        Ok(mut s) => tokio::time::timeout(Duration::from_secs(30), s.next())
            .await?
            .expect_err("a fifth stream must not be served"),
        Err(status) => status,
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    // Closing one makes room.
    open.pop();
    eventually_some(Duration::from_secs(20), "room for a new stream", || {
        let (socket, token) = (agent.socket.clone(), token.clone());
        async move {
            Ok(match SdsStream::open(&socket, &token, &names).await {
                Ok(mut s) => tokio::time::timeout(Duration::from_secs(10), s.next())
                    .await?
                    .ok()
                    .map(|_| ()),
                Err(_) => None,
            })
        }
    })
    .await?;
    Ok(())
}

// Issue #10, item 7: anyone who may write EndpointSlices could list a
// meshed pod's IP under a Service of their own, with a targetRef to an
// unmeshed pod, and sort first: clients then sent that pod plaintext. The
// identity of a pod IP now comes from the Pod holding it.
#[tokio::test]
async fn a_foreign_endpointslice_cannot_downgrade_a_pod_ip_to_plaintext() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh = MeshNode::start(cluster, "node-shadow", &workspace_bin("mizzen-proxy"), &[]).await?;
    let victim_ns = cluster.namespace(&client, "zz-victim", INJECTED).await?;
    let evil_ns = cluster.namespace(&client, "aa-evil", &[]).await?;
    mesh.server_and_client(&client, &victim_ns, "victim").await?;
    let (_, victim_ip) = mesh.node.pod(&victim_ns, "victim")?;
    // Counted before the shadow exists: the agent may publish it before
    // the slice's create call returns.
    let before = discovery_endpoints(&mesh).await?;
    // The shadow: a selector-less Service and a hand-written slice.
    let shadow: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shadow"},
        "spec": {"ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), &evil_ns)
        .create(&PostParams::default(), &shadow)
        .await?;
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shadow-1", "labels": {"kubernetes.io/service-name": "shadow"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [victim_ip.to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": evil_ns, "name": "decoy"}}],
    }))?;
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), &evil_ns)
        .create(&PostParams::default(), &slice)
        .await?;
    // The agent publishes the shadow's endpoint (and pushes it to the
    // client's proxy) before the client calls.
    eventually_some(
        Duration::from_secs(30),
        "the shadow slice to reach discovery",
        || async { Ok((discovery_endpoints(&mesh).await? > before).then_some(())) },
    )
    .await?;
    // The client calls the victim's pod IP: it must be mutual TLS.
    mesh.eventually_connects(&victim_ns, "client", &format!("{victim_ip}:8080"), "secret")
        .await?;
    let (_, text) = proxy_metric(victim_ip, "mizzen_proxy_connections_total").await?;
    let inbound = |tls: &str| {
        metric_where(
            &text,
            &format!("mizzen_proxy_connections_total{{direction=\"inbound\",tls=\"{tls}\""),
        )
    };
    assert_eq!(inbound("plaintext"), 0.0, "the victim got plaintext:\n{text}");
    assert!(inbound("mtls") >= 1.0, "the call was mutual TLS:\n{text}");
    Ok(())
}

/// Endpoints the node's agent publishes now.
async fn discovery_endpoints(mesh: &MeshNode) -> anyhow::Result<f64> {
    let text = mesh.agent.daemon.metrics().await?;
    Ok(mizzen_tests::daemon::metric(&text, "mizzen_agent_discovery_endpoints"))
}

/// A client authenticated as ServiceAccount `mizzen-system/<sa>`.
async fn client_as(cluster: &Cluster, sa: &str) -> anyhow::Result<kube::Client> {
    let admin = cluster.client().await?;
    let path = cluster
        .kubeconfig_for_service_account(&admin, "mizzen-system", sa)
        .await?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The refusal of creating `obj` as `client` (a dry run), once a newly
/// applied admission policy is in force; an error if it is admitted.
async fn refused_write<K>(client: &kube::Client, ns: &str, obj: K) -> anyhow::Result<kube::core::Status>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually_some(Duration::from_secs(20), "the write to be refused", || {
        let (api, obj, dry_run) = (api.clone(), obj.clone(), dry_run.clone());
        async move {
            Ok(match api.create(&dry_run, &obj).await {
                Err(kube::Error::Api(s)) if s.code == 403 => Some(*s),
                _ => None,
            })
        }
    })
    .await
}

// Issue #10, item 12: RBAC cannot limit `create` by name, so the CA could
// create a token Secret for the injector's ServiceAccount (which controls
// the webhook) or write the injector's template ConfigMap.
#[tokio::test]
async fn the_ca_cannot_mint_a_token_secret_for_another_service_account() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    install_manifests(cluster).await?;
    let ca = client_as(cluster, "mizzen-ca").await?;
    let mut secret = k8s_openapi::api::core::v1::Secret::default();
    secret.metadata.name = Some("injector-token".into());
    secret.metadata.annotations = Some(
        [(
            "kubernetes.io/service-account.name".to_string(),
            "mizzen-injector".to_string(),
        )]
        .into(),
    );
    secret.type_ = Some("kubernetes.io/service-account-token".into());
    let status = refused_write(&ca, "mizzen-system", secret).await?;
    // The policy's refusal, not RBAC's (which allows creating Secrets here).
    assert!(
        status.message.contains("may write only its own root Secret"),
        "{status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_ca_cannot_write_the_injectors_template() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    install_manifests(cluster).await?;
    let ca = client_as(cluster, "mizzen-ca").await?;
    let mut cm = k8s_openapi::api::core::v1::ConfigMap::default();
    cm.metadata.name = Some("mizzen-injector-config".into());
    cm.data = Some(
        [(
            "config.yaml".to_string(),
            "proxyImage: evil.example/shell:1\n".to_string(),
        )]
        .into(),
    );
    let status = refused_write(&ca, "mizzen-system", cm).await?;
    assert!(status.message.contains("may write only the trust bundle"), "{status:?}");
    Ok(())
}

// Issue #10, item 9: unauthenticated callers made the CA review their
// tokens with the API server, twice per call; a flood of them got the CA's
// ServiceAccount throttled. Garbage and forged tokens (the right audience,
// a signature the issuer never made) now cost no TokenReview at all.
#[tokio::test]
async fn forged_tokens_cost_the_ca_no_token_review() -> anyhow::Result<()> {
    use base64::Engine;
    let cluster = Cluster::get();
    let (ca, _agent) = ca_and_agent(cluster, "node-forged", &[]).await?;
    let client = cluster.client().await?;
    let root = mizzen_tests::mesh::published_root(&client, "mizzen-system", "mizzen-root-ca").await?;
    let mut grpc = mizzen_tests::ca_client::ca_client(&ca, &root).await?;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let reviews = |text: &str| mizzen_tests::daemon::metric(text, "mizzen_ca_token_review_duration_seconds_count");
    let before = reviews(&ca.daemon.metrics().await?);
    let csr = mizzen_tests::ca_client::csr(
        vec![mizzen_tests::ca_client::uri("spiffe://cluster.local/ns/x/sa/y")],
        false,
    );
    for i in 0..50 {
        let forged = format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"aud":["mizzen-ca"],"sub":"system:serviceaccount:mizzen-system:mizzen-agent"}"#),
            b64(&format!("not-the-issuers-signature-{i}"))
        );
        let garbage = format!("random-{i}");
        for token in [&forged, &garbage] {
            let refused = grpc
                .create_certificate(mizzen_tests::ca_client::request(&csr.pem, Some(token), Some(token)))
                .await
                .expect_err("a forged token gets nothing");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
    }
    let text = ca.daemon.metrics().await?;
    assert_eq!(
        reviews(&text),
        before,
        "TokenReviews were sent for forged tokens:\n{text}"
    );
    assert!(
        mizzen_tests::daemon::metric(&text, "mizzen_ca_requests_rejected_total{reason=\"token_unusable\"}") >= 100.0,
        "{text}"
    );
    Ok(())
}
