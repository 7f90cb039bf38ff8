//! The registry of open connections, and graceful drain.
//!
//! Every accepted connection is registered until its task ends, with what
//! is known of it (direction, client address, the peer's identity once
//! verified, whether it is served as HTTP). The registry can:
//! - **drain**: on SIGTERM the proxy stops accepting and reports not ready;
//!   HTTP connections are told to finish (HTTP/2 GOAWAY, `Connection:
//!   close` on HTTP/1.1's next response) and TCP connections may run to
//!   their end, for up to the drain period;
//! - **close** the connections matching a predicate at once (for policy
//!   changes that revoke what was allowed when they opened);
//! - do the same for HTTP requests in flight on inbound connections
//!   ([`Connections::open_stream`]): an HTTP/2 stream or gRPC call that is
//!   closed this way is reset, its connection and the other streams on it
//!   go on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mizzen_api::SpiffeId;
use tokio::sync::watch;

use crate::metrics::Direction;

/// What the registry knows of one connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The client's address.
    pub peer: SocketAddr,
    /// The peer proxy's verified identity, once known.
    pub identity: Option<SpiffeId>,
    /// Whether it is served as HTTP (and drains gracefully).
    pub http: bool,
    /// Where it was going (inbound: the app's address), once known.
    pub dst: Option<SocketAddr>,
}

/// What the registry knows of one HTTP request in flight.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub direction: Direction,
    /// The client's address.
    pub peer: SocketAddr,
    /// Where the request was going (the app's address inbound).
    pub dst: SocketAddr,
    /// The peer proxy's verified identity; `None` over plaintext.
    pub identity: Option<SpiffeId>,
    pub method: String,
    /// The path as received.
    pub path: String,
    pub authority: Option<String>,
    /// What authorization read of it, when a policy applied on arrival.
    pub facts: Option<crate::policy::RequestFacts>,
}

/// Registered things of one kind, each with its close signal.
#[derive(Debug)]
struct Table<I>(Mutex<HashMap<u64, (I, watch::Sender<bool>)>>);

impl<I: Clone> Table<I> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (I, watch::Sender<bool>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `info` as `id`; the receiver turns true when it is to close.
    fn insert(&self, id: u64, info: I) -> watch::Receiver<bool> {
        let (close, closed) = watch::channel(false);
        self.lock().insert(id, (info, close));
        closed
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut I)) {
        if let Some((info, _)) = self.lock().get_mut(&id) {
            f(info);
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn list(&self) -> Vec<I> {
        self.lock().values().map(|(info, _)| info.clone()).collect()
    }

    fn close_where(&self, matching: impl Fn(&I) -> bool) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for (_, close) in entries.values().filter(|(info, _)| matching(info)) {
            close.send_replace(true);
            n += 1;
        }
        n
    }
}

/// Resolves once `signal` is true (at once if it already is).
async fn once_true(mut signal: watch::Receiver<bool>) {
    let _ = signal.wait_for(|v| *v).await;
}

#[derive(Debug)]
struct Inner {
    next: AtomicU64,
    connections: Table<ConnInfo>,
    streams: Table<StreamInfo>,
    draining: watch::Sender<bool>,
}

/// The open connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Inner>);

impl Default for Connections {
    fn default() -> Self {
        Self(Arc::new(Inner {
            next: AtomicU64::new(0),
            connections: Table::new(),
            streams: Table::new(),
            draining: watch::Sender::new(false),
        }))
    }
}

/// One registered connection; dropping it unregisters.
#[derive(Debug)]
pub struct ConnGuard {
    inner: Arc<Inner>,
    id: u64,
    close: watch::Receiver<bool>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.inner.connections.remove(self.id);
    }
}

/// One registered HTTP request; dropping it unregisters.
#[derive(Debug)]
pub struct StreamGuard {
    inner: Arc<Inner>,
    id: u64,
    close: watch::Receiver<bool>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.inner.streams.remove(self.id);
    }
}

impl StreamGuard {
    /// Resolves when the request is to be closed at once.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + use<> {
        once_true(self.close.clone())
    }
}

impl ConnGuard {
    /// The registry this connection is in (to register its requests).
    pub fn registry(&self) -> Connections {
        Connections(self.inner.clone())
    }

    fn update(&self, f: impl FnOnce(&mut ConnInfo)) {
        self.inner.connections.update(self.id, f);
    }

    /// Records the peer proxy's verified identity.
    pub fn identified(&self, id: &SpiffeId) {
        self.update(|i| i.identity = Some(id.clone()));
    }

    /// Records where the connection was going.
    pub fn destined(&self, dst: SocketAddr) {
        self.update(|i| i.dst = Some(dst));
    }

    /// Records that the connection is served as HTTP.
    pub fn serving_http(&self) {
        self.update(|i| i.http = true);
    }

    /// Resolves when the connection is to be closed at once.
    pub fn closed(&self) -> impl Future<Output = ()> + use<> {
        once_true(self.close.clone())
    }

    /// Resolves once the proxy drains (at once if it already does).
    pub fn draining(&self) -> impl Future<Output = ()> + use<> {
        once_true(self.inner.draining.subscribe())
    }
}

impl Connections {
    /// Registers a connection from `peer`.
    pub fn open(&self, direction: Direction, peer: SocketAddr) -> ConnGuard {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let info = ConnInfo {
            direction,
            peer,
            identity: None,
            http: false,
            dst: None,
        };
        ConnGuard {
            close: self.0.connections.insert(id, info),
            inner: self.0.clone(),
            id,
        }
    }

    /// Accepts the next connection on `listener` and registers it. An
    /// accept error (e.g. out of file descriptors) is logged and retried
    /// after a pause rather than ending the listener.
    pub async fn accept(
        &self,
        listener: &tokio::net::TcpListener,
        direction: Direction,
    ) -> (tokio::net::TcpStream, SocketAddr, ConnGuard) {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => return (conn, peer, self.open(direction, peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.0.connections.len()
    }

    /// What is known of the open connections.
    pub fn list(&self) -> Vec<ConnInfo> {
        self.0.connections.list()
    }

    /// Closes every open connection `matching` says so of; returns how many.
    pub fn close_where(&self, matching: impl Fn(&ConnInfo) -> bool) -> usize {
        self.0.connections.close_where(matching)
    }

    /// Registers an HTTP request in flight.
    pub fn open_stream(&self, info: StreamInfo) -> StreamGuard {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            close: self.0.streams.insert(id, info),
            inner: self.0.clone(),
            id,
        }
    }

    /// What is known of the requests in flight.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.0.streams.list()
    }

    /// Closes every request in flight `matching` says so of; returns how many.
    pub fn close_streams_where(&self, matching: impl Fn(&StreamInfo) -> bool) -> usize {
        self.0.streams.close_where(matching)
    }

    /// Starts draining: HTTP connections are told to finish.
    pub fn drain(&self) {
        self.0.draining.send_replace(true);
    }

    /// Waits until no connection is open or `limit` has passed; returns
    /// the number still open.
    pub async fn drained(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        while self.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 4000))
    }

    #[tokio::test]
    async fn waits_for_open_connections() {
        let c = Connections::default();
        let g = c.open(Direction::Inbound, peer(1));
        assert_eq!(c.count(), 1);
        assert_eq!(
            c.drained(Duration::from_millis(100)).await,
            1,
            "times out while one is open"
        );
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.drained(Duration::from_secs(10)).await });
        drop(g);
        assert_eq!(waiter.await.expect("join"), 0);
    }

    #[tokio::test]
    async fn close_where_reaches_only_the_matching_connections() {
        let c = Connections::default();
        let alice = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/alice").expect("id");
        let a = c.open(Direction::Inbound, peer(1));
        a.identified(&alice);
        let b = c.open(Direction::Inbound, peer(2));
        let closed = c.close_where(|i| i.identity.as_ref() == Some(&alice));
        assert_eq!(closed, 1);
        tokio::time::timeout(Duration::from_secs(1), a.closed())
            .await
            .expect("the matching connection is told to close");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.closed())
                .await
                .is_err(),
            "the other one is not"
        );
        assert_eq!(
            c.list().len(),
            2,
            "closing is the connection task's job; the guard unregisters"
        );
    }

    #[tokio::test]
    async fn close_streams_where_reaches_only_the_matching_requests() {
        let c = Connections::default();
        let info = |path: &str| StreamInfo {
            direction: Direction::Inbound,
            peer: peer(1),
            dst: peer(2),
            identity: None,
            method: "POST".into(),
            path: path.into(),
            authority: None,
            facts: None,
        };
        let admin = c.open_stream(info("/admin/x"));
        let public = c.open_stream(info("/public"));
        assert_eq!(c.streams().len(), 2);
        assert_eq!(c.close_streams_where(|s| s.path.starts_with("/admin")), 1);
        tokio::time::timeout(Duration::from_secs(1), admin.closed())
            .await
            .expect("the matching request is told to close");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), public.closed())
                .await
                .is_err()
        );
        drop(admin);
        assert_eq!(c.streams().len(), 1, "a finished request unregisters");
    }

    #[tokio::test]
    async fn draining_is_seen_by_connections_old_and_new() {
        let c = Connections::default();
        let old = c.open(Direction::Outbound, peer(1));
        let waiting = old.draining();
        c.drain();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("old");
        let new = c.open(Direction::Outbound, peer(2));
        new.serving_http();
        tokio::time::timeout(Duration::from_secs(1), new.draining())
            .await
            .expect("a connection opened after the drain began sees it at once");
        assert!(c.list().iter().any(|i| i.http));
    }
}
