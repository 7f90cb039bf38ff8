//! Distributed tracing: a span per HTTP request, exported over OTLP/gRPC
//! when a collector is configured (`--tracing-otlp-endpoint`; mesh-wide,
//! the injector's `tracing.otlpEndpoint`).
//!
//! The client's proxy starts a `CLIENT` span, the server's proxy a
//! `SERVER` span, each the child of the span named by the request's W3C
//! `traceparent` (a new trace when there is none), and each rewrites
//! `traceparent` to name itself, as Envoy does; `tracestate` is carried.
//! Whether a new trace is recorded is decided by `--tracing-sampling-percent`;
//! a request already in a trace follows its sampled flag. Without a
//! collector nothing is created and trace headers (W3C and B3) pass
//! untouched; B3 headers always pass untouched.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::metrics::{Direction, RequestFacts};

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The proxy's tracer, exporting to one collector.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// A request's span, ended with what became of the request.
#[derive(Debug)]
pub struct RequestSpan(Context);

impl Tracing {
    /// Exports the spans of `service` (`<workload>.<namespace>`) to
    /// `endpoint`, sampling `percent` of new traces. Must be called within
    /// the proxy's runtime (the exporter's gRPC client lives there).
    pub fn new(endpoint: &str, percent: f64, service: String) -> Result<Self, TracingError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| TracingError::Exporter {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        let ratio = (percent / 100.0).clamp(0.0, 1.0);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        Ok(Self {
            tracer: provider.tracer("mizzen-proxy"),
            provider,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts the span of the request whose head is `parts`, and points its
    /// `traceparent` at it.
    pub fn start(&self, direction: Direction, parts: &mut hyper::http::request::Parts) -> RequestSpan {
        let parent = self.propagator.extract(&HeaderExtractor(&parts.headers));
        let kind = match direction {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", parts.method.to_string()),
            KeyValue::new("url.path", parts.uri.path().to_owned()),
            KeyValue::new("mizzen.direction", direction.as_str()),
        ];
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
        if let Some(a) = authority {
            attributes.push(KeyValue::new("server.address", a));
        }
        if let Some(r) = parts
            .headers
            .get(super::headers::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("mizzen.request_id", r.to_owned()));
        }
        let span = self
            .tracer
            .span_builder(parts.method.to_string())
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(&mut parts.headers));
        RequestSpan(cx)
    }

    /// Exports what is still buffered.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

impl RequestSpan {
    /// Ends the span with the request's outcome.
    pub fn end(self, f: &RequestFacts) {
        let span = self.0.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(f.status)));
        if let Some(flag) = f.flag {
            span.set_attribute(KeyValue::new("mizzen.response_flags", flag.as_str()));
        }
        if let Some(peer) = &f.peer {
            span.set_attribute(KeyValue::new("mizzen.peer.principal", peer.to_string()));
        }
        if let Some(g) = &f.grpc_status {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", g.clone()));
        }
        if f.status >= 500 || f.flag.is_some() {
            span.set_status(Status::error(format!("{}", f.status)));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_span_continues_the_callers_trace_and_names_itself_in_traceparent() {
        // Nothing listens there; spans are dropped, the headers are what
        // is checked.
        let t = Tracing::new("http://127.0.0.1:9", 100.0, "test.default".into()).expect("tracer");
        let (mut parts, ()) = hyper::Request::builder()
            .uri("/x")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .header("tracestate", "vendor=1")
            .body(())
            .expect("request")
            .into_parts();
        let span = t.start(Direction::Outbound, &mut parts);
        let tp = parts.headers["traceparent"].to_str().expect("ascii").to_owned();
        let fields: Vec<&str> = tp.split('-').collect();
        assert_eq!(fields[1], "0af7651916cd43dd8448eb211c80319c", "same trace: {tp}");
        assert_ne!(
            fields[2], "b7ad6b7169203331",
            "the proxy's span is the new parent: {tp}"
        );
        assert_eq!(fields[3], "01", "still sampled");
        assert_eq!(parts.headers["tracestate"], "vendor=1");
        span.end(&RequestFacts::new(Direction::Outbound, false));
    }

    #[tokio::test]
    async fn a_request_without_a_trace_starts_one() {
        let t = Tracing::new("http://127.0.0.1:9", 100.0, "test.default".into()).expect("tracer");
        let (mut parts, ()) = hyper::Request::builder()
            .uri("/x")
            .body(())
            .expect("request")
            .into_parts();
        let _span = t.start(Direction::Inbound, &mut parts);
        let tp = parts.headers["traceparent"].to_str().expect("ascii").to_owned();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(tp.ends_with("-01"), "sampled at 100 %: {tp}");
    }
}
