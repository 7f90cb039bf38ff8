//! Workload certificates: one cached certificate per identity on this node,
//! issued once however many proxies share the identity, renewed at about
//! half its lifetime, and kept while the CA is unreachable.
//!
//! Every proxy's token is reviewed before it subscribes (by the SDS layer);
//! the manager only ever sees verified identities. One worker task per
//! identity talks to the CA, so a burst of pods with one identity costs one
//! CA call, and a semaphore bounds concurrent CA calls across identities.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mizzen_api::SpiffeId;
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::identity::{self, Svid};
use crate::metrics::Metrics;

/// The latest certificate of an identity, `None` until the first arrives.
pub type SvidWatch = watch::Receiver<Option<Arc<Svid>>>;

/// Why the CA did not sign. `kind()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("CA unreachable: {0}")]
    Unavailable(String),
    #[error("CA refused the workload's token: {0}")]
    Unauthenticated(String),
    #[error("CA refused the request: {0}")]
    Refused(String),
    #[error("unusable CA answer: {0}")]
    BadResponse(String),
    #[error("cannot make a key or CSR: {0}")]
    Local(String),
}

impl SignError {
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::Unavailable(_) => "unavailable",
            SignError::Unauthenticated(_) => "unauthenticated",
            SignError::Refused(_) => "refused",
            SignError::BadResponse(_) => "bad_response",
            SignError::Local(_) => "local",
        }
    }
}

/// Something that turns a CSR and the workload's token into a chain.
pub trait Signer: Send + Sync + 'static {
    fn sign(
        &self,
        csr_pem: String,
        workload_token: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<String>, SignError>> + Send;
}

/// Rotation and retry settings.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Requested certificate lifetime.
    pub ttl: Duration,
    /// Renew at this fraction of the lifetime (0.5).
    pub fraction: f64,
    /// ± this fraction of the lifetime, at random, so renewals spread out (0.1).
    pub jitter: f64,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

struct Entry {
    tx: watch::Sender<Option<Arc<Svid>>>,
    /// The newest verified token presented for this identity.
    token: Mutex<Zeroizing<String>>,
}

/// The agent's certificate cache.
pub struct SecretManager<S> {
    signer: Arc<S>,
    rotation: Rotation,
    entries: Mutex<HashMap<SpiffeId, Arc<Entry>>>,
    ca_calls: Semaphore,
    metrics: Arc<Metrics>,
}

impl<S> std::fmt::Debug for SecretManager<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManager")
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

impl<S: Signer> SecretManager<S> {
    pub fn new(signer: S, rotation: Rotation, max_concurrent_ca_calls: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            signer: Arc::new(signer),
            rotation,
            entries: Mutex::new(HashMap::new()),
            ca_calls: Semaphore::new(max_concurrent_ca_calls.max(1)),
            metrics,
        })
    }

    /// Subscribes to the certificate of `id`, whose holder proved it with
    /// `token` (already reviewed). Starts issuance if nobody holds it yet.
    pub fn subscribe(self: &Arc<Self>, id: &SpiffeId, token: &str) -> SvidWatch {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get(id) {
            *e.token.lock().unwrap_or_else(|p| p.into_inner()) = Zeroizing::new(token.to_owned());
            return e.tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let entry = Arc::new(Entry {
            tx,
            token: Mutex::new(Zeroizing::new(token.to_owned())),
        });
        entries.insert(id.clone(), entry.clone());
        self.metrics.certificates_cached.set(entries.len() as i64);
        drop(entries);
        tokio::spawn(self.clone().worker(id.clone(), entry));
        rx
    }

    /// Seconds until the soonest expiry among cached certificates.
    pub fn oldest_expiry(&self) -> Option<SystemTime> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .filter_map(|e| e.tx.borrow().as_ref().map(|s| s.not_after))
            .min()
    }

    async fn issue(&self, id: &SpiffeId, entry: &Entry) -> Result<Svid, SignError> {
        let _permit = self
            .ca_calls
            .acquire()
            .await
            .map_err(|e| SignError::Local(e.to_string()))?;
        let kc = identity::new_key_and_csr(id).map_err(|e| SignError::Local(e.to_string()))?;
        let token = entry.token.lock().unwrap_or_else(|p| p.into_inner()).to_string();
        self.metrics.ca_calls.inc();
        let chain = self.signer.sign(kc.csr_pem, token, self.rotation.ttl).await?;
        Svid::from_ca(id, chain, kc.key_pem).map_err(|e| SignError::BadResponse(e.to_string()))
    }

    /// Removes the entry if nobody watches it; true when removed.
    fn retire_if_unused(&self, id: &SpiffeId, entry: &Arc<Entry>) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entry.tx.receiver_count() == 0 {
            entries.remove(id);
            self.metrics.certificates_cached.set(entries.len() as i64);
            true
        } else {
            false
        }
    }

    async fn worker(self: Arc<Self>, id: SpiffeId, entry: Arc<Entry>) {
        let mut backoff = self.rotation.backoff_initial;
        loop {
            match self.issue(&id, &entry).await {
                Ok(svid) => {
                    backoff = self.rotation.backoff_initial;
                    let unit: f64 = rand::rng().random();
                    let refresh = svid.refresh_at(self.rotation.fraction, self.rotation.jitter, unit);
                    info!(%id, serial = %svid.serial, not_after = ?svid.not_after, "certificate issued");
                    entry.tx.send_replace(Some(Arc::new(svid)));
                    let wait = refresh.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.metrics.ca_error(e.kind());
                    let still_valid = entry
                        .tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|s| s.not_after > SystemTime::now());
                    warn!(%id, error = %e, retry_in = ?backoff, still_valid, "cannot get a certificate");
                    // Full jitter spreads retries of many identities apart.
                    let unit: f64 = rand::rng().random();
                    tokio::time::sleep(backoff.mul_f64(0.5 + unit / 2.0)).await;
                    backoff = (backoff * 2).min(self.rotation.backoff_max);
                }
            }
            if self.retire_if_unused(&id, &entry) {
                debug!(%id, "no proxy holds this identity any more; dropping its certificate");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
