//! The API server's ServiceAccount token signing keys (its OIDC JWKS at
//! `/openid/v1/jwks`), used to refuse forged tokens without a TokenReview.
//!
//! A token whose signature does not verify under the issuer's keys cannot
//! be a ServiceAccount token, so reviewing it would only spend the API
//! server's time (and the caller's rate limit): a flood of forged tokens
//! would get the CA throttled. A verified signature proves nothing more:
//! the token is still reviewed (expiry, audience, bound pod). When the keys
//! cannot be fetched (RBAC, an issuer without discovery), every token is
//! reviewed as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use super::AuthError;

/// Least time between two fetches of the keys (a token signed by an
/// unknown key triggers one, in case the API server rotated them).
const REFETCH_AFTER: Duration = Duration::from_secs(30);

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    EcP256 { point: Vec<u8> },
}

/// The keys by `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys(HashMap<String, Key>);

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

impl Keys {
    /// Parses a JWK set; keys of other types are skipped.
    pub fn parse(jwks: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(jwks).map_err(|e| format!("JWKS: {e}"))?;
        let keys = v.get("keys").and_then(|k| k.as_array()).ok_or("JWKS without keys")?;
        let mut out = HashMap::new();
        for k in keys {
            let field = |name: &str| k.get(name).and_then(|f| f.as_str());
            let key = match (field("kty"), field("crv")) {
                (Some("RSA"), _) => (|| {
                    Some(Key::Rsa {
                        n: b64(field("n")?)?,
                        e: b64(field("e")?)?,
                    })
                })(),
                (Some("EC"), Some("P-256")) => (|| {
                    let (x, y) = (b64(field("x")?)?, b64(field("y")?)?);
                    Some(Key::EcP256 {
                        point: [&[4u8][..], &x, &y].concat(),
                    })
                })(),
                _ => None,
            };
            if let Some(key) = key {
                out.insert(field("kid").unwrap_or_default().to_owned(), key);
            }
        }
        Ok(Self(out))
    }

    /// Whether `token`'s signature verifies under the key it names (any
    /// key when it names none). `None` when no key has its `kid`.
    pub fn verify(&self, token: &str) -> Option<bool> {
        let (signed, signature) = token.rsplit_once('.')?;
        let header: serde_json::Value = serde_json::from_slice(&b64(signed.split('.').next()?)?).ok()?;
        let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or_default();
        let signature = b64(signature)?;
        // The key the token names; keys published without a `kid` may sign
        // anything.
        let candidates: Vec<&Key> = match header.get("kid").and_then(|k| k.as_str()) {
            Some(kid) => self.0.get(kid).into_iter().chain(self.0.get("")).collect(),
            None => self.0.values().collect(),
        };
        if candidates.is_empty() {
            return None;
        }
        Some(candidates.into_iter().any(|key| {
            match (alg, key) {
                ("RS256", Key::Rsa { n, e }) => ring::signature::RsaPublicKeyComponents { n, e }
                    .verify(
                        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                        signed.as_bytes(),
                        &signature,
                    )
                    .is_ok(),
                ("ES256", Key::EcP256 { point }) => {
                    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(signed.as_bytes(), &signature)
                        .is_ok()
                }
                _ => false,
            }
        }))
    }
}

/// The issuer's keys, fetched on first use and again when a token names a
/// key not among them (at most every 30 s).
pub struct IssuerKeys {
    client: kube::Client,
    state: Mutex<(Option<Keys>, Option<Instant>)>,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys").finish_non_exhaustive()
    }
}

impl IssuerKeys {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            state: Mutex::new((None, None)),
        }
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let req = http::Request::get("/openid/v1/jwks")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let text = self.client.request_text(req).await.map_err(|e| e.to_string())?;
        Keys::parse(&text)
    }

    /// The keys, fetching them when there are none yet or `stale` (a token
    /// named an unknown key), at most every 30 s.
    async fn keys(&self, stale: bool) -> Option<Keys> {
        let (held, due) = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let due = state.1.is_none_or(|at| at.elapsed() >= REFETCH_AFTER);
            (state.0.clone(), due && (stale || state.0.is_none()))
        };
        if !due {
            return held;
        }
        let fetched = self.fetch().await;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = Some(Instant::now());
        match fetched {
            Ok(keys) => state.0 = Some(keys),
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the ServiceAccount issuer's keys; reviewing every token")
            }
        }
        state.0.clone()
    }

    /// Refuses `token` when the issuer's keys are known and its signature
    /// does not verify under them; passes it on to review otherwise.
    pub async fn check(&self, token: &str) -> Result<(), AuthError> {
        let Some(keys) = self.keys(false).await else {
            return Ok(());
        };
        let verdict = match keys.verify(token) {
            Some(v) => Some(v),
            // An unknown key: the API server may have rotated its keys.
            None => self.keys(true).await.and_then(|k| k.verify(token)),
        };
        match verdict {
            Some(true) => Ok(()),
            Some(false) => Err(AuthError::Unusable(
                "its signature does not verify under the issuer's keys",
            )),
            None => Err(AuthError::Unusable("signed by a key the issuer does not publish")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// An ES256 key pair and its JWKS.
    fn issuer(kid: &str) -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        let point = key.public_key().as_ref().to_vec();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": enc(&point[1..33]), "y": enc(&point[33..65])}]})
        .to_string();
        (key, jwks)
    }

    fn token(key: &EcdsaKeyPair, kid: &str) -> String {
        let signed = format!(
            "{}.{}",
            enc(format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#).as_bytes()),
            enc(br#"{"aud":["mizzen-ca"]}"#)
        );
        let sig = key.sign(&SystemRandom::new(), signed.as_bytes()).expect("sign");
        format!("{signed}.{}", enc(sig.as_ref()))
    }

    #[test]
    fn only_tokens_signed_by_the_issuer_verify() {
        let (key, jwks) = issuer("k1");
        let keys = Keys::parse(&jwks).expect("jwks");
        let good = token(&key, "k1");
        assert_eq!(keys.verify(&good), Some(true));
        // Same claims, another signature: forged.
        let (other, _) = issuer("k1");
        assert_eq!(keys.verify(&token(&other, "k1")), Some(false));
        // Tampered claims.
        let mut parts: Vec<&str> = good.split('.').collect();
        let tampered = enc(br#"{"aud":["mizzen-ca"],"sub":"admin"}"#);
        parts[1] = &tampered;
        assert_eq!(keys.verify(&parts.join(".")), Some(false));
        // A key the issuer does not publish.
        assert_eq!(keys.verify(&token(&key, "k2")), None);
    }
}
