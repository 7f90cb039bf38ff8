//! Graceful drain: on SIGTERM the proxy stops accepting and reports not
//! ready, lets open connections finish for up to the drain period, then
//! exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts open connections; each holds a [`ConnGuard`].
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<AtomicUsize>);

/// Marks one open connection until dropped.
#[derive(Debug)]
pub struct ConnGuard(Arc<AtomicUsize>);

impl Connections {
    pub fn open(&self) -> ConnGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.0.clone())
    }

    /// Accepts the next connection on `listener` and counts it as open. An
    /// accept error (e.g. out of file descriptors) is logged and retried
    /// after a pause rather than ending the listener.
    pub async fn accept(
        &self,
        listener: &tokio::net::TcpListener,
    ) -> (tokio::net::TcpStream, std::net::SocketAddr, ConnGuard) {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => return (conn, peer, self.open()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
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

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_open_connections() {
        let c = Connections::default();
        let g = c.open();
        assert_eq!(c.count(), 1);
        assert_eq!(
            c.drained(Duration::from_millis(100)).await,
            1,
            "times out while one is open"
        );
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.drained(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(g);
        assert_eq!(waiter.await.expect("join"), 0);
    }
}
