//! Authorization policy end to end, rolled out with kubectl: injected pods
//! on a test node (the HTTP mesh of `mizzen_tests::http_mesh`), policies
//! applied and deleted with the real kubectl, requests made with curl as
//! the client app, decisions read from what curl got and from the server
//! proxy's metrics.

use std::time::Duration;

use anyhow::Context;
use mizzen_tests::daemon::{metric_where, proxy_metric};
use mizzen_tests::http_mesh::{APP_UID, HttpMesh, TIMEOUT};
use mizzen_tests::k8s::service_account;
use mizzen_tests::node::{create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

/// How long a policy change may take to reach the proxies here (the
/// target is well under a second; the machine is shared).
const PROPAGATION: Duration = Duration::from_secs(20);

/// `kubectl apply` of `yaml` in `ns`.
async fn apply(ns: &str, yaml: &str) -> anyhow::Result<()> {
    Cluster::get().apply(ns, yaml).await
}

/// curl from `pod`'s app, without failing on an HTTP error: the status
/// code and the body.
async fn status(m: &HttpMesh, pod: &str, args: &[&str]) -> anyhow::Result<(u16, String)> {
    let out = m
        .mesh
        .node
        .command_as(&m.ns, pod, APP_UID, "curl")?
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    Ok((code.trim().parse().context("status code")?, body.to_owned()))
}

/// Waits until curl from `pod` with `args` gets `code`; returns the body.
async fn until_status(m: &HttpMesh, pod: &str, args: &[&str], code: u16) -> anyhow::Result<String> {
    eventually_some(PROPAGATION, &format!("{args:?} from {pod} to get {code}"), || async {
        let (got, body) = status(m, pod, args).await?;
        Ok((got == code).then_some(body))
    })
    .await
}

/// A second client, `intruder`, with a ServiceAccount of its own.
async fn intruder(m: &HttpMesh) -> anyhow::Result<()> {
    let client = Cluster::get().client().await?;
    service_account(&client, &m.ns, "intruder").await?;
    let mut pod = mizzen_tests::mesh::echo_pod("intruder", &m.mesh.node.name);
    pod["spec"]["serviceAccountName"] = serde_json::json!("intruder");
    create_pod(&client, &m.ns, pod).await?;
    wait_ready(&client, &m.ns, "intruder", TIMEOUT).await?;
    Ok(())
}

#[tokio::test]
async fn an_allow_by_principal_lets_one_client_in_and_keeps_another_out() -> anyhow::Result<()> {
    let m = HttpMesh::start("policy-allow", true).await?;
    intruder(&m).await?;
    let url = m.url("/");
    until_status(&m, "intruder", &[&url], 200).await?;
    apply(
        &m.ns,
        &format!(
            "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {{name: only-client}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/default]}}}}]}}]
",
            ns = m.ns
        ),
    )
    .await?;
    let body = until_status(&m, "intruder", &[&url], 403).await?;
    assert_eq!(body, "RBAC: access denied", "Envoy's body, as Istio users expect");
    let (code, body) = status(&m, "client", &[&url]).await?;
    assert_eq!(code, 200, "the allowed principal still gets in: {body}");
    // Counted on the replica that refused it: no ALLOW policy matched.
    let denied = eventually_some(Duration::from_secs(10), "the denial to be counted", || async {
        let mut sum = 0.0;
        for ip in &m.web_ips {
            let (_, text) = proxy_metric(ip, "mizzen_proxy_authz_decisions_total").await?;
            sum += metric_where(
                &text,
                "mizzen_proxy_authz_decisions_total{policy=\"none\",action=\"ALLOW\",result=\"denied\"}",
            );
        }
        Ok((sum >= 1.0).then_some(sum))
    })
    .await?;
    assert!(denied >= 1.0);
    Ok(())
}

#[tokio::test]
async fn a_deny_on_post_admin_refuses_it_however_spelt_and_nothing_else() -> anyhow::Result<()> {
    let m = HttpMesh::start("policy-deny", true).await?;
    apply(
        &m.ns,
        "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-writes}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {methods: [POST], paths: [\"/admin*\"]}}]}]
",
    )
    .await?;
    let post = |path: &str| vec!["--path-as-is".to_string(), "-X".into(), "POST".into(), m.url(path)];
    let admin = post("/admin/reset");
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    until_status(&m, "client", &admin, 403).await?;
    // The same path spelt as the app would still read it as /admin...
    for path in ["/./admin/reset", "//admin/reset", "/%61dmin/reset", "/public/../admin"] {
        let args = post(path);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = status(&m, "client", &args).await?;
        assert_eq!(code, 403, "POST {path}: {body}");
    }
    // ...but not what the app reads as another path, nor another method.
    for (method, path) in [("POST", "/ADMIN"), ("POST", "/"), ("GET", "/admin/reset")] {
        let url = m.url(path);
        let (code, body) = status(&m, "client", &["--path-as-is", "-X", method, &url]).await?;
        assert_eq!(code, 200, "{method} {path}: {body}");
    }
    // An encoded separator is refused outright while a policy applies: the
    // app might decode it into a path the policy never saw.
    let (code, _) = status(
        &m,
        "client",
        &["--path-as-is", "-X", "GET", &m.url("/public%2F..%2Fadmin")],
    )
    .await?;
    assert_eq!(code, 403);
    Ok(())
}

#[tokio::test]
async fn deleting_a_policy_restores_access() -> anyhow::Result<()> {
    let m = HttpMesh::start("policy-delete", true).await?;
    apply(
        &m.ns,
        "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec: {action: DENY, rules: [{}]}
",
    )
    .await?;
    let url = m.url("/");
    until_status(&m, "client", &[&url], 403).await?;
    Cluster::get()
        .kubectl(["delete", "-n", &m.ns, "authorizationpolicy", "deny-all"])
        .run()
        .await?;
    until_status(&m, "client", &[&url], 200).await?;
    Ok(())
}

#[tokio::test]
async fn an_open_tcp_connection_that_a_new_deny_covers_is_closed() -> anyhow::Result<()> {
    let m = HttpMesh::start("policy-revoke", true).await?;
    let server = &m.web_ips[0];
    let open_inbound = |text: &str| metric_where(text, "mizzen_proxy_connections_open{direction=\"inbound\"}");
    // The client proxy's pooled HTTP/2 connection may be open already.
    let before = open_inbound(&proxy_metric(server, "mizzen_proxy_connections_open").await?.1);
    // A TCP connection to a replica's own address: relayed, not HTTP.
    let cmd = m
        .mesh
        .node
        .command_as(&m.ns, "client", APP_UID, workspace_bin("mizzen-testapp"))?
        .args(["hold", &format!("{}:8080", m.web_ips[0]), "1", "60"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let held = eventually_some(TIMEOUT, "the held connection to reach the server proxy", || async {
        let (_, text) = proxy_metric(server, "mizzen_proxy_connections_open").await?;
        let open = open_inbound(&text);
        Ok((open > before).then_some(open))
    })
    .await?;
    apply(
        &m.ns,
        &format!(
            "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {{name: not-the-client}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/default]}}}}]}}]
",
            ns = m.ns
        ),
    )
    .await?;
    // Counted against the open connections once the held one was among
    // them: the client proxy's pooled HTTP/2 connection may have opened or
    // closed since `before`, and any connection the DENY covers is closed.
    let closed = eventually_some(PROPAGATION, "the server proxy to close the held connection", || async {
        let (_, text) = proxy_metric(server, "mizzen_proxy_").await?;
        let revoked = metric_where(&text, "mizzen_proxy_authz_revoked_total{kind=\"connection\"}");
        Ok((revoked >= 1.0 && open_inbound(&text) < held).then_some(()))
    })
    .await;
    if let Err(e) = closed {
        let (_, text) = proxy_metric(server, "mizzen_proxy_").await?;
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("connections_open") || l.contains("revoked") || l.contains("denied"))
            .collect();
        anyhow::bail!(
            "{e} (open before {before}, with the held one {held}):\n{}",
            lines.join("\n")
        );
    }
    drop(cmd);
    Ok(())
}
