//! Circuit breakers: a DestinationRule's connection pool limits, per
//! destination (a Service, or one of its subsets), for this proxy's
//! requests. A request takes a place among the `max_active` sent at once,
//! or waits for one if fewer than `max_pending` already wait; otherwise it
//! is refused at once (503 `UO`), so that a slow destination cannot make
//! requests queue without bound. See
//! [`mizzen_api::routing::traffic_policy`] for how Istio's fields map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use mizzen_api::routing::traffic_policy::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One destination's breaker.
#[derive(Debug)]
struct Breaker {
    limits: Pool,
    active: Arc<Semaphore>,
    pending: AtomicU32,
}

/// A place among a destination's requests sent at once, held until the
/// response ends.
#[derive(Debug)]
pub struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

/// The destination's limits are reached.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the destination's connection pool is full ({active} requests sent, {pending} waiting)")]
pub struct Overflow {
    pub active: u32,
    pub pending: u32,
}

/// Every destination's breaker, by destination name.
#[derive(Debug, Default)]
pub struct Breakers {
    by_destination: Mutex<HashMap<String, Arc<Breaker>>>,
}

/// At most this many destinations keep a breaker; past it, idle ones are
/// forgotten (discovery may long have dropped them).
const MAX_BREAKERS: usize = 4096;

impl Breakers {
    fn breaker(&self, destination: &str, limits: Pool) -> Arc<Breaker> {
        let mut map = self.by_destination.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(destination).filter(|b| b.limits == limits) {
            return b.clone();
        }
        if map.len() >= MAX_BREAKERS {
            map.retain(|_, b| Arc::strong_count(b) > 1 || b.active.available_permits() < b.limits.max_active as usize);
        }
        // New limits take a new breaker: requests under the old ones finish
        // under them.
        let permits = (limits.max_active as usize).min(Semaphore::MAX_PERMITS);
        let b = Arc::new(Breaker {
            limits,
            active: Arc::new(Semaphore::new(permits)),
            pending: AtomicU32::new(0),
        });
        map.insert(destination.to_owned(), b.clone());
        b
    }

    /// A place for one request to `destination` under `limits`: at once,
    /// after waiting among at most `max_pending`, or [`Overflow`].
    pub async fn enter(&self, destination: &str, limits: Pool) -> Result<Place, Overflow> {
        let b = self.breaker(destination, limits);
        if let Ok(p) = b.active.clone().try_acquire_owned() {
            return Ok(Place(p));
        }
        let overflow = || Overflow {
            active: limits.max_active,
            pending: b.pending.load(Ordering::Relaxed),
        };
        b.pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limits.max_pending).then_some(n + 1)
            })
            .map_err(|_| overflow())?;
        let place = b.active.clone().acquire_owned().await;
        b.pending.fetch_sub(1, Ordering::Relaxed);
        place.map(Place).map_err(|_| overflow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_active_and_pending_limits_requests_overflow_at_once() {
        let breakers = Arc::new(Breakers::default());
        let limits = Pool {
            max_active: 1,
            max_pending: 1,
        };
        let first = breakers.enter("demo/web", limits).await.expect("a place");
        // The second waits for the first's place.
        let waiting = tokio::spawn({
            let b = breakers.clone();
            async move { b.enter("demo/web", limits).await.map(drop) }
        });
        let pending = || {
            breakers.by_destination.lock().expect("lock")["demo/web"]
                .pending
                .load(Ordering::Relaxed)
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while pending() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second request waits");
        // The third finds both taken.
        let err = breakers.enter("demo/web", limits).await.expect_err("overflow");
        assert_eq!((err.active, err.pending), (1, 1));
        // Another destination is not affected.
        breakers.enter("demo/api", limits).await.expect("its own breaker");
        drop(first);
        waiting.await.expect("task").expect("the waiting request got the place");
    }
}
