//! The client side of the pooled HTTP/2 mTLS connection between proxies.
//!
//! hyper's client hands each request to the connection's task over a
//! channel and then spawns two tasks per request (one awaits the response
//! for the caller, one pipes the body), and a new stream's DATA waits for
//! a turn of the connection task after its HEADERS. Measured on the proxy
//! benchmark, a small POST cost 13 task polls in the client proxy (the
//! L4 relay: 2), and user-space CPU per request followed. Here the
//! request's own task (the app connection's) opens the stream, queues the
//! body's first bytes at once (h2 holds them until the stream opens and
//! its flow-control window allows), awaits the response and reads the
//! response body straight from the stream. A body that is not all there
//! yet is carried by the same task while it waits for the response; only
//! one still going when the response arrives (streaming gRPC, a slow
//! upload) moves to a task of its own, with flow control as hyper has it.
//!
//! The connection's task also sends PINGs: an answer must come within
//! [`super::super::pool::H2_KEEPALIVE`], or the connection is closed, so a
//! vanished peer is noticed in seconds.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use super::super::Body;
use super::super::pool::SendError;
use super::{DriveError, H2Body, Keepalive, Tunnel, TunnelIo, pipe};

/// Flow-control windows as hyper's client sets them: a stream may have
/// 2 MiB in flight, the connection 5 MiB.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Bytes h2 may buffer per stream before a writer waits.
const SEND_BUFFER: usize = 1024 * 1024;

/// One HTTP/2 connection to a peer proxy; clones share it.
#[derive(Debug, Clone)]
pub struct MeshConn {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// Opens the HTTP/2 connection on `io`; its driver, with keepalive PINGs,
/// runs as a task. Writes are not coalesced ([`crate::coalesce`]): a
/// request's HEADERS and first DATA are queued in the same turn here, so
/// the turn `Coalesce` waits would only cost a poll.
pub async fn handshake<IO>(io: IO) -> Result<MeshConn, h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let pings = conn.ping_pong();
    let flag = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = drive(conn, pings).await {
            tracing::debug!(error = %e, "HTTP/2 connection to a peer proxy ended");
        }
        flag.store(true, Ordering::Release);
    });
    Ok(MeshConn { send, closed })
}

/// Runs the connection until it ends, or until a PING goes unanswered.
async fn drive<T>(conn: h2::client::Connection<T, Bytes>, pings: Option<h2::PingPong>) -> Result<(), DriveError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = pin!(conn);
    let Some(pings) = pings else {
        return Ok(conn.await?);
    };
    let mut keepalive = Keepalive::new(pings);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(DriveError::from));
        }
        keepalive.poll(cx).map(Err)
    })
    .await
}

impl MeshConn {
    /// Whether the connection has ended (closed by either side).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (in HTTP/2 form) and returns the response. A request
    /// the connection could not take (it is closing, or out of stream IDs)
    /// comes back unsent. A `CONNECT` request's response carries the
    /// stream as a [`Tunnel`] in its extensions.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let (mut parts, body) = req.into_parts();
        let connect = parts.method == hyper::Method::CONNECT;
        if let Some(p) = parts.extensions.remove::<hyper::ext::Protocol>() {
            parts.extensions.insert(h2::ext::Protocol::from(p.as_str()));
        }
        // A connection that cannot open a stream (the peer said GOAWAY, it
        // failed, its stream IDs ran out) takes no more: the pool opens a
        // new one for the next request.
        let mut send = match self.send.clone().ready().await {
            Ok(s) => s,
            Err(e) => {
                self.closed.store(true, Ordering::Release);
                return Err(SendError::NotSent(Box::new(Request::from_parts(parts, body)), e.into()));
            }
        };
        let eos = !connect && body.is_end_stream();
        // Kept to give the request back should the stream not open.
        let head = Request::from_parts(parts, ());
        let again = copy_head(&head);
        let (response, stream) = match send.send_request(head, eos) {
            Ok(sent) => sent,
            Err(e) => {
                self.closed.store(true, Ordering::Release);
                return Err(SendError::NotSent(Box::new(again.map(|()| body)), e.into()));
            }
        };
        if connect {
            let response = response.await.map_err(|e| SendError::Failed(e.into()))?;
            let (parts, recv) = response.into_parts();
            let mut response = Response::from_parts(parts, crate::http::full(""));
            if response.status().is_success() {
                response
                    .extensions_mut()
                    .insert(Tunnel::new(TunnelIo::new(stream, recv)));
            }
            return Ok(response);
        }
        let response = if eos {
            response.await
        } else {
            send_body_while_waiting(body, stream, response).await
        };
        let response = response.map_err(|e| SendError::Failed(e.into()))?;
        Ok(response.map(|recv| H2Body::new(recv).boxed()))
    }
}

/// A copy of a request head without its body or extensions (only
/// [`h2::ext::Protocol`] matters, and the caller sets it again).
fn copy_head(head: &Request<()>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = head.method().clone();
    *r.uri_mut() = head.uri().clone();
    *r.version_mut() = head.version();
    *r.headers_mut() = head.headers().clone();
    r
}

/// Awaits `response` while sending `body` on `stream`; a body still going
/// when the response comes is carried on by a task of its own.
async fn send_body_while_waiting(
    body: Body,
    stream: SendStream<Bytes>,
    response: h2::client::ResponseFuture,
) -> Result<Response<RecvStream>, h2::Error> {
    let mut pipe = Box::pin(pipe(body, stream));
    let mut response = pin!(response);
    tokio::select! {
        biased;
        () = pipe.as_mut() => response.await,
        r = response.as_mut() => {
            tokio::spawn(pipe);
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::BodyError;
    use hyper::body::Frame;
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// An HTTP/2 server (hyper's, as the peer proxy runs) on one end of an
    /// in-memory pipe serving `svc`; the client connection on the other.
    async fn connection<F, Fut>(svc: F) -> MeshConn
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let svc = svc.clone();
                async move { Ok::<_, std::convert::Infallible>(svc(req).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .enable_connect_protocol()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        handshake(client).await.expect("handshake")
    }

    fn post(body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = hyper::Method::POST;
        *r.uri_mut() = "http://echo.test/".parse().expect("uri");
        *r.version_mut() = hyper::Version::HTTP_2;
        r
    }

    /// Echoes the request body and ends with a `grpc-status` trailer.
    async fn echo(req: Request<Incoming>) -> Response<Body> {
        let body = req.into_body().collect().await.expect("body").to_bytes();
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        let frames = futures::stream::iter([Ok::<_, BodyError>(Frame::data(body)), Ok(Frame::trailers(trailers))]);
        Response::new(http_body_util::StreamBody::new(frames).boxed())
    }

    #[tokio::test]
    async fn a_body_crosses_and_the_response_keeps_its_trailers() {
        let conn = connection(echo).await;
        let response = conn.send(post(crate::http::full("hello over h2"))).await.expect("sent");
        let collected = response.into_body().collect().await.expect("body");
        assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello over h2");
    }

    #[tokio::test]
    async fn a_body_still_streaming_when_the_response_comes_goes_on_from_a_task() {
        // The server answers at once and echoes what streams in (as a
        // bidirectional gRPC call does).
        let conn =
            connection(|req: Request<Incoming>| async move { Response::new(crate::http::boxed(req.into_body())) })
                .await;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BodyError>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"one "))))
            .expect("send");
        let response = conn
            .send(post(http_body_util::StreamBody::new(rx).boxed()))
            .await
            .expect("response before the body ended");
        let mut body = response.into_body();
        let first = body
            .frame()
            .await
            .expect("frame")
            .expect("data")
            .into_data()
            .expect("data");
        assert_eq!(first, "one ");
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"two"))))
            .expect("send");
        drop(tx);
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(rest, "two");
    }

    #[tokio::test]
    async fn an_accepted_connect_stream_is_a_tunnel_both_ways() {
        let conn = connection(|mut req: Request<Incoming>| async move {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(u) = upgrade.await {
                    super::super::tunnel_test::echo_four(TokioIo::new(u)).await;
                }
            });
            Response::new(crate::http::full(""))
        })
        .await;
        let mut req = Request::new(crate::http::full(""));
        *req.method_mut() = hyper::Method::CONNECT;
        *req.uri_mut() = "echo.test:443".parse().expect("uri");
        let mut response = conn.send(req).await.expect("sent");
        assert_eq!(response.status(), hyper::StatusCode::OK);
        let io = response
            .extensions_mut()
            .remove::<Tunnel>()
            .and_then(|t| t.take())
            .expect("the accepted stream's tunnel");
        let back = super::super::tunnel_test::round_trip(io).await;
        assert_eq!(back, b"ping");
    }

    #[tokio::test]
    async fn a_closed_connection_gives_the_request_back_unsent() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("server handshake");
            conn.graceful_shutdown();
            let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
        });
        let conn = handshake(client).await.expect("handshake");
        accept.await.expect("server");
        // The connection ends once the server's GOAWAY has been read.
        for _ in 0..100 {
            if conn.is_closed() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(conn.is_closed(), "the connection ended");
        match conn.send(post(crate::http::full("kept"))).await {
            Err(SendError::NotSent(back, _)) => {
                let body = back.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body, "kept", "the request comes back whole");
            }
            other => panic!("expected NotSent, got {:?}", other.map(|r| r.status())),
        }
    }
}
