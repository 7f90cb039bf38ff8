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
//! ```
//! The echo server prints `listening <addr>` on stdout once it is bound.

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

fn connect(addr: &str, text: &str) -> Result<(), String> {
    let sock = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
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

fn open(addr: &str) -> Result<BufReader<TcpStream>, String> {
    let sock = addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match args.as_slice() {
        ["echo-server", addr] => echo_server(addr),
        ["connect", addr, text] => connect(addr, text),
        ["load", addr, secs, ms] => load(addr, secs, ms),
        ["whoami"] => {
            let (uid, gid) = ids();
            println!("uid={uid} gid={gid}");
            Ok(())
        }
        _ => Err("usage: mizzen-testapp echo-server ADDR | connect ADDR TEXT | whoami | load ADDR SECS MS".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mizzen-testapp: {e}");
            ExitCode::FAILURE
        }
    }
}
