//! Certificates over days, compressed: the shortest token the API server
//! issues and short certificates, through the real agent, CA, injector and
//! test node. In its own test binary because it asks the injector for
//! 600 s tokens, and the webhook configuration names one injector.

use std::time::Duration;

use anyhow::Context;
use mizzen_tests::daemon::{metric_where, proxy_metric};
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::Node;
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

const INJECTED: &[(&str, &str)] = &[("mizzen.dev/inject", "enabled")];

/// `series` of the proxy of the pod at `ip`, once it answers.
async fn proxy_value(ip: std::net::Ipv4Addr, series: &str) -> anyhow::Result<f64> {
    Ok(proxy_metric(ip, series).await?.0)
}

// Issue #10, item 2: the proxy read its token once per stream and the agent
// renewed with the token it was given then, so once the token expired
// (an hour in production) renewals failed and the pod lost mTLS when its
// certificate ran out. With the shortest token the API server issues
// (600 s, rotated by the node at 80 %) and 30 s certificates, both proxies
// still receive certificates issued after the first token expired, and
// traffic between them still flows over mTLS.
#[tokio::test]
async fn certificates_keep_renewing_past_the_tokens_first_expiry() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mesh = MeshNode::start_with(
        cluster,
        "node-renew",
        &workspace_bin("mizzen-proxy"),
        &["--cert-ttl=30s"],
        "tokenExpirationSeconds: 600\n",
    )
    .await?;
    let ns = cluster.namespace(&client, "renew", INJECTED).await?;
    let vip = mesh.server_and_client(&client, &ns, "server").await?;
    let token_file = Node::log(cluster, &ns, "client", "mizzen-proxy")
        .parent()
        .context("pod dir")?
        .join("volumes/mizzen-token/token");
    let first_token = std::fs::read_to_string(&token_file)?;
    let first_expiry = mizzen_api::tokenreview::token_expiry(first_token.trim())
        .context("the projected token has an exp claim")?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let target = format!("{vip}:80");
    mesh.eventually_connects(&ns, "client", &target, "at-the-start").await?;

    let mut ips = Vec::new();
    for name in ["server", "client"] {
        ips.push(mesh.node.pod(&ns, name)?.1);
    }
    // A certificate that expires 30 s after the first token did was issued
    // after it expired, with the token the node rotated in.
    for ip in ips.iter().copied() {
        eventually_some(
            Duration::from_secs(900),
            "a certificate issued after the pod's first token expired",
            || async move {
                let expiry = proxy_value(ip, "mizzen_proxy_certificate_expiry_seconds").await?;
                Ok((expiry >= first_expiry + 30.0).then_some(()))
            },
        )
        .await?;
    }
    assert_ne!(
        std::fs::read_to_string(&token_file)?,
        first_token,
        "the node rotated the token"
    );
    let out = mesh
        .node
        .command_as(&ns, "client", 1000, workspace_bin("mizzen-testapp"))?
        .args(["connect", &target, "after-expiry"])
        .output()
        .await?;
    assert!(out.status.success(), "traffic flows after the token expired: {out:?}");
    let (_, text) = proxy_metric(ips[0], "mizzen_proxy_connections_total").await?;
    let mtls = metric_where(
        &text,
        "mizzen_proxy_connections_total{direction=\"inbound\",tls=\"mtls\"",
    );
    assert!(mtls >= 2.0, "both connections reached the server over mTLS:\n{text}");
    Ok(())
}
