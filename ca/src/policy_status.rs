//! Writes the `Accepted` condition into the status of every
//! `AuthorizationPolicy`, `PeerAuthentication`, `VirtualService` and
//! `DestinationRule`, so that `kubectl get mzap` (or `mzvs`) shows whether
//! a policy or rule is applied as written.
//!
//! One writer for the cluster: agents (one per node) compile the same
//! policies but do not write, which would cost one API write per node per
//! change. The status is a pure function of the spec
//! ([`mizzen_api::authz::status`]), so CA replicas running side by side
//! write the same thing, and a write is made only when the status differs
//! from what is stored: the CA's own writes come back through its watch and
//! settle at once.

use std::sync::Arc;

use futures::{StreamExt, stream};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::authz::status::{self, Verdict};
use mizzen_api::policy::{AuthorizationPolicy, PeerAuthentication, PolicyStatus};
use mizzen_api::routing::spec::{DestinationRule, VirtualService};
use mizzen_api::routing::status as routing_status;
use time::format_description::well_known::Rfc3339;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// A policy kind whose status the CA writes.
trait Judged: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope> {
    const KIND: &'static str;
    fn verdict(&self) -> Verdict;
    fn current(&self) -> Option<&PolicyStatus>;
}

impl Judged for AuthorizationPolicy {
    const KIND: &'static str = "AuthorizationPolicy";
    fn verdict(&self) -> Verdict {
        status::of_authorization(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for VirtualService {
    const KIND: &'static str = "VirtualService";
    fn verdict(&self) -> Verdict {
        routing_status::of_virtual_service(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for DestinationRule {
    const KIND: &'static str = "DestinationRule";
    fn verdict(&self) -> Verdict {
        routing_status::of_destination_rule(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    fn verdict(&self) -> Verdict {
        status::of_peer_authentication(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

/// Now, in RFC 3339 to the second: a condition's transition time.
pub(crate) fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Brings one policy's status up to date.
async fn reconcile<K>(client: &kube::Client, policy: &K, metrics: &Metrics)
where
    K: Judged + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let (Some(ns), Some(name)) = (policy.meta().namespace.as_deref(), policy.meta().name.as_deref()) else {
        return;
    };
    let policy_name = format!("{ns}/{name}");
    let verdict = policy.verdict();
    let Some(next) = status::next(policy.current(), &verdict, policy.meta().generation, &now()) else {
        return;
    };
    let api = Api::<K>::namespaced(client.clone(), ns);
    let patch = serde_json::json!({ "status": next });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            metrics.policy_status_written(K::KIND, verdict.label());
            match &verdict {
                Verdict::Accepted => debug!(kind = K::KIND, policy = %policy_name, "policy accepted"),
                Verdict::Rejected { reason, message } => info!(kind = K::KIND, policy = %policy_name,
                    reason, message, "policy not accepted as written"),
            }
        }
        // Deleted since the event: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            metrics.policy_status_failed(K::KIND);
            warn!(kind = K::KIND, policy = %policy_name, error = %e,
                "cannot write policy status; retried on the next change or resync");
        }
    }
}

async fn follow<K>(client: kube::Client, metrics: Arc<Metrics>)
where
    K: Judged + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(policy) => reconcile(&client, &policy, &metrics).await,
            Err(e) => warn!(kind = K::KIND, error = %e, "policy watch failed; retrying"),
        }
    }
}

/// Keeps the status of both policy kinds and both traffic rule kinds, in
/// every namespace, up to date. Runs until the process ends; watch
/// failures (the CRDs not installed yet, say) are retried with backoff.
pub async fn run(client: kube::Client, metrics: Arc<Metrics>) {
    type Follow = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let all: [Follow; 4] = [
        Box::pin(follow::<AuthorizationPolicy>(client.clone(), metrics.clone())),
        Box::pin(follow::<PeerAuthentication>(client.clone(), metrics.clone())),
        Box::pin(follow::<VirtualService>(client.clone(), metrics.clone())),
        Box::pin(follow::<DestinationRule>(client, metrics)),
    ];
    stream::iter(all).for_each_concurrent(None, |f| f).await;
}
