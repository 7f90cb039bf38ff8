//! The CA's state in Kubernetes: the signing bundle in a Secret and the
//! trust bundle published as a ConfigMap in every namespace.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::TrustDomain;
use tracing::{debug, info, warn};

use crate::authority::{Authority, Bundle};
use crate::metrics::Metrics;

/// The ConfigMap holding the trust bundle, in every namespace (the default name).
pub const ROOT_CONFIGMAP: &str = "mizzen-root-ca";
/// Its key.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "mizzen-ca";

/// Where the signing bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The operator's Secret in Istio's `cacerts` layout.
    PluggedIn,
    /// Our own Secret, created now or by an earlier start or another replica.
    SelfSigned { created_now: bool },
}

fn secret_to_bundle(secret: &Secret, what: &str) -> anyhow::Result<Bundle> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &str| -> anyhow::Result<String> {
        let v = data.get(key).with_context(|| {
            format!("{what} has no key {key:?}: it needs ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem")
        })?;
        String::from_utf8(v.0.clone()).with_context(|| format!("{what} key {key:?} is not UTF-8 PEM"))
    };
    Ok(Bundle {
        ca_cert: get("ca-cert.pem")?,
        ca_key: get("ca-key.pem")?,
        cert_chain: get("cert-chain.pem")?,
        root_cert: get("root-cert.pem")?,
    })
}

fn bundle_to_secret(name: &str, namespace: &str, b: &Bundle) -> Secret {
    let mut data = BTreeMap::new();
    for (k, v) in [
        ("ca-cert.pem", &b.ca_cert),
        ("ca-key.pem", &b.ca_key),
        ("cert-chain.pem", &b.cert_chain),
        ("root-cert.pem", &b.root_cert),
    ] {
        data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
    }
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_owned());
    s.metadata.namespace = Some(namespace.to_owned());
    s.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "mizzen".into())]));
    s.type_ = Some("Opaque".into());
    s.data = Some(data);
    s
}

/// Loads the signing bundle: the operator's plug-in Secret if it exists,
/// else our own Secret, creating it (create-only: a replica that loses the
/// race uses the winner's) with a new root and intermediate.
pub async fn load_bundle(
    client: &kube::Client,
    namespace: &str,
    plugin_secret: &str,
    own_secret: &str,
    td: &TrustDomain,
    root_ttl: std::time::Duration,
) -> anyhow::Result<(Authority, Source)> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    if let Some(s) = secrets
        .get_opt(plugin_secret)
        .await
        .with_context(|| format!("read Secret {namespace}/{plugin_secret}"))?
    {
        let what = format!("Secret {namespace}/{plugin_secret}");
        let bundle = secret_to_bundle(&s, &what)?;
        let authority = Authority::from_bundle(&bundle, td).with_context(|| format!("{what} is not a usable CA"))?;
        return Ok((authority, Source::PluggedIn));
    }
    let what = format!("Secret {namespace}/{own_secret}");
    let (secret, created_now) = match secrets
        .get_opt(own_secret)
        .await
        .with_context(|| format!("read {what}"))?
    {
        Some(s) => (s, false),
        None => {
            let bundle = Authority::generate(td, root_ttl).context("generate a root CA")?;
            match secrets
                .create(
                    &PostParams::default(),
                    &bundle_to_secret(own_secret, namespace, &bundle),
                )
                .await
            {
                Ok(s) => (s, true),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    info!(secret = %what, "another replica created the root first; using it");
                    (
                        secrets.get(own_secret).await.with_context(|| format!("read {what}"))?,
                        false,
                    )
                }
                Err(e) => return Err(e).with_context(|| format!("create {what}")),
            }
        }
    };
    let bundle = secret_to_bundle(&secret, &what)?;
    let authority = Authority::from_bundle(&bundle, td).with_context(|| format!("{what} is not a usable CA"))?;
    Ok((authority, Source::SelfSigned { created_now }))
}

async fn publish(client: &kube::Client, name: &str, namespace: &str, root_pem: &str, metrics: &Metrics) {
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "mizzen"},
        },
        "data": { ROOT_CONFIGMAP_KEY: root_pem },
    });
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    match api
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
    {
        Ok(_) => {
            metrics.root_configmaps_published.inc();
            debug!(%namespace, "published the trust bundle");
        }
        // A namespace being deleted refuses new objects; nothing to do.
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("terminat") => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(%namespace, error = %e, "cannot publish the trust bundle"),
    }
}

/// Keeps `mizzen-root-ca` present and current in every namespace: writes it
/// when a namespace appears, and again when someone deletes or edits it.
pub async fn publish_roots(
    client: kube::Client,
    name: String,
    root_pem: String,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let namespaces = {
        let client = client.clone();
        let name = name.clone();
        let root_pem = root_pem.clone();
        let metrics = metrics.clone();
        async move {
            let mut events = watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ns) => {
                        let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
                        if let (Some(ns_name), false) = (ns.metadata.name.as_deref(), terminating) {
                            publish(&client, &name, ns_name, &root_pem, &metrics).await;
                        }
                    }
                    Err(e) => warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
        }
    };
    let configmaps = async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(Api::<ConfigMap>::all(client.clone()), config)
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            let (cm, deleted) = match ev {
                Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => (cm, false),
                Ok(watcher::Event::Delete(cm)) => (cm, true),
                Ok(_) => continue,
                Err(e) => {
                    warn!(error = %e, "configmap watch failed; retrying");
                    continue;
                }
            };
            let current = cm.data.as_ref().and_then(|d| d.get(ROOT_CONFIGMAP_KEY));
            if (deleted || current.map(String::as_str) != Some(root_pem.as_str()))
                && let Some(ns) = cm.metadata.namespace.as_deref()
            {
                info!(namespace = %ns, deleted, "restoring the trust bundle ConfigMap");
                publish(&client, &name, ns, &root_pem, &metrics).await;
            }
        }
    };
    tokio::join!(namespaces, configmaps);
    bail!("the trust bundle watches ended")
}
