//! The access log: one JSON line per HTTP request on stdout, off by
//! default (`--access-log`, or the pod annotation
//! `mizzen.dev/access-log: "true"`), written when the response ends.
//!
//! Fields follow Envoy's default access log under JSON names:
//! `start_time`, `direction`, `method`, `path`, `protocol`, `authority`,
//! `user_agent`, `x_request_id`, `traceparent`, `response_code`,
//! `grpc_status`, `response_flags`, `bytes_received`, `bytes_sent`,
//! `duration_ms`, `upstream_host`, `peer_principal`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use hyper::http::request::Parts;

use super::headers::REQUEST_ID;
use crate::metrics::{Direction, RequestFacts};

/// What the access log keeps of a request, taken when it arrives.
#[derive(Debug, Clone)]
pub struct AccessEntry {
    start: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    authority: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    traceparent: Option<String>,
    /// Where the request went (the endpoint outbound, the app inbound).
    pub upstream: Option<SocketAddr>,
}

fn header(p: &Parts, name: &str) -> Option<String> {
    p.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl AccessEntry {
    /// From the request as the proxy forwards it (so `x-request-id` is the
    /// one the app sees).
    pub fn new(p: &Parts, version: hyper::Version) -> Self {
        Self {
            start: SystemTime::now(),
            method: p.method.to_string(),
            path: p
                .uri
                .path_and_query()
                .map_or_else(|| p.uri.to_string(), |pq| pq.to_string()),
            protocol: super::headers::version_name(version),
            authority: super::headers::authority(&p.uri, &p.headers).map(str::to_owned),
            user_agent: header(p, "user-agent"),
            request_id: header(p, REQUEST_ID),
            traceparent: header(p, "traceparent"),
            upstream: None,
        }
    }

    /// The line for this request, ended as `facts` say.
    pub fn line(&self, f: &RequestFacts, duration: Duration, received: u64, sent: u64) -> serde_json::Value {
        serde_json::json!({
            "start_time": humantime::format_rfc3339_millis(self.start).to_string(),
            "direction": match f.direction { Direction::Inbound => "inbound", Direction::Outbound => "outbound" },
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "authority": self.authority,
            "user_agent": self.user_agent,
            "x_request_id": self.request_id,
            "traceparent": self.traceparent,
            "response_code": f.status,
            "grpc_status": f.grpc_status,
            "response_flags": f.flag.map_or("-", super::ResponseFlag::as_str),
            "bytes_received": received,
            "bytes_sent": sent,
            "duration_ms": duration.as_secs_f64() * 1000.0,
            "upstream_host": self.upstream.map(|a| a.to_string()),
            "peer_principal": f.peer.as_ref().map(ToString::to_string),
        })
    }

    /// Writes the line to stdout.
    pub fn write(&self, f: &RequestFacts, duration: Duration, received: u64, sent: u64) {
        use std::io::Write;
        let line = self.line(f, duration, received, sent);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_request_and_how_it_ended() {
        let (parts, ()) = hyper::Request::builder()
            .method("POST")
            .uri("http://reviews.default:9080/ratings/1?x=y")
            .header("user-agent", "curl/8")
            .header(REQUEST_ID, "abc")
            .body(())
            .expect("request")
            .into_parts();
        let mut e = AccessEntry::new(&parts, hyper::Version::HTTP_11);
        e.upstream = Some(SocketAddr::from(([10, 0, 0, 7], 9080)));
        let mut f = RequestFacts::new(Direction::Outbound, false);
        f.status = 503;
        f.flag = Some(super::super::ResponseFlag::NoHealthyUpstream);
        let line = e.line(&f, Duration::from_millis(12), 5, 20);
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/ratings/1?x=y");
        assert_eq!(line["authority"], "reviews.default:9080");
        assert_eq!(line["protocol"], "HTTP/1.1");
        assert_eq!(line["response_code"], 503);
        assert_eq!(line["response_flags"], "UH");
        assert_eq!(line["x_request_id"], "abc");
        assert_eq!(line["upstream_host"], "10.0.0.7:9080");
        assert_eq!(line["bytes_received"], 5);
        assert_eq!(line["bytes_sent"], 20);
        assert_eq!(line["direction"], "outbound");
        assert!(humantime::parse_rfc3339(line["start_time"].as_str().expect("time")).is_ok());
    }
}
