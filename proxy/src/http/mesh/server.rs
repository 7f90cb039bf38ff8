//! The server side of the pooled HTTP/2 mTLS connection between proxies:
//! the inbound proxy serves a peer proxy's requests on it.
//!
//! Every stream is handled in the connection's own task (hyper's server
//! spawns a task per stream and hands the response back to the
//! connection's task): the handler's future, and then the response body's
//! pipe, are polled next to the connection itself. A stream the peer
//! resets drops its handler, which cancels the request to the app.
//!
//! A CONNECT stream (an upgrade or a tunnel, see [`crate::http::upgrade`])
//! reaches the handler with an empty body and a [`PendingTunnel`] in its
//! extensions; once the handler's answer is a success, the stream is sent
//! through it as a [`TunnelIo`] for the handler's bridge to carry.
//!
//! The settings are those hyper's server had: 200 concurrent streams,
//! 16 KiB of headers, 1 MiB windows; PINGs as on the client side
//! ([`Keepalive`]). When `draining` resolves the connection says GOAWAY
//! and ends once its streams have.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use h2::RecvStream;
use h2::server::SendResponse;
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper::header::{CONTENT_LENGTH, TE};
use hyper::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use super::super::Body;
use super::{DriveError, H2Body, Keepalive, TakeOnce, TunnelIo, pipe};

const MAX_STREAMS: u32 = 200;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const WINDOW: u32 = 1024 * 1024;
const SEND_BUFFER: usize = 400 * 1024;

/// A CONNECT stream's byte stream, sent once the handler has answered it
/// with success (a request's extensions hold it).
pub type PendingTunnel = TakeOnce<oneshot::Receiver<TunnelIo>>;

/// Serves the peer proxy's requests on `io` with `handle` until the
/// connection ends: closed by the peer, failed, an unanswered PING, or
/// finished after `draining`.
pub async fn serve<IO, H, F, D>(io: IO, handle: H, draining: D) -> Result<(), DriveError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
    D: Future<Output = ()>,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_connect_protocol()
        .handshake(io)
        .await?;
    let mut keepalive = conn.ping_pong().map(Keepalive::new);
    let mut streams = FuturesUnordered::new();
    let mut draining = pin!(draining);
    let mut drained = false;
    std::future::poll_fn(|cx| {
        if !drained && draining.as_mut().poll(cx).is_ready() {
            drained = true;
            conn.graceful_shutdown();
        }
        if let Some(k) = keepalive.as_mut()
            && let Poll::Ready(e) = k.poll(cx)
        {
            return Poll::Ready(Err(e));
        }
        // The connection is polled again after the streams ran, so that
        // what they queued is written in the same turn.
        let mut ran = false;
        loop {
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        streams.push(stream(&handle, req, respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if ran && !accepted {
                return Poll::Pending;
            }
            while let Poll::Ready(Some(())) = futures::StreamExt::poll_next_unpin(&mut streams, cx) {}
            ran = true;
        }
    })
    .await
}

/// One stream: the handler's answer, then its body.
async fn stream<H, F>(handle: &H, req: Request<RecvStream>, mut respond: SendResponse<Bytes>)
where
    H: Fn(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    let (mut parts, recv) = req.into_parts();
    if let Some(p) = parts.extensions.remove::<h2::ext::Protocol>() {
        parts.extensions.insert(hyper::ext::Protocol::from(p.as_str()));
    }
    let (body, tunnel) = if parts.method == Method::CONNECT {
        let (tx, rx) = oneshot::channel();
        parts.extensions.insert(PendingTunnel::new(rx));
        (crate::http::full(""), Some((tx, recv)))
    } else {
        (H2Body::new(recv).boxed(), None)
    };
    let answer = handle(Request::from_parts(parts, body));
    let response = tokio::select! {
        biased;
        r = answer => r,
        reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(reason = ?reason.ok(), "the peer reset the stream before its answer");
            return;
        }
    };
    let (mut head, body) = response.into_parts();
    // Not allowed in an HTTP/2 response (the handler strips the others).
    head.headers.remove(TE);
    match tunnel {
        Some((tx, recv)) if head.status.is_success() => {
            head.headers.remove(CONTENT_LENGTH);
            match respond.send_response(Response::from_parts(head, ()), false) {
                Ok(send) => {
                    // A handler that does not bridge drops the receiver:
                    // the stream is reset as its halves go.
                    let _ = tx.send(TunnelIo::new(send, recv));
                }
                Err(e) => debug!(error = %e, "the CONNECT stream's answer could not be sent"),
            }
        }
        _ => {
            let eos = body.is_end_stream();
            // A body of known length says so, as hyper's server did: the
            // client proxy answers HTTP/1.1 apps with it rather than with
            // chunks (the proxy's own answers, 403 and 503, are such bodies).
            if !eos
                && let Some(n) = body.size_hint().exact()
                && !head.headers.contains_key(CONTENT_LENGTH)
            {
                head.headers.insert(CONTENT_LENGTH, n.into());
            }
            match respond.send_response(Response::from_parts(head, ()), eos) {
                Ok(send) if !eos => pipe(body, send).await,
                Ok(_) => {}
                Err(e) => debug!(error = %e, "the answer could not be sent"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BodyError;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// hyper's HTTP/2 client (an independent implementation) on one end
    /// of an in-memory pipe, this server with `handle` on the other;
    /// `drain` fires the server's drain.
    async fn connection<H, F>(
        handle: H,
    ) -> (
        hyper::client::conn::http2::SendRequest<Body>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), DriveError>>,
    )
    where
        H: Fn(Request<Body>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (drain, drained) = oneshot::channel::<()>();
        let served = tokio::spawn(serve(server, handle, async move {
            let _ = drained.await;
        }));
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(client))
            .await
            .expect("client handshake");
        tokio::spawn(conn);
        (send, drain, served)
    }

    fn post(body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = Method::POST;
        *r.uri_mut() = "http://echo.test/".parse().expect("uri");
        r
    }

    /// Echoes the request body and its trailers, then `grpc-status: 0`.
    async fn echo(req: Request<Body>) -> Response<Body> {
        let collected = req.into_body().collect().await.expect("body");
        let mut trailers = collected.trailers().cloned().unwrap_or_default();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let frames = futures::stream::iter([
            Ok::<_, BodyError>(Frame::data(collected.to_bytes())),
            Ok(Frame::trailers(trailers)),
        ]);
        Response::new(http_body_util::StreamBody::new(frames).boxed())
    }

    #[tokio::test]
    async fn a_body_and_its_trailers_cross_both_ways() {
        let (mut send, _drain, _served) = connection(echo).await;
        let mut request_trailers = hyper::HeaderMap::new();
        request_trailers.insert("x-sum", hyper::header::HeaderValue::from_static("42"));
        let frames = futures::stream::iter([
            Ok::<_, BodyError>(Frame::data(Bytes::from_static(b"hello over h2"))),
            Ok(Frame::trailers(request_trailers)),
        ]);
        let response = send
            .send_request(post(http_body_util::StreamBody::new(frames).boxed()))
            .await
            .expect("response");
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().expect("trailers").clone();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-sum"], "42", "the request's trailers reached the handler");
        assert_eq!(collected.to_bytes(), "hello over h2");
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_answered_with_its_content_length() {
        let (mut send, _drain, _served) = connection(|_req| async { crate::http::denied(false) }).await;
        let response = send.send_request(post(crate::http::full(""))).await.expect("response");
        assert_eq!(response.status(), hyper::StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[CONTENT_LENGTH], "19", "RBAC: access denied");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "RBAC: access denied");
    }

    #[tokio::test]
    async fn a_stream_the_peer_resets_drops_its_handler() {
        // The handler never answers; it notes being dropped.
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = oneshot::channel::<()>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let flag = dropped.clone();
        let (mut send, _drain, _served) = connection(move |_req| {
            let mut guard = DropFlag(flag.clone(), tx.lock().expect("lock").take());
            guard.started();
            async move {
                let _guard = guard;
                std::future::pending::<Response<Body>>().await
            }
        })
        .await;
        let request = tokio::spawn(async move { send.send_request(post(crate::http::full("x"))).await });
        // The handler runs, then the client gives up (hyper resets the
        // stream when the response future is dropped).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        request.abort();
        for _ in 0..200 {
            if dropped.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(dropped.load(Ordering::Acquire), "the handler was dropped");
    }

    /// Sets its flag when dropped; tells its sender it exists.
    struct DropFlag(Arc<AtomicBool>, Option<oneshot::Sender<()>>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    impl DropFlag {
        fn started(&mut self) {
            if let Some(tx) = self.1.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn an_accepted_connect_stream_is_a_tunnel_both_ways() {
        let (mut send, _drain, _served) = connection(|mut req: Request<Body>| async move {
            let pending = req
                .extensions_mut()
                .remove::<PendingTunnel>()
                .and_then(|p| p.take())
                .expect("a pending tunnel");
            tokio::spawn(async move {
                if let Ok(io) = pending.await {
                    super::super::tunnel_test::echo_four(io).await;
                }
            });
            Response::new(crate::http::full(""))
        })
        .await;
        let mut req = Request::new(crate::http::full(""));
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = "echo.test:443".parse().expect("uri");
        let mut response = send.send_request(req).await.expect("response");
        assert_eq!(response.status(), hyper::StatusCode::OK);
        let upgraded = hyper::upgrade::on(&mut response).await.expect("upgraded");
        let back = super::super::tunnel_test::round_trip(TokioIo::new(upgraded)).await;
        assert_eq!(back, b"ping");
    }

    #[tokio::test]
    async fn on_drain_a_request_in_flight_finishes_and_the_connection_ends() {
        let (release, released) = oneshot::channel::<()>();
        let (started, has_started) = oneshot::channel::<()>();
        let ends = Arc::new(Mutex::new(Some((started, released))));
        let (mut send, drain, served) = connection(move |_req| {
            let ends = ends.lock().expect("lock").take();
            async move {
                if let Some((started, released)) = ends {
                    let _ = started.send(());
                    let _ = released.await;
                }
                Response::new(crate::http::full("finished"))
            }
        })
        .await;
        let in_flight = tokio::spawn(send.send_request(post(crate::http::full(""))));
        has_started.await.expect("the handler runs");
        drain.send(()).expect("drain");
        release.send(()).expect("release");
        let response = in_flight
            .await
            .expect("task")
            .expect("the request in flight is answered");
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "finished");
        // The client may close its end first once it has read the final
        // GOAWAY (the server then ends on a broken pipe): either way, the
        // connection ends.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
        assert!(matches!(ended, Ok(Ok(_))), "the connection ended: {ended:?}");
    }
}
