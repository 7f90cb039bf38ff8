//! Webhook TLS without manual steps.
//!
//! The injector keeps a small CA of its own in a Secret (created once,
//! create-only, so replicas agree), issues itself a serving certificate
//! from it, renews that certificate in place, and keeps the `caBundle` of
//! its MutatingWebhookConfiguration equal to the CA's certificate, also
//! after a `kubectl apply` resets it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::tls::{ReloadingResolver, certified_key};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tracing::{info, warn};

/// The injector's webhook CA.
pub struct WebhookCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl std::fmt::Debug for WebhookCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn now_plus(d: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + d
}

impl WebhookCa {
    fn generate() -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "mizzen-injector webhook CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now_plus(Duration::ZERO) - Duration::from_secs(60);
        p.not_after = now_plus(Duration::from_secs(10 * 365 * 86_400));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = p.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads Secret `namespace/name`, creating it first if absent.
    pub async fn load_or_create(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<Self> {
        let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
        let secret = match secrets
            .get_opt(name)
            .await
            .with_context(|| format!("read Secret {namespace}/{name}"))?
        {
            Some(s) => s,
            None => {
                let (cert, key) = Self::generate()?;
                let mut s = Secret::default();
                s.metadata.name = Some(name.into());
                s.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "mizzen".into())]));
                s.data = Some(BTreeMap::from([
                    ("ca-cert.pem".into(), ByteString(cert.into_bytes())),
                    ("ca-key.pem".into(), ByteString(key.into_bytes())),
                ]));
                match secrets.create(&PostParams::default(), &s).await {
                    Ok(s) => s,
                    Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(name).await?,
                    Err(e) => return Err(e).with_context(|| format!("create Secret {namespace}/{name}")),
                }
            }
        };
        let data = secret.data.unwrap_or_default();
        let get = |k: &str| -> anyhow::Result<String> {
            let v = data
                .get(k)
                .with_context(|| format!("Secret {namespace}/{name} has no {k}"))?;
            Ok(String::from_utf8(v.0.clone())?)
        };
        let cert_pem = get("ca-cert.pem")?;
        let key = KeyPair::from_pem(&get("ca-key.pem")?).context("webhook CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).context("webhook CA certificate")?;
        Ok(Self { issuer, cert_pem })
    }

    /// A serving certificate for `dns` names and `ips`, valid for `ttl`.
    pub fn serving(&self, dns: &[String], ips: &[IpAddr], ttl: Duration) -> anyhow::Result<rustls::sign::CertifiedKey> {
        let mut p = CertificateParams::new(dns.to_vec())?;
        p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.distinguished_name.push(
            DnType::CommonName,
            dns.first().cloned().unwrap_or_else(|| "mizzen-injector".into()),
        );
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = now_plus(Duration::ZERO) - Duration::from_secs(60);
        p.not_after = now_plus(ttl);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(certified_key(
            &format!("{}{}", cert.pem(), self.cert_pem),
            &key.serialize_pem(),
        )?)
    }
}

/// What the serving certificate names, and for how long.
#[derive(Debug, Clone)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub ttl: Duration,
}

/// Renews the serving certificate at half its lifetime, in place.
pub async fn renew_forever(ca: Arc<WebhookCa>, names: ServingNames, resolver: Arc<ReloadingResolver>) {
    loop {
        tokio::time::sleep(names.ttl / 2).await;
        match ca.serving(&names.dns, &names.ips, names.ttl) {
            Ok(ck) => {
                resolver.set(ck);
                info!("renewed the webhook serving certificate");
            }
            Err(e) => warn!(error = %e, "cannot renew the webhook serving certificate"),
        }
    }
}

/// A webhook configuration whose webhooks' caBundle the injector keeps
/// current: the mutating one (injection) and the validating one (traffic
/// rules).
pub trait WebhookConfiguration:
    kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Each webhook's caBundle, in order.
    fn bundles(&self) -> Vec<Option<&ByteString>>;
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn bundles(&self) -> Vec<Option<&ByteString>> {
        self.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.as_ref())
            .collect()
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn bundles(&self) -> Vec<Option<&ByteString>> {
        self.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.as_ref())
            .collect()
    }
}

/// JSON patch operations setting every webhook's caBundle of `config` to
/// `ca_pem` (none when all are set already).
pub fn ca_bundle_patch(config: &impl WebhookConfiguration, ca_pem: &str) -> Vec<serde_json::Value> {
    let want = ByteString(ca_pem.as_bytes().to_vec());
    config
        .bundles()
        .into_iter()
        .enumerate()
        .filter(|(_, b)| *b != Some(&want))
        .map(|(i, _)| {
            serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": want})
        })
        .collect()
}

/// Keeps the caBundle of webhook configuration `name` (of kind `K`)
/// current.
pub async fn keep_ca_bundle<K: WebhookConfiguration>(client: kube::Client, name: String, ca_pem: String) {
    let api = Api::<K>::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api.clone(), config).default_backoff().applied_objects().boxed();
    while let Some(ev) = events.next().await {
        let current = match ev {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "webhook configuration watch failed; retrying");
                continue;
            }
        };
        let ops = ca_bundle_patch(&current, &ca_pem);
        if ops.is_empty() {
            continue;
        }
        let patch: json_patch::Patch = match serde_json::from_value(serde_json::Value::Array(ops)) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "BUG: cannot build the caBundle patch");
                continue;
            }
        };
        match api
            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => info!(configuration = %name, "set the webhook caBundle"),
            Err(e) => warn!(configuration = %name, error = %e, "cannot set the webhook caBundle"),
        }
    }
}
