//! What an outbound connection speaks, decided per Service port the way
//! Istio does, so that a Service written for Istio behaves the same here.
//!
//! 1. `appProtocol`, when set, wins;
//! 2. otherwise the port name, `<protocol>` or `<protocol>-<suffix>`;
//! 3. otherwise the app's first bytes are looked at ([`sniff`]): an
//!    HTTP/1.x request line or the HTTP/2 connection preface makes it
//!    HTTP, anything else (or nothing within the sniff timeout, as with
//!    server-first protocols such as MySQL or SMTP) makes it TCP.
//!
//! | declared (case-insensitive) | treated as |
//! |---|---|
//! | `http`, `http2`, `grpc`, `grpc-web`, `h2c`, `kubernetes.io/h2c`, `kubernetes.io/ws` | HTTP |
//! | `tcp`, `tls`, `https`, `mongo`, `mysql`, `redis`, `kubernetes.io/wss`, `udp` | TCP, relayed as bytes |
//! | anything else, or nothing | sniffed |
//!
//! HTTP is proxied per request (either version, whatever the declaration
//! says: the app's own bytes tell HTTP/1.1 from HTTP/2).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::net::Rewind;

/// How a Service port's traffic is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// Declared HTTP (any version, gRPC).
    Http,
    /// Declared opaque: bytes are relayed per connection.
    Tcp,
    /// Not declared (or not known): decided by the first bytes.
    Sniff,
}

impl PortProtocol {
    /// A metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Http => "http",
            PortProtocol::Tcp => "tcp",
            PortProtocol::Sniff => "sniff",
        }
    }
}

fn declared(name: &str) -> Option<PortProtocol> {
    match name.to_ascii_lowercase().as_str() {
        "http" | "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c" | "kubernetes.io/ws" => {
            Some(PortProtocol::Http)
        }
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" | "udp" => Some(PortProtocol::Tcp),
        _ => None,
    }
}

/// The protocol of a Service port with `app_protocol` (`None` when unset)
/// and `name` (empty for a single unnamed port).
pub fn select(app_protocol: Option<&str>, name: &str) -> PortProtocol {
    if let Some(p) = app_protocol.and_then(declared) {
        return p;
    }
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    // `grpc-web` is a name of its own, not `grpc` with a suffix.
    let by_name = if name.to_ascii_lowercase().starts_with("grpc-web") {
        Some(PortProtocol::Http)
    } else {
        declared(prefix)
    };
    by_name.unwrap_or(PortProtocol::Sniff)
}

/// What the first bytes showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Other,
}

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest first line looked at before deciding it is not HTTP/1.x.
const MAX_LINE: usize = 8 * 1024;

/// Classifies `buf`, the first bytes a client sent: `None` while more
/// bytes could still change the answer.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    // An HTTP/1.x request line: METHOD SP target SP HTTP/1.x CRLF, the
    // method an uppercase token (RFC 9110 methods are case-sensitive, and
    // every registered one is uppercase).
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase() || **b == b'-').count();
    if method_len == 0 || (method_len < buf.len() && buf[method_len] != b' ') {
        return Some(Sniffed::Other);
    }
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE || buf.iter().any(|b| b.is_ascii_control() && *b != b'\r') {
            Some(Sniffed::Other)
        } else {
            None
        };
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    let mut parts = line.split(|&b| b == b' ');
    let ok = matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() && (v == b"HTTP/1.1" || v == b"HTTP/1.0")
    );
    Some(if ok { Sniffed::Http1 } else { Sniffed::Other })
}

/// Reads `conn`'s first bytes until [`classify`] decides, the peer stops
/// sending, or `timeout` passes (then it is [`Sniffed::Other`]: the app
/// waits for the server to speak first). The bytes read come back first
/// from the returned stream.
pub async fn sniff<S: AsyncRead + Unpin>(mut conn: S, timeout: Duration) -> std::io::Result<(Sniffed, Rewind<S>)> {
    let mut buf = Vec::with_capacity(1024);
    let decided = tokio::time::timeout(timeout, async {
        loop {
            if buf.len() == buf.capacity() {
                buf.reserve(buf.len());
            }
            if conn.read_buf(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(classify(&buf).unwrap_or(Sniffed::Other));
            }
            if let Some(s) = classify(&buf) {
                return Ok(s);
            }
        }
    })
    .await;
    let sniffed = match decided {
        Ok(r) => r?,
        Err(_) => Sniffed::Other,
    };
    Ok((sniffed, Rewind::new(buf, conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_istio() {
        use PortProtocol::*;
        let table: &[(Option<&str>, &str, PortProtocol)] = &[
            (None, "http", Http),
            (None, "http-web", Http),
            (None, "HTTP2-api", Http),
            (None, "grpc", Http),
            (None, "grpc-web", Http),
            (None, "grpc-web-ui", Http),
            (None, "tcp-echo", Tcp),
            (None, "mysql", Tcp),
            (None, "https-admin", Tcp),
            (None, "tls", Tcp),
            (None, "web", Sniff),
            (None, "", Sniff),
            (None, "httpx", Sniff),
            // appProtocol wins over the name.
            (Some("tcp"), "http-web", Tcp),
            (Some("http"), "tcp-echo", Http),
            (Some("kubernetes.io/h2c"), "", Http),
            (Some("kubernetes.io/ws"), "", Http),
            (Some("kubernetes.io/wss"), "http", Tcp),
            (Some("GRPC"), "", Http),
            // An unknown appProtocol falls back to the name.
            (Some("example.com/custom"), "http-x", Http),
            (Some("example.com/custom"), "x", Sniff),
        ];
        for (app, name, want) in table {
            assert_eq!(select(*app, name), *want, "appProtocol {app:?}, name {name:?}");
        }
    }

    #[test]
    fn first_bytes_are_classified_as_soon_as_they_can_be() {
        use Sniffed::*;
        let table: &[(&[u8], Option<Sniffed>)] = &[
            (b"", None),
            (b"G", None),
            (b"GET / HTTP/1.1\r\n", Some(Http1)),
            (b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n", Some(Http1)),
            (b"GET / HTTP/1.1\n", Some(Http1)),
            (b"GET /", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Http2)),
            (b"PRI * HTTP/2", None),
            (b"hello\n", Some(Other)),
            (b"HELLO\n", Some(Other)),
            (b"HELO example.com\r\n", Some(Other)),
            (b"GET / HTTP/2.0\r\n", Some(Other)),
            (b"get / HTTP/1.1\r\n", Some(Other)),
            (b"\x16\x03\x01", Some(Other)),
            (b"GET /\x00", Some(Other)),
        ];
        for (bytes, want) in table {
            assert_eq!(classify(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
