//! A tiny application for end-to-end tests, run inside network-namespace pods.
//!
//! ```text
//! mizzen-testapp echo-server ADDR     accept TCP connections on ADDR; reply to
//!                                     each line with "<uid> <peer> <local> <line>"
//!                                     (<local> is the accepted socket's address,
//!                                     which shows a REDIRECT's target port)
//! mizzen-testapp connect ADDR TEXT    send TEXT as one line to ADDR, print the reply
//! mizzen-testapp whoami               print "uid=<uid> gid=<gid>"
//! mizzen-testapp load ADDR SECS MS     for SECS seconds, every MS milliseconds,
//!                                     send a numbered line on a new connection
//!                                     and on one kept-open connection, and
//!                                     check each reply; print
//!                                     "ok=<n> failed=<n>", exit 1 on a failure
//! mizzen-testapp http-server ADDR     HTTP/1.1 keep-alive server: answers every
//!                                     request with a 1 KiB body
//! mizzen-testapp http-load ADDR RATE SECS CONNS
//!                                     POST 1 KiB bodies over CONNS keep-alive
//!                                     connections, RATE requests/s in all (0:
//!                                     as fast as possible), for SECS seconds;
//!                                     prints one JSON line with the count,
//!                                     errors and latency percentiles (µs,
//!                                     from each request's scheduled time)
//! mizzen-testapp http-echo ADDR       HTTP/1.1 and h2c (prior knowledge) server:
//!                                     answers each request with text lines
//!                                     "pod <HOSTNAME>", "version <v>",
//!                                     "method <m>", "path <p>", then
//!                                     "header <name>: <value>" per header;
//!                                     status <code> for path /status/<code>;
//!                                     CONNECT is answered 200 and the tunnel
//!                                     served the same way; ECHO_DELAY_MS
//!                                     delays every answer; /sleep/<ms> waits
//!                                     that long; /fail/<percent> (or
//!                                     ECHO_FAIL_PERCENT for every path)
//!                                     answers 500 to that share of
//!                                     requests, at random; with
//!                                     ECHO_CALL=IP:PORT each answer also
//!                                     holds "upstream <status>" and the
//!                                     indented answer of a GET / there
//!                                     (end-user carried along)
//! mizzen-testapp banner-server ADDR   a server-first protocol: greets each
//!                                     connection with "banner <HOSTNAME>"
//!                                     before reading anything
//! mizzen-testapp banner-client ADDR [N]
//!                                     connects, sends nothing, prints the
//!                                     greeting; N times in turn
//! mizzen-testapp http-keepalive ADDR SECS
//!                                     one HTTP/1.1 connection, a GET every
//!                                     100 ms, until the server closes it:
//!                                     prints "<status> connection=<value>"
//!                                     per response, then "closed after <n>";
//!                                     exit 1 if still open after SECS
//! mizzen-testapp grpc-server ADDR     h2c gRPC server: answers every unary
//!                                     call with its message, status 0
//! mizzen-testapp grpc-load ADDR RATE SECS CONNS
//!                                     unary gRPC calls with 1 KiB messages
//!                                     over CONNS h2c connections, as
//!                                     http-load (same JSON line)
//! mizzen-testapp hold ADDR N SECS [HEX]  open N connections (writing HEX bytes on each), print "open <n>",
//!                                     keep them for SECS seconds
//! mizzen-testapp get ADDR PATH        one HTTP/1.1 GET: prints the status line
//!                                     and the body; exit 1 unless 2xx
//! mizzen-testapp idle                 do nothing until terminated (a pod to
//!                                     `kubectl exec` the client commands in)
//! mizzen-testapp --version            print the version
//! ```
//! ADDR is `host:port`; host names are resolved (a Service name in a pod).
//! The servers print `listening <addr>` on stdout once it is bound. SIGTERM
//! ends every mode at once: in a container the app is PID 1, which the
//! kernel does not end by a signal it has no handler for.

mod grpc;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn ids() -> (String, String) {
    // The effective IDs are the second field of /proc/self/status's Uid/Gid lines.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_owned()
    };
    (field("Uid:"), field("Gid:"))
}

fn echo_server(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (uid, _) = ids();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let uid = uid.clone();
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let local = conn.local_addr().map(|p| p.to_string()).unwrap_or_default();
            let Ok(mut writer) = conn.try_clone() else {
                return;
            };
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                if writeln!(writer, "{uid} {peer} {local} {line}").is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn http_keepalive(addr: &str, secs: &str) -> Result<(), String> {
    let secs: u64 = secs.parse().map_err(|_| format!("bad seconds {secs:?}"))?;
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let mut conn = open(addr)?;
    let mut body = Vec::new();
    let mut n = 0;
    while std::time::Instant::now() < end {
        if conn
            .get_mut()
            .write_all(b"GET /keepalive HTTP/1.1\r\nhost: keepalive\r\n\r\n")
            .is_err()
        {
            break;
        }
        let Some(head) = read_message(&mut conn, &mut body)? else {
            break;
        };
        n += 1;
        let status = head.lines().next().unwrap_or_default();
        let connection = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("connection:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_else(|| "-".into());
        println!("{status} connection={connection}");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        if connection == "close" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if std::time::Instant::now() >= end {
        return Err(format!("still open after {n} responses"));
    }
    println!("closed after {n}");
    Ok(())
}

fn banner_server(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = writeln!(conn, "banner {host}");
    }
    Ok(())
}

fn banner_client(addr: &str, times: &str) -> Result<(), String> {
    let times: u32 = times.parse().map_err(|_| format!("not a count: {times}"))?;
    for _ in 0..times {
        let mut conn = open(addr)?;
        let mut greeting = String::new();
        conn.read_line(&mut greeting).map_err(|e| format!("read: {e}"))?;
        if greeting.is_empty() {
            return Err(format!("{addr} closed the connection without a greeting"));
        }
        print!("{greeting}");
    }
    Ok(())
}

fn connect(addr: &str, text: &str) -> Result<(), String> {
    let sock = resolve(addr)?;
    let mut conn =
        TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(conn, "{text}").map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(conn)
        .read_line(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    if reply.is_empty() {
        return Err(format!("{addr} closed the connection without replying"));
    }
    print!("{reply}");
    Ok(())
}

/// Sends `text` on `conn` and checks the echo server's reply ends with it.
fn exchange(conn: &mut BufReader<TcpStream>, text: &str) -> Result<(), String> {
    writeln!(conn.get_mut(), "{text}").map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    conn.read_line(&mut reply).map_err(|e| format!("read: {e}"))?;
    if !reply.trim_end().ends_with(text) {
        return Err(format!("reply {reply:?} does not echo {text:?}"));
    }
    Ok(())
}

/// The first address `host:port` names (an IP address or a resolvable name).
fn resolve(addr: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

fn open(addr: &str) -> Result<BufReader<TcpStream>, String> {
    let sock = resolve(addr)?;
    let conn = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    Ok(BufReader::new(conn))
}

fn load(addr: &str, secs: &str, ms: &str) -> Result<(), String> {
    let secs: u64 = secs.parse().map_err(|_| format!("bad seconds {secs:?}"))?;
    let ms: u64 = ms.parse().map_err(|_| format!("bad interval {ms:?}"))?;
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let mut kept = open(addr)?;
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut n = 0u64;
    while std::time::Instant::now() < end {
        n += 1;
        let fresh = open(addr).and_then(|mut c| exchange(&mut c, &format!("new-{n}")));
        let long = exchange(&mut kept, &format!("kept-{n}"));
        for r in [fresh, long] {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("request {n}: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(ms));
    }
    println!("ok={ok} failed={failed}");
    if failed > 0 {
        return Err(format!("{failed} of {} requests failed", ok + failed));
    }
    Ok(())
}

const BODY: usize = 1024;

/// Reads one HTTP/1.1 message's head and its Content-Length body; `None`
/// at a clean end of stream.
fn read_message(conn: &mut BufReader<TcpStream>, body: &mut Vec<u8>) -> Result<Option<String>, String> {
    use std::io::Read;
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        let n = conn.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err("connection closed mid-message".into())
            };
        }
        head.push_str(&line);
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| format!("bad content-length {v:?}"))?;
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    body.resize(length, 0);
    conn.read_exact(body).map_err(|e| format!("read body: {e}"))?;
    Ok(Some(head))
}

fn http_server(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut response =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {BODY}\r\n\r\n")
            .into_bytes();
    response.extend(std::iter::repeat_n(b'r', BODY));
    let response = std::sync::Arc::new(response);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let response = response.clone();
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let Ok(mut writer) = conn.try_clone() else { return };
            let mut reader = BufReader::new(conn);
            let mut body = Vec::with_capacity(BODY);
            while let Ok(Some(_)) = read_message(&mut reader, &mut body) {
                if writer.write_all(&response).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// What [`http_echo`] answers to `req`.
fn describe(req: &hyper::Request<hyper::body::Incoming>) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let mut text = format!(
        "pod {}\nversion {:?}\nmethod {}\npath {}\n",
        std::env::var("HOSTNAME").unwrap_or_default(),
        req.version(),
        req.method(),
        req.uri().path()
    );
    for (name, value) in req.headers() {
        text.push_str(&format!(
            "header {name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let fails = || {
        use std::hash::BuildHasher;
        static DRAWN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let percent = match req.uri().path().strip_prefix("/fail/") {
            Some(p) => p.parse::<u64>().ok()?,
            None => std::env::var("ECHO_FAIL_PERCENT").ok()?.parse::<u64>().ok()?,
        };
        let n = DRAWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A fresh random key per draw: uniform enough for a share.
        (std::collections::hash_map::RandomState::new().hash_one(n) % 100 < percent)
            .then_some(hyper::StatusCode::INTERNAL_SERVER_ERROR)
    };
    let status = req
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| hyper::StatusCode::from_u16(c).ok())
        .or_else(fails)
        .unwrap_or(hyper::StatusCode::OK);
    let mut resp = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(text)));
    *resp.status_mut() = status;
    resp
}

/// Serves [`describe`] on `io`; a CONNECT is answered 200 and the tunnel
/// it opens is served the same way (an HTTP server behind a proxy).
fn serve_echo<IO>(io: IO) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(serve_echo_on(io))
}

async fn serve_echo_on<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let svc = hyper::service::service_fn(|mut req: hyper::Request<hyper::body::Incoming>| async move {
        if req.method() == hyper::Method::CONNECT {
            let tunnel = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = tunnel.await {
                    serve_echo(hyper_util::rt::TokioIo::new(upgraded)).await;
                }
            });
            return Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::default()));
        }
        // A slow replica for balancing tests.
        if let Some(ms) = std::env::var("ECHO_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(ms) = req.uri().path().strip_prefix("/sleep/").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut resp = describe(&req);
        // A service that calls the next one (reviews calling ratings).
        if let Ok(next) = std::env::var("ECHO_CALL") {
            let line = match call(&next, &req).await {
                Ok((status, body)) => {
                    let nested: String = body.lines().map(|l| format!("  {l}\n")).collect();
                    format!("upstream {status}\n{nested}")
                }
                Err(e) => format!("upstream error {e}\n"),
            };
            let mut text = resp
                .body()
                .clone()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default()
                .to_vec();
            text.extend_from_slice(line.as_bytes());
            *resp.body_mut() = http_body_util::Full::new(hyper::body::Bytes::from(text));
        }
        Ok(resp)
    });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

/// `GET /` at `addr` (an `IP:port`), carrying `end-user` from `req` as
/// Istio's sample apps propagate it: the status and the body.
async fn call(addr: &str, req: &hyper::Request<hyper::body::Incoming>) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut out = hyper::Request::get("/").header("host", addr);
    if let Some(user) = req.headers().get("end-user") {
        out = out.header("end-user", user);
    }
    let out = out
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(out).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn http_echo(addr: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve_echo(conn));
        }
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    mizzen_tests::percentile(sorted, p).unwrap_or(0)
}

fn http_load(addr: &str, rate: &str, secs: &str, conns: &str) -> Result<(), String> {
    let rate: f64 = rate.parse().map_err(|_| format!("bad rate {rate:?}"))?;
    let secs: f64 = secs.parse().map_err(|_| format!("bad seconds {secs:?}"))?;
    let conns: usize = conns.parse().map_err(|_| format!("bad connection count {conns:?}"))?;
    let sock = resolve(addr)?;
    let mut request = format!("POST /echo HTTP/1.1\r\nhost: bench\r\ncontent-length: {BODY}\r\n\r\n").into_bytes();
    request.extend(std::iter::repeat_n(b'q', BODY));
    let request = std::sync::Arc::new(request);
    let start = std::time::Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let request = request.clone();
            std::thread::spawn(move || -> (Vec<u64>, u64) {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let connect = || -> Result<BufReader<TcpStream>, String> {
                    let c = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| e.to_string())?;
                    let _ = c.set_nodelay(true);
                    c.set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())?;
                    Ok(BufReader::new(c))
                };
                let mut conn = connect().ok();
                // Fixed rate: this connection's share, offset so the
                // connections interleave.
                let interval = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
                let mut next = start + interval.map(|d| d.mul_f64(i as f64 / conns as f64)).unwrap_or_default();
                let mut body = Vec::with_capacity(BODY);
                while next < end {
                    let now = std::time::Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let scheduled = if interval.is_some() {
                        next
                    } else {
                        std::time::Instant::now()
                    };
                    let result = match conn.as_mut() {
                        Some(c) => c
                            .get_mut()
                            .write_all(&request)
                            .map_err(|e| e.to_string())
                            .and_then(|()| read_message(c, &mut body))
                            .and_then(|m| match m {
                                Some(status) if status.starts_with("HTTP/1.1 200") && body.len() == BODY => Ok(()),
                                other => Err(format!("bad response {other:?}")),
                            }),
                        None => Err("not connected".into()),
                    };
                    match result {
                        Ok(()) => latencies.push(scheduled.elapsed().as_micros() as u64),
                        Err(_) => {
                            errors += 1;
                            conn = connect().ok();
                        }
                    }
                    next = match interval {
                        Some(d) => next + d,
                        None => std::time::Instant::now(),
                    };
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.join().map_err(|_| "worker panicked".to_string())?;
        all.extend(l);
        errors += e;
    }
    report(all, errors, secs);
    Ok(())
}

/// Prints a load run as one JSON line: count, errors, rate and latency
/// percentiles (µs).
fn report(mut latencies: Vec<u64>, errors: u64, secs: f64) {
    latencies.sort_unstable();
    println!(
        "{{\"requests\":{},\"errors\":{errors},\"seconds\":{secs},\"rps\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{}}}",
        latencies.len(),
        latencies.len() as f64 / secs,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99)
    );
}

/// Opens `n` connections to `addr`, writes `first` (hex) on each, and
/// holds them for `secs` seconds.
fn hold(addr: &str, n: &str, secs: &str, first: &str) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| format!("bad count {n:?}"))?;
    let secs: u64 = secs.parse().map_err(|_| format!("bad seconds {secs:?}"))?;
    let sock = resolve(addr)?;
    let first = (0..first.len())
        .step_by(2)
        .map(|i| first.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| format!("bad hex bytes {first:?}"))?;
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        match TcpStream::connect_timeout(&sock, Duration::from_secs(5)) {
            Ok(mut c) => {
                // The peer may close it at once (e.g. to shed load): fine.
                let _ = c.write_all(&first);
                open.push(c);
            }
            Err(e) => eprintln!("connect {addr}: {e}"),
        }
    }
    println!("open {}", open.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn get(addr: &str, path: &str) -> Result<(), String> {
    let mut conn = open(addr)?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut body = Vec::new();
    let head = read_message(&mut conn, &mut body)?.ok_or("connection closed before a response")?;
    let status = head.lines().next().unwrap_or_default().trim().to_owned();
    println!("{status}");
    let body = String::from_utf8_lossy(&body);
    // A body without a final newline would run into the shell's next line.
    if body.is_empty() || body.ends_with('\n') {
        print!("{body}");
    } else {
        println!("{body}");
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(format!("response {status:?}")),
    }
}

/// Exits on SIGTERM (see the module's docs).
fn exit_on_sigterm() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                term.recv().await;
                std::process::exit(0);
            }
        });
    });
}

fn main() -> ExitCode {
    exit_on_sigterm();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match args.as_slice() {
        ["echo-server", addr] => echo_server(addr),
        ["connect", addr, text] => connect(addr, text),
        ["load", addr, secs, ms] => load(addr, secs, ms),
        ["http-server", addr] => http_server(addr),
        ["http-echo", addr] => http_echo(addr),
        ["banner-server", addr] => banner_server(addr),
        ["http-keepalive", addr, secs] => http_keepalive(addr, secs),
        ["grpc-server", addr] => grpc::server(addr),
        ["grpc-load", addr, rate, secs, conns] => grpc::load(addr, rate, secs, conns),
        ["banner-client", addr] => banner_client(addr, "1"),
        ["banner-client", addr, times] => banner_client(addr, times),
        ["http-load", addr, rate, secs, conns] => http_load(addr, rate, secs, conns),
        ["hold", addr, n, secs] => hold(addr, n, secs, ""),
        ["hold", addr, n, secs, first] => hold(addr, n, secs, first),
        ["get", addr, path] => get(addr, path),
        ["idle"] => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        ["--version"] => {
            println!("mizzen-testapp {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        ["whoami"] => {
            let (uid, gid) = ids();
            println!("uid={uid} gid={gid}");
            Ok(())
        }
        _ => Err("usage: mizzen-testapp echo-server ADDR | connect ADDR TEXT | whoami | load ADDR SECS MS | http-server ADDR | http-echo ADDR | banner-server ADDR | banner-client ADDR [N] | http-keepalive ADDR SECS | grpc-server ADDR | grpc-load ADDR RATE SECS CONNS | http-load ADDR RATE SECS CONNS | hold ADDR N SECS [HEX-BYTES] | get ADDR PATH | idle | --version".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mizzen-testapp: {e}");
            ExitCode::FAILURE
        }
    }
}
