//! gRPC-shaped load for the benchmark: unary calls over h2c, framed as
//! gRPC (a 5-byte prefix per message, `application/grpc`, the status in
//! trailers), so that the proxies carry what a gRPC service carries.
//! Correctness through the mesh is tested with grpcio (`tests/grpc_echo.py`).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{BODY, report};

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A message as gRPC frames it: uncompressed flag, length, bytes.
fn framed(message: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + message.len());
    b.push(0);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    b.into()
}

type Answer = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn answer(req: hyper::Request<hyper::body::Incoming>) -> Result<hyper::Response<Answer>, Infallible> {
    let message = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = vec![Ok(Frame::data(message)), Ok(Frame::trailers(trailers))];
    let mut resp = hyper::Response::new(StreamBody::new(futures::stream::iter(frames)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

pub(crate) fn server(addr: &str) -> Result<(), String> {
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), hyper::service::service_fn(answer))
                    .await;
            });
        }
    })
}

/// One call: Ok when the answer is the message back with status 0.
async fn call(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &hyper::Uri,
    message: &Bytes,
) -> Result<(), String> {
    let req = hyper::Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message.clone()))
        .map_err(|e| e.to_string())?;
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.as_bytes().to_vec());
    if status.as_deref() != Some(b"0") || body.to_bytes() != *message {
        return Err(format!("bad answer, grpc-status {status:?}"));
    }
    Ok(())
}

/// One connection's share of the load, on a thread of its own: the wait
/// for each call's scheduled time is a thread sleep, finer than the
/// async timer's millisecond.
fn connection(
    addr: &str,
    uri: &hyper::Uri,
    message: &Bytes,
    schedule: (Instant, Instant, Option<Duration>),
) -> Result<(Vec<u64>, u64), String> {
    let (mut next, end, interval) = schedule;
    runtime()?.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let (mut latencies, mut errors) = (Vec::new(), 0u64);
        while next < end {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let scheduled = if interval.is_some() { next } else { Instant::now() };
            match call(&mut send, uri, message).await {
                Ok(()) => latencies.push(scheduled.elapsed().as_micros() as u64),
                Err(_) => errors += 1,
            }
            next = match interval {
                Some(d) => next + d,
                None => Instant::now(),
            };
        }
        Ok((latencies, errors))
    })
}

pub(crate) fn load(addr: &str, rate: &str, secs: &str, conns: &str) -> Result<(), String> {
    let rate: f64 = rate.parse().map_err(|_| format!("bad rate {rate:?}"))?;
    let secs: f64 = secs.parse().map_err(|_| format!("bad seconds {secs:?}"))?;
    let conns: usize = conns.parse().map_err(|_| format!("bad connection count {conns:?}"))?;
    let uri: hyper::Uri = format!("http://{addr}/mizzen.bench.Echo/Unary")
        .parse()
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let message = framed(&[b'g'; BODY]);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let (uri, message, addr) = (uri.clone(), message.clone(), addr.to_owned());
            // Offset so the connections interleave.
            let first = start + interval.map(|d| d.mul_f64(i as f64 / conns as f64)).unwrap_or_default();
            std::thread::spawn(move || connection(&addr, &uri, &message, (first, end, interval)))
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in threads {
        let (l, e) = t.join().map_err(|_| "load thread panicked".to_string())??;
        all.extend(l);
        errors += e;
    }
    report(all, errors, secs);
    Ok(())
}
