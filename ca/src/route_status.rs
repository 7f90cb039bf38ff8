//! Writes Mizzen's entries into the `status.parents` of every Gateway API
//! `HTTPRoute` and `GRPCRoute` bound to a Service, as the specification asks of a mesh
//! implementation: `Accepted` and `ResolvedRefs` per Service parent
//! ([`mizzen_api::routing::gateway::status`], pure), leaving other
//! controllers' entries alone. Like the policies' status, the CA is the
//! one writer, and writes only what differs from what is stored.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::routing::gateway::grpc::GRPCRoute;
use mizzen_api::routing::gateway::{GammaRoute, HTTPRoute, status};
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

/// Keeps HTTPRoutes' and GRPCRoutes' status up to date, when the Gateway
/// API's CRDs are installed (checked once, at start).
pub async fn run(client: kube::Client, metrics: Arc<Metrics>) {
    tokio::join!(
        follow::<HTTPRoute>(client.clone(), metrics.clone()),
        follow::<GRPCRoute>(client, metrics)
    );
}

async fn follow<R>(client: kube::Client, metrics: Arc<Metrics>)
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
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(route) => reconcile(&client, &route, &metrics).await,
            Err(e) => warn!(kind = R::KIND, error = %e, "route watch failed; retrying"),
        }
    }
}
