//! The real `mizzen-injector` registered as the real API server's webhook,
//! with the manifests' RBAC and webhook selectors; pods applied with the
//! real kubectl and read back as the API server stored them.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::secret_value;
use mizzen_tests::mesh::{Injector, SYSTEM, ca_bundle_set};
use mizzen_tests::{Cluster, eventually, eventually_some};

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE: &str = "mizzen-proxy:e2e";

fn names(containers: Option<&Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    containers.into_iter().flatten().map(|c| c.name.clone()).collect()
}

/// Asserts that `pod` carries exactly the mesh: init, native proxy first,
/// then the pod's own init containers; volumes; status; app containers kept.
fn assert_injected(pod: &Pod, own_inits: &[&str], apps: &[&str]) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().expect("spec");
    let mut want_inits = vec!["mizzen-init".to_string(), "mizzen-proxy".into()];
    want_inits.extend(own_inits.iter().map(|s| s.to_string()));
    assert_eq!(
        names(spec.init_containers.as_ref()),
        want_inits,
        "{name}: init containers"
    );
    assert_eq!(names(Some(&spec.containers)), apps, "{name}: containers");
    let proxy = &spec.init_containers.as_ref().expect("inits")[1];
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "{name}: native sidecar"
    );
    assert_eq!(
        proxy.image.as_deref(),
        Some(IMAGE),
        "{name}: image from the config file"
    );
    let vols: BTreeSet<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(
        vols.contains("mizzen-agent-socket") && vols.contains("mizzen-token"),
        "{name}: {vols:?}"
    );
    let ann = pod.metadata.annotations.clone().unwrap_or_default();
    assert!(ann.contains_key("mizzen.dev/status"), "{name}: status annotation");
}

fn assert_untouched(pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().expect("spec");
    let all: Vec<String> = names(Some(&spec.containers))
        .into_iter()
        .chain(names(spec.init_containers.as_ref()))
        .collect();
    assert!(
        !all.iter().any(|n| n.starts_with("mizzen-")),
        "{name} was injected: {all:?}"
    );
    assert!(
        !pod.metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .contains_key("mizzen.dev/status"),
        "{name}"
    );
}

#[tokio::test]
async fn labelled_namespace_pods_are_injected_exactly() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let injector = Injector::start(cluster, &format!("proxyImage: {IMAGE}\n")).await?;
    let mwcs = Api::<MutatingWebhookConfiguration>::all(client.clone());

    let ns = cluster.namespace(&client, "demo", &[]).await?;
    cluster
        .kubectl(["label", "namespace", &ns, "mizzen.dev/inject=enabled"])
        .run()
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

    let manifests = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: web, image: web}}]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: once, namespace: {ns}}}
spec:
  template:
    metadata: {{labels: {{app: once}}}}
    spec:
      restartPolicy: Never
      containers: [{{name: task, image: task}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: probed, namespace: {ns}, labels: {{app: probed}}}}
spec:
  initContainers: [{{name: migrate, image: migrate}}]
  containers:
  - name: api
    image: api
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe: {{httpGet: {{path: /ready, port: http}}}}
    livenessProbe: {{tcpSocket: {{port: 8080}}}}
    startupProbe: {{grpc: {{port: 9090}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: host, namespace: {ns}, labels: {{app: host}}}}
spec:
  hostNetwork: true
  containers: [{{name: app, image: app}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: optout, namespace: {ns}, labels: {{app: optout, mizzen.dev/inject: "false"}}}}
spec:
  containers: [{{name: app, image: app}}]
"#
    );
    // The webhook may take a moment to be picked up by the API server.
    eventually(TIMEOUT, "kubectl apply through the webhook", || {
        let kubectl = cluster.kubectl(["apply", "-f", "-"]).stdin(manifests.clone());
        async move { Ok(kubectl.run().await.is_ok()) }
    })
    .await?;

    let by_app = |app: &'static str| {
        let pods = pods.clone();
        async move {
            eventually_some(TIMEOUT, &format!("a pod of app={app}"), || {
                let pods = pods.clone();
                async move {
                    Ok(pods
                        .list(&ListParams::default().labels(&format!("app={app}")))
                        .await?
                        .items
                        .into_iter()
                        .next())
                }
            })
            .await
        }
    };
    let web = by_app("web").await?;
    assert_injected(&web, &[], &["web"]);
    let job = by_app("once").await?;
    assert_injected(&job, &[], &["task"]);
    let probed = by_app("probed").await?;
    assert_injected(&probed, &["migrate"], &["api"]);
    assert_untouched(&by_app("host").await?);
    assert_untouched(&by_app("optout").await?);

    // Probes now go to the proxy, which carries the originals.
    let api = &probed.spec.as_ref().expect("spec").containers[0];
    for (probe, kind) in [
        (&api.readiness_probe, "readyz"),
        (&api.liveness_probe, "livez"),
        (&api.startup_probe, "startupz"),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("rewritten to httpGet")?;
        assert_eq!(http.path.as_deref(), Some(format!("/app-health/api/{kind}").as_str()));
        assert_eq!(
            http.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)
        );
    }
    let proxy = &probed
        .spec
        .as_ref()
        .expect("spec")
        .init_containers
        .as_ref()
        .expect("inits")[1];
    let carried = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MIZZEN_APP_PROBES")
        .and_then(|e| e.value.clone());
    let carried: serde_json::Value = serde_json::from_str(&carried.context("probes env")?)?;
    assert_eq!(carried["/app-health/api/readyz"]["httpGet"]["port"], 8080);
    assert_eq!(carried["/app-health/api/startupz"]["grpc"]["port"], 9090);

    // Re-submitting an injected pod changes nothing.
    let mut again: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "again", "labels": probed.metadata.labels, "annotations": probed.metadata.annotations},
        "spec": probed.spec,
    }))?;
    if let Some(spec) = again.spec.as_mut() {
        spec.node_name = None;
    }
    let stored = pods.create(&PostParams::default(), &again).await?;
    assert_eq!(
        names(stored.spec.as_ref().and_then(|s| s.init_containers.as_ref())),
        names(probed.spec.as_ref().and_then(|s| s.init_containers.as_ref())),
        "no second proxy"
    );
    assert_eq!(
        stored.spec.as_ref().map(|s| &s.containers),
        probed.spec.as_ref().map(|s| &s.containers)
    );

    // A bad annotation is refused, naming it.
    let (status, _, stderr) = cluster
        .kubectl(["apply", "-f", "-"])
        .stdin(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: bad, namespace: {ns}, annotations: {{mizzen.dev/exclude-inbound-ports: \"eighty\"}}}}\nspec: {{containers: [{{name: a, image: a}}]}}\n"
        ))
        .output()
        .await?;
    assert!(!status.success(), "a bad annotation must be refused");
    assert!(stderr.contains("mizzen.dev/exclude-inbound-ports"), "{stderr}");

    // A pod may opt in where its namespace has no label.
    let plain = cluster.namespace(&client, "plain", &[]).await?;
    let opted: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "in", "labels": {"mizzen.dev/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }))?;
    let stored = Api::<Pod>::namespaced(client.clone(), &plain)
        .create(&PostParams::default(), &opted)
        .await?;
    assert_injected(&stored, &[], &["app"]);

    let text = injector.daemon.metrics().await?;
    assert!(
        metric(&text, "mizzen_injector_requests_total{result=\"injected\"}") >= 4.0,
        "{text}"
    );
    assert!(
        metric(&text, "mizzen_injector_requests_total{result=\"denied\"}") >= 1.0,
        "{text}"
    );
    // Someone removing the caBundle is repaired.
    cluster
        .kubectl([
            "patch",
            "mutatingwebhookconfiguration",
            "mizzen-injector",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/webhooks/0/clientConfig/caBundle"}]"#,
        ])
        .run()
        .await?;
    ca_bundle_set(&mwcs, "the caBundle to be restored").await?;
    // Oversized and malformed bodies over HTTPS: refused, server unharmed.
    let ca_pem = secret_value(&client, SYSTEM, "mizzen-injector-ca", "ca-cert.pem", TIMEOUT).await?;
    let ca_file = cluster.dir().join("injector-ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let big = cluster.dir().join("injector-big.json");
    std::fs::write(&big, vec![b' '; 3 * 1024 * 1024])?;
    let curl = |body: String| {
        let ca_file = ca_file.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca_file)
                .args(["-H", "content-type: application/json", "--data-binary", &body])
                .arg(format!("https://127.0.0.1:{}/inject", injector.port))
                .output()
                .await?;
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    assert_eq!(
        curl(format!("@{}", big.display())).await?,
        "413",
        "a body over the limit is refused"
    );
    assert_eq!(
        curl("{not json".into()).await?,
        "400",
        "a body with no request to answer"
    );
    assert_eq!(
        curl(r#"{"request":{"uid":"x","kind":7}}"#.into()).await?,
        "200",
        "answered with a refusal"
    );
    if injector.daemon.log_text().contains("panicked") {
        bail!("the injector panicked:\n{}", injector.daemon.log_text());
    }
    Ok(())
}
