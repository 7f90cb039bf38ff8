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

/// A verified token of a proxy holding an identity, and when it expires.
struct Token {
    token: Zeroizing<String>,
    expires_at: Option<SystemTime>,
    /// Set once the CA refused the token (expired, or its pod is gone).
    refused: watch::Sender<bool>,
}

impl Token {
    /// Whether renewals should prefer `self` to `other`: the token that
    /// stays valid longest (one without `exp` counts as newest).
    fn outlives(&self, other: &Token) -> bool {
        match (self.expires_at, other.expires_at) {
            (Some(a), Some(b)) => a >= b,
            (None, _) => true,
            (Some(_), None) => false,
        }
    }
}

/// The tokens of the live subscribers of one identity.
#[derive(Default)]
struct Tokens {
    next: u64,
    live: HashMap<u64, Token>,
}

struct Entry {
    tx: watch::Sender<Option<Arc<Svid>>>,
    tokens: Mutex<Tokens>,
}

impl Entry {
    fn tokens(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key and value of the token renewals should use now.
    fn best_token(&self) -> Option<(u64, Zeroizing<String>)> {
        let tokens = self.tokens();
        let mut best: Option<(&u64, &Token)> = None;
        for (k, t) in &tokens.live {
            if best.is_none_or(|(_, b)| t.outlives(b)) {
                best = Some((k, t));
            }
        }
        best.map(|(k, t)| (*k, t.token.clone()))
    }

    /// The CA refused token `key`: tell its stream, and never use it again.
    fn refuse(&self, key: u64) {
        if let Some(t) = self.tokens().live.remove(&key) {
            t.refused.send_replace(true);
        }
    }
}

/// A subscriber's token, offered for the identity's renewals until the
/// subscriber drops it (its stream ended).
pub struct TokenLease {
    entry: Arc<Entry>,
    key: u64,
    refused: watch::Receiver<bool>,
}

impl TokenLease {
    /// Becomes `true` once the CA refused this token: its pod is gone or
    /// it expired, and the stream that presented it must end.
    pub fn refused(&self) -> watch::Receiver<bool> {
        self.refused.clone()
    }
}

impl Drop for TokenLease {
    fn drop(&mut self) {
        self.entry.tokens().live.remove(&self.key);
    }
}

impl std::fmt::Debug for TokenLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLease")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
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
    /// `token` (already reviewed), valid until `expires_at`. Starts issuance
    /// if nobody holds it yet. Renewals are signed with the live
    /// subscriber's token that stays valid longest.
    pub fn subscribe(
        self: &Arc<Self>,
        id: &SpiffeId,
        token: &str,
        expires_at: Option<SystemTime>,
    ) -> (SvidWatch, TokenLease) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (entry, rx, new) = match entries.get(id) {
            Some(e) => (e.clone(), e.tx.subscribe(), false),
            None => {
                let (tx, rx) = watch::channel(None);
                let e = Arc::new(Entry {
                    tx,
                    tokens: Mutex::default(),
                });
                entries.insert(id.clone(), e.clone());
                self.metrics.certificates_cached.set(entries.len() as i64);
                (e, rx, true)
            }
        };
        drop(entries);
        let (refused_tx, refused) = watch::channel(false);
        let key = {
            let mut tokens = entry.tokens();
            let key = tokens.next;
            tokens.next += 1;
            tokens.live.insert(
                key,
                Token {
                    token: Zeroizing::new(token.to_owned()),
                    expires_at,
                    refused: refused_tx,
                },
            );
            key
        };
        if new {
            tokio::spawn(self.clone().worker(id.clone(), entry.clone()));
        }
        (rx, TokenLease { entry, key, refused })
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
        // Expired tokens and those of deleted pods are refused by the CA:
        // drop each, ending its stream, and try the next best.
        let chain = loop {
            let (key, token) = entry
                .best_token()
                .ok_or_else(|| SignError::Unauthenticated("no proxy of this identity holds a valid token".into()))?;
            self.metrics.ca_calls.inc();
            match self
                .signer
                .sign(kc.csr_pem.clone(), token.to_string(), self.rotation.ttl)
                .await
            {
                Err(SignError::Unauthenticated(e)) => {
                    warn!(%id, error = %e, "the CA refused a proxy's token; its stream ends");
                    entry.refuse(key);
                }
                other => break other?,
            }
        };
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
