//! Choosing an endpoint: power of two choices on what each endpoint is
//! busy with (open TCP connections and outstanding HTTP requests), skipping
//! endpoints that recently failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::discovery::Backend;

/// How long an endpoint that failed a connection is skipped.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// Per-endpoint load and health, shared by all connections.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Open connections (TCP) or outstanding requests (HTTP); each [`Load`]
    /// holds a reference.
    open: Arc<AtomicUsize>,
    failed_until: Option<Instant>,
}

/// Counts one open connection or outstanding request to an endpoint
/// until dropped.
#[derive(Debug)]
pub struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            // Forget idle endpoints, which discovery may long have dropped.
            let now = Instant::now();
            map.retain(|_, e| Arc::strong_count(&e.open) > 1 || e.failed_until.is_some_and(|t| now < t));
        }
        map
    }

    /// Picks among `backends` not in `tried`: two at random, the one with
    /// fewer open connections; endpoints that failed recently only when
    /// nothing else is left.
    pub fn pick<'a>(&self, backends: &'a [Backend], tried: &[SocketAddr]) -> Option<&'a Backend> {
        let now = Instant::now();
        let map = self.entries();
        let failed = |b: &Backend| map.get(&b.addr).and_then(|e| e.failed_until).is_some_and(|t| now < t);
        let open = |b: &Backend| map.get(&b.addr).map_or(0, |e| e.open.load(Ordering::Relaxed));
        let left: Vec<&Backend> = backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
        let healthy: Vec<&Backend> = left.iter().copied().filter(|b| !failed(b)).collect();
        let pool = if healthy.is_empty() { left } else { healthy };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                Some(if open(pool[b]) < open(pool[a]) {
                    pool[b]
                } else {
                    pool[a]
                })
            }
        }
    }

    /// Counts a connection to `addr` as open.
    pub fn load(&self, addr: SocketAddr) -> Load {
        let open = self.entries().entry(addr).or_default().open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        Load(open)
    }

    /// Skips `addr` for a while.
    pub fn mark_failed(&self, addr: SocketAddr) {
        self.entries().entry(addr).or_default().failed_until = Some(Instant::now() + FAILURE_HOLD);
    }

    /// Open connections to `addr` (for tests and metrics).
    pub fn open(&self, addr: SocketAddr) -> usize {
        self.entries().get(&addr).map_or(0, |e| e.open.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                identity: None,
                pod: String::new(),
            })
            .collect()
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let b = Balancer::default();
        let all = backends(2);
        // Endpoint 0 is busy: with two endpoints both are always compared.
        let _busy: Vec<Load> = (0..5).map(|_| b.load(all[0].addr)).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(&all, &[]).expect("pick").addr, all[1].addr);
        }
        assert_eq!(b.open(all[0].addr), 5);
    }

    #[test]
    fn load_spreads_and_failed_endpoints_are_skipped() {
        let b = Balancer::default();
        let all = backends(4);
        let mut loads = Vec::new();
        for _ in 0..400 {
            let p = b.pick(&all, &[]).expect("pick");
            loads.push(b.load(p.addr));
        }
        for e in &all {
            let n = b.open(e.addr);
            assert!((60..=140).contains(&n), "{} got {n} of 400", e.addr);
        }
        drop(loads);
        b.mark_failed(all[2].addr);
        for _ in 0..100 {
            assert_ne!(b.pick(&all, &[]).expect("pick").addr, all[2].addr);
        }
        // Tried endpoints are excluded; a failed one is used when nothing else is left.
        let tried: Vec<SocketAddr> = [0, 1, 3].iter().map(|&i| all[i].addr).collect();
        assert_eq!(b.pick(&all, &tried).expect("last resort").addr, all[2].addr);
        let every: Vec<SocketAddr> = all.iter().map(|e| e.addr).collect();
        assert!(b.pick(&all, &every).is_none());
        let load = b.load(all[0].addr);
        drop(load);
        assert_eq!(b.open(all[0].addr), 0, "load released on drop");
    }
}
