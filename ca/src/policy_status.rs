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
//! settle at once. A VirtualService's status also depends on the Gateway
//! API routes bound to its Services ([`Claims`]): it is judged again
//! whenever they change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::{StreamExt, stream};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::authz::status::{self, Verdict};
use mizzen_api::policy::{AuthorizationPolicy, PeerAuthentication, PolicyStatus};
use mizzen_api::routing::spec::{DestinationRule, VirtualService};
use mizzen_api::routing::status::{self as routing_status, GatewayClaims};
use time::format_description::well_known::Rfc3339;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::route_status::{Claims, by_service};

/// A policy kind whose status the CA writes.
trait Judged: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope> {
    const KIND: &'static str;
    /// Whether the verdict depends on the Gateway API routes' claims.
    const CLAIMS: bool = false;
    fn verdict(&self, claims: &GatewayClaims) -> Verdict;
    fn current(&self) -> Option<&PolicyStatus>;
}

impl Judged for AuthorizationPolicy {
    const KIND: &'static str = "AuthorizationPolicy";
    fn verdict(&self, _: &GatewayClaims) -> Verdict {
        status::of_authorization(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for VirtualService {
    const KIND: &'static str = "VirtualService";
    const CLAIMS: bool = true;
    fn verdict(&self, claims: &GatewayClaims) -> Verdict {
        routing_status::of_virtual_service(self, claims)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for DestinationRule {
    const KIND: &'static str = "DestinationRule";
    fn verdict(&self, _: &GatewayClaims) -> Verdict {
        routing_status::of_destination_rule(self)
    }
    fn current(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl Judged for PeerAuthentication {
    const KIND: &'static str = "PeerAuthentication";
    fn verdict(&self, _: &GatewayClaims) -> Verdict {
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
async fn reconcile<K>(client: &kube::Client, policy: &K, claims: &GatewayClaims, metrics: &Metrics)
where
    K: Judged + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let (Some(ns), Some(name)) = (policy.meta().namespace.as_deref(), policy.meta().name.as_deref()) else {
        return;
    };
    let policy_name = format!("{ns}/{name}");
    let verdict = policy.verdict(claims);
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

async fn follow<K>(client: kube::Client, metrics: Arc<Metrics>, claims: Arc<Claims>)
where
    K: Judged + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut claimed = claims.subscribe();
    let mut current = by_service(&claimed.borrow_and_update());
    // What the watch last saw, to judge again when the claims change.
    let mut seen: BTreeMap<String, K> = BTreeMap::new();
    let mut listing: Option<BTreeSet<String>> = None;
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(Event::Init) => listing = Some(BTreeSet::new()),
                    Ok(Event::InitApply(policy) | Event::Apply(policy)) => {
                        reconcile(&client, &policy, &current, &metrics).await;
                        if let (true, Some(key)) = (K::CLAIMS, key(&policy)) {
                            if let Some(listed) = listing.as_mut() {
                                listed.insert(key.clone());
                            }
                            seen.insert(key, policy);
                        }
                    }
                    Ok(Event::Delete(policy)) => {
                        if let Some(key) = key(&policy) {
                            seen.remove(&key);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let Some(listed) = listing.take() {
                            seen.retain(|k, _| listed.contains(k));
                        }
                    }
                    Err(e) => warn!(kind = K::KIND, error = %e, "policy watch failed; retrying"),
                }
            }
            // The sender lives as long as `claims`, which this holds.
            Ok(()) = claimed.changed(), if K::CLAIMS => {
                current = by_service(&claimed.borrow_and_update());
                for policy in seen.values() {
                    reconcile(&client, policy, &current, &metrics).await;
                }
            }
        }
    }
}

/// `<namespace>/<name>` of `policy`.
fn key(policy: &impl kube::Resource) -> Option<String> {
    Some(format!(
        "{}/{}",
        policy.meta().namespace.as_deref()?,
        policy.meta().name.as_deref()?
    ))
}

/// Keeps the status of both policy kinds and both traffic rule kinds, in
/// every namespace, up to date. Runs until the process ends; watch
/// failures (the CRDs not installed yet, say) are retried with backoff.
pub async fn run(client: kube::Client, metrics: Arc<Metrics>, claims: Arc<Claims>) {
    type Follow = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let all: [Follow; 4] = [
        Box::pin(follow::<AuthorizationPolicy>(
            client.clone(),
            metrics.clone(),
            claims.clone(),
        )),
        Box::pin(follow::<PeerAuthentication>(
            client.clone(),
            metrics.clone(),
            claims.clone(),
        )),
        Box::pin(follow::<VirtualService>(
            client.clone(),
            metrics.clone(),
            claims.clone(),
        )),
        Box::pin(follow::<DestinationRule>(client, metrics, claims)),
    ];
    stream::iter(all).for_each_concurrent(None, |f| f).await;
}
