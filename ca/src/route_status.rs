//! Writes Mizzen's entries into the `status.parents` of every Gateway API
//! `HTTPRoute` and `GRPCRoute` bound to a Service, as the specification asks of a mesh
//! implementation: `Accepted` and `ResolvedRefs` per Service parent
//! ([`mizzen_api::routing::gateway::status`], pure), leaving other
//! controllers' entries alone. Like the policies' status, the CA is the
//! one writer, and writes only what differs from what is stored.
//!
//! The Services the routes are bound to are kept in [`Claims`], from which
//! a VirtualService naming one of them learns that it is overridden
//! ([`mizzen_api::routing::status::of_virtual_service`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::routing::gateway::grpc::GRPCRoute;
use mizzen_api::routing::gateway::{GammaRoute, HTTPRoute, check, parents, status};
use mizzen_api::routing::status::GatewayClaims;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::policy_status::now;

async fn reconcile<R>(client: &kube::Client, route: &R, metrics: &Metrics)
where
    R: GammaRoute + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let (Some(ns), Some(name)) = (route.meta().namespace.as_deref(), route.meta().name.as_deref()) else {
        return;
    };
    let Some(next) = status::next(route, &now()) else {
        return;
    };
    let accepted = next
        .parents
        .iter()
        .filter(|p| p.controller_name == mizzen_api::routing::gateway::CONTROLLER_NAME)
        .flat_map(|p| &p.conditions)
        .all(|c| c.status == "True");
    let verdict = if accepted { "accepted" } else { "rejected" };
    let patch = serde_json::json!({ "status": next });
    match Api::<R>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => metrics.policy_status_written(R::KIND, verdict),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            metrics.policy_status_failed(R::KIND);
            warn!(kind = R::KIND, route = %format!("{ns}/{name}"), error = %e, "cannot write route status; retried on the next change");
        }
    }
}

/// Which Services the Gateway API routes the mesh applies are bound to,
/// as the route watches last saw them.
#[derive(Debug)]
pub struct Claims {
    /// Route (`HTTPRoute <namespace>/<name>`) → the Services it is bound to.
    by_route: watch::Sender<BTreeMap<String, Vec<String>>>,
}

impl Claims {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            by_route: watch::Sender::new(BTreeMap::new()),
        })
    }

    /// Sees every change of the claims.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, Vec<String>>> {
        self.by_route.subscribe()
    }

    fn set(&self, route: String, services: Vec<String>) {
        self.by_route.send_if_modified(|m| {
            if services.is_empty() {
                m.remove(&route).is_some()
            } else {
                m.insert(route, services.clone()).as_ref() != Some(&services)
            }
        });
    }

    /// Forgets the routes of `kind` not in `listed` (a relist's result).
    fn keep(&self, kind: &str, listed: &BTreeSet<String>) {
        let prefix = format!("{kind} ");
        self.by_route.send_if_modified(|m| {
            let before = m.len();
            m.retain(|route, _| !route.starts_with(&prefix) || listed.contains(route));
            m.len() != before
        });
    }
}

/// `by_route` turned around: each Service with the routes bound to it.
pub fn by_service(by_route: &BTreeMap<String, Vec<String>>) -> GatewayClaims {
    let mut claims = GatewayClaims::new();
    for (route, services) in by_route {
        for s in services {
            claims.entry(s.clone()).or_default().push(route.clone());
        }
    }
    claims
}

/// `route`'s name in the claims, and the Services it is bound to (none
/// when the mesh cannot apply it as written).
fn claim<R: GammaRoute>(route: &R) -> Option<(String, Vec<String>)> {
    let ns = route.meta().namespace.as_deref()?;
    let name = route.meta().name.as_deref()?;
    let services = route
        .as_http()
        .ok()
        .filter(|http| check(http, ns).is_ok())
        .map(|http| parents(&http, ns).into_iter().map(|(s, _)| s).collect())
        .unwrap_or_default();
    Some((format!("{} {ns}/{name}", R::KIND), services))
}

/// Keeps HTTPRoutes' and GRPCRoutes' status, and `claims`, up to date,
/// when the Gateway API's CRDs are installed (checked once, at start).
pub async fn run(client: kube::Client, metrics: Arc<Metrics>, claims: Arc<Claims>) {
    tokio::join!(
        follow::<HTTPRoute>(client.clone(), metrics.clone(), claims.clone()),
        follow::<GRPCRoute>(client, metrics, claims)
    );
}

async fn follow<R>(client: kube::Client, metrics: Arc<Metrics>, claims: Arc<Claims>)
where
    R: GammaRoute + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let api = Api::<R>::all(client.clone());
    if let Err(kube::Error::Api(e)) = api.list_metadata(&ListParams::default().limit(1)).await
        && e.code == 404
    {
        info!(
            kind = R::KIND,
            "the Gateway API's CRDs are not installed: no status is written for these routes (restart the CA once they are)"
        );
        return;
    }
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(BTreeSet::new()),
            Ok(Event::InitApply(route) | Event::Apply(route)) => {
                if let Some((id, services)) = claim(&route) {
                    if let Some(listed) = listing.as_mut() {
                        listed.insert(id.clone());
                    }
                    claims.set(id, services);
                }
                reconcile(&client, &route, &metrics).await;
            }
            Ok(Event::Delete(route)) => {
                if let Some((id, _)) = claim(&route) {
                    claims.set(id, Vec::new());
                }
            }
            Ok(Event::InitDone) => {
                if let Some(listed) = listing.take() {
                    claims.keep(R::KIND, &listed);
                }
            }
            Err(e) => warn!(kind = R::KIND, error = %e, "route watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_follow_routes_and_a_relist_forgets_only_its_own_kind() {
        let claims = Claims::new();
        let mut seen = claims.subscribe();
        claims.set("HTTPRoute demo/a".into(), vec!["demo/web".into()]);
        claims.set("GRPCRoute demo/g".into(), vec!["demo/web".into(), "demo/api".into()]);
        assert!(seen.has_changed().unwrap_or(false));
        assert_eq!(
            by_service(&seen.borrow_and_update()),
            GatewayClaims::from([
                ("demo/api".into(), vec!["GRPCRoute demo/g".into()]),
                (
                    "demo/web".into(),
                    vec!["GRPCRoute demo/g".into(), "HTTPRoute demo/a".into()]
                ),
            ])
        );
        // The same claim again is no change.
        claims.set("HTTPRoute demo/a".into(), vec!["demo/web".into()]);
        assert!(!seen.has_changed().unwrap_or(true));
        // HTTPRoutes relisted without demo/a: the GRPCRoute stays.
        claims.keep("HTTPRoute", &BTreeSet::new());
        assert_eq!(
            by_service(&seen.borrow_and_update()).get("demo/web"),
            Some(&vec!["GRPCRoute demo/g".to_owned()])
        );
        // A route the mesh cannot apply claims nothing.
        claims.set("GRPCRoute demo/g".into(), Vec::new());
        assert!(by_service(&seen.borrow_and_update()).is_empty());
    }
}
