//! What the traffic management tests share: a mesh whose two replicas
//! are versions of one Service, and the client app's requests as curl
//! saw them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::http_mesh::{APP_UID, HttpMesh};
use crate::{Cluster, eventually_some};

/// How long a rule may take to reach the client's proxy.
pub const ROLLOUT: Duration = Duration::from_secs(30);

/// The mesh with `web-a` labelled `version: v1` and `web-b` `v2`, and a
/// DestinationRule naming both subsets.
pub async fn versioned(node: &str) -> anyhow::Result<HttpMesh> {
    let m = HttpMesh::start_with(node, true, |pod| {
        let version = if pod["metadata"]["name"] == "web-a" { "v1" } else { "v2" };
        pod["metadata"]["labels"]["version"] = version.into();
    })
    .await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#,
    )
    .await?;
    Ok(m)
}

pub async fn apply(m: &HttpMesh, yaml: &str) -> anyhow::Result<()> {
    Cluster::get().apply(&m.ns, yaml).await
}

/// One answer as the client app saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// `x-mizzen-response-flags`, empty when absent.
    pub flags: String,
    /// The pod that answered, when the echo app did.
    pub pod: Option<String>,
    /// The test's `x-test-rule` response header: which version of a rule
    /// routed the request, for rules that set it.
    pub rule: Option<String>,
    /// The answer's `Set-Cookie`.
    pub set_cookie: Option<String>,
    /// How long curl took, in seconds.
    pub secs: f64,
}

/// `n` GETs of `path` with `headers`, on one keep-alive connection of the
/// client app, as curl saw them.
pub async fn get(m: &HttpMesh, path: &str, headers: &[&str], n: usize) -> anyhow::Result<Vec<Answer>> {
    let url = m.url(path);
    let mut cmd = m.mesh.node.command_as(&m.ns, "client", APP_UID, "curl")?;
    cmd.args([
        "-sS",
        "--max-time",
        "60",
        "-w",
        "\nanswer %{http_code} %{time_total} rule=%header{x-test-rule} cookie=%header{set-cookie} flags=%header{x-mizzen-response-flags}\n",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.args(std::iter::repeat_n(url.as_str(), n));
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut answers = Vec::with_capacity(n);
    let mut pod = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("pod ") {
            pod = Some(p.to_owned());
        } else if let Some(rest) = line.strip_prefix("answer ") {
            let (head, flags) = rest.split_once(" flags=").context("answer line")?;
            let (head, set_cookie) = head.split_once(" cookie=").context("answer line")?;
            let (head, rule) = head.split_once(" rule=").context("answer line")?;
            let (status, secs) = head.split_once(' ').context("answer line")?;
            answers.push(Answer {
                status: status.parse()?,
                flags: flags.to_owned(),
                pod: pod.take(),
                rule: (!rule.is_empty()).then(|| rule.to_owned()),
                set_cookie: (!set_cookie.is_empty()).then(|| set_cookie.to_owned()),
                secs: secs.parse()?,
            });
        }
    }
    if answers.len() != n {
        bail!("{} answers to {n} requests:\n{text}", answers.len());
    }
    Ok(answers)
}

/// How many answers came from each pod (`-` for the proxy's own).
pub fn by_pod(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.pod.clone().unwrap_or_else(|| "-".into())).or_default() += 1;
    }
    counts
}

/// Waits until `ok` holds of 10 answers to `path` with `headers`: the
/// rule has reached the client's proxy.
pub async fn until(
    m: &HttpMesh,
    path: &str,
    headers: &[&str],
    what: &str,
    ok: impl Fn(&[Answer]) -> bool,
) -> anyhow::Result<Vec<Answer>> {
    eventually_some(ROLLOUT, what, || async {
        let answers = get(m, path, headers, 10).await?;
        Ok(ok(&answers).then_some(answers))
    })
    .await
}

/// `n` GETs of `path` at once, each from its own curl.
pub async fn at_once(m: &HttpMesh, path: &str, n: usize) -> anyhow::Result<Vec<Answer>> {
    let all = futures::future::join_all((0..n).map(|_| get(m, path, &[], 1))).await;
    Ok(all.into_iter().collect::<anyhow::Result<Vec<_>>>()?.concat())
}

pub fn all_from(pod: &str) -> impl Fn(&[Answer]) -> bool + '_ {
    move |answers| answers.iter().all(|a| a.status == 200 && a.pod.as_deref() == Some(pod))
}

/// Whether all answers were routed by the rule that marks them `rule`
/// (which the balancer alone can never fake, unlike a run on one pod).
pub fn all_under(rule: &str) -> impl Fn(&[Answer]) -> bool + '_ {
    move |answers| {
        answers
            .iter()
            .all(|a| a.status == 200 && a.rule.as_deref() == Some(rule))
    }
}

/// Waits until jason's requests all reach web-b and the others' web-a.
pub async fn routed_ab(m: &HttpMesh) -> anyhow::Result<()> {
    eventually_some(ROLLOUT, "jason on v2 and the others on v1", || async {
        let jason = get(m, "/", &["end-user: jason"], 10).await?;
        let others = get(m, "/", &[], 10).await?;
        Ok((all_from("web-b")(&jason) && all_from("web-a")(&others)).then_some(()))
    })
    .await
}

/// Services `web-v1` and `web-v2` selecting each version's pod: the
/// backends of Gateway API routes, which name Services, not subsets.
pub async fn versioned_services(m: &HttpMesh) -> anyhow::Result<()> {
    let client = Cluster::get().client().await?;
    for v in ["v1", "v2"] {
        let spec = serde_json::json!({
            "metadata": {"name": format!("web-{v}")},
            "spec": {"selector": {"app": "web", "version": v},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        });
        crate::k8s::create_service(&client, &m.ns, spec).await?;
    }
    Ok(())
}
