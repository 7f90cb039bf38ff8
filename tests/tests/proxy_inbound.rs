//! The real proxy in a network-namespace pod, with its certificate from the
//! real agent and CA: `openssl s_client` with a mesh SVID is served, without
//! one is refused; plaintext is refused under a STRICT PeerAuthentication
//! and accepted once it is deleted (PERMISSIVE); the app sees connections from 127.0.0.6 and an app bound to
//! localhost only is not exposed; a PERMISSIVE workload with one STRICT
//! port (`portLevelMtls`) mixes both; a proxy whose policy has not arrived
//! refuses every inbound connection.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mizzen_tests::daemon::{http_get, metric};
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::{Agent, Ca, SYSTEM, ca_and_agent, install_manifests};
use mizzen_tests::{Cluster, NetnsPod, eventually, workspace_bin};
use tokio::io::{AsyncBufReadExt, BufReader};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A namespace-wide STRICT PeerAuthentication.
const STRICT_NAMESPACE: &str = "apiVersion: security.mizzen.dev/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: STRICT}}
";

fn testapp() -> &'static str {
    env!("CARGO_BIN_EXE_mizzen-testapp")
}

/// What both tests need around a proxy: a namespace with a `server` pod on
/// `server_node` (its token in `<dir>/server-token`) and a `client` pod on
/// `client_node` whose SVID, from the agent at `client_agent`, is in `dir`
/// for openssl.
struct Workloads {
    ns: String,
    dir: std::path::PathBuf,
    server_token: std::path::PathBuf,
}

async fn workloads(
    cluster: &Cluster,
    prefix: &str,
    server_node: &str,
    client_node: &str,
    client_agent: &Agent,
) -> anyhow::Result<Workloads> {
    let client = cluster.client().await?;
    let ns = cluster.namespace(&client, prefix, &[]).await?;
    for sa in ["server", "client"] {
        service_account(&client, &ns, sa).await?;
    }
    let server_pod = pod_on_node(&client, &ns, "server", "server", server_node).await?;
    let client_pod = pod_on_node(&client, &ns, "client", "client", client_node).await?;
    let dir = cluster.dir().join(format!("{prefix}-{ns}"));
    std::fs::create_dir_all(&dir)?;
    let server_token = dir.join("server-token");
    std::fs::write(
        &server_token,
        token(&client, &ns, "server", Some(&server_pod), "mizzen-ca").await?,
    )?;
    let client_token = token(&client, &ns, "client", Some(&client_pod), "mizzen-ca").await?;
    mizzen_tests::sds::svid_files(&client_agent.socket, &client_token, &dir).await?;
    Ok(Workloads { ns, dir, server_token })
}

/// Starts the proxy in `pod` as UID 1337 and waits for /healthz/ready.
async fn start_proxy(
    pod: &NetnsPod,
    agent: &Agent,
    token_file: &Path,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let child = spawn_proxy(pod, agent, token_file, log)?;
    let url = format!("http://{}:15021/healthz/ready", pod.ip());
    eventually(TIMEOUT, "the proxy to be ready", || {
        let url = url.clone();
        async move { Ok(http_get(&url).await.map(|(c, _)| c == 200).unwrap_or(false)) }
    })
    .await
    .with_context(|| std::fs::read_to_string(log).unwrap_or_default())?;
    Ok(child)
}

/// Starts the proxy in `pod` as UID 1337.
fn spawn_proxy(pod: &NetnsPod, agent: &Agent, token_file: &Path, log: &Path) -> anyhow::Result<tokio::process::Child> {
    let out = std::fs::File::create(log)?;
    Ok(pod
        .command_as(1337, 1337, workspace_bin("mizzen-proxy"))
        .env("RUST_LOG", "info,mizzen_proxy=debug")
        .env("INSTANCE_IP", pod.ip().to_string())
        .env(
            "MIZZEN_APP_PROBES",
            r#"{"/app-health/app/livez":{"tcpSocket":{"port":8080}},"/app-health/app/readyz":{"tcpSocket":{"port":8181}}}"#,
        )
        .arg("proxy")
        .arg(format!("--agent-socket={}", agent.socket.display()))
        .arg(format!("--token-file={}", token_file.display()))
        .arg("--drain-seconds=60")
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?)
}

/// `openssl s_client` from `pod` to `addr`, sending one line; returns what came back.
async fn s_client(pod: &NetnsPod, addr: &str, dir: &Path, with_cert: bool) -> anyhow::Result<String> {
    let mut cmd = pod.command("timeout");
    cmd.args([
        "5",
        "openssl",
        "s_client",
        "-connect",
        addr,
        "-tls1_3",
        "-alpn",
        "mizzen",
        "-quiet",
        "-verify_return_error",
    ])
    .arg("-CAfile")
    .arg(dir.join("root.pem"));
    if with_cert {
        // -cert sends the leaf only; the intermediate goes with -cert_chain.
        cmd.arg("-cert")
            .arg(dir.join("chain.pem"))
            .arg("-cert_chain")
            .arg(dir.join("chain.pem"));
        cmd.arg("-key").arg(dir.join("key.pem"));
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"hello-through-mtls\n").await?;
        // Keep stdin open so s_client waits for the reply; timeout ends it.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            drop(stdin);
        });
    }
    let out = child.wait_with_output().await?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test]
async fn inbound_mtls_with_openssl_and_plaintext_by_mode() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let node = "proxy-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[]).await?;

    let Workloads { ns, dir, server_token } = workloads(cluster, "proxy-in", node, node, &agent).await?;

    // The server pod: capture rules, app, proxy.
    let server = NetnsPod::create("proxy-server")?;
    let peer = NetnsPod::create("proxy-client")?;
    server.capture().await?;
    let _app = server.spawn_echo(1000, "0.0.0.0:8080").await?;
    let _local_only = server.spawn_echo(1000, "127.0.0.1:9090").await?;
    // STRICT for the namespace, as an operator sets it: before the proxy
    // starts, so that its first policy already says so.
    cluster
        .kubectl(["apply", "-n", &ns, "-f", "-"])
        .stdin(STRICT_NAMESPACE)
        .run()
        .await?;
    let log = dir.join("proxy.log");
    let _proxy = start_proxy(&server, &agent, &server_token, &log).await?;
    let target = format!("{}:8080", server.ip());

    // openssl with the client's SVID: handshake, and the app answers,
    // seeing the connection come from 127.0.0.6 to the pod's own IP.
    let out = s_client(&peer, &target, &dir, true).await?;
    assert!(
        out.contains("1000 127.0.0.6:") && out.contains(&format!("{target} hello-through-mtls")),
        "openssl with an SVID: {out}\n--- proxy log ---\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Without a client certificate: refused, nothing from the app.
    let out = s_client(&peer, &target, &dir, false).await?;
    assert!(
        !out.contains("hello-through-mtls"),
        "no client certificate must be refused: {out}"
    );
    // Plaintext in STRICT: refused.
    let plain = peer
        .command(testapp())
        .args(["connect", &target, "plain"])
        .output()
        .await?;
    assert!(
        !plain.status.success(),
        "plaintext in STRICT: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    // An app listening on localhost only is not exposed through the proxy.
    let out = s_client(&peer, &format!("{}:9090", server.ip()), &dir, true).await?;
    assert!(!out.contains("hello-through-mtls"), "localhost-only app exposed: {out}");

    // Kubelet's rewritten probes, from the node, work under STRICT mTLS and
    // follow the app: 8080 listens, 8181 does not.
    let base = format!("http://{}:15020/app-health/app", server.ip());
    assert_eq!(http_get(&format!("{base}/livez")).await?.0, 200);
    assert_eq!(http_get(&format!("{base}/readyz")).await?.0, 503);
    assert_eq!(http_get(&format!("{base}/startupz")).await?.0, 404, "no such probe");
    // The postStart hook of regular sidecars returns once the proxy is ready.
    let wait = server
        .command(workspace_bin("mizzen-proxy"))
        .args(["wait", "--timeout-seconds=10"])
        .output()
        .await?;
    assert!(wait.status.success(), "wait: {}", String::from_utf8_lossy(&wait.stderr));

    // The proxy saw the client's SPIFFE ID.
    let client_id = format!("spiffe://cluster.local/ns/{ns}/sa/client");
    let (_, text) = http_get(&format!("http://{}:15020/metrics", server.ip())).await?;
    assert!(
        metric(
            &text,
            &format!("mizzen_proxy_connections_total{{direction=\"inbound\",tls=\"mtls\",peer=\"{client_id}\"}}")
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"plaintext_in_strict\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "mizzen_proxy_handshake_failures_total{direction=\"inbound\",reason=\"no_client_cert\"}"
        ) >= 1.0,
        "the handshake without a client certificate is counted by reason: {text}"
    );
    assert!(
        std::fs::read_to_string(&log)?.contains(&client_id),
        "the peer identity is logged"
    );

    // Without the PeerAuthentication, PERMISSIVE (the default), on the
    // running proxy: plaintext is forwarded too.
    cluster
        .kubectl(["delete", "-n", &ns, "peerauthentication", "default"])
        .run()
        .await?;
    eventually(TIMEOUT, "plaintext to be accepted in PERMISSIVE", || {
        let cmd = peer.command(testapp()).args(["connect", &target, "plain"]).output();
        async move {
            let out = cmd.await?;
            Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("127.0.0.6:"))
        }
    })
    .await?;
    let out = s_client(&peer, &target, &dir, true).await?;
    assert!(
        out.contains("hello-through-mtls"),
        "mTLS still works in PERMISSIVE: {out}"
    );

    // The app's own TLS (a ClientHello without ALPN mizzen) is passed through
    // untouched in PERMISSIVE, counted with plaintext, not as a failed handshake.
    let plain = |text: &str| {
        metric(
            text,
            "mizzen_proxy_connections_total{direction=\"inbound\",tls=\"plaintext\",peer=\"\"}",
        )
    };
    let handshake_refused = |text: &str| {
        metric(
            text,
            "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"handshake\"}",
        )
    };
    let metrics_url = format!("http://{}:15020/metrics", server.ip());
    let text = http_get(&metrics_url).await?.1;
    let (before, refused_before) = (plain(&text), handshake_refused(&text));
    let _ = peer
        .command("timeout")
        .args(["2", "openssl", "s_client", "-connect", &target, "-tls1_3"])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    eventually(TIMEOUT, "the app's TLS to be passed through", || {
        let url = metrics_url.clone();
        async move { Ok(plain(&http_get(&url).await?.1) > before) }
    })
    .await?;
    let text = http_get(&metrics_url).await?.1;
    assert_eq!(handshake_refused(&text), refused_before, "{text}");
    Ok(())
}

/// Reads the serial of the certificate the server at `addr` presents.
async fn server_serial(pod: &NetnsPod, addr: &str, dir: &Path) -> anyhow::Result<String> {
    let script = format!(
        "openssl s_client -connect {addr} -tls1_3 -alpn mizzen -CAfile {d}/root.pem -cert {d}/chain.pem \
         -cert_chain {d}/chain.pem -key {d}/key.pem </dev/null 2>/dev/null | openssl x509 -noout -serial",
        d = dir.display()
    );
    let out = pod
        .command("timeout")
        .args(["5", "bash", "-c", &script])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(text.starts_with("serial="), "no server certificate from {addr}: {text}");
    Ok(text)
}

/// With certificates lasting seconds, the proxy swaps in rotated ones for
/// new connections while a connection opened before keeps working.
#[tokio::test]
async fn rotation_keeps_open_connections() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    let (short_node, long_node) = ("rotate-node", "steady-node");
    for n in [short_node, long_node] {
        cluster.register_node(&client, n).await?;
    }
    let ca = Ca::start(cluster, None, &[]).await?;
    let short = Agent::start(
        cluster,
        short_node,
        ca.grpc_port,
        &["--cert-ttl=8s", "--rotation-jitter=0"],
    )
    .await?;
    let steady = Agent::start(cluster, long_node, ca.grpc_port, &[]).await?;

    let Workloads { dir, server_token, .. } = workloads(cluster, "rotate", short_node, long_node, &steady).await?;

    let server = NetnsPod::create("rotate-server")?;
    let peer = NetnsPod::create("rotate-client")?;
    server.capture().await?;
    let _app = server.spawn_echo(1000, "0.0.0.0:8080").await?;
    let log = dir.join("proxy.log");
    let mut proxy = start_proxy(&server, &short, &server_token, &log).await?;
    let target = format!("{}:8080", server.ip());

    // One long-lived mTLS connection, used throughout.
    let mut long = peer
        .command("openssl")
        .args(["s_client", "-connect", &target, "-tls1_3", "-alpn", "mizzen", "-quiet"])
        .arg("-CAfile")
        .arg(dir.join("root.pem"))
        .arg("-cert")
        .arg(dir.join("chain.pem"))
        .arg("-cert_chain")
        .arg(dir.join("chain.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut input = long.stdin.take().context("stdin")?;
    let mut replies = BufReader::new(long.stdout.take().context("stdout")?).lines();

    let mut serials = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(14) {
        sent += 1;
        input.write_all(format!("ping-{sent}\n").as_bytes()).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next_line())
            .await
            .with_context(|| format!("no reply to ping-{sent} on the open connection"))??
            .context("the open connection was closed")?;
        assert!(reply.ends_with(&format!(" ping-{sent}")), "{reply}");
        serials.insert(server_serial(&peer, &target, &dir).await?);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(sent >= 10, "traffic ran throughout: {sent}");
    assert!(
        serials.len() >= 2,
        "new connections saw a rotated certificate within 14 s of 8 s certificates: {serials:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // SIGTERM: not ready, no new connections, the open one keeps working,
    // and the proxy exits once it closes (well before the 60 s drain limit).
    let pid = proxy.id().context("proxy pid")?.to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    assert!(kill.success());
    let ready_url = format!("http://{}:15021/healthz/ready", server.ip());
    eventually(TIMEOUT, "the draining proxy to report not ready", || {
        let url = ready_url.clone();
        async move { Ok(http_get(&url).await.map(|(c, _)| c == 503).unwrap_or(false)) }
    })
    .await?;
    let fresh = peer
        .command(testapp())
        .args(["connect", &target, "late"])
        .output()
        .await?;
    assert!(!fresh.status.success(), "no new connections while draining");
    sent += 1;
    input.write_all(format!("ping-{sent}\n").as_bytes()).await?;
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next_line())
        .await
        .context("the open connection stopped answering during the drain")??
        .context("the open connection was closed during the drain")?;
    assert!(reply.ends_with(&format!(" ping-{sent}")), "{reply}");
    let _ = long.kill().await;
    let exited = tokio::time::timeout(Duration::from_secs(15), proxy.wait())
        .await
        .context("the proxy did not exit after its last connection closed")??;
    assert!(exited.success(), "clean exit after draining: {exited}");
    Ok(())
}

/// IPv6: a dual-stack pod's capture rules cover IPv6 too; the proxy
/// terminates mTLS from `openssl s_client` over IPv6 and reaches the app
/// from ::6; the app's own outbound IPv6 connections leave through the
/// proxy's IPv6 outbound listener.
#[tokio::test]
async fn ipv6_inbound_mtls_and_outbound() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let node = "proxy-v6-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[]).await?;
    let Workloads { dir, server_token, .. } = workloads(cluster, "proxy-v6", node, node, &agent).await?;

    let server = NetnsPod::create_dual_stack("proxy-v6-server")?;
    let peer = NetnsPod::create_dual_stack("proxy-v6-peer")?;
    let server6 = server.ip6().context("server IPv6")?;
    let peer6 = peer.ip6().context("peer IPv6")?;
    server.capture().await?;
    let rules = server.command("ip6tables-save").args(["-t", "nat"]).output().await?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("MIZZEN_INBOUND") && rules.contains("::6/128"),
        "IPv6 capture rules: {rules}"
    );
    // The app listens on both families ([::] accepts IPv4 too).
    let _app = server.spawn_echo(1000, "[::]:8080").await?;
    let log = dir.join("proxy-v6.log");
    let _proxy = start_proxy(&server, &agent, &server_token, &log).await?;

    let target = format!("[{server6}]:8080");
    let out = s_client(&peer, &target, &dir, true).await?;
    assert!(
        out.contains("1000 [::6]:") && out.contains("hello-through-mtls"),
        "mTLS over IPv6, app reached from ::6: {out}\n--- proxy log ---\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let out = s_client(&peer, &target, &dir, false).await?;
    assert!(
        !out.contains("hello-through-mtls"),
        "no client certificate, refused: {out}"
    );

    // The app's outbound IPv6 connection goes through the proxy (which the
    // peer sees as the source: the proxy's own connection, as UID 1337) to
    // an address the mesh does not know: plaintext passthrough.
    let _outside = peer.spawn_echo(1000, "[::]:9000").await?;
    let out = server
        .command_as(1000, 1000, testapp())
        .args(["connect", &format!("[{peer6}]:9000"), "out-over-v6"])
        .output()
        .await?;
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && reply.contains(&format!("[{server6}]:")) && reply.contains("out-over-v6"),
        "outbound over IPv6: {reply}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, text) = http_get(&format!("http://{}:15020/metrics", server.ip())).await?;
    assert!(
        metric(
            &text,
            "mizzen_proxy_connections_total{direction=\"outbound\",tls=\"plaintext\",peer=\"\"}"
        ) >= 1.0,
        "the outbound IPv6 connection went through the proxy: {text}"
    );
    Ok(())
}

/// Issue #10, item 4: two clusters that share a root (a plugged-in CA) but
/// not a trust domain are two identity spaces. A certificate signed by this
/// mesh's own CA for `spiffe://other.example/...` chains to the bundle and
/// is still refused: only our trust domain's identities get in.
#[tokio::test]
async fn a_peer_of_another_trust_domain_is_refused_under_our_own_root() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let node = "proxy-td-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[]).await?;
    let Workloads { ns, dir, server_token } = workloads(cluster, "proxy-td", node, node, &agent).await?;
    let server = NetnsPod::create("td-server")?;
    let peer = NetnsPod::create("td-client")?;
    server.capture().await?;
    let _app = server.spawn_echo(1000, "0.0.0.0:8080").await?;
    let log = dir.join("proxy-td.log");
    let _proxy = start_proxy(&server, &agent, &server_token, &log).await?;
    let target = format!("{}:8080", server.ip());
    let out = s_client(&peer, &target, &dir, true).await?;
    assert!(
        out.contains("hello-through-mtls"),
        "our own trust domain gets in: {out}"
    );

    // The mesh CA's own signing key, as a second cluster sharing it would hold.
    let client = cluster.client().await?;
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign)?;
    for key in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        let bytes = mizzen_tests::k8s::secret_value(&client, "mizzen-system", "mizzen-ca", key, TIMEOUT).await?;
        std::fs::write(foreign.join(key), bytes)?;
    }
    std::fs::copy(dir.join("root.pem"), foreign.join("root.pem"))?;
    let script = format!(
        r#"set -e
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out leaf.csr -subj "/O=other"
printf 'subjectAltName=critical,URI:spiffe://other.example/ns/{ns}/sa/client\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment,keyAgreement\nextendedKeyUsage=clientAuth,serverAuth\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 1 -extfile leaf.ext -out leaf.pem
cat leaf.pem cert-chain.pem > chain.pem
openssl verify -CAfile root.pem -untrusted cert-chain.pem leaf.pem
"#
    );
    mizzen_tests::bash_in(&foreign, &script).await.context("openssl")?;

    let out = s_client(&peer, &target, &foreign, true).await?;
    assert!(
        !out.contains("hello-through-mtls"),
        "a foreign trust domain must not reach the app: {out}"
    );
    let url = format!("http://{}:15020/metrics", server.ip());
    eventually(TIMEOUT, "the refusal to be counted", || {
        let url = url.clone();
        async move {
            let (_, text) = http_get(&url).await?;
            Ok(metric(
                &text,
                "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"foreign_trust_domain\"}",
            ) == 1.0)
        }
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    Ok(())
}

/// A ServiceAccount whose RBAC is the agent's ClusterRole (as
/// `manifests/agent.yaml` has it) without the policy rule, and the agent's
/// Role in mizzen-system: an agent upgraded before its ClusterRole.
/// Returns its name.
async fn agent_account_without_policy_rbac(cluster: &Cluster) -> anyhow::Result<String> {
    use serde::Deserialize;
    let account = format!("agent-before-policy-{}", std::process::id());
    let manifest = std::fs::read_to_string(mizzen_tests::cluster::repo_root().join("manifests/agent.yaml"))?;
    let mut role = serde_yaml::Deserializer::from_str(&manifest)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .find(|d| d["kind"] == "ClusterRole")
        .context("the agent's ClusterRole")?;
    let rules = role["rules"].as_array_mut().context("rules")?;
    let before = rules.len();
    rules.retain(|r| !r["apiGroups"].to_string().contains("security.mizzen.dev"));
    anyhow::ensure!(rules.len() == before - 1, "the policy rule was not found in {role}");
    role["metadata"] = serde_json::json!({"name": account});
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": account, "namespace": SYSTEM}]);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": SYSTEM}},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": account},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": account, "namespace": SYSTEM},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mizzen-agent"},
         "subjects": subject},
    ]});
    cluster
        .kubectl(["apply", "-f", "-"])
        .stdin(list.to_string())
        .run()
        .await?;
    Ok(account)
}

#[tokio::test]
async fn a_proxy_without_its_policy_fails_closed_until_the_policy_arrives() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let node = "no-policy-node";
    install_manifests(cluster).await?;
    mizzen_tests::cluster::register_node(&cluster.client().await?, node).await?;
    let account = agent_account_without_policy_rbac(cluster).await?;
    let ca = Ca::start(cluster, None, &[]).await?;
    // Discovery and certificates work; the policy watches are forbidden.
    let agent = Agent::start_as(cluster, node, ca.grpc_port, &[], &account, None).await?;
    let Workloads { dir, server_token, .. } = workloads(cluster, "no-policy", node, node, &agent).await?;
    let server = NetnsPod::create("nopol-server")?;
    let peer = NetnsPod::create("nopol-client")?;
    server.capture().await?;
    let _app = server.spawn_echo(1000, "0.0.0.0:8080").await?;
    let log = dir.join("proxy.log");
    let _proxy = spawn_proxy(&server, &agent, &server_token, &log)?;
    let target = format!("{}:8080", server.ip());
    let metrics_url = format!("http://{}:15020/metrics", server.ip());
    let ready_url = format!("http://{}:15021/healthz/ready", server.ip());
    let connect = || peer.command(testapp()).args(["connect", &target, "plain"]).output();

    // The proxy has its certificate and captures inbound traffic, but no
    // policy: plaintext, which PERMISSIVE (the default) would let in, is
    // refused, and the proxy is not ready.
    let text = mizzen_tests::eventually_some(TIMEOUT, "the proxy's certificate", || async {
        let text = http_get(&metrics_url).await.map(|(_, t)| t).unwrap_or_default();
        Ok((metric(&text, "mizzen_proxy_certificate_updates_total") >= 1.0).then_some(text))
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let refused = |t: &str| {
        metric(
            t,
            "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"no_policy_yet\"}",
        )
    };
    let before = refused(&text);
    let out = connect().await?;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("127.0.0.6:"),
        "the app was reached without a policy: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = http_get(&metrics_url).await?.1;
    assert!(refused(&text) > before, "refused for want of a policy: {text}");
    assert_ne!(http_get(&ready_url).await?.0, 200, "ready without a policy");

    // The RBAC the manifests grant: the agent's watches recover, the policy
    // arrives, and the same connection is let in.
    cluster
        .kubectl([
            "create".to_owned(),
            "clusterrolebinding".to_owned(),
            format!("{account}-upgraded"),
            "--clusterrole=mizzen-agent".to_owned(),
            format!("--serviceaccount={SYSTEM}:{account}"),
        ])
        .run()
        .await?;
    eventually(TIMEOUT, "the proxy to be ready once its policy arrives", || {
        let url = ready_url.clone();
        async move { Ok(http_get(&url).await.map(|(c, _)| c == 200).unwrap_or(false)) }
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let out = connect().await?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("127.0.0.6:"),
        "plaintext in PERMISSIVE once the policy is there: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[tokio::test]
async fn a_permissive_workload_with_one_strict_port_mixes_both() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let node = "port-mtls-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[]).await?;
    let Workloads { ns, dir, server_token } = workloads(cluster, "port-mtls", node, node, &agent).await?;
    cluster
        .kubectl(["label", "pod", "-n", &ns, "server", "app=web"])
        .run()
        .await?;
    cluster
        .kubectl(["apply", "-n", &ns, "-f", "-"])
        .stdin(
            "apiVersion: security.mizzen.dev/v1
kind: PeerAuthentication
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    \"8080\": {mode: STRICT}
",
        )
        .run()
        .await?;
    let server = NetnsPod::create("portmtls-server")?;
    let peer = NetnsPod::create("portmtls-client")?;
    server.capture().await?;
    let _strict_app = server.spawn_echo(1000, "0.0.0.0:8080").await?;
    let _permissive_app = server.spawn_echo(1000, "0.0.0.0:9090").await?;
    let log = dir.join("proxy.log");
    let _proxy = start_proxy(&server, &agent, &server_token, &log).await?;
    let (strict, permissive) = (format!("{}:8080", server.ip()), format!("{}:9090", server.ip()));
    let plaintext_reaches = |target: String| {
        let cmd = peer.command(testapp()).args(["connect", &target, "plain"]).output();
        async move {
            let out = cmd.await?;
            Ok::<_, anyhow::Error>(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("127.0.0.6:"))
        }
    };

    // The policy may reach the proxy a moment after it is ready.
    eventually(TIMEOUT, "plaintext to the STRICT port to be refused", || {
        let reaches = plaintext_reaches(strict.clone());
        async move { Ok(!reaches.await?) }
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    assert!(
        plaintext_reaches(permissive.clone()).await?,
        "plaintext to the workload's other port (PERMISSIVE) is let in"
    );
    let out = s_client(&peer, &strict, &dir, true).await?;
    assert!(out.contains("hello-through-mtls"), "mTLS to the STRICT port: {out}");
    let (_, text) = http_get(&format!("http://{}:15020/metrics", server.ip())).await?;
    assert!(
        metric(
            &text,
            "mizzen_proxy_refused_total{direction=\"inbound\",reason=\"plaintext_in_strict\"}"
        ) >= 1.0,
        "{text}"
    );
    Ok(())
}
