//! The cache's logic against an in-process signer (rcgen), so single flight,
//! rotation and outage behaviour can be checked without a CA.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rcgen::{BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, IsCa, KeyPair};

use super::*;

struct FakeCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    calls: AtomicUsize,
    down: AtomicBool,
    delay: Duration,
    /// Tokens it treats as expired or of a deleted pod.
    refused: Mutex<Vec<String>>,
    /// Tokens it was called with, in order.
    seen: Mutex<Vec<String>>,
}

impl FakeCa {
    fn new(delay: Duration) -> Arc<Self> {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        Arc::new(Self {
            issuer,
            calls: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay,
            refused: Mutex::default(),
            seen: Mutex::default(),
        })
    }
}

impl Signer for Arc<FakeCa> {
    async fn sign(&self, csr_pem: String, token: String, ttl: Duration) -> Result<Vec<String>, SignError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(SignError::Unavailable("fake CA is down".into()));
        }
        self.seen.lock().expect("lock").push(token.clone());
        if self.refused.lock().expect("lock").contains(&token) {
            return Err(SignError::Unauthenticated("token expired".into()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&csr_pem).expect("csr");
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now;
        csr.params.not_after = now + ttl;
        let cert = csr.signed_by(&self.issuer).expect("sign");
        Ok(vec![cert.pem(), self.issuer.pem()])
    }
}

fn rotation(ttl: Duration) -> Rotation {
    Rotation {
        ttl,
        fraction: 0.5,
        jitter: 0.0,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
    }
}

async fn first(rx: &mut SvidWatch) -> Arc<Svid> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return s;
            }
            rx.changed().await.expect("sender alive");
        }
    })
    .await
    .expect("a certificate within 10 s")
}

#[tokio::test]
async fn a_burst_with_one_identity_costs_one_ca_call() {
    let ca = FakeCa::new(Duration::from_millis(50));
    let mgr = SecretManager::new(
        ca.clone(),
        rotation(Duration::from_secs(3600)),
        4,
        Arc::new(Metrics::new()),
    );
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/web".parse().expect("id");
    let mut rxs: Vec<_> = (0..50).map(|_| mgr.subscribe(&id, "token", None)).collect();
    let mut serials = std::collections::HashSet::new();
    for (rx, _) in &mut rxs {
        serials.insert(first(rx).await.serial.clone());
    }
    assert_eq!(serials.len(), 1, "all 50 share one certificate");
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    let other: SpiffeId = "spiffe://cluster.local/ns/a/sa/db".parse().expect("id");
    let (mut rx, _lease) = mgr.subscribe(&other, "token", None);
    assert_eq!(first(&mut rx).await.id, other);
    assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn rotates_before_expiry_and_survives_an_outage() {
    let ca = FakeCa::new(Duration::ZERO);
    let mgr = SecretManager::new(
        ca.clone(),
        rotation(Duration::from_secs(4)),
        4,
        Arc::new(Metrics::new()),
    );
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/web".parse().expect("id");
    let (mut rx, _lease) = mgr.subscribe(&id, "token", None);
    let one = first(&mut rx).await;
    // A new certificate arrives on the same watch before the first expires.
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("rotated")
        .expect("alive");
    let two = rx.borrow_and_update().clone().expect("cert");
    assert_ne!(two.serial, one.serial);
    assert!(SystemTime::now() < one.not_after, "rotated before the first expired");

    // CA down: the cached certificate stays, failures are retried.
    ca.down.store(true, Ordering::SeqCst);
    let calls = ca.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(ca.calls.load(Ordering::SeqCst) > calls + 1, "retries while down");
    assert_eq!(
        rx.borrow().as_ref().map(|s| s.serial.clone()),
        Some(two.serial.clone()),
        "still serving the cached one"
    );
    // CA back: a fresh certificate follows.
    ca.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("recovered")
        .expect("alive");
    assert_ne!(rx.borrow().as_ref().map(|s| s.serial.clone()), Some(two.serial.clone()));
}

#[test]
fn renewals_use_the_token_that_stays_valid_longest() {
    let at = |s: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    let t = |exp| Token {
        token: Zeroizing::new("t".into()),
        expires_at: exp,
        refused: watch::channel(false).0,
    };
    assert!(
        t(at(20)).outlives(&t(at(10))),
        "a rotated token replaces its predecessor"
    );
    assert!(!t(at(10)).outlives(&t(at(20))), "an older token does not");
    assert!(t(None).outlives(&t(at(10))), "a token without exp is taken as newest");
}

#[tokio::test]
async fn a_refused_token_is_dropped_and_renewals_use_another_live_one() {
    let ca = FakeCa::new(Duration::ZERO);
    let mgr = SecretManager::new(
        ca.clone(),
        rotation(Duration::from_secs(2)),
        4,
        Arc::new(Metrics::new()),
    );
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/web".parse().expect("id");
    let at = |s: u64| Some(SystemTime::now() + Duration::from_secs(s));
    let (mut live, _live_lease) = mgr.subscribe(&id, "live", at(600));
    first(&mut live).await;
    // A second pod of the identity, with a token that outlives the first.
    let (_gone, gone_lease) = mgr.subscribe(&id, "gone", at(900));
    let mut refused = gone_lease.refused();
    // Its pod is deleted: the CA refuses its token from now on.
    ca.refused.lock().expect("lock").push("gone".into());
    tokio::time::timeout(Duration::from_secs(10), refused.wait_for(|r| *r))
        .await
        .expect("the refused stream is told")
        .expect("alive");
    let before = live.borrow_and_update().as_ref().map(|s| s.serial.clone());
    tokio::time::timeout(Duration::from_secs(10), live.changed())
        .await
        .expect("renewed with the live token")
        .expect("alive");
    assert_ne!(live.borrow().as_ref().map(|s| s.serial.clone()), before);
    let seen = ca.seen.lock().expect("lock").clone();
    assert_eq!(seen.last().map(String::as_str), Some("live"), "{seen:?}");
}
