//! Writes Mizzen's entries into the `status.parents` of every Gateway API
//! `HTTPRoute` bound to a Service, as the specification asks of a mesh
//! implementation: `Accepted` and `ResolvedRefs` per Service parent
//! ([`mizzen_api::routing::gateway::status`], pure), leaving other
//! controllers' entries alone. Like the policies' status, the CA is the
//! one writer, and writes only what differs from what is stored.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::routing::gateway::{HTTPRoute, status};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::policy_status::now;

const KIND: &str = "HTTPRoute";

async fn reconcile(client: &kube::Client, route: &HTTPRoute, metrics: &Metrics) {
    let (Some(ns), Some(name)) = (route.metadata.namespace.as_deref(), route.metadata.name.as_deref()) else {
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
    match Api::<HTTPRoute>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => metrics.policy_status_written(KIND, verdict),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            metrics.policy_status_failed(KIND);
            warn!(route = %format!("{ns}/{name}"), error = %e, "cannot write HTTPRoute status; retried on the next change");
        }
    }
}

/// Keeps HTTPRoutes' status up to date, when the Gateway API's CRDs are
/// installed (checked once, at start).
pub async fn run(client: kube::Client, metrics: Arc<Metrics>) {
    let api = Api::<HTTPRoute>::all(client.clone());
    if let Err(kube::Error::Api(e)) = api.list_metadata(&ListParams::default().limit(1)).await
        && e.code == 404
    {
        info!(
            "the Gateway API's CRDs are not installed: no HTTPRoute status is written (restart the CA once they are)"
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
            Err(e) => warn!(error = %e, "HTTPRoute watch failed; retrying"),
        }
    }
}
