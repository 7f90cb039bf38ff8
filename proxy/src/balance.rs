//! Choosing an endpoint: power of two choices on each endpoint's cost,
//! skipping endpoints that recently failed.
//!
//! The cost is what the endpoint is busy with (open TCP connections and
//! outstanding HTTP requests, plus one) times its latency: a moving average
//! of the time to response headers, each sample weighing [`ALPHA`], so one
//! outlier moves it a quarter of the way. An endpoint without samples, or
//! whose last one is older than [`STALE`], costs as if it were as fast as
//! the faster candidate: new endpoints are tried, and one that was slow is
//! tried again now and then rather than starved on an old figure.
//! Two costs within a factor of [`TOLERANCE`] count as equal and the first
//! of the two random candidates wins: replicas that are equally fast share
//! the requests (rather than the one that measured a few microseconds
//! faster taking every sequential request), while an endpoint twice as
//! busy, or markedly slower, loses. Relayed TCP connections give no
//! samples and compare on load alone.
//!
//! Under a DestinationRule's outlier detection, each endpoint's outcomes
//! are counted ([`Balancer::outcome`]) and one that crosses a threshold is
//! ejected: skipped like a failed one until its ejection ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use mizzen_api::routing::traffic_policy::{Outcome, Outlier, Streak, rendezvous};

use crate::discovery::Backend;

/// How long an endpoint that failed a connection is skipped.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// The weight of each latency sample in the average.
pub const ALPHA: f64 = 0.25;
/// After this long without a sample, an endpoint's latency is unknown again.
pub const STALE: Duration = Duration::from_millis(500);
/// Costs closer than this factor are treated as equal.
pub const TOLERANCE: f64 = 1.5;
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
    latency: Option<Ewma>,
    /// Consecutive failures, for outlier detection.
    streak: Streak,
    /// Ejections so far (each lasts longer).
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Entry {
    fn skipped(&self, now: Instant) -> bool {
        self.failed_until.is_some_and(|t| now < t) || self.ejected_until.is_some_and(|t| now < t)
    }
}

/// An exponentially weighted moving average of latency, and when it was
/// last fed.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    micros: f64,
    at: Instant,
}

impl Ewma {
    fn observe(self, sample: Duration, now: Instant) -> Self {
        let sample = sample.as_secs_f64() * 1e6;
        Self {
            micros: self.micros * (1.0 - ALPHA) + sample * ALPHA,
            at: now,
        }
    }

    /// The average, unless it is stale.
    fn current(&self, now: Instant) -> Option<f64> {
        (now.saturating_duration_since(self.at) < STALE).then_some(self.micros)
    }
}

/// How [`Balancer::pick_by`] chooses (a DestinationRule's load balancer).
#[derive(Debug, Clone, Copy)]
pub enum Choice<'a> {
    /// Power of two choices on cost (the default).
    LeastRequest,
    Random,
    /// The next of the endpoints left, by this counter.
    RoundRobin(&'a AtomicUsize),
    /// Rendezvous hashing of this key over the endpoints left.
    Hash(&'a [u8]),
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
            map.retain(|_, e| Arc::strong_count(&e.open) > 1 || e.skipped(now) || e.ejections > 0);
        }
        map
    }

    /// Picks among `backends` not in `tried`: two at random, the one that
    /// costs less; endpoints that failed recently only when nothing else is
    /// left.
    pub fn pick<'a>(&self, backends: &'a [Backend], tried: &[SocketAddr]) -> Option<&'a Backend> {
        self.pick_by(backends, tried, Choice::LeastRequest)
    }

    /// Picks among `backends` not in `tried` as `how` says; endpoints that
    /// failed recently or are ejected only when nothing else is left.
    pub fn pick_by<'a>(&self, backends: &'a [Backend], tried: &[SocketAddr], how: Choice<'_>) -> Option<&'a Backend> {
        let now = Instant::now();
        let map = self.entries();
        let failed = |b: &Backend| map.get(&b.addr).is_some_and(|e| e.skipped(now));
        let latency = |b: &Backend| map.get(&b.addr).and_then(|e| e.latency).and_then(|l| l.current(now));
        let left: Vec<&Backend> = backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
        let healthy: Vec<&Backend> = left.iter().copied().filter(|b| !failed(b)).collect();
        let pool = if healthy.is_empty() { left } else { healthy };
        match how {
            Choice::LeastRequest => {}
            Choice::Random if !pool.is_empty() => return Some(pool[rand::rng().random_range(0..pool.len())]),
            Choice::RoundRobin(next) if !pool.is_empty() => {
                return Some(pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()]);
            }
            Choice::Hash(key) => {
                let names: Vec<String> = pool.iter().map(|b| b.addr.to_string()).collect();
                return rendezvous(key, names.iter().map(String::as_bytes)).map(|i| pool[i]);
            }
            _ => return None,
        }
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
                let (a, b) = (pool[a], pool[b]);
                // Unmeasured: as fast as the faster of the two (1 µs when
                // neither was measured, so that load alone decides).
                let fastest = match (latency(a), latency(b)) {
                    (Some(x), Some(y)) => x.min(y),
                    (Some(x), None) | (None, Some(x)) => x,
                    (None, None) => 1.0,
                };
                let cost = |e: &Backend| {
                    let open = map.get(&e.addr).map_or(0, |e| e.open.load(Ordering::Relaxed));
                    (open + 1) as f64 * latency(e).unwrap_or(fastest).max(1.0)
                };
                Some(if cost(b) * TOLERANCE < cost(a) { b } else { a })
            }
        }
    }

    /// Counts a connection to `addr` as open.
    pub fn load(&self, addr: SocketAddr) -> Load {
        let open = self.entries().entry(addr).or_default().open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        Load(open)
    }

    /// Records how long `addr` took to answer a request.
    pub fn observe(&self, addr: SocketAddr, latency: Duration) {
        let now = Instant::now();
        let mut map = self.entries();
        let e = map.entry(addr).or_default();
        e.latency = Some(match e.latency {
            Some(l) => l.observe(latency, now),
            None => Ewma {
                micros: latency.as_secs_f64() * 1e6,
                at: now,
            },
        });
    }

    /// Skips `addr` for a while.
    pub fn mark_failed(&self, addr: SocketAddr) {
        self.entries().entry(addr).or_default().failed_until = Some(Instant::now() + FAILURE_HOLD);
    }

    /// Counts `outcome` of a request to `addr`, one of `backends`, under
    /// `outlier`; ejects `addr` when its streak crosses a threshold and
    /// fewer than the most `outlier` allows of `backends` are ejected.
    /// Returns whether it ejected. An ejection lasts its time rounded up
    /// to whole `interval`s, as Envoy's sweeps (every `interval`) end them.
    pub fn outcome(&self, addr: SocketAddr, outcome: Outcome, outlier: &Outlier, backends: &[Backend]) -> bool {
        let now = Instant::now();
        let mut map = self.entries();
        let crossed = {
            let e = map.entry(addr).or_default();
            outlier.observe(&mut e.streak, outcome) && e.ejected_until.is_none_or(|t| now >= t)
        };
        if !crossed {
            return false;
        }
        let ejected = backends
            .iter()
            .filter(|b| map.get(&b.addr).and_then(|e| e.ejected_until).is_some_and(|t| now < t))
            .count();
        if ejected >= outlier.max_ejected(backends.len()) {
            return false;
        }
        let e = map.entry(addr).or_default();
        e.ejections += 1;
        let time = outlier.ejection_time(e.ejections);
        let ticks = time.as_nanos().div_ceil(outlier.interval.as_nanos().max(1));
        let until = outlier
            .interval
            .saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX));
        e.ejected_until = Some(now + until);
        true
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.entries()
            .get(&addr)
            .and_then(|e| e.ejected_until)
            .is_some_and(|t| now < t)
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
    fn equally_fast_replicas_share_sequential_requests() {
        let b = Balancer::default();
        let all = backends(2);
        b.observe(all[0].addr, Duration::from_micros(400));
        b.observe(all[1].addr, Duration::from_micros(450));
        let firsts = (0..200)
            .filter(|_| b.pick(&all, &[]).expect("pick").addr == all[0].addr)
            .count();
        assert!(
            (60..=140).contains(&firsts),
            "{firsts} of 200 to the slightly faster one"
        );
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
    fn a_slow_endpoint_gets_no_traffic_until_the_fast_one_is_busy() {
        let b = Balancer::default();
        let all = backends(2);
        b.observe(all[0].addr, Duration::from_millis(50));
        b.observe(all[1].addr, Duration::from_millis(1));
        // Idle, both measured: the fast one wins every comparison.
        for _ in 0..50 {
            assert_eq!(b.pick(&all, &[]).expect("pick").addr, all[1].addr);
        }
        // Busy enough (100 outstanding: twice the slow one's cost), the
        // fast one loses to the slow idle one.
        let _busy: Vec<Load> = (0..100).map(|_| b.load(all[1].addr)).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(&all, &[]).expect("pick").addr, all[0].addr);
        }
    }

    #[test]
    fn one_outlier_moves_the_average_a_quarter_of_the_way_and_old_figures_expire() {
        let t0 = Instant::now();
        let e = Ewma { micros: 1000.0, at: t0 };
        let moved = e.observe(Duration::from_millis(5), t0);
        assert!((moved.micros - 2000.0).abs() < 1e-6, "{}", moved.micros);
        assert_eq!(moved.current(t0 + STALE / 2), Some(moved.micros));
        assert_eq!(moved.current(t0 + STALE), None, "stale: unknown again");
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

    #[test]
    fn an_endpoint_failing_in_a_row_is_ejected_and_skipped_within_the_ejection_bound() {
        let outlier = Outlier {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_millis(2500),
            max_ejection_percent: 50,
        };
        let bal = Balancer::default();
        let bs = backends(2);
        let (a, b) = (bs[0].addr, bs[1].addr);
        assert!(!bal.outcome(a, Outcome::Status(500), &outlier, &bs));
        assert!(!bal.outcome(a, Outcome::Status(500), &outlier, &bs));
        assert!(bal.outcome(a, Outcome::Status(500), &outlier, &bs), "the third ejects");
        assert!(bal.is_ejected(a));
        for _ in 0..20 {
            assert_eq!(
                bal.pick(&bs, &[]).map(|p| p.addr),
                Some(b),
                "the ejected one is skipped"
            );
        }
        // Half of two is one: the other is not ejected as well.
        for _ in 0..3 {
            bal.outcome(b, Outcome::LocalFailure, &outlier, &bs);
        }
        assert!(!bal.is_ejected(b));
        // 2.5 s rounded up to whole intervals.
        let until = bal.entries()[&a].ejected_until.expect("ejected");
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_millis(2500) && left <= Duration::from_secs(3),
            "{left:?}"
        );
    }

    #[test]
    fn round_robin_takes_each_endpoint_in_turn_and_a_hash_always_the_same() {
        let bal = Balancer::default();
        let bs = backends(3);
        let next = AtomicUsize::new(0);
        let turns: Vec<SocketAddr> = (0..6)
            .filter_map(|_| bal.pick_by(&bs, &[], Choice::RoundRobin(&next)).map(|b| b.addr))
            .collect();
        assert_eq!(turns[..3], turns[3..], "{turns:?}");
        let distinct: std::collections::HashSet<_> = turns.iter().collect();
        assert_eq!(distinct.len(), 3);
        let one = bal.pick_by(&bs, &[], Choice::Hash(b"alice")).map(|b| b.addr);
        for _ in 0..20 {
            assert_eq!(bal.pick_by(&bs, &[], Choice::Hash(b"alice")).map(|b| b.addr), one);
        }
        // A tried endpoint is left out, even for its own key.
        let other = bal
            .pick_by(&bs, &[one.expect("picked")], Choice::Hash(b"alice"))
            .map(|b| b.addr);
        assert!(other.is_some() && other != one);
    }
}
