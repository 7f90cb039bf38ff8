//! The mesh as users install it, on a real node: kubelet, containerd, runc,
//! the CNI bridge, kube-proxy and CoreDNS (`scripts/node.sh`), running the
//! images of `scripts/images.sh`. `manifests/install.yaml` is applied
//! unchanged; the sample app of `manifests/examples/` is injected by the
//! webhook running as a pod, its init container writes the capture rules,
//! its proxy gets certificates from the agent's DaemonSet through the
//! hostPath socket, and it calls a Service by name through CoreDNS.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mizzen_tests::cluster::repo_root;
use mizzen_tests::{Cluster, eventually_some};

const SYSTEM: &str = "mizzen-system";
const ROLLOUT: &str = "--timeout=240s";

/// `kubectl ARGS` (blocking, for the shared fixtures): stdout, or the error
/// with stderr.
fn kubectl_sync(c: &Cluster, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(c.kubectl_path())
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(args)
        .output()
        .map_err(|e| format!("run kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn manifest(path: &str) -> String {
    repo_root().join("manifests").join(path).display().to_string()
}

static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
static DEMO: OnceLock<Result<(), String>> = OnceLock::new();

/// The real node with `manifests/install.yaml` applied and rolled out.
fn installed() -> &'static Cluster {
    let c = Cluster::with_real_node();
    let res = INSTALLED.get_or_init(|| {
        kubectl_sync(c, &["apply", "-f", &manifest("install.yaml")])?;
        for what in [
            "deployment/mizzen-ca",
            "daemonset/mizzen-agent",
            "deployment/mizzen-injector",
        ] {
            kubectl_sync(c, &["-n", SYSTEM, "rollout", "status", what, ROLLOUT])?;
        }
        Ok(())
    });
    if let Err(e) = res {
        panic!("install.yaml did not roll out on the real node: {e}");
    }
    c
}

/// [`installed`] with `manifests/examples/demo.yaml` applied and rolled out.
fn demo() -> &'static Cluster {
    let c = installed();
    let res = DEMO.get_or_init(|| {
        kubectl_sync(c, &["apply", "-f", &manifest("examples/demo.yaml")])?;
        for what in ["deployment/echo", "deployment/client"] {
            kubectl_sync(c, &["-n", "demo", "rollout", "status", what, ROLLOUT])?;
        }
        Ok(())
    });
    if let Err(e) = res {
        panic!("the demo app did not roll out on the real node: {e}");
    }
    c
}

/// `kubectl get pods -l SELECTOR -o jsonpath=TEMPLATE` in `ns`.
async fn pods_jsonpath(c: &Cluster, ns: &str, selector: &str, template: &str) -> anyhow::Result<String> {
    c.kubectl(["-n", ns, "get", "pods", "-l", selector, "-o"])
        .arg(format!("jsonpath={template}"))
        .run()
        .await
}

/// `mizzen-testapp ARGS` in the app container of `ns`'s client pod.
fn in_client<'a>(c: &Cluster, ns: &str, args: impl IntoIterator<Item = &'a str>) -> mizzen_tests::Kubectl {
    let mut cmd = c.kubectl(["-n", ns, "exec", "deploy/client", "-c", "app", "--", "mizzen-testapp"]);
    for a in args {
        cmd = cmd.arg(a);
    }
    cmd
}

/// `mizzen-testapp get ADDR PATH` in `ns`'s client pod: (exit ok, stdout).
async fn get_from_client(c: &Cluster, ns: &str, addr: &str, path: &str) -> anyhow::Result<(bool, String)> {
    let (status, out, _) = in_client(c, ns, ["get", addr, path]).output().await?;
    Ok((status.success(), out))
}

#[tokio::test]
async fn install_yaml_runs_every_component_from_its_image_on_the_real_node() -> anyhow::Result<()> {
    let c = installed();
    let pods = pods_jsonpath(
        c,
        SYSTEM,
        "app.kubernetes.io/part-of=mizzen",
        r#"{range .items[*]}{.spec.nodeName} {.status.phase} {.spec.containers[0].image}{"\n"}{end}"#,
    )
    .await?;
    for component in ["mizzen-ca", "mizzen-agent", "mizzen-injector"] {
        let image = format!("ghcr.io/mizzen-mesh/{component}:{}", env!("CARGO_PKG_VERSION"));
        assert!(
            pods.lines().any(|l| l == format!("mizzen-node Running {image}")),
            "{component} runs from {image} on the real node:\n{pods}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn injected_pods_call_a_service_by_name_over_mutual_tls() -> anyhow::Result<()> {
    let c = demo();
    // Injected by the webhook running as a pod: the proxy and its init container.
    let containers = pods_jsonpath(
        c,
        "demo",
        "app=echo",
        r#"{range .items[*]}{.spec.initContainers[*].name} {.spec.containers[*].name}{"\n"}{end}"#,
    )
    .await?;
    assert_eq!(containers.lines().count(), 2, "two echo replicas: {containers}");
    for line in containers.lines() {
        assert!(line.contains("mizzen-proxy"), "the echo pod was injected: {line}");
    }
    let (ok, out) = get_from_client(c, "demo", "echo:8080", "/hello").await?;
    assert!(ok, "the client reaches echo:8080 through CoreDNS and the mesh:\n{out}");
    // The server's proxy verified the client's certificate and says whose it was.
    let xfcc = out
        .lines()
        .find_map(|l| l.strip_prefix("header x-forwarded-client-cert: "))
        .with_context(|| format!("no XFCC reached the app:\n{out}"))?;
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/demo/sa/default"),
        "XFCC names the client's SPIFFE ID: {xfcc}"
    );
    Ok(())
}

#[tokio::test]
async fn the_server_side_metrics_name_the_client_workload_and_the_service() -> anyhow::Result<()> {
    let c = demo();
    let (ok, out) = get_from_client(c, "demo", "echo:8080", "/metrics-check").await?;
    assert!(ok, "a request to count: {out}");
    // Either echo replica may have served it: read both proxies' metrics
    // (their admin port, from the app container of the same pod).
    let pods = pods_jsonpath(c, "demo", "app=echo", "{.items[*].metadata.name}").await?;
    let wanted = "reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"demo\"";
    let mut lines = Vec::new();
    for pod in pods.split_whitespace() {
        let metrics = c
            .kubectl([
                "-n",
                "demo",
                "exec",
                pod,
                "-c",
                "app",
                "--",
                "mizzen-testapp",
                "get",
                "127.0.0.1:15020",
                "/metrics",
            ])
            .run()
            .await?;
        lines.extend(
            metrics
                .lines()
                .filter(|l| l.starts_with("mizzen_requests_total{") && l.contains(wanted))
                .map(str::to_owned),
        );
    }
    assert!(
        !lines.is_empty(),
        "the echo proxies count the client's requests by its workload"
    );
    for l in &lines {
        assert!(
            l.contains("destination_service=\"echo.demo.svc.cluster.local\"")
                && l.contains("destination_workload=\"echo\"")
                && l.contains("connection_security_policy=\"mutual_tls\""),
            "{l}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn logs_exec_and_rewritten_probes_work_on_injected_pods() -> anyhow::Result<()> {
    let c = demo();
    let logs = c
        .kubectl(["-n", "demo", "logs", "deploy/echo", "-c", "app"])
        .run()
        .await?;
    assert!(
        logs.contains("listening 0.0.0.0:8080"),
        "kubectl logs of the app: {logs}"
    );
    let exec = in_client(c, "demo", ["whoami"]).run().await?;
    assert!(exec.starts_with("uid="), "kubectl exec in an injected pod: {exec}");
    // Readiness is probed through the proxy (the injector rewrites the app's
    // probe); a pod is Ready only when that probe reaches the app.
    let ready = pods_jsonpath(
        c,
        "demo",
        "app=echo",
        r#"{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
    )
    .await?;
    assert_eq!(
        ready.lines().collect::<Vec<_>>(),
        ["True", "True"],
        "echo pods are Ready"
    );
    Ok(())
}

#[tokio::test]
async fn the_example_policy_is_enforced_on_the_real_node() -> anyhow::Result<()> {
    let c = demo();
    c.kubectl(["apply", "-f", &manifest("examples/deny-admin.yaml")])
        .run()
        .await?;
    let denied = eventually_some(Duration::from_secs(30), "the policy to deny /admin", || async {
        let (ok, out) = get_from_client(c, "demo", "echo:8080", "/admin/users").await?;
        Ok((!ok && out.starts_with("HTTP/1.1 403")).then_some(out))
    })
    .await?;
    assert!(denied.contains("RBAC: access denied"), "Envoy's body: {denied}");
    let (ok, out) = get_from_client(c, "demo", "echo:8080", "/hello").await?;
    assert!(ok, "other paths are still served: {out}");
    c.kubectl(["delete", "-f", &manifest("examples/deny-admin.yaml")])
        .run()
        .await?;
    Ok(())
}

#[tokio::test]
async fn every_manifest_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    let c = installed();
    let mut files = Vec::new();
    for dir in ["manifests", "manifests/examples"] {
        for entry in std::fs::read_dir(repo_root().join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 9, "the manifests and examples: {files:?}");
    for f in files {
        let (status, _, err) = c.kubectl(["apply", "--dry-run=server", "-f"]).arg(&f).output().await?;
        assert!(
            status.success(),
            "kubectl apply --dry-run=server -f {}: {err}",
            f.display()
        );
    }
    Ok(())
}

/// A Deployment of the test app's image with `args`.
fn testapp_deployment(name: &str, replicas: u32, args: &str) -> String {
    format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - {{name: app, image: 'ghcr.io/mizzen-mesh/mizzen-testapp:{version}', args: [{args}]}}
",
        version = env!("CARGO_PKG_VERSION")
    )
}

const SERVER_SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  selector: {app: server}
  ports: [{name: http, port: 8080, appProtocol: http}]
";

#[tokio::test]
async fn rolling_restarts_of_the_agent_ca_and_injector_lose_no_request() -> anyhow::Result<()> {
    let c = installed();
    let client = c.client().await?;
    let ns = c
        .namespace(&client, "steady", &[("mizzen.dev/inject", "enabled")])
        .await?;
    for yaml in [
        SERVER_SERVICE.to_owned(),
        testapp_deployment("server", 2, "http-server, '0.0.0.0:8080'"),
        testapp_deployment("client", 1, "idle"),
    ] {
        c.apply(&ns, &yaml).await?;
    }
    for what in ["deployment/server", "deployment/client"] {
        c.kubectl(["-n", &ns, "rollout", "status", what, ROLLOUT]).run().await?;
    }
    // A steady client: 20 requests/s over 2 keep-alive connections, for
    // longer than the restarts take.
    const LOAD_SECS: u64 = 150;
    let load = in_client(c, &ns, ["http-load", "server:8080", "20", &LOAD_SECS.to_string(), "2"]).output();
    let load = tokio::spawn(load);
    let started = Instant::now();
    for what in [
        "daemonset/mizzen-agent",
        "deployment/mizzen-ca",
        "deployment/mizzen-injector",
    ] {
        c.kubectl(["-n", SYSTEM, "rollout", "restart", what]).run().await?;
        c.kubectl(["-n", SYSTEM, "rollout", "status", what, ROLLOUT])
            .run()
            .await?;
    }
    // A pod created after the injector's restart is injected and runs.
    c.kubectl(["-n", &ns, "scale", "deployment/server", "--replicas=3"])
        .run()
        .await?;
    c.kubectl(["-n", &ns, "rollout", "status", "deployment/server", ROLLOUT])
        .run()
        .await?;
    let restarts = started.elapsed();
    if restarts >= Duration::from_secs(LOAD_SECS) {
        bail!("the restarts took {restarts:?}, longer than the steady load ({LOAD_SECS} s)");
    }
    let injected = pods_jsonpath(
        c,
        &ns,
        "app=server",
        "{.items[*].spec.initContainers[*].name} {.items[*].spec.containers[*].name}",
    )
    .await?;
    assert_eq!(
        injected.matches("mizzen-proxy").count(),
        3,
        "every server pod is injected: {injected}"
    );

    let (status, out, err) = load.await??;
    assert!(status.success(), "the steady client saw failures: {out} {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| format!("load report {out:?}"))?;
    assert_eq!(report["errors"], 0, "no request lost: {report}");
    assert!(
        report["requests"].as_u64().unwrap_or(0) >= 20 * LOAD_SECS * 9 / 10,
        "the client kept its rate through the restarts: {report}"
    );
    Ok(())
}
