//! Bounds on what local callers may hold open on the agent's socket.
//!
//! Any pod on the node can present a valid token, so what one stream may
//! ask for and how many streams there are must be bounded: each stream
//! holds a task, its subscription and what was sent to it. Streams are
//! counted per identity and in total; beyond either limit a new stream is
//! refused with `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mizzen_api::SpiffeId;
use tonic::Status;

/// Most names one discovery stream may subscribe to or claim to hold.
pub const MAX_NAMES_PER_STREAM: usize = 16_384;
/// Longest resource name (`<namespace>/<name>`: 63 + 1 + 253) and version.
pub const MAX_NAME_LEN: usize = 317;
pub const MAX_VERSION_LEN: usize = 128;

/// Open streams, in total and per identity.
#[derive(Debug)]
pub struct StreamLimits {
    max_total: usize,
    max_per_identity: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_identity: HashMap<SpiffeId, usize>,
}

/// One admitted stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamSlot {
    limits: Arc<StreamLimits>,
    id: SpiffeId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_identity.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                open.by_identity.remove(&self.id);
            }
        }
    }
}

impl StreamLimits {
    pub fn new(max_total: usize, max_per_identity: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_identity: max_per_identity.max(1),
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new stream of `id`, or why there is none.
    pub fn admit(self: &Arc<Self>, id: &SpiffeId) -> Result<StreamSlot, Status> {
        let mut open = self.lock();
        let of_id = open.by_identity.get(id).copied().unwrap_or(0);
        if open.total >= self.max_total {
            return Err(Status::resource_exhausted(format!(
                "the agent already serves {} streams (--max-streams)",
                self.max_total
            )));
        }
        if of_id >= self.max_per_identity {
            return Err(Status::resource_exhausted(format!(
                "{id} already holds {of_id} streams (--max-streams-per-identity)"
            )));
        }
        open.total += 1;
        *open.by_identity.entry(id.clone()).or_default() += 1;
        Ok(StreamSlot {
            limits: self.clone(),
            id: id.clone(),
        })
    }

    /// Streams open now.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_bounded_per_identity_and_in_total() {
        let limits = StreamLimits::new(3, 2);
        let a: SpiffeId = "spiffe://cluster.local/ns/a/sa/web".parse().expect("id");
        let b: SpiffeId = "spiffe://cluster.local/ns/a/sa/db".parse().expect("id");
        let a1 = limits.admit(&a).expect("first");
        let _a2 = limits.admit(&a).expect("second");
        assert_eq!(
            limits.admit(&a).expect_err("third of a").code(),
            tonic::Code::ResourceExhausted
        );
        let _b1 = limits.admit(&b).expect("b");
        assert_eq!(
            limits.admit(&b).expect_err("total").code(),
            tonic::Code::ResourceExhausted
        );
        drop(a1);
        assert_eq!(limits.total(), 2);
        limits.admit(&b).expect("room again");
    }
}
