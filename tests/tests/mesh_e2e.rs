//! The mesh end to end, on the real control plane: pods created through the
//! real injector, scheduled by the real scheduler onto a test node that runs
//! their stored init and proxy commands (real iptables, the proxy as UID
//! 1337) and apps in network namespaces; the real EndpointSlice controller
//! publishes them; the agent serves discovery and certificates from the
//! real CA. The client app reaches the server app through a Service VIP
//! over mutual TLS 1.3 (checked on the wire with tcpdump and tshark), the
//! server proxy learns the client's SPIFFE ID, certificates rotate under
//! continuous traffic without a failed request, and plaintext from outside
//! the mesh is accepted in PERMISSIVE and refused in STRICT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use mizzen_tests::capture::Capture;
use mizzen_tests::daemon::proxy_metric;
use mizzen_tests::k8s::service_account;
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{Node, create_pod, wait_ready};
use mizzen_tests::{Cluster, NetnsPod, eventually, eventually_some, workspace_bin};

const TIMEOUT: Duration = Duration::from_secs(90);
const NODE: &str = "mesh-node";
/// The client app's UID (anything but the proxy's 1337).
const APP_UID: u32 = 1000;

fn app_pod(name: &str, sa: &str, labels: serde_json::Value, annotations: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "containers": [{
                "name": "app", "image": "mizzen-testapp:e2e",
                "args": ["echo-server", "0.0.0.0:8080"],
                "ports": [{"name": "echo", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "echo"}, "periodSeconds": 1},
            }],
        },
    })
}

/// Runs `mizzen-testapp ARGS` as the client app; returns stdout, or the
/// error with stderr.
async fn client_app(node: &Node, ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = node
        .command_as(ns, "client", APP_UID, workspace_bin("mizzen-testapp"))?
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "mizzen-testapp {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn count(path: &PathBuf, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test]
async fn service_traffic_is_mutual_tls_with_rotation_and_modes() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    // Certificates of 12 s: the agent renews them every ~6 s.
    let mesh = MeshNode::start(cluster, NODE, &workspace_bin("mizzen-proxy"), &["--cert-ttl=12s"]).await?;
    let (agent, node) = (&mesh.agent, &mesh.node);

    let ns = cluster
        .namespace(&client, "mesh", &[("mizzen.dev/inject", "enabled")])
        .await?;
    for sa in ["server", "client"] {
        service_account(&client, &ns, sa).await?;
    }
    // Services for both servers; a pod IP is known to discovery (and gets
    // mTLS) when it backs a Service.
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let mut vips = Vec::new();
    for (name, app) in [("echo", "server"), ("echo-strict", "server-strict")] {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"selector": {"app": app},
                     "ports": [{"name": "tcp-echo", "port": 80, "targetPort": "echo"}]},
        }))?;
        let vip = services
            .create(&PostParams::default(), &svc)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("cluster IP")?;
        vips.push(vip);
    }
    let target = format!("{}:80", vips[0]);
    let strict_target = format!("{}:80", vips[1]);

    // STRICT for the strict server only: a workload PeerAuthentication,
    // applied before its pod exists so that its proxy's first policy says so.
    cluster
        .kubectl(["apply", "-n", &ns, "-f", "-"])
        .stdin(
            "apiVersion: security.mizzen.dev/v1
kind: PeerAuthentication
metadata: {name: strict-server}
spec: {selector: {matchLabels: {app: server-strict}}, mtls: {mode: STRICT}}
",
        )
        .run()
        .await?;
    for name in ["server", "server-2"] {
        create_pod(
            &client,
            &ns,
            app_pod(
                name,
                "server",
                serde_json::json!({"app": "server"}),
                serde_json::json!({}),
            ),
        )
        .await?;
    }
    create_pod(
        &client,
        &ns,
        app_pod(
            "server-strict",
            "server",
            serde_json::json!({"app": "server-strict"}),
            serde_json::json!({}),
        ),
    )
    .await?;
    create_pod(
        &client,
        &ns,
        serde_json::json!({
            "metadata": {"name": "client"},
            "spec": {"serviceAccountName": "client", "nodeSelector": {"kubernetes.io/hostname": NODE},
                     "containers": [{"name": "app", "image": "mizzen-testapp:e2e", "command": ["sleep", "3600"]}]},
        }),
    )
    .await?;
    for name in ["server", "server-2", "server-strict", "client"] {
        let pod = wait_ready(&client, &ns, name, TIMEOUT).await?;
        let spec = pod.spec.context("spec")?;
        let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(
            inits,
            ["mizzen-init", "mizzen-proxy"],
            "{name} was injected by the real webhook"
        );
    }
    let (_, server_ip) = node.pod(&ns, "server")?;
    let (_, strict_ip) = node.pod(&ns, "server-strict")?;
    let server_log = Node::log(cluster, &ns, "server", "mizzen-proxy");
    let client_id = format!("spiffe://cluster.local/ns/{ns}/sa/client");
    let server_id = format!("spiffe://cluster.local/ns/{ns}/sa/server");

    // The client app reaches the server app through the Service VIP (no
    // kube-proxy here: the client's proxy resolves it from discovery), and
    // the server app sees the connection from its proxy (127.0.0.6).
    let reply = eventually_some(TIMEOUT, "the client to reach the server through the VIP", || {
        let (node, ns, target) = (&node, &ns, &target);
        async move {
            let out = client_app(node, ns, &["connect", target, "hello-through-the-vip"]).await?;
            Ok(Some(out))
        }
    })
    .await?;
    assert!(
        reply.contains("127.0.0.6:") && reply.contains("hello-through-the-vip"),
        "{reply}"
    );

    // Connections to the VIP spread over both replicas.
    let (_, server2_ip) = node.pod(&ns, "server-2")?;
    let want: std::collections::BTreeSet<String> = [format!("{server_ip}:8080"), format!("{server2_ip}:8080")]
        .into_iter()
        .collect();
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    eventually(TIMEOUT, "both replicas to serve the VIP", || {
        let (node, ns, target, seen, want) = (&node, &ns, &target, &seen, &want);
        async move {
            let reply = client_app(node, ns, &["connect", target, "spread"]).await?;
            let local = reply.split_whitespace().nth(2).context("local address")?.to_owned();
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(local);
            Ok(*seen == *want)
        }
    })
    .await?;

    // On the wire between the pods (captured on the client's interface,
    // whichever replica answers): TLS 1.3 with ALPN mizzen, no plaintext.
    let (capture_netns, _) = node.pod(&ns, "client")?;
    let capture = cluster.dir().join(format!("{ns}-client.pcap"));
    let capture = Capture::start(&capture_netns, "tcp port 8080", capture).await?;
    let marker = "PLAINTEXT-MARKER-7f3a";
    let reply = client_app(node, &ns, &["connect", &target, marker]).await?;
    assert!(reply.contains(marker), "the marker went through: {reply}");
    let pcap = capture.stop(200).await?;
    let raw = pcap.raw()?;
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the app's bytes crossed the wire in plaintext"
    );
    pcap.tls(8080)?.only_tls13_with_alpn("mizzen")?;

    // The server's proxy knows who called: logs and metrics carry the
    // client's SPIFFE ID; the client's proxy verified the server's.
    assert!(
        count(&server_log, &client_id) >= 1,
        "the server proxy logs the client's identity"
    );
    let (n, text) = proxy_metric(
        server_ip,
        &format!("mizzen_proxy_connections_total{{direction=\"inbound\",tls=\"mtls\",peer=\"{client_id}\"}}"),
    )
    .await?;
    // The replicas share the connections; each has had at least one.
    assert!(n >= 1.0, "{text}");
    let (_, client_ip) = node.pod(&ns, "client")?;
    let (n, text) = proxy_metric(
        client_ip,
        &format!("mizzen_proxy_connections_total{{direction=\"outbound\",tls=\"mtls\",peer=\"{server_id}\"}}"),
    )
    .await?;
    assert!(n >= 2.0, "{text}");

    // Rotation under continuous traffic: ~20 s of requests, each on a new
    // connection and on one kept open, while 12 s certificates renew.
    let rotations_before = count(&server_log, "certificate updated");
    let out = client_app(node, &ns, &["load", &target, "20", "50"]).await?;
    let rotations = count(&server_log, "certificate updated") - rotations_before;
    let ok: u64 = out
        .trim()
        .strip_prefix("ok=")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context(out.clone())?;
    assert!(ok >= 100, "enough requests were made: {out}");
    assert!(out.contains("failed=0"), "{out}");
    assert!(
        rotations >= 2,
        "the server's certificate rotated {rotations} times during the load"
    );
    eprintln!("rotation under load: {out} with {rotations} server certificate rotations");

    // From outside the mesh (no proxy, no capture): plaintext is accepted
    // in PERMISSIVE (the default) and refused in STRICT. The meshed client
    // reaches the STRICT pod by its IP over mTLS.
    let outsider = NetnsPod::create("outsider")?;
    let plain = |ip: std::net::Ipv4Addr| {
        outsider
            .command_as(APP_UID, APP_UID, workspace_bin("mizzen-testapp"))
            .args(["connect", &format!("{ip}:8080"), "plain"])
            .output()
    };
    let out = plain(server_ip).await?;
    assert!(out.status.success(), "PERMISSIVE accepts plaintext: {out:?}");
    let out = plain(strict_ip).await?;
    assert!(!out.status.success(), "STRICT refuses plaintext: {out:?}");
    for dst in [strict_target.clone(), format!("{strict_ip}:8080")] {
        let reply = eventually_some(TIMEOUT, "the meshed client to reach the STRICT pod", || {
            let (node, ns, dst) = (&node, &ns, &dst);
            async move { Ok(Some(client_app(node, ns, &["connect", dst, "meshed-to-strict"]).await?)) }
        })
        .await?;
        assert!(reply.contains("meshed-to-strict"), "{dst}: {reply}");
    }
    let (n, text) = proxy_metric(
        strict_ip,
        "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"plaintext_in_strict\"}",
    )
    .await?;
    assert!(n >= 1.0, "{text}");

    // A destination outside the mesh gets plaintext from the client's proxy.
    let _echo = outsider.spawn_echo(APP_UID, "0.0.0.0:9000").await?;
    let reply = client_app(
        node,
        &ns,
        &["connect", &format!("{}:9000", outsider.ip()), "to-outside"],
    )
    .await?;
    assert!(reply.contains("to-outside"), "{reply}");
    let (n, text) = proxy_metric(
        client_ip,
        "mizzen_proxy_connections_total{direction=\"outbound\",tls=\"plaintext\",peer=\"\"}",
    )
    .await?;
    assert!(n >= 1.0, "{text}");

    // Secure naming: discovery says an endpoint is a meshed pod of
    // ServiceAccount "server", but at its address an openssl s_server
    // answers. With the server's SVID the client's proxy talks to it; with
    // another valid mesh SVID (the client's own) the handshake is refused
    // before any app data is sent. Discovery takes an address's identity
    // from the Pod holding it, so a stand-in pod of that ServiceAccount
    // (injected, run by no node) is given the outsider's address.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    create_pod(
        &client,
        &ns,
        serde_json::json!({
            "metadata": {"name": "stand-in", "annotations": {mizzen_tests::node::UNMANAGED: "true"}},
            "spec": {"serviceAccountName": "server",
                     "containers": [{"name": "app", "image": "mizzen-testapp:e2e", "command": ["sleep", "3600"]}]},
        }),
    )
    .await?;
    let ip = outsider.ip().to_string();
    pods.patch_status(
        "stand-in",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
        ),
    )
    .await?;
    let slices = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), &ns);
    let mut naming_vips = Vec::new();
    for (name, port) in [("genuine", 8443), ("impostor", 8444)] {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "spec": {"ports": [{"name": "tls", "port": 443}]},
        }))?;
        let vip = services
            .create(&PostParams::default(), &svc)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("vip")?;
        let slice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "tls", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [outsider.ip().to_string()], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": "stand-in"}}],
        }))?;
        slices.create(&PostParams::default(), &slice).await?;
        naming_vips.push(format!("{vip}:443"));
    }
    let mut s_servers = Vec::new();
    for (pod_name, sa, port) in [("server", "server", "8443"), ("client", "client", "8444")] {
        let dir = cluster.dir().join(format!("{ns}-svid-{sa}"));
        std::fs::create_dir_all(&dir)?;
        let pod = pods.get(pod_name).await?;
        let token = mizzen_tests::k8s::token(&client, &ns, sa, Some(&pod), "mizzen-ca").await?;
        mizzen_tests::sds::svid_files(&agent.socket, &token, &dir).await?;
        let log = std::fs::File::create(dir.join("s_server.log"))?;
        s_servers.push(
            outsider
                .command("openssl")
                .args([
                    "s_server", "-accept", port, "-tls1_3", "-alpn", "mizzen", "-rev", "-quiet",
                ])
                .args(["-cert", "chain.pem", "-cert_chain", "chain.pem", "-key", "key.pem"])
                .args(["-CAfile", "root.pem", "-Verify", "1", "-verify_return_error"])
                .current_dir(&dir)
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(std::process::Stdio::piped())
                .spawn()?,
        );
    }
    let reply = eventually_some(TIMEOUT, "the genuine server to answer over mTLS", || {
        let (node, ns, dst) = (&node, &ns, &naming_vips[0]);
        async move { Ok(Some(client_app(node, ns, &["connect", dst, "genuine"]).await?)) }
    })
    .await?;
    assert!(reply.contains("eniuneg"), "openssl s_server reversed our line: {reply}");
    eventually(TIMEOUT, "the impostor to be refused for its identity", || {
        let (node, ns, dst) = (&node, &ns, &naming_vips[1]);
        async move {
            let refused = client_app(node, ns, &["connect", dst, "secret-for-the-server"])
                .await
                .is_err();
            let series = "mizzen_proxy_handshake_failures_total{direction=\"outbound\",reason=\"identity_mismatch\"}";
            Ok(refused && proxy_metric(client_ip, series).await?.0 >= 1.0)
        }
    })
    .await?;
    let client_log = std::fs::read_to_string(Node::log(cluster, &ns, "client", "mizzen-proxy"))?;
    assert!(
        client_log.contains("presented the wrong identity") && client_log.contains(&client_id),
        "the client's proxy names the identity it was shown"
    );
    drop(s_servers);

    // Deleting a replica stops it and removes its endpoint: traffic goes to
    // the other one. With none left, the client gets a prompt refusal.
    let delete = |name: &'static str| {
        let pods = pods.clone();
        eventually(TIMEOUT, "the pod to be deleted", move || {
            let pods = pods.clone();
            async move {
                let _ = pods.delete(name, &Default::default()).await;
                Ok(pods.get_opt(name).await?.is_none())
            }
        })
    };
    delete("server").await?;
    eventually(TIMEOUT, "ten requests in a row to reach the remaining replica", || {
        let (node, ns, target) = (&node, &ns, &target);
        async move {
            for i in 0..10 {
                let reply = client_app(node, ns, &["connect", target, &format!("after-{i}")]).await?;
                if !reply.contains(&format!("{server2_ip}:8080")) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await?;
    delete("server-2").await?;
    eventually(
        TIMEOUT,
        "connections to the VIP without endpoints to be refused",
        || {
            let (node, ns, target) = (&node, &ns, &target);
            async move { Ok(client_app(node, ns, &["connect", target, "nobody-home"]).await.is_err()) }
        },
    )
    .await?;
    let (n, text) = proxy_metric(
        client_ip,
        "mizzen_proxy_refused_total{direction=\"outbound\",reason=\"no_endpoints\"}",
    )
    .await?;
    assert!(n >= 1.0, "{text}");
    assert!(node.pod(&ns, "server").is_err(), "the deleted pod's namespace is gone");
    Ok(())
}
