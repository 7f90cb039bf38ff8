//! Bodies passed through while counting their bytes, with a callback once
//! they end: request metrics are recorded when the response has been
//! carried to the end (or abandoned), and an endpoint's outstanding
//! request is released then, not when the headers arrive.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// How an [`Observed`] body ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ended {
    /// Data bytes carried.
    pub bytes: u64,
    /// `grpc-status` of its trailers, if it had them.
    pub grpc_status: Option<String>,
}

/// What runs once when an [`Observed`] body ends.
pub type OnEnd = Box<dyn FnOnce(Ended) + Send + Sync>;

/// `inner`, counting data bytes into `count` and calling `on_end` once at
/// the end of the stream, on an error, or when dropped (whichever comes
/// first: a server that stops polling a body it knows has ended drops it).
/// Trailers come after the last data frame, so nothing ends on data alone.
pub struct Observed<B> {
    inner: B,
    count: Arc<AtomicU64>,
    grpc_status: Option<String>,
    on_end: Option<OnEnd>,
}

impl<B> std::fmt::Debug for Observed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("bytes", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<B> Observed<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>, on_end: Option<OnEnd>) -> Self {
        Self {
            inner,
            count,
            grpc_status: None,
            on_end,
        }
    }

    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(Ended {
                bytes: self.count.load(Ordering::Relaxed),
                grpc_status: self.grpc_status.take(),
            });
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = Some(status.to_owned());
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::Mutex;

    #[tokio::test]
    async fn counts_bytes_and_ends_once() {
        let ended = Arc::new(Mutex::new(Vec::new()));
        let seen = ended.clone();
        let body = Observed::new(
            Full::new(Bytes::from_static(b"hello")),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |e: Ended| seen.lock().expect("lock").push(e.bytes))),
        );
        let collected = body.collect().await.expect("collect").to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(*ended.lock().expect("lock"), [5], "once, with the byte count");
    }

    #[tokio::test]
    async fn the_grpc_status_of_trailers_is_kept() {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("5"));
        let frames = futures::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let ended = Arc::new(Mutex::new(None));
        let seen = ended.clone();
        let body = Observed::new(
            http_body_util::StreamBody::new(frames),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |e: Ended| *seen.lock().expect("lock") = Some(e))),
        );
        body.collect().await.expect("collect");
        assert_eq!(
            *ended.lock().expect("lock"),
            Some(Ended {
                bytes: 3,
                grpc_status: Some("5".into())
            })
        );
    }

    #[tokio::test]
    async fn a_closed_request_s_body_ends_with_an_error_and_unregisters() {
        let registry = crate::drain::Connections::default();
        let peer = std::net::SocketAddr::from(([10, 0, 0, 1], 1000));
        let guard = registry.open_stream(crate::drain::StreamInfo {
            direction: crate::metrics::Direction::Inbound,
            peer,
            dst: peer,
            identity: None,
            method: "POST".into(),
            path: "/stream".into(),
            authority: None,
            facts: None,
        });
        // A body that never ends by itself (a long gRPC stream).
        let endless = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, super::super::BodyError>,
        >());
        let mut body = Closable::new(endless.boxed(), guard);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), body.frame())
                .await
                .is_err(),
            "still streaming"
        );
        assert_eq!(registry.close_streams_where(|s| s.path == "/stream"), 1);
        let frame = tokio::time::timeout(std::time::Duration::from_secs(1), body.frame())
            .await
            .expect("ends at once");
        let err = frame.expect("a frame").expect_err("an error");
        assert!(err.is::<ClosedByProxy>(), "{err}");
        drop(body);
        assert!(registry.streams().is_empty());
    }

    #[test]
    fn a_body_dropped_early_still_ends() {
        let ended = Arc::new(Mutex::new(Vec::new()));
        let seen = ended.clone();
        drop(Observed::new(
            Full::new(Bytes::from_static(b"unread")),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |e: Ended| seen.lock().expect("lock").push(e.bytes))),
        ));
        assert_eq!(*ended.lock().expect("lock"), [0]);
    }
}

/// The proxy closed the request (a policy change revoked it).
#[derive(Debug, thiserror::Error)]
#[error("the request was closed by the proxy")]
pub struct ClosedByProxy;

/// A response body that ends with [`ClosedByProxy`] as soon as its
/// request is told to close (the peer's HTTP/2 stream is reset, an
/// HTTP/1.1 connection closed); the request stays registered while the
/// body lives.
pub struct Closable {
    inner: super::Body,
    closed: std::sync::Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>,
    _guard: crate::drain::StreamGuard,
}

impl std::fmt::Debug for Closable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closable").finish_non_exhaustive()
    }
}

impl Closable {
    pub fn new(inner: super::Body, guard: crate::drain::StreamGuard) -> Self {
        Self {
            inner,
            closed: std::sync::Mutex::new(Box::pin(guard.closed())),
            _guard: guard,
        }
    }
}

impl HttpBody for Closable {
    type Data = Bytes;
    type Error = super::BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let closed = self.closed.get_mut().unwrap_or_else(|p| p.into_inner());
        if closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(ClosedByProxy.into())));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
