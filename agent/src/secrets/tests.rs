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
        assert_eq!(token, "token", "the subscriber's token is forwarded");
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
    let mut rxs: Vec<_> = (0..50).map(|_| mgr.subscribe(&id, "token")).collect();
    let mut serials = std::collections::HashSet::new();
    for rx in &mut rxs {
        serials.insert(first(rx).await.serial.clone());
    }
    assert_eq!(serials.len(), 1, "all 50 share one certificate");
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    let other: SpiffeId = "spiffe://cluster.local/ns/a/sa/db".parse().expect("id");
    let mut rx = mgr.subscribe(&other, "token");
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
    let mut rx = mgr.subscribe(&id, "token");
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
