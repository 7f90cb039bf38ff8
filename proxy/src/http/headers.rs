//! Headers the proxies add, strip and carry.
//!
//! - Hop-by-hop headers (RFC 9110 7.6.1: `Connection` and every header it
//!   names, `Keep-Alive`, `Proxy-Connection`, `TE` other than `trailers`,
//!   `Transfer-Encoding`, `Upgrade`) describe one connection and are
//!   removed before a message goes on.
//! - [`APP_PROTOCOL`] tells the server-side proxy in which HTTP version the
//!   client app spoke, so the server app gets the same; nothing from an
//!   app or from outside the mesh can set it.
//! - [`PEER_WORKLOAD`] tells the server-side proxy the client's workload
//!   (Istio's peer metadata exchange), for its request metrics'
//!   `source_workload`; read only from a peer proxy over mutual TLS, and
//!   removed before any app sees a request.
//! - [`XFCC`] is set by the server-side proxy alone, in Istio's format;
//!   whatever a client sent under that name is dropped first, so an app can
//!   trust it to name the calling workload.
//! - `x-request-id` is added when missing; trace headers (`traceparent`,
//!   `tracestate`, B3) pass untouched.

use hyper::Version;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use mizzen_api::SpiffeId;

/// The proxy's response flag on its own answers.
pub const RESPONSE_FLAGS: &str = "x-mizzen-response-flags";
/// Between proxies: the HTTP version the client app spoke.
pub const APP_PROTOCOL: &str = "x-mizzen-app-protocol";
/// Between proxies: the client's workload (a Deployment's name, say).
pub const PEER_WORKLOAD: &str = "x-mizzen-peer-workload";
/// The calling workload's identity, for the server app.
pub const XFCC: &str = "x-forwarded-client-cert";
/// A request's correlation ID.
pub const REQUEST_ID: &str = "x-request-id";
/// How the client reached the mesh.
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The request's authority: the URI's (HTTP/2 `:authority`, an absolute
/// HTTP/1 target), else the `Host` header.
pub fn authority<'a>(uri: &'a hyper::Uri, h: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| h.get(hyper::header::HOST).and_then(|v| v.to_str().ok()))
}

/// Removes hop-by-hop headers, keeping `te: trailers` (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let trailers = h
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if trailers {
        h.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A request's headers as either proxy forwards it: hop-by-hop headers
/// and any [`APP_PROTOCOL`] and [`PEER_WORKLOAD`] gone (only the client's
/// proxy sets them, after this), `x-request-id` and `x-forwarded-proto` added when missing.
pub fn forwarded_request(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.remove(APP_PROTOCOL);
    h.remove(PEER_WORKLOAD);
    ensure_request_id(h);
    ensure_forwarded_proto(h);
}

/// The label of `v` for [`APP_PROTOCOL`] and metrics.
pub fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// The workload [`PEER_WORKLOAD`] names, when it is a Kubernetes object
/// name (a DNS subdomain of at most 253 characters); anything else is not
/// used as a metrics label.
pub fn peer_workload(h: &HeaderMap) -> Option<String> {
    let v = h.get(PEER_WORKLOAD)?.to_str().ok()?;
    // Each dot-separated part is an RFC 1123 label, as a namespace name is.
    (v.len() <= 253 && v.split('.').all(mizzen_api::mesh::is_namespace_name)).then(|| v.to_owned())
}

/// The version [`APP_PROTOCOL`] names; HTTP/1.1 when absent or unknown.
pub fn app_version(h: &HeaderMap) -> Version {
    match h.get(APP_PROTOCOL).map(HeaderValue::as_bytes) {
        Some(b"HTTP/2") => Version::HTTP_2,
        Some(b"HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// Istio's XFCC value: the server's ID, the SHA-256 of the client's
/// certificate, an empty subject and the client's ID.
pub fn xfcc(server: &SpiffeId, client_cert: &[u8], client: &SpiffeId) -> HeaderValue {
    let hash = ring::digest::digest(&ring::digest::SHA256, client_cert);
    let hex: String = hash.as_ref().iter().fold(String::with_capacity(64), |mut s, b| {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
        s
    });
    let v = format!("By={server};Hash={hex};Subject=\"\";URI={client}");
    // SPIFFE IDs are ASCII without control characters (checked at parse).
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Adds `x-request-id` (a random version 4 UUID, from the thread's RNG:
/// no system call per request) when the request has none.
pub fn ensure_request_id(h: &mut HeaderMap) {
    if !h.contains_key(REQUEST_ID) {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
            h.insert(REQUEST_ID, v);
        }
    }
}

/// Sets `x-forwarded-proto: http` when absent: the app spoke plain HTTP to
/// its proxy.
pub fn ensure_forwarded_proto(h: &mut HeaderMap) {
    if !h.contains_key(FORWARDED_PROTO) {
        h.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("x-kept", "yes"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "traceparent", "x-kept"], "{h:?}");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn a_peer_workload_is_used_only_when_it_is_an_object_name() {
        let table = [
            ("reviews-v1", Some("reviews-v1")),
            ("web.frontend", Some("web.frontend")),
            ("", None),
            ("Reviews", None),
            ("-web", None),
            ("web-", None),
            ("a b", None),
            ("web..x", None),
        ];
        for (value, want) in table {
            let h = map(&[(PEER_WORKLOAD, value)]);
            assert_eq!(peer_workload(&h).as_deref(), want, "{value:?}");
        }
        let long = "a".repeat(254);
        assert_eq!(peer_workload(&map(&[(PEER_WORKLOAD, &long)])), None, "longer than 253");
        assert_eq!(peer_workload(&HeaderMap::new()), None);
    }

    #[test]
    fn the_peer_workload_never_passes_a_proxy() {
        let mut h = map(&[(PEER_WORKLOAD, "client"), (APP_PROTOCOL, "HTTP/2")]);
        forwarded_request(&mut h);
        assert!(h.get(PEER_WORKLOAD).is_none() && h.get(APP_PROTOCOL).is_none());
    }

    #[test]
    fn te_without_trailers_goes() {
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn app_version_round_trips_and_defaults_to_http11() {
        for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            let h = map(&[(APP_PROTOCOL, version_name(v))]);
            assert_eq!(app_version(&h), v);
        }
        assert_eq!(app_version(&map(&[(APP_PROTOCOL, "HTTP/3")])), Version::HTTP_11);
        assert_eq!(app_version(&HeaderMap::new()), Version::HTTP_11);
    }

    #[test]
    fn xfcc_is_in_istios_format() {
        let server = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/server").expect("id");
        let client = SpiffeId::parse("spiffe://cluster.local/ns/b/sa/client").expect("id");
        let v = xfcc(&server, b"cert", &client);
        let want = format!(
            "By=spiffe://cluster.local/ns/a/sa/server;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/b/sa/client",
            sha256_hex(b"cert")
        );
        assert_eq!(v.to_str().expect("ascii"), want);
    }

    fn sha256_hex(b: &[u8]) -> String {
        // An independent computation: the sha256sum of "cert".
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(b)?;
                c.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("digest")
            .to_owned()
    }

    #[test]
    fn a_request_id_is_added_only_when_missing() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h[REQUEST_ID].to_str().expect("ascii").to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(), 4);
        let mut kept = map(&[(REQUEST_ID, "abc")]);
        ensure_request_id(&mut kept);
        assert_eq!(kept[REQUEST_ID], "abc");
    }
}
