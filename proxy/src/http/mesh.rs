//! The client side of the pooled HTTP/2 mTLS connection between proxies,
//! on the `h2` crate itself rather than hyper's HTTP/2 client.
//!
//! Why: hyper's client hands each request to the connection's task over a
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
//! [`H2_KEEPALIVE`], or the connection is closed, so a vanished peer is
//! noticed in seconds.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{H2_KEEPALIVE, SendError};
use super::{Body, BodyError};

/// Flow-control windows as hyper's client sets them: a stream may have
/// 2 MiB in flight, the connection 5 MiB.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Bytes h2 may buffer per stream before a writer waits.
const SEND_BUFFER: usize = 1024 * 1024;
/// A request body's first bytes queued without waiting for the stream's
/// window (h2 sends them as the window allows): beyond this the body
/// waits for capacity like any stream.
const EAGER: usize = 64 * 1024;

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

/// Why a connection's driver stopped.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no PING answer within {0:?}")]
    PingTimeout(std::time::Duration),
}

/// Runs the connection until it ends; every [`H2_KEEPALIVE`] a PING whose
/// answer must come within as long.
async fn drive<T>(conn: h2::client::Connection<T, Bytes>, pings: Option<h2::PingPong>) -> Result<(), DriveError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = pin!(conn);
    let Some(mut pings) = pings else {
        return Ok(conn.await?);
    };
    loop {
        tokio::select! {
            r = conn.as_mut() => return Ok(r?),
            () = tokio::time::sleep(H2_KEEPALIVE) => {}
        }
        let answered = tokio::time::timeout(H2_KEEPALIVE, pings.ping(h2::Ping::opaque()));
        tokio::select! {
            r = conn.as_mut() => return Ok(r?),
            r = answered => match r {
                Ok(pong) => { pong?; }
                Err(_) => return Err(DriveError::PingTimeout(H2_KEEPALIVE)),
            },
        }
    }
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
            let mut response = Response::from_parts(parts, super::full(""));
            if response.status().is_success() {
                response.extensions_mut().insert(Tunnel::new(stream, recv));
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

/// Carries `body` onto `stream`: its first [`EAGER`] bytes at once, the
/// rest as the stream's window allows; trailers at the end. A body that
/// fails resets the stream.
async fn pipe(mut body: Body, mut stream: SendStream<Bytes>) {
    let mut eager = 0usize;
    loop {
        let frame = match body.frame().await {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; resetting its stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(f)) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        eager += data.len();
        if eager > EAGER && !has_capacity(&mut stream).await {
            return;
        }
        if stream.send_data(data, body.is_end_stream()).is_err() || body.is_end_stream() {
            return;
        }
    }
}

/// Waits until `stream` may send more (hyper's rule: at least one byte of
/// window); false once the stream is gone.
async fn has_capacity(stream: &mut SendStream<Bytes>) -> bool {
    stream.reserve_capacity(1);
    loop {
        if stream.capacity() > 0 {
            return true;
        }
        match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            _ => return false,
        }
    }
}

/// The stream's next data chunk, its bytes' window given back to the peer.
fn poll_released(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
    let data = std::task::ready!(recv.poll_data(cx));
    if let Some(Ok(d)) = &data {
        let _ = recv.flow_control().release_capacity(d.len());
    }
    Poll::Ready(data)
}

/// A response body read from its HTTP/2 stream: window given back as
/// data is taken, trailers after the data.
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
}

impl H2Body {
    fn new(recv: RecvStream) -> Self {
        Self { recv, data_done: false }
    }
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match std::task::ready!(poll_released(&mut self.recv, cx)) {
                Some(Ok(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// An accepted CONNECT stream to a peer proxy, as a byte stream: what an
/// upgraded connection or a tunnel is carried on.
#[derive(Debug, Clone)]
pub struct Tunnel {
    inner: Arc<std::sync::Mutex<Option<TunnelIo>>>,
}

impl Tunnel {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            inner: Arc::new(std::sync::Mutex::new(Some(TunnelIo {
                send,
                recv,
                unread: Bytes::new(),
            }))),
        }
    }

    /// The stream's I/O, once (a response's extensions hold the tunnel
    /// for whoever bridges it).
    pub fn take(&self) -> Option<TunnelIo> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Reads and writes of a CONNECT stream.
#[derive(Debug)]
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
}

fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::ErrorKind::BrokenPipe.into())
    } else {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, e)
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.unread.is_empty() {
            match std::task::ready!(poll_released(&mut self.recv, cx)) {
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        let n = loop {
            let available = self.send.capacity();
            if available > 0 {
                break available.min(data.len());
            }
            match std::task::ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        };
        self.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The stream's end; a stream already reset has nothing to end.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let response = conn
            .send(post(super::super::full("hello over h2")))
            .await
            .expect("sent");
        let collected = response.into_body().collect().await.expect("body");
        assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello over h2");
    }

    #[tokio::test]
    async fn a_body_still_streaming_when_the_response_comes_goes_on_from_a_task() {
        // The server answers at once and echoes what streams in (as a
        // bidirectional gRPC call does).
        let conn =
            connection(|req: Request<Incoming>| async move { Response::new(super::super::boxed(req.into_body())) })
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
                    let mut io = TokioIo::new(u);
                    let mut buf = [0u8; 4];
                    if io.read_exact(&mut buf).await.is_ok() {
                        let _ = io.write_all(&buf).await;
                        let _ = io.shutdown().await;
                    }
                }
            });
            Response::new(super::super::full(""))
        })
        .await;
        let mut req = Request::new(super::super::full(""));
        *req.method_mut() = hyper::Method::CONNECT;
        *req.uri_mut() = "echo.test:443".parse().expect("uri");
        let mut response = conn.send(req).await.expect("sent");
        assert_eq!(response.status(), hyper::StatusCode::OK);
        let mut io = response
            .extensions_mut()
            .remove::<Tunnel>()
            .and_then(|t| t.take())
            .expect("the accepted stream's tunnel");
        io.write_all(b"ping").await.expect("write");
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.expect("read");
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
        match conn.send(post(super::super::full("kept"))).await {
            Err(SendError::NotSent(back, _)) => {
                let body = back.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body, "kept", "the request comes back whole");
            }
            other => panic!("expected NotSent, got {:?}", other.map(|r| r.status())),
        }
    }
}
