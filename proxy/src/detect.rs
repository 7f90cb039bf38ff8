//! Telling a peer proxy's mTLS from anything else on a new inbound
//! connection, cheaply and with bounded cost however clients behave.
//!
//! The first bytes are read (not peeked: a peek that finds nothing new
//! would have to poll) into a small buffer that grows only as a ClientHello
//! arrives, and handed back afterwards through [`Rewind`]. Connections still
//! being sorted are [`Undecided`]: there are at most `max` of them, and a
//! new one beyond that closes the oldest, so a flood of clients that send
//! one byte and wait costs a fixed amount of memory and never locks out the
//! clients that finish their hello at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::net::Rewind;

/// Largest ClientHello looked at (a TLS record's maximum plaintext).
pub const MAX_HELLO: usize = 16 * 1024 + 5;
/// First read size; a typical ClientHello fits.
const FIRST_READ: usize = 2048;

/// What a new connection turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello offering the mesh's ALPN: a peer proxy.
    MeshTls,
    /// Anything else: plaintext, the app's own TLS, or nothing at all.
    Other,
}

/// Why a connection was closed before it was sorted.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no complete first bytes within the detection timeout")]
    Timeout,
    #[error("closed to make room: more than {0} connections were still being sorted")]
    Evicted(usize),
    #[error("reading the first bytes: {0}")]
    Io(#[from] std::io::Error),
}

impl DetectError {
    /// The metric label (`reason`) of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            DetectError::Timeout => "first_bytes_timeout",
            DetectError::Evicted(_) => "detect_overload",
            DetectError::Io(_) => "io",
        }
    }
}

/// The connections being sorted now, oldest first.
#[derive(Debug)]
pub struct Undecided {
    max: usize,
    next: AtomicU64,
    waiting: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

/// One connection's place among the [`Undecided`]; leaving drops it.
#[derive(Debug)]
pub struct Place {
    undecided: Arc<Undecided>,
    key: u64,
    evicted: oneshot::Receiver<()>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.undecided.lock().remove(&self.key);
    }
}

impl Undecided {
    /// At most `max` connections sorted at once (at least one).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            next: AtomicU64::new(0),
            waiting: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place, closing the oldest undecided connection when full.
    pub fn enter(self: &Arc<Self>) -> Place {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, evicted) = oneshot::channel();
        let mut waiting = self.lock();
        while waiting.len() >= self.max {
            match waiting.pop_first() {
                Some((_, oldest)) => {
                    let _ = oldest.send(());
                }
                None => break,
            }
        }
        waiting.insert(key, tx);
        drop(waiting);
        Place {
            undecided: self.clone(),
            key,
            evicted,
        }
    }

    /// Connections being sorted now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads `conn`'s first bytes until it is clear what it speaks, within
/// `timeout` and while `place` is not taken away. The bytes read come back
/// first from the returned stream.
pub async fn detect(
    mut conn: TcpStream,
    mut place: Place,
    timeout: std::time::Duration,
) -> Result<(Protocol, Rewind<TcpStream>), DetectError> {
    let max = place.undecided.max;
    let mut buf = Vec::with_capacity(FIRST_READ);
    let sorted = tokio::select! {
        r = tokio::time::timeout(timeout, sort(&mut conn, &mut buf)) => r.map_err(|_| DetectError::Timeout)??,
        _ = &mut place.evicted => return Err(DetectError::Evicted(max)),
    };
    Ok((sorted, Rewind::new(buf, conn)))
}

async fn sort(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Protocol, DetectError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HELLO - buf.len()));
        }
        if conn.read_buf(buf).await? == 0 || buf[0] != 0x16 {
            // Closed, or not TLS: whatever it is goes to the app as it is.
            return Ok(Protocol::Other);
        }
        let mut new = &buf[fed..];
        while !new.is_empty() {
            if acceptor.read_tls(&mut new).map_err(DetectError::Io)? == 0 {
                break;
            }
        }
        fed = buf.len() - new.len();
        match acceptor.accept() {
            Ok(Some(hello)) => {
                let mesh = hello
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut protos| protos.any(crate::tls::is_mesh_alpn));
                return Ok(if mesh { Protocol::MeshTls } else { Protocol::Other });
            }
            Ok(None) if buf.len() < MAX_HELLO => {}
            // Not a ClientHello rustls understands, or too long: not ours.
            _ => return Ok(Protocol::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_closes_the_oldest_first() {
        let u = Undecided::new(2);
        let mut first = u.enter();
        let mut second = u.enter();
        assert_eq!(u.len(), 2);
        let _third = u.enter();
        assert_eq!(u.len(), 2, "bounded");
        assert!(first.evicted.try_recv().is_ok(), "the oldest is told to close");
        assert!(second.evicted.try_recv().is_err(), "the others stay");
        drop(second);
        assert_eq!(u.len(), 1, "leaving frees the place");
    }
}
