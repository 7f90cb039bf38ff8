//! Requests that take the connection over: HTTP/1.1 `Upgrade` (WebSocket
//! and any other protocol) and `CONNECT` tunnels.
//!
//! Between proxies they travel on the pooled HTTP/2 connection as
//! CONNECT streams: an upgrade as an extended CONNECT (RFC 8441) whose
//! `:protocol` is the upgrade token, with the request's other headers
//! (`Sec-WebSocket-Key` and the like) as they were. The server-side proxy
//! turns it back into the app's HTTP/1.1 upgrade request on a connection
//! of its own, answers the stream with 200 and the app's headers when the
//! app switches protocols, and the client-side proxy answers the app with
//! 101. Bytes then flow both ways until either side closes. Any other
//! answer is passed back as an ordinary response.

use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::upgrade::OnUpgrade;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::mesh::server::PendingTunnel;
use super::mesh::{Tunnel, TunnelIo};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// `Upgrade: <token>` with `Connection: upgrade` (HTTP/1.1).
    Upgrade(HeaderValue),
    /// `CONNECT host:port`.
    Connect,
}

/// Whether `h` lists `token` in `Connection`.
fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The takeover an HTTP/1.x request asks for, if any.
pub fn requested<B>(req: &Request<B>) -> Option<Takeover> {
    if req.method() == Method::CONNECT {
        return Some(Takeover::Connect);
    }
    if req.version() == hyper::Version::HTTP_2 || !connection_has(req.headers(), "upgrade") {
        return None;
    }
    req.headers().get(UPGRADE).cloned().map(Takeover::Upgrade)
}

/// The takeover a peer proxy's HTTP/2 CONNECT stream carries.
pub fn from_peer<B>(req: &Request<B>) -> Option<Takeover> {
    if req.method() != Method::CONNECT {
        return None;
    }
    match req.extensions().get::<hyper::ext::Protocol>() {
        Some(p) => HeaderValue::from_str(p.as_str()).ok().map(Takeover::Upgrade),
        None => Some(Takeover::Connect),
    }
}

/// Makes `req` (already in HTTP/2 form) the CONNECT stream for `t`.
pub fn into_connect_stream<B>(req: &mut Request<B>, t: &Takeover) {
    if let Takeover::Upgrade(token) = t {
        *req.method_mut() = Method::CONNECT;
        if let Ok(p) = token.to_str() {
            req.extensions_mut().insert(hyper::ext::Protocol::from(p));
        }
    }
}

/// Makes `req` the HTTP/1.1 request for `t`: a peer's CONNECT stream
/// back into the app's upgrade request, or the app's own request (whose
/// upgrade headers hop-by-hop stripping removed) as it leaves again.
pub fn into_http1_request<B>(req: &mut Request<B>, t: &Takeover) {
    if let Takeover::Upgrade(token) = t {
        *req.method_mut() = Method::GET;
        req.extensions_mut().remove::<hyper::ext::Protocol>();
        req.headers_mut().insert(UPGRADE, token.clone());
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether `status` means the server took the connection over for `t`:
/// 2xx on a CONNECT stream (`connect_stream`, between proxies, and for
/// CONNECT), 101 on an HTTP/1.1 upgrade.
pub fn accepted(status: StatusCode, t: &Takeover, connect_stream: bool) -> bool {
    match t {
        Takeover::Upgrade(_) if !connect_stream => status == StatusCode::SWITCHING_PROTOCOLS,
        _ => status.is_success(),
    }
}

/// The answer to the app for an accepted takeover: 101 with the upgrade
/// headers for an upgrade, the status as it was for CONNECT.
pub fn to_app_response<B>(resp: &mut Response<B>, t: &Takeover) {
    if let Takeover::Upgrade(token) = t {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(UPGRADE, token.clone());
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The answer to a peer proxy's CONNECT stream for an accepted takeover.
pub fn to_peer_response<B>(resp: &mut Response<B>) {
    *resp.status_mut() = StatusCode::OK;
}

/// The side of a takeover that asked for it: an HTTP/1.1 connection
/// hyper hands over once it has sent the answer, or a peer proxy's
/// CONNECT stream that the mesh server sends once it has.
#[derive(Debug)]
pub enum Downstream {
    Http1(OnUpgrade),
    Stream(tokio::sync::oneshot::Receiver<TunnelIo>),
}

impl Downstream {
    /// Where `req`'s side of the takeover will come from.
    pub fn of<B>(req: &mut Request<B>) -> Self {
        match req.extensions_mut().remove::<PendingTunnel>().and_then(|p| p.take()) {
            Some(stream) => Self::Stream(stream),
            None => Self::Http1(hyper::upgrade::on(req)),
        }
    }
}

/// Once `upstream`'s connection and then `downstream`'s have switched,
/// carries bytes both ways between them. A peer proxy's accepted CONNECT
/// stream ([`Tunnel`]) has switched already.
pub fn bridge_when_switched<B>(downstream: Downstream, upstream: &mut Response<B>) {
    if let Some(tunnel) = upstream.extensions_mut().remove::<Tunnel>().and_then(|t| t.take()) {
        tokio::spawn(bridge(downstream, tunnel));
        return;
    }
    let upstream = hyper::upgrade::on(upstream);
    tokio::spawn(async move {
        match upstream.await {
            Ok(u) => bridge(downstream, TokioIo::new(u)).await,
            Err(e) => tracing::debug!(error = %e, "the upstream did not switch protocols"),
        }
    });
}

/// Carries bytes both ways between the two sides once both have switched.
async fn bridge<U: AsyncRead + AsyncWrite + Unpin>(downstream: Downstream, upstream: U) {
    match downstream {
        Downstream::Http1(on) => match on.await {
            Ok(down) => carry(TokioIo::new(down), upstream).await,
            Err(e) => tracing::debug!(error = %e, "the client side did not switch protocols"),
        },
        Downstream::Stream(stream) => match stream.await {
            Ok(down) => carry(down, upstream).await,
            Err(_) => tracing::debug!("the client's CONNECT stream was not answered"),
        },
    }
}

async fn carry<D, U>(mut down: D, mut up: U)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/chat");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn upgrades_and_connect_are_recognised() {
        let ws = req(
            "GET",
            &[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")],
        );
        assert_eq!(
            requested(&ws),
            Some(Takeover::Upgrade(HeaderValue::from_static("websocket")))
        );
        let no_connection = req("GET", &[("upgrade", "websocket")]);
        assert_eq!(requested(&no_connection), None, "Upgrade without Connection: upgrade");
        assert_eq!(requested(&req("GET", &[])), None);
        let mut connect = req("CONNECT", &[]);
        *connect.uri_mut() = "example.com:443".parse().expect("uri");
        assert_eq!(requested(&connect), Some(Takeover::Connect));
    }

    #[test]
    fn an_upgrade_round_trips_through_a_connect_stream() {
        let t = Takeover::Upgrade(HeaderValue::from_static("websocket"));
        let mut r = req("GET", &[("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]);
        into_connect_stream(&mut r, &t);
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(from_peer(&r), Some(t.clone()));
        into_http1_request(&mut r, &t);
        assert_eq!(r.method(), Method::GET);
        assert_eq!(r.headers()[UPGRADE], "websocket");
        assert_eq!(r.headers()["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(requested(&r), Some(t));
    }
}
