//! Kubernetes TokenReview of ServiceAccount bearer tokens, shared by the CA
//! (which authenticates workloads and node agents) and the node agent
//! (which authenticates the proxies on its socket).
//!
//! [`parse_review`] is the pure part: it accepts a review only when it was
//! authenticated for the audience asked, and only for a username of the
//! exact form `system:serviceaccount:<namespace>:<name>`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};

pub mod jwks;
use kube::api::{Api, PostParams};

/// Longest token accepted (projected tokens are ~1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most cached reviews; beyond it expired entries are dropped, then the cache is cleared.
pub const MAX_CACHE_ENTRIES: usize = 8192;

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// A ServiceAccount as the API server vouched for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    /// When the reviewed token expires (its `exp` claim); `None` for a
    /// token without one. Whatever the token grants ends then.
    pub expires_at: Option<SystemTime>,
}

impl Reviewed {
    /// `namespace/service-account`, for logs.
    pub fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {0} metadata with a bearer token")]
    Missing(&'static str),
    #[error("{0} metadata is not \"Bearer <token>\"")]
    Malformed(&'static str),
    #[error("token was not authenticated: {0}")]
    NotAuthenticated(String),
    #[error("token is not for audience {0:?}")]
    WrongAudience(String),
    #[error("reviewed user {0:?} is not a ServiceAccount (system:serviceaccount:<ns>:<name>)")]
    NotServiceAccount(String),
    #[error("cannot review the token with the API server: {0}")]
    Unavailable(String),
    #[error("not a usable ServiceAccount token ({0}); refused without asking the API server")]
    Unusable(&'static str),
    #[error("too many token reviews in flight; retry")]
    Overloaded,
}

impl AuthError {
    /// A short stable name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "token_missing",
            AuthError::Malformed(_) => "token_malformed",
            AuthError::NotAuthenticated(_) => "token_invalid",
            AuthError::WrongAudience(_) => "token_audience",
            AuthError::NotServiceAccount(_) => "token_not_service_account",
            AuthError::Unavailable(_) => "token_review_unavailable",
            AuthError::Unusable(_) => "token_unusable",
            AuthError::Overloaded => "token_review_overloaded",
        }
    }

    /// Whether the API server said no (worth remembering briefly), as
    /// opposed to not answering.
    fn is_verdict(&self) -> bool {
        matches!(
            self,
            AuthError::NotAuthenticated(_) | AuthError::WrongAudience(_) | AuthError::NotServiceAccount(_)
        )
    }
}

/// Extracts the token from an `authorization`-style value.
pub fn bearer(header: &'static str, value: Option<&str>) -> Result<String, AuthError> {
    let v = value.ok_or(AuthError::Missing(header))?;
    let (scheme, token) = v.split_once(' ').ok_or(AuthError::Malformed(header))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || token.contains(char::is_whitespace)
    {
        return Err(AuthError::Malformed(header));
    }
    Ok(token.to_owned())
}

fn is_dns_label(s: &str, max: usize, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// Turns a TokenReview status into a [`Reviewed`], checking that it was
/// authenticated for `audience` and names a ServiceAccount, strictly.
pub fn parse_review(status: &TokenReviewStatus, audience: &str) -> Result<Reviewed, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::NotAuthenticated(
            status.error.clone().unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    // The API server echoes the audiences the token is valid for among those
    // asked; a success without ours is not a success (SPIRE 1.10.0).
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(AuthError::WrongAudience(audience.to_owned()));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let parts: Vec<&str> = username.split(':').collect();
    let (namespace, sa) = match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if crate::mesh::is_namespace_name(ns) && is_dns_label(sa, 253, true) => {
            (*ns, *sa)
        }
        _ => return Err(AuthError::NotServiceAccount(username.to_owned())),
    };
    let extra = |key: &str| -> Option<String> {
        let values = user?.extra.as_ref()?.get(key)?;
        match values.as_slice() {
            [one] if !one.is_empty() => Some(one.clone()),
            _ => None,
        }
    };
    Ok(Reviewed {
        namespace: namespace.to_owned(),
        service_account: sa.to_owned(),
        pod_name: extra(EXTRA_POD_NAME),
        pod_uid: extra(EXTRA_POD_UID),
        node_name: extra(EXTRA_NODE_NAME),
        expires_at: None,
    })
}

/// Refuses, without asking the API server, a token that cannot be a
/// ServiceAccount token for `audience`: not a JWT, another audience, or
/// already expired. Its claims are not verified here (the review does
/// that); this only spares the API server reviews of garbage, so that a
/// flood of random tokens cannot get the caller's ServiceAccount throttled.
pub fn precheck(token: &str, audience: &str) -> Result<(), AuthError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Unusable("not a JWT"));
    };
    if signature.is_empty() || b64.decode(signature.trim_end_matches('=')).is_err() {
        return Err(AuthError::Unusable("not a signed JWT"));
    }
    let json = |part: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&b64.decode(part.trim_end_matches('=')).ok()?).ok()
    };
    if json(header).and_then(|h| h.get("alg").cloned()).is_none() {
        return Err(AuthError::Unusable("no JWT header"));
    }
    let claims = json(payload).ok_or(AuthError::Unusable("no JWT claims"))?;
    let ours = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !ours {
        return Err(AuthError::Unusable("another audience"));
    }
    if token_expiry(token).is_some_and(|exp| exp <= SystemTime::now()) {
        return Err(AuthError::Unusable("expired"));
    }
    Ok(())
}

/// When JWT `token` expires, from its `exp` claim. The signature is not
/// checked: use it only on a token the API server has just accepted, and
/// only to limit what the token may do, never to grant anything.
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// A review's outcome and until when it may be reused.
type CachedReview = (Result<Reviewed, AuthError>, Instant);

/// How long a refusal by the API server is remembered.
pub const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(5);
/// How long a review waits for a free slot before giving up.
const REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(2);

/// Reviews tokens with the API server: garbage is refused without a
/// review, successes are cached for `cache_ttl` and refusals for
/// [`NEGATIVE_CACHE_TTL`], and at most `max_concurrent` reviews are in
/// flight (more wait up to 2 s, then fail as [`AuthError::Overloaded`]).
pub struct Authenticator {
    client: kube::Client,
    audience: String,
    cache_ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], CachedReview>>,
    reviews: tokio::sync::Semaphore,
    issuer_keys: jwks::IssuerKeys,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("audience", &self.audience)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(client: kube::Client, audience: String, cache_ttl: Duration) -> Self {
        Self::with_limit(client, audience, cache_ttl, 16)
    }

    /// At most `max_concurrent` reviews in flight.
    pub fn with_limit(client: kube::Client, audience: String, cache_ttl: Duration, max_concurrent: usize) -> Self {
        Self {
            issuer_keys: jwks::IssuerKeys::new(client.clone()),
            client,
            audience,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(max_concurrent.max(1)),
        }
    }

    fn key(&self, token: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.audience.as_bytes());
        ctx.update(b"\0");
        ctx.update(token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Reviews `token` for the configured audience.
    pub async fn review(&self, token: &str) -> Result<Reviewed, AuthError> {
        self.review_timed(token).await.0
    }

    /// [`Authenticator::review`], with how long the API server took when
    /// it was asked (`None`: answered from the cache or refused before).
    pub async fn review_timed(&self, token: &str) -> (Result<Reviewed, AuthError>, Option<Duration>) {
        if let Err(e) = precheck(token, &self.audience) {
            return (Err(e), None);
        }
        let key = self.key(token);
        if let Some((r, expires)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && *expires > Instant::now()
        {
            return (r.clone(), None);
        }
        // A forged signature is refused here, without a review.
        if let Err(e) = self.issuer_keys.check(token).await {
            return (Err(e), None);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(REVIEW_QUEUE_WAIT, self.reviews.acquire()).await else {
            return (Err(AuthError::Overloaded), None);
        };
        let asked = Instant::now();
        let result = self.ask(token).await;
        let took = asked.elapsed();
        let ttl = match &result {
            // Never remember a token as good past its expiry.
            Ok(reviewed) => reviewed
                .expires_at
                .map(|e| e.duration_since(SystemTime::now()).unwrap_or_default())
                .map_or(self.cache_ttl, |u| u.min(self.cache_ttl)),
            Err(e) if e.is_verdict() => NEGATIVE_CACHE_TTL,
            Err(_) => Duration::ZERO,
        };
        if !ttl.is_zero() {
            let now = Instant::now();
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.retain(|_, (_, exp)| *exp > now);
                if cache.len() >= MAX_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (result.clone(), now + ttl));
        }
        (result, Some(took))
    }

    /// One TokenReview.
    async fn ask(&self, token: &str) -> Result<Reviewed, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let status = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .status
            .ok_or_else(|| AuthError::Unavailable("TokenReview without status".into()))?;
        let mut reviewed = parse_review(&status, &self.audience)?;
        reviewed.expires_at = token_expiry(token);
        Ok(reviewed)
    }
}

#[cfg(test)]
mod tests;
