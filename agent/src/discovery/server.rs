//! The delta discovery stream
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`).
//!
//! Protocol, as Envoy's incremental xDS defines it: the first request names
//! the type URL and what to subscribe to (nothing or `*` = every Service;
//! otherwise `<namespace>/<name>` names) and may list the versions the
//! client already holds (after a reconnect). Every response carries only
//! resources that are new or changed for this client, the names of those
//! removed, and a fresh nonce; the client ACKs by echoing the nonce and
//! NACKs by adding `error_detail`. Callers present their projected token,
//! as on the SDS stream; the state-of-the-world variant is not served.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use mizzen_api::proto::discovery::SERVICE_TYPE;
use mizzen_api::tokenreview::Authenticator;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::Snapshot;
use crate::limits::{MAX_NAME_LEN, MAX_NAMES_PER_STREAM, MAX_VERSION_LEN, StreamLimits};
use crate::metrics::Metrics;
use crate::sds::{CallerPolicy, authenticate_caller};

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// The discovery service.
pub struct Discovery {
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub authenticator: Arc<Authenticator>,
    pub policy: CallerPolicy,
    pub metrics: Arc<Metrics>,
    /// Shared with SDS: streams per identity and in total.
    pub limits: Arc<StreamLimits>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What one stream subscribed to and what it was sent.
#[derive(Debug, Default)]
pub struct StreamState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name → version the client holds (as far as the agent knows).
    sent: BTreeMap<String, String>,
}

impl StreamState {
    /// Applies a request's subscription changes; `first` marks the
    /// stream's first request (where an empty subscription means all).
    /// Refuses names and versions that cannot be ours, and more of them
    /// than [`MAX_NAMES_PER_STREAM`]: any local caller may ask.
    pub fn subscribe(&mut self, req: &DeltaDiscoveryRequest, first: bool) -> Result<(), Status> {
        let too_long = |n: &String| n.len() > MAX_NAME_LEN;
        if let Some(n) = req
            .resource_names_subscribe
            .iter()
            .chain(&req.resource_names_unsubscribe)
            .chain(req.initial_resource_versions.keys())
            .find(|n| too_long(n))
        {
            return Err(Status::invalid_argument(format!(
                "resource name of {} bytes: names are <namespace>/<service>, at most {MAX_NAME_LEN}",
                n.len()
            )));
        }
        if req
            .initial_resource_versions
            .values()
            .any(|v| v.len() > MAX_VERSION_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "a resource version is longer than {MAX_VERSION_LEN} bytes"
            )));
        }
        if first {
            if req.initial_resource_versions.len() > MAX_NAMES_PER_STREAM {
                return Err(too_many());
            }
            self.wildcard = req.resource_names_subscribe.is_empty();
            self.sent = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
            }
        }
        if self.names.len() > MAX_NAMES_PER_STREAM {
            return Err(too_many());
        }
        Ok(())
    }

    /// The response that brings the client from what it holds to `snap`,
    /// or `None` when it is up to date. Records the new versions as sent.
    pub fn diff(&mut self, snap: &Snapshot, nonce: String) -> Option<DeltaDiscoveryResponse> {
        let wanted = |name: &str| self.wildcard || self.names.contains(name);
        let mut resources = Vec::new();
        for (name, r) in &snap.resources {
            if wanted(name) && self.sent.get(name) != Some(&r.version) {
                resources.push((**r).clone());
            }
        }
        let removed: Vec<String> = self
            .sent
            .keys()
            .filter(|n| !wanted(n) || !snap.resources.contains_key(*n))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        for n in &removed {
            self.sent.remove(n);
        }
        for r in &resources {
            self.sent.insert(r.name.clone(), r.version.clone());
        }
        Some(DeltaDiscoveryResponse {
            type_url: SERVICE_TYPE.into(),
            resources,
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

fn too_many() -> Status {
    Status::invalid_argument(format!(
        "more than {MAX_NAMES_PER_STREAM} resource names on one stream: subscribe to everything (*) instead"
    ))
}

async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Discovery {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "discovery is served incrementally only: use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = authenticate_caller(&self.authenticator, &self.policy, &self.metrics, request.metadata()).await?;
        let id = caller.id.clone();
        let slot = self
            .limits
            .admit(&id)
            .inspect_err(|_| self.metrics.reject("too_many_streams"))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DeltaDiscoveryResponse, Status>>(4);
        let mut snapshots = self.snapshots.clone();
        let metrics = self.metrics.clone();
        metrics.discovery_streams_open.inc();
        info!(%id, "discovery stream opened");
        tokio::spawn(async move {
            let _slot = slot;
            let mut state = StreamState::default();
            let mut first = true;
            let mut nonce: u64 = 0;
            let result: Result<(), Status> = async {
                loop {
                    tokio::select! {
                        msg = inbound.message() => {
                            let Some(req) = msg? else { return Ok(()) };
                            if req.type_url != SERVICE_TYPE {
                                return Err(Status::invalid_argument(format!(
                                    "this stream serves {SERVICE_TYPE}, not {:?}", req.type_url)));
                            }
                            if !req.response_nonce.is_empty() {
                                match &req.error_detail {
                                    Some(err) => {
                                        metrics.discovery_nacks.inc();
                                        warn!(%id, nonce = %req.response_nonce, error = %err.message,
                                            "proxy rejected discovery resources (NACK)");
                                    }
                                    None => debug!(%id, nonce = %req.response_nonce, "ACK"),
                                }
                            }
                            state.subscribe(&req, first)?;
                            first = false;
                        }
                        _ = changed(&mut snapshots), if !first => {}
                        _ = caller.token_expired() => return Err(caller.expired_status()),
                    }
                    let Some(snap) = snapshots.borrow_and_update().clone() else {
                        continue;
                    };
                    let Some(resp) = state.diff(&snap, (nonce + 1).to_string()) else {
                        continue;
                    };
                    nonce += 1;
                    debug!(%id, nonce, changed = resp.resources.len(), removed = resp.removed_resources.len(),
                        "pushing discovery");
                    if tx.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    metrics.discovery_pushes.inc();
                }
            }
            .await;
            metrics.discovery_streams_open.dec();
            match result {
                Ok(()) => info!(%id, "discovery stream closed"),
                Err(status) => {
                    warn!(%id, error = %status.message(), "discovery stream ended with an error");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }
}
