//! Policy status: the CA writes an `Accepted` condition into every
//! AuthorizationPolicy and PeerAuthentication, and `kubectl get` shows it
//! in its columns. Policies are applied and read with the real kubectl.

use std::time::Duration;

use mizzen_tests::daemon::metric;
use mizzen_tests::mesh::{Ca, install_manifests};
use mizzen_tests::{Cluster, eventually_some};
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The binary's one CA: the only writer of policy status here, so its
/// metrics count every write.
async fn ca() -> anyhow::Result<&'static Ca> {
    static SHARED: OnceCell<Ca> = OnceCell::const_new();
    SHARED
        .get_or_try_init(|| async {
            let cluster = Cluster::get();
            install_manifests(cluster).await?;
            let ca = Ca::start(cluster, None, &[]).await?;
            if let Some(pid) = ca.daemon.pid() {
                mizzen_tests::reaper::at_exit(&format!("kill {pid} 2>/dev/null"));
            }
            Ok(ca)
        })
        .await
}

async fn namespace(prefix: &str) -> anyhow::Result<String> {
    let cluster = Cluster::get();
    cluster.namespace(&cluster.client().await?, prefix, &[]).await
}

/// `kubectl apply` of `yaml` in `ns`.
async fn apply(ns: &str, yaml: &str) -> anyhow::Result<()> {
    Cluster::get().apply(ns, yaml).await
}

/// The `kubectl get <resource> -o wide` row of `name`, split into columns,
/// once its Accepted column reads `accepted`.
async fn row_once(resource: &str, ns: &str, name: &str, accepted: &str) -> anyhow::Result<Vec<String>> {
    eventually_some(
        TIMEOUT,
        &format!("{resource} {ns}/{name} Accepted={accepted}"),
        || async {
            let out = Cluster::get()
                .kubectl(["get", resource, "-n", ns, name, "-o", "wide"])
                .run()
                .await?;
            let mut lines = out.lines();
            let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
            let row: Vec<String> = lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect();
            let at = |col: &str| header.iter().position(|h| *h == col).and_then(|i| row.get(i));
            Ok((at("ACCEPTED").map(String::as_str) == Some(accepted))
                .then(|| header.iter().zip(&row).map(|(h, v)| format!("{h}={v}")).collect()))
        },
    )
    .await
}

/// `{.status.conditions[?(@.type=="Accepted")].<field>}` of a policy.
async fn condition(resource: &str, ns: &str, name: &str, field: &str) -> anyhow::Result<String> {
    Cluster::get()
        .kubectl([
            "get",
            resource,
            "-n",
            ns,
            name,
            "-o",
            &format!("jsonpath={{.status.conditions[?(@.type==\"Accepted\")].{field}}}"),
        ])
        .run()
        .await
}

fn allow_from(ns: &str, name: &str, ip_block: &str) -> String {
    format!(
        "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{ipBlocks: [\"{ip_block}\"]}}
"
    )
}

#[tokio::test]
async fn an_enforceable_policy_shows_accepted_in_kubectl_get() -> anyhow::Result<()> {
    let ca = ca().await?;
    let ns = namespace("status-ok").await?;
    apply(&ns, &allow_from(&ns, "office", "10.0.0.0/8")).await?;
    let row = row_once("mzap", &ns, "office", "True").await?;
    assert!(row.contains(&"ACTION=ALLOW".to_owned()), "{row:?}");
    assert!(row.contains(&"REASON=Accepted".to_owned()), "{row:?}");
    assert_eq!(condition("mzap", &ns, "office", "observedGeneration").await?, "1");
    let text = ca.daemon.metrics().await?;
    let written = metric(
        &text,
        "mizzen_ca_policy_status_writes_total{kind=\"AuthorizationPolicy\",verdict=\"accepted\"}",
    );
    assert!(written >= 1.0, "no accepted write counted:\n{text}");
    Ok(())
}

#[tokio::test]
async fn a_policy_that_cannot_be_enforced_as_written_says_why() -> anyhow::Result<()> {
    ca().await?;
    let ns = namespace("status-bad").await?;
    // Admission cannot parse addresses; the compiler can, and refuses it.
    apply(&ns, &allow_from(&ns, "typo", "10.0.0.300")).await?;
    let row = row_once("mzap", &ns, "typo", "False").await?;
    assert!(row.contains(&"REASON=BadIpBlock".to_owned()), "{row:?}");
    let message = condition("mzap", &ns, "typo", "message").await?;
    assert!(
        message.contains("ipBlocks") && message.contains("10.0.0.300"),
        "the message names the field and value: {message}"
    );
    assert!(
        message.contains("allows nothing"),
        "and what is enforced instead: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn fixing_a_policy_accepts_it_at_its_new_generation() -> anyhow::Result<()> {
    ca().await?;
    let ns = namespace("status-fix").await?;
    apply(&ns, &allow_from(&ns, "fixme", "not-an-address")).await?;
    row_once("mzap", &ns, "fixme", "False").await?;
    let rejected_at = condition("mzap", &ns, "fixme", "lastTransitionTime").await?;
    apply(&ns, &allow_from(&ns, "fixme", "192.168.0.0/16")).await?;
    let row = row_once("mzap", &ns, "fixme", "True").await?;
    assert!(row.contains(&"REASON=Accepted".to_owned()), "{row:?}");
    assert_eq!(condition("mzap", &ns, "fixme", "observedGeneration").await?, "2");
    let accepted_at = condition("mzap", &ns, "fixme", "lastTransitionTime").await?;
    assert!(
        !accepted_at.is_empty() && accepted_at >= rejected_at,
        "transition time moves on: {rejected_at} then {accepted_at}"
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_authentication_with_a_port_that_is_not_a_number_is_not_accepted() -> anyhow::Result<()> {
    let ca = ca().await?;
    let ns = namespace("status-pa").await?;
    apply(
        &ns,
        &format!(
            "apiVersion: security.mizzen.dev/v1
kind: PeerAuthentication
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls:
    http: {{mode: STRICT}}
"
        ),
    )
    .await?;
    let row = row_once("mzpa", &ns, "web", "False").await?;
    assert!(row.contains(&"MODE=PERMISSIVE".to_owned()), "{row:?}");
    assert!(row.contains(&"REASON=BadPort".to_owned()), "{row:?}");
    let text = ca.daemon.metrics().await?;
    let written = metric(
        &text,
        "mizzen_ca_policy_status_writes_total{kind=\"PeerAuthentication\",verdict=\"rejected\"}",
    );
    assert!(written >= 1.0, "no rejected write counted:\n{text}");
    Ok(())
}

#[tokio::test]
async fn a_virtual_service_whose_weights_do_not_add_up_is_not_accepted_and_says_why() -> anyhow::Result<()> {
    ca().await?;
    let ns = namespace("status-route").await?;
    let yaml = |v2: u32| {
        format!(
            "apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {{name: split, namespace: {ns}}}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {{host: web, subset: v1}}
      weight: 90
    - destination: {{host: web, subset: v2}}
      weight: {v2}
"
        )
    };
    apply(&ns, &yaml(20)).await?;
    let row = row_once("mzvs", &ns, "split", "False").await?;
    assert!(row.contains(&"REASON=Weights".to_owned()), "{row:?}");
    let message = condition("mzvs", &ns, "split", "message").await?;
    assert!(
        message.contains("http[0].route") && message.contains("110"),
        "{message}"
    );
    // Fixed, it is accepted.
    apply(&ns, &yaml(10)).await?;
    row_once("mzvs", &ns, "split", "True").await?;
    Ok(())
}
