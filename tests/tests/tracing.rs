//! Distributed tracing end to end: injected pods whose proxies export
//! spans over OTLP/gRPC (the injector's `tracing.otlpEndpoint`) to a
//! collector this test runs (the OpenTelemetry project's generated
//! TraceService server): a request's client and server spans continue the
//! caller's W3C trace, and the app sees `traceparent` naming the server
//! proxy's span. Its own binary: it needs an injector configured for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use mizzen_tests::mesh::{MeshNode, echo_pod};
use mizzen_tests::node::{create_pod, wait_ready};
use mizzen_tests::{Cluster, eventually_some, workspace_bin};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Every span received, with its resource's `service.name`.
#[derive(Debug, Default, Clone)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{:?}", v.value))
}

#[tokio::test]
async fn a_request_s_spans_continue_the_callers_trace_and_reach_the_collector() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let collector = Collector::default();
    let gateway = mizzen_tests::netns::bridge_gateway()?;
    let port = mizzen_tests::free_port();
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream_listener(listener));
    let _server = tokio::spawn(server);

    let config = format!("tracing:\n  otlpEndpoint: http://{gateway}:{port}\n  samplingPercent: 100\n");
    let node = "trace-node";
    let mesh = MeshNode::start_with(cluster, node, &workspace_bin("mizzen-proxy"), &[], &config).await?;
    let ns = cluster
        .namespace(&client, "trace", &[("mizzen.dev/inject", "enabled")])
        .await?;
    let spec = serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    });
    let vip = mizzen_tests::k8s::create_service(&client, &ns, spec).await?;
    let mut web = echo_pod("web", node);
    web["metadata"]["labels"] = serde_json::json!({"app": "web"});
    web["spec"]["containers"][0]["args"] = serde_json::json!(["http-echo", "0.0.0.0:8080"]);
    create_pod(&client, &ns, web).await?;
    create_pod(&client, &ns, echo_pod("client", node)).await?;
    for name in ["web", "client"] {
        wait_ready(&client, &ns, name, TIMEOUT).await?;
    }

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller}-01");
    let echoed = eventually_some(Duration::from_secs(30), "the traced request to succeed", || async {
        let out = mesh
            .node
            .command_as(&ns, "client", 1000, "curl")?
            .args(["-sS", "--fail", "--max-time", "10", "-H"])
            .arg(format!("traceparent: {traceparent}"))
            .arg(format!("http://{vip}/traced"))
            .output()
            .await?;
        Ok(mizzen_tests::stdout_if_success(&out))
    })
    .await?;
    let seen = echoed
        .lines()
        .find_map(|l| l.strip_prefix("header traceparent: "))
        .context("the app got a traceparent")?
        .to_owned();

    let spans = eventually_some(Duration::from_secs(30), "both proxies' spans at the collector", || {
        let spans = collector.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        async move {
            let of_trace: Vec<(String, Span)> = spans.into_iter().filter(|(_, s)| hex(&s.trace_id) == trace).collect();
            // The server proxy's span (kind SERVER, 2) arrives in its own batch.
            Ok(of_trace.iter().any(|(_, s)| s.kind == 2).then_some(of_trace))
        }
    })
    .await?;
    // Attempts made before the route was known have a client span only.
    let (client_span, server_span) = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| hex(&s.parent_span_id) == caller)
        .find_map(|c| {
            spans
                .iter()
                .map(|(_, s)| s)
                .find(|s| s.parent_span_id == c.span_id)
                .map(|s| (c, s))
        })
        .with_context(|| format!("a client span whose parent is the caller's, and its child: {spans:#?}"))?;
    // SpanKind: 2 = SERVER, 3 = CLIENT.
    assert_eq!(client_span.kind, 3, "{client_span:?}");
    assert_eq!(server_span.kind, 2, "{server_span:?}");
    assert_eq!(
        seen,
        format!("00-{trace}-{}-01", hex(&server_span.span_id)),
        "the app's traceparent names the server proxy's span"
    );
    for s in [client_span, server_span] {
        assert_eq!(
            attribute(s, "http.response.status_code").as_deref(),
            Some("Some(IntValue(200))"),
            "{s:?}"
        );
        assert_eq!(
            attribute(s, "url.path").as_deref(),
            Some("Some(StringValue(\"/traced\"))"),
            "{s:?}"
        );
    }
    let services: Vec<&str> = spans.iter().map(|(svc, _)| svc.as_str()).collect();
    assert!(
        services.iter().any(|s| s.contains(&format!("client.{ns}")))
            && services.iter().any(|s| s.contains(&format!("web.{ns}"))),
        "each proxy names its workload: {services:?}"
    );
    Ok(())
}

/// `listener`'s connections as the stream tonic serves.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}
