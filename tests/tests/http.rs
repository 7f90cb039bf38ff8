//! The HTTP data path end to end, on the real control plane: injected
//! pods on a test node, a Service whose port is named `http`, the client
//! app's requests made with curl (an independent HTTP implementation) as
//! the app's UID so that its traffic is captured.
//!
//! The server app is `mizzen-testapp http-echo`, which answers with its
//! pod name, the HTTP version it was spoken to in, and every header it
//! received, so each test reads what reached the app.

use std::time::Duration;

use anyhow::{Context, bail};
use mizzen_tests::daemon::{metric_where, proxy_metric};
use mizzen_tests::http_mesh::{APP_UID, HttpMesh, MESHED, TIMEOUT, curl_in, service};
use mizzen_tests::mesh::MeshNode;
use mizzen_tests::node::{create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually_some, workspace_bin};

/// The proxy's metrics at `ip` once the series starting with `prefix`
/// sum to at least `at_least`.
async fn settled_metrics(ip: &str, prefix: &str, at_least: f64) -> anyhow::Result<String> {
    let last = std::sync::Mutex::new(String::new());
    let found = eventually_some(Duration::from_secs(10), prefix, || async {
        let (_, text) = proxy_metric(ip, "mizzen_requests_total").await?;
        let enough = metric_where(&text, prefix) >= at_least;
        *last.lock().unwrap_or_else(|p| p.into_inner()) = text.clone();
        Ok(enough.then_some(text))
    })
    .await;
    found.or_else(|_| Ok(last.into_inner().unwrap_or_else(|p| p.into_inner())))
}

/// The values of header `name` the echo server reported.
fn header<'a>(echo: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("header {name}: ");
    echo.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
}

#[tokio::test]
async fn keep_alive_requests_are_balanced_per_request_over_one_connection_per_endpoint() -> anyhow::Result<()> {
    // Both replicas take 20 ms to answer, so that the balancer sees them as
    // equally fast (a millisecond of scheduling noise on a shared machine
    // would otherwise make one look several times faster than the other).
    let m = HttpMesh::start_with("http-balance", true, |pod| {
        pod["spec"]["containers"][0]["env"] = serde_json::json!([{"name": "ECHO_DELAY_MS", "value": "20"}]);
    })
    .await?;
    // 20 requests on one keep-alive connection of the app.
    let url = m.url("/");
    let mut args = vec!["-w", "\nconnects %{num_connects}\n"];
    args.extend(std::iter::repeat_n(url.as_str(), 20));
    let out = m.curl(&args).await?;
    let connects: u32 = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects "))
        .map(|n| n.parse::<u32>().unwrap_or(99))
        .sum();
    assert_eq!(connects, 1, "curl used one connection for all 20 requests:\n{out}");
    for pod in ["web-a", "web-b"] {
        let n = out.lines().filter(|l| *l == format!("pod {pod}")).count();
        assert!(
            n >= 3,
            "{pod} answered {n} of 20 requests made on one connection:\n{out}"
        );
    }
    // The client's proxy holds one mTLS connection per endpoint, whatever
    // the number of requests.
    let (_, text) = proxy_metric(&m.client_ip, "mizzen_proxy_connections_total").await?;
    let opened = metric_where(
        &text,
        "mizzen_proxy_connections_total{direction=\"outbound\",tls=\"mtls\"",
    );
    assert_eq!(opened, 2.0, "one connection per endpoint:\n{text}");
    Ok(())
}

#[tokio::test]
async fn between_pods_requests_travel_only_as_tls13_with_alpn_mizzen_h2() -> anyhow::Result<()> {
    let m = HttpMesh::deploy("http-wire", true, |_| {}).await?;
    let (netns, _) = m.mesh.node.pod(&m.ns, "client")?;
    let file = Cluster::get().dir().join(format!("{}-client.pcap", m.ns));
    let capture = mizzen_tests::capture::Capture::start(&netns, "tcp port 8080", file).await?;
    m.wait_answering().await?;
    let marker = "PLAINTEXT-MARKER-h2-5c1d";
    let out = m
        .curl(&["-H", &format!("x-marker: {marker}"), "--data", marker, &m.url("/wire")])
        .await?;
    assert!(out.contains(marker), "the marker reached the app:\n{out}");
    // Both handshakes (certificates both ways) and the request: well over 2 KB.
    let pcap = capture.stop(2000).await?;
    let raw = pcap.raw()?;
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the request crossed the wire in plaintext"
    );
    // The pooled connections offer ALPN mizzen-h2.
    pcap.tls(8080)?.only_tls13_with_alpn("mizzen-h2")?;
    Ok(())
}

#[tokio::test]
async fn the_server_app_gets_xfcc_naming_the_client_and_a_forged_one_is_replaced() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-xfcc", true).await?;
    let forged = "By=spiffe://cluster.local/ns/x/sa/y;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    let out = m
        .curl(&["-H", &format!("x-forwarded-client-cert: {forged}"), &m.url("/")])
        .await?;
    let xfcc = header(&out, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "exactly one XFCC reaches the app:\n{out}");
    let client = format!("URI=spiffe://cluster.local/ns/{}/sa/default", m.ns);
    assert!(
        xfcc[0].starts_with(&format!("By=spiffe://cluster.local/ns/{}/sa/default;Hash=", m.ns))
            && xfcc[0].ends_with(&format!(";Subject=\"\";{client}")),
        "Istio's format, naming the calling workload: {}",
        xfcc[0]
    );
    Ok(())
}

#[tokio::test]
async fn xfcc_forged_outside_the_mesh_never_reaches_the_app() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-forged", true).await?;
    // An unmeshed pod calls a replica directly (PERMISSIVE accepts it).
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let outside = cluster.namespace(&client, "outside", &[]).await?;
    create_pod(
        &client,
        &outside,
        mizzen_tests::mesh::echo_pod("stranger", &m.mesh.node.name),
    )
    .await?;
    wait_ready(&client, &outside, "stranger", TIMEOUT).await?;
    let forged = format!("By=x;URI=spiffe://cluster.local/ns/{}/sa/default", m.ns);
    let out = curl_in(
        &m.mesh,
        &outside,
        "stranger",
        &[
            "-H",
            &format!("x-forwarded-client-cert: {forged}"),
            &format!("http://{}:8080/", m.web_ips[0]),
        ],
    )
    .await?;
    assert!(out.contains("\npath /\n"), "the app answered:\n{out}");
    assert!(
        header(&out, "x-forwarded-client-cert").is_empty(),
        "no XFCC from outside the mesh:\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn traceparent_is_kept_and_a_request_id_added() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-trace", true).await?;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let out = m.curl(&["-H", &format!("traceparent: {tp}"), &m.url("/")]).await?;
    assert_eq!(header(&out, "traceparent"), [tp], "{out}");
    let ids = header(&out, "x-request-id");
    assert_eq!(ids.len(), 1, "{out}");
    assert_eq!(ids[0].len(), 36, "a UUID: {}", ids[0]);
    assert_eq!(header(&out, "x-forwarded-proto"), ["http"], "{out}");
    Ok(())
}

#[tokio::test]
async fn h2c_reaches_the_app_as_http2_and_http11_as_http11() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-h2c", true).await?;
    let h2 = m.curl(&["--http2-prior-knowledge", &m.url("/h2")]).await?;
    assert!(h2.contains("\nversion HTTP/2.0\n"), "h2c end to end:\n{h2}");
    let h1 = m.curl(&["--http1.1", &m.url("/h1")]).await?;
    assert!(h1.contains("\nversion HTTP/1.1\n"), "HTTP/1.1 end to end:\n{h1}");
    assert_eq!(header(&h1, "host"), [m.vip.as_str()], "the Host the client sent:\n{h1}");
    Ok(())
}

#[tokio::test]
async fn request_metrics_carry_istio_labels_and_response_codes() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-metrics", true).await?;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    // A Service whose pods do not exist: no endpoint, 503 UH.
    let empty = service(&client, &m.ns, "nobody", "nobody", "http").await?;
    m.curl(&[&m.url("/ok")]).await?;
    let not_found = m
        .curl(&["-o", "/dev/null", "-w", "%{http_code}", &m.url("/status/404")])
        .await;
    assert!(
        not_found.is_err(),
        "404 is an error for --fail-with-body: {not_found:?}"
    );
    let unavailable = eventually_some(Duration::from_secs(30), "the empty Service to be known", || async {
        let out = m
            .curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{empty}/")])
            .await;
        Ok(out.err().filter(|e| e.to_string().contains("503")))
    })
    .await;
    assert!(
        unavailable.is_ok(),
        "503 for a Service without endpoints: {unavailable:?}"
    );

    let ns = &m.ns;
    // Requests are counted once their responses have been carried to the end.
    let source = settled_metrics(&m.client_ip, "mizzen_requests_total{reporter=\"source\"", 4.0).await?;
    let client_side = |code: &str, flags: &str, service: &str| {
        format!(
            "mizzen_requests_total{{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"{ns}\",\
             source_principal=\"spiffe://cluster.local/ns/{ns}/sa/default\",destination_workload=\"{dw}\",\
             destination_workload_namespace=\"{dns}\",destination_principal=\"{dp}\",\
             destination_service=\"{service}.{ns}.svc.cluster.local\",request_protocol=\"http\",\
             response_code=\"{code}\",grpc_response_status=\"\",response_flags=\"{flags}\",\
             connection_security_policy=\"{csp}\"}}",
            dw = if flags == "-" { "web-a" } else { "unknown" },
            dns = if flags == "-" { ns.as_str() } else { "unknown" },
            dp = if flags == "-" {
                format!("spiffe://cluster.local/ns/{ns}/sa/default")
            } else {
                "unknown".into()
            },
            csp = if flags == "-" { "mutual_tls" } else { "none" },
        )
    };
    let either = |code: &str| {
        metric_where(&source, &client_side(code, "-", "web"))
            + metric_where(
                &source,
                &client_side(code, "-", "web").replace("\"web-a\"", "\"web-b\""),
            )
    };
    assert!(either("200") >= 2.0, "200s reported by the client's proxy:\n{source}");
    assert_eq!(either("404"), 1.0, "one 404 reported by the client's proxy:\n{source}");
    assert!(
        metric_where(&source, &client_side("503", "UH", "nobody")) >= 1.0,
        "503 UH reported by the client's proxy:\n{source}"
    );
    let (_, all) = proxy_metric(&m.client_ip, "mizzen_response_bytes_sum").await?;
    let echoed = metric_where(
        &all,
        &client_side("200", "-", "web").replace("mizzen_requests_total", "mizzen_response_bytes_sum"),
    ) + metric_where(
        &all,
        &client_side("200", "-", "web")
            .replace("mizzen_requests_total", "mizzen_response_bytes_sum")
            .replace("\"web-a\"", "\"web-b\""),
    );
    assert!(
        echoed > 100.0,
        "response bytes of the echoed requests are counted:\n{all}"
    );
    // The server side reports what it served, naming the client's workload
    // (told by its proxy) and the Service it was called through.
    let from_client = format!(
        "mizzen_requests_total{{reporter=\"destination\",source_workload=\"client\",\
         source_workload_namespace=\"{ns}\",source_principal=\"spiffe://cluster.local/ns/{ns}/sa/default\""
    );
    let servers = || async {
        let mut texts = String::new();
        for ip in &m.web_ips {
            texts.push_str(&proxy_metric(ip, "mizzen_requests_total").await?.1);
        }
        Ok::<_, anyhow::Error>(texts)
    };
    let served = eventually_some(
        Duration::from_secs(10),
        "the servers' proxies to count 3 requests",
        || async {
            let texts = servers().await?;
            Ok((metric_where(&texts, &from_client) >= 3.0).then_some(texts))
        },
    )
    .await;
    let texts = match served {
        Ok(t) => t,
        Err(e) => panic!("{e}: {}", servers().await?),
    };
    let through_web = format!("destination_service=\"web.{ns}.svc.cluster.local\"");
    assert!(
        texts
            .lines()
            .filter(|l| l.starts_with(&from_client))
            .all(|l| l.contains(&through_web)),
        "the servers' proxies name the Service:\n{texts}"
    );
    let durations = texts.matches("mizzen_request_duration_milliseconds_count{").count();
    assert!(durations >= 1, "the servers' proxies recorded durations");
    Ok(())
}

/// A server pod running a Python script of `tests/` (with the libraries
/// `scripts/deps.sh` installs) behind a Service of port 80 named
/// `port_name`, and a `client` pod that runs the same script as a client.
struct ScriptMesh {
    mesh: MeshNode,
    ns: String,
    script: String,
    /// The Service's `<cluster IP>:80`.
    target: String,
    client_ip: String,
}

impl ScriptMesh {
    async fn start(node: &str, script: &str, serve: &[&str], port_name: &str) -> anyhow::Result<Self> {
        let cluster = Cluster::get();
        let client = cluster.client().await?;
        let mesh = MeshNode::start(cluster, node, &workspace_bin("mizzen-proxy"), &[]).await?;
        let ns = cluster.namespace(&client, "script", MESHED).await?;
        let vip = service(&client, &ns, "server", "server", port_name).await?;
        let script = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut command = vec![mizzen_tests::sds::python()?.display().to_string(), script.clone()];
        command.extend(serve.iter().map(|a| a.to_string()));
        create_pod(
            &client,
            &ns,
            serde_json::json!({
                "metadata": {"name": "server-a", "labels": {"app": "server"}},
                "spec": {
                    "nodeName": node,
                    "containers": [{
                        "name": "app", "image": "mizzen-testapp",
                        "command": command,
                        "ports": [{"name": "serving", "containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": "serving"}, "periodSeconds": 1},
                    }],
                },
            }),
        )
        .await?;
        create_pod(&client, &ns, mizzen_tests::mesh::echo_pod("client", node)).await?;
        wait_ready(&client, &ns, "server-a", TIMEOUT).await?;
        let client_pod = wait_ready(&client, &ns, "client", TIMEOUT).await?;
        Ok(Self {
            mesh,
            ns,
            script,
            target: format!("{vip}:80"),
            client_ip: client_pod.status.and_then(|s| s.pod_ip).context("client IP")?,
        })
    }

    /// Runs the script in the client pod (as root, which capture
    /// redirects like any app UID but the proxy's).
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .mesh
            .node
            .command_as(&self.ns, "client", 0, mizzen_tests::sds::python()?)?
            .arg(&self.script)
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "{} {args:?}: {}{}",
                self.script,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `run(args)` once it succeeds (the Service reaches the client's
    /// proxy a moment after the pods are ready).
    async fn eventually_run(&self, args: &[&str]) -> anyhow::Result<String> {
        let last = std::sync::Mutex::new(String::new());
        let done = eventually_some(Duration::from_secs(30), "the client to succeed", || async {
            match self.run(args).await {
                Ok(out) => Ok(Some(out)),
                Err(e) => {
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = format!("{e:#}");
                    Ok(None)
                }
            }
        })
        .await;
        done.with_context(|| last.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    async fn grpc(start: &str) -> anyhow::Result<Self> {
        let m = Self::start(start, "grpc_echo.py", &["serve", "0.0.0.0:8080"], "grpc").await?;
        m.eventually_run(&["unary", &m.target, "ready"]).await?;
        Ok(m)
    }
}

#[tokio::test]
async fn grpc_unary_and_bidirectional_streaming_pass_through_the_mesh() -> anyhow::Result<()> {
    let m = ScriptMesh::grpc("http-grpc").await?;
    assert_eq!(m.run(&["unary", &m.target, "hello"]).await?, "server-a hello\n");
    let chat = m.run(&["chat", &m.target, "5"]).await?;
    let want: String = (0..5).map(|i| format!("echo m{i}\n")).collect();
    assert_eq!(chat, want, "each message answered while the stream stays open");
    // Both calls went through the client's proxy as gRPC requests.
    let text = settled_metrics(&m.client_ip, "mizzen_requests_total{reporter=\"source\"", 3.0).await?;
    let grpc_ok = text
        .lines()
        .filter(|l| {
            l.starts_with("mizzen_requests_total{reporter=\"source\"")
                && l.contains("request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"0\"")
        })
        .count();
    assert!(grpc_ok >= 1, "gRPC requests with status 0 are counted:\n{text}");
    Ok(())
}

#[tokio::test]
async fn a_grpc_status_in_trailers_reaches_the_client_and_the_metrics() -> anyhow::Result<()> {
    let m = ScriptMesh::grpc("http-grpc-fail").await?;
    assert_eq!(m.run(&["fail", &m.target]).await?, "NOT_FOUND no such thing\n");
    let text = settled_metrics(&m.client_ip, "mizzen_requests_total{reporter=\"source\"", 2.0).await?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("mizzen_requests_total{reporter=\"source\"")
                && l.contains("request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"5\"")),
        "NOT_FOUND (5) is the request's gRPC status:\n{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_websocket_upgrade_passes_with_the_clients_identity() -> anyhow::Result<()> {
    let m = ScriptMesh::start("http-ws", "ws_echo.py", &["serve", "8080"], "http").await?;
    let url = format!("ws://{}/chat", m.target);
    let out = m.eventually_run(&["chat", &url, "3"]).await?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "the identity, then 3 answers:\n{out}");
    assert!(
        lines[0].ends_with(&format!(";URI=spiffe://cluster.local/ns/{}/sa/default", m.ns)),
        "the upgrade request carried XFCC naming the client: {}",
        lines[0]
    );
    assert_eq!(
        lines[1..],
        ["server-a m0", "server-a m1", "server-a m2"],
        "messages both ways on the upgraded connection"
    );
    Ok(())
}

#[tokio::test]
async fn a_connect_tunnel_through_an_http_service_works() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-connect", true).await?;
    // curl asks the Service (an HTTP proxy, as far as it knows) for a
    // tunnel, then speaks HTTP/1.1 through it to the app.
    let proxy = format!("http://{}:80", m.vip);
    let out = m
        .curl(&["--proxytunnel", "--proxy", &proxy, "http://tunnel.example/through"])
        .await?;
    assert!(
        out.contains("\npath /through\n"),
        "the app answered through the tunnel:\n{out}"
    );
    assert!(out.starts_with("pod web-"), "{out}");
    Ok(())
}

#[tokio::test]
async fn a_server_first_protocol_works_on_a_tcp_port_and_after_sniffing_on_an_undeclared_one() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let node = "http-banner";
    let mesh = MeshNode::start(cluster, node, &workspace_bin("mizzen-proxy"), &[]).await?;
    let ns = cluster.namespace(&client, "banner", MESHED).await?;
    let spec = serde_json::json!({
        "metadata": {"name": "banner"},
        "spec": {"selector": {"app": "banner"}, "ports": [
            {"name": "tcp-banner", "port": 80, "targetPort": 8080},
            {"name": "banner", "port": 81, "targetPort": 8080},
        ]},
    });
    let vip = mizzen_tests::k8s::create_service(&client, &ns, spec).await?;
    let mut server = mizzen_tests::mesh::echo_pod("banner-a", node);
    server["metadata"]["labels"] = serde_json::json!({"app": "banner"});
    server["spec"]["containers"][0]["args"] = serde_json::json!(["banner-server", "0.0.0.0:8080"]);
    create_pod(&client, &ns, server).await?;
    create_pod(&client, &ns, mizzen_tests::mesh::echo_pod("client", node)).await?;
    for name in ["banner-a", "client"] {
        wait_ready(&client, &ns, name, TIMEOUT).await?;
    }
    let greeting = |port: u16| {
        let (mesh, ns, target) = (&mesh, &ns, format!("{vip}:{port}"));
        async move {
            eventually_some(Duration::from_secs(30), &format!("a greeting on {target}"), || async {
                let out = mesh
                    .node
                    .command_as(ns, "client", APP_UID, workspace_bin("mizzen-testapp"))?
                    .args(["banner-client", &target])
                    .output()
                    .await?;
                Ok(mizzen_tests::stdout_if_success(&out))
            })
            .await
        }
    };
    assert_eq!(
        greeting(80).await?,
        "banner banner-a\n",
        "declared tcp-: relayed at once"
    );
    assert_eq!(
        greeting(81).await?,
        "banner banner-a\n",
        "undeclared: relayed as TCP once the app sent nothing within the sniff timeout"
    );
    Ok(())
}

#[tokio::test]
async fn on_drain_a_keep_alive_http_connection_is_closed_gracefully_while_tcp_ones_may_finish() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-drain", true).await?;
    let app = |args: Vec<String>| {
        let cmd = m
            .mesh
            .node
            .command_as(&m.ns, "client", APP_UID, workspace_bin("mizzen-testapp"));
        async move { Ok::<_, anyhow::Error>(cmd?.args(args).output().await?) }
    };
    // A TCP connection to a replica's own address (relayed, not HTTP),
    // which keeps the draining proxy alive for its drain period.
    let held = tokio::spawn(app(vec![
        "hold".into(),
        format!("{}:8080", m.web_ips[0]),
        "1".into(),
        "30".into(),
    ]));
    let keepalive = tokio::spawn(app(vec!["http-keepalive".into(), format!("{}:80", m.vip), "30".into()]));
    settled_metrics(&m.client_ip, "mizzen_requests_total{reporter=\"source\"", 4.0).await?;
    let open = |text: &str| metric_where(text, "mizzen_proxy_connections_open{direction=\"outbound\"}");
    let (_, text) = proxy_metric(&m.client_ip, "mizzen_proxy_connections_open").await?;
    assert_eq!(
        open(&text),
        2.0,
        "the held TCP connection and the keep-alive one:\n{text}"
    );

    let proxy = m.mesh.node.pid(&m.ns, "client", "mizzen-proxy")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &proxy.to_string()])
        .status()?;
    assert!(status.success());
    let out = keepalive.await??;
    let text_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the keep-alive connection ended: {text_out}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text_out.lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("closed after ")),
        "{text_out}"
    );
    assert!(
        lines[..lines.len() - 1].iter().all(|l| l.starts_with("HTTP/1.1 200")),
        "no request failed on the way out:\n{text_out}"
    );
    // The proxy is still draining (the TCP connection may finish), so it
    // was the graceful close, not the proxy's exit, that ended the HTTP one.
    let (_, text) = proxy_metric(&m.client_ip, "mizzen_proxy_connections_open").await?;
    assert_eq!(open(&text), 1.0, "only the TCP connection is left:\n{text}");
    held.abort();
    Ok(())
}

#[tokio::test]
async fn the_access_log_is_a_json_line_per_request_when_the_pod_asks_for_it() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-access", true).await?;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mut logged = mizzen_tests::mesh::echo_pod("logged", &m.mesh.node.name);
    logged["metadata"]["annotations"] = serde_json::json!({"mizzen.dev/access-log": "true"});
    create_pod(&client, &m.ns, logged).await?;
    wait_ready(&client, &m.ns, "logged", TIMEOUT).await?;
    let out = eventually_some(
        Duration::from_secs(30),
        "the logged client to reach the Service",
        || async { Ok(curl_in(&m.mesh, &m.ns, "logged", &[&m.url("/logged?q=1")]).await.ok()) },
    )
    .await?;
    let request_id = header(&out, "x-request-id")
        .first()
        .map(|s| s.to_string())
        .context("request id")?;
    let log = mizzen_tests::node::Node::log(cluster, &m.ns, "logged", "mizzen-proxy");
    let line = eventually_some(Duration::from_secs(10), "the access log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let id = request_id.clone();
        async move {
            Ok(text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["x_request_id"] == id.as_str()))
        }
    })
    .await?;
    assert_eq!(line["path"], "/logged?q=1", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["response_code"], 200, "{line}");
    assert_eq!(line["direction"], "outbound", "{line}");
    assert_eq!(line["response_flags"], "-", "{line}");
    assert_eq!(
        line["peer_principal"],
        format!("spiffe://cluster.local/ns/{}/sa/default", m.ns).as_str(),
        "{line}"
    );
    assert!(line["bytes_sent"].as_u64().is_some_and(|n| n > 0), "{line}");
    // Off by default: the replicas' proxies served requests and logged none.
    for pod in ["web-a", "web-b"] {
        let text = std::fs::read_to_string(mizzen_tests::node::Node::log(cluster, &m.ns, pod, "mizzen-proxy"))?;
        assert!(
            !text.contains("\"x_request_id\""),
            "{pod} wrote access log lines without asking"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_slow_replica_gets_few_requests() -> anyhow::Result<()> {
    let m = HttpMesh::start_with("http-slow", true, |pod| {
        if pod["metadata"]["name"] == "web-b" {
            pod["spec"]["containers"][0]["env"] = serde_json::json!([{"name": "ECHO_DELAY_MS", "value": "50"}]);
        }
    })
    .await?;
    let url = m.url("/");
    let mut args = vec![];
    args.extend(std::iter::repeat_n(url.as_str(), 40));
    let out = m.curl(&args).await?;
    let count = |pod: &str| out.lines().filter(|l| *l == format!("pod {pod}")).count();
    assert_eq!(count("web-a") + count("web-b"), 40, "{out}");
    assert!(
        count("web-a") >= 30,
        "the 50 ms replica answered {} of 40 sequential requests",
        count("web-b")
    );
    Ok(())
}

/// Issue #12: a policy change reaches requests already in flight. A gRPC
/// stream held open by grpcio is reset when a new DENY covers its method;
/// a new call of it gets PERMISSION_DENIED.
#[tokio::test]
async fn an_open_grpc_stream_that_a_new_deny_covers_is_closed() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let m = ScriptMesh::grpc("http-grpc-revoke").await?;
    let mut held = m
        .mesh
        .node
        .command_as(&m.ns, "client", 0, mizzen_tests::sds::python()?)?
        .arg(&m.script)
        .args(["hold-chat", &m.target, "60"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(held.stdout.take().context("stdout")?).lines();
    let first = tokio::time::timeout(TIMEOUT, lines.next_line()).await??;
    assert_eq!(first.as_deref(), Some("open"), "the stream opened");
    Cluster::get()
        .kubectl(["apply", "-n", &m.ns, "-f", "-"])
        .stdin(
            "apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-chat}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{to: [{operation: {paths: [/mizzen.test.Echo/Chat]}}]}]
",
        )
        .run()
        .await?;
    let ended = tokio::time::timeout(TIMEOUT, lines.next_line()).await??;
    let ended = ended.unwrap_or_default();
    assert!(
        ended.starts_with("ended ") && ended != "ended OK",
        "the stream must end with an error, long before its 60 s: {ended:?}"
    );
    let err = m
        .run(&["chat", &m.target, "1"])
        .await
        .expect_err("a new call is denied");
    assert!(format!("{err:#}").contains("PERMISSION_DENIED"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn a_proxy_follows_its_namespace_and_fetches_other_services_on_first_use() -> anyhow::Result<()> {
    let m = HttpMesh::start("http-scope", true).await?;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let mut everything = mizzen_tests::mesh::echo_pod("everything", &m.mesh.node.name);
    everything["metadata"]["annotations"] = serde_json::json!({"mizzen.dev/discovery-namespaces": "*"});
    create_pod(&client, &m.ns, everything).await?;
    let pod = wait_ready(&client, &m.ns, "everything", TIMEOUT).await?;
    let everything_ip = pod.status.and_then(|s| s.pod_ip).context("pod IP")?;

    // By default a proxy follows its own namespace's Services (web);
    // asked to, every Service: at least the API server's `kubernetes` too.
    let ip = m.client_ip.clone();
    let (services, text) = proxy_metric(&ip, "mizzen_proxy_discovery_services").await?;
    assert_eq!(services, 1.0, "{text}");
    let (all, _) = proxy_metric(&everything_ip, "mizzen_proxy_discovery_services").await?;
    assert!(all >= 2.0, "the proxy following everything has {all} Services");

    // Its own namespace's Service is reached over mTLS, naming the caller.
    let out = m.curl(&[&m.url("/")]).await?;
    let xfcc = header(&out, "x-forwarded-client-cert");
    let caller = format!("URI=spiffe://cluster.local/ns/{}/sa/default", m.ns);
    assert!(xfcc.first().is_some_and(|x| x.ends_with(&caller)), "{out}");

    // A Service of another namespace, once the mesh knows it (the proxy
    // that follows everything reaches it): the client's proxy fetches it
    // on first use, and
    // the first request succeeds, over mTLS.
    let other = cluster.namespace(&client, "http-scope-other", MESHED).await?;
    let vip = service(&client, &other, "web", "web", "http").await?;
    create_pod(
        &client,
        &other,
        mizzen_tests::http_mesh::web_pod("web-x", &m.mesh.node.name),
    )
    .await?;
    wait_ready(&client, &other, "web-x", TIMEOUT).await?;
    let url = format!("http://{vip}/");
    eventually_some(
        Duration::from_secs(30),
        "the other namespace's web to answer",
        || async { Ok(curl_in(&m.mesh, &m.ns, "everything", &[&url]).await.ok()) },
    )
    .await?;
    let out = m.curl(&[&url]).await?;
    assert!(out.contains("web-x"), "answered by the other namespace's pod: {out}");
    let xfcc = header(&out, "x-forwarded-client-cert");
    assert!(xfcc.first().is_some_and(|x| x.ends_with(&caller)), "{out}");
    let (services, text) = proxy_metric(&ip, "mizzen_proxy_discovery_services").await?;
    assert_eq!(services, 2.0, "its namespace's and the one it fetched: {text}");
    Ok(())
}
