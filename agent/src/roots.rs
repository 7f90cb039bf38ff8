//! The trust bundle: the `mizzen-root-ca` ConfigMap in the agent's namespace.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::{info, warn};

/// The ConfigMap key holding PEM roots.
pub const ROOT_KEY: &str = "root-cert.pem";

/// Follows ConfigMap `namespace/name` and publishes its roots on `tx` when
/// they change. A deleted ConfigMap keeps the last roots: removing trust
/// would break every proxy, and the CA restores the ConfigMap.
pub async fn follow(client: kube::Client, namespace: String, name: String, tx: watch::Sender<Option<Arc<String>>>) {
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().applied_objects().boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(cm) => {
                let Some(pem) = cm
                    .data
                    .and_then(|mut d| d.remove(ROOT_KEY))
                    .filter(|p| p.contains("BEGIN CERTIFICATE"))
                else {
                    warn!(%namespace, %name, "trust bundle ConfigMap has no {ROOT_KEY}");
                    continue;
                };
                let changed = tx.borrow().as_deref().map(String::as_str) != Some(pem.as_str());
                if changed {
                    info!(%namespace, %name, "trust bundle updated");
                    tx.send_replace(Some(Arc::new(pem)));
                }
            }
            Err(e) => warn!(error = %e, "trust bundle watch failed; retrying"),
        }
    }
}
