//! The aggregated discovery stream
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`),
//! carrying two resource types on one stream, each with its own
//! subscription ([`StreamState`]):
//! - [`SERVICE_TYPE`]: every Service with its ready endpoints (or the
//!   `<namespace>/<name>` names subscribed to), from [`crate::discovery`];
//! - [`POLICY_TYPE`]: the caller's own workload policy, from
//!   [`crate::policy`], named `<namespace>/<pod>` after the pod its token is
//!   bound to. Names the client subscribes to are ignored for this type: a
//!   proxy learns its own pod's policy and no other.
//!
//! Protocol, as Envoy's incremental xDS defines it: the first request of a
//! type names it and what to subscribe to (nothing or `*` = everything) and
//! may list the versions the client already holds (after a reconnect).
//! Every response carries only resources of one type that are new or
//! changed for this client, the names of those removed, and a fresh nonce;
//! the client ACKs by echoing the nonce and NACKs by adding
//! `error_detail`. A push larger than `--max-discovery-message-bytes` is
//! split over several responses; all but the last say
//! [`MORE`](crate::xds::MORE) in `system_version_info`. Callers present
//! their projected token, as on the SDS stream; the state-of-the-world
//! variant is not served.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use mizzen_api::proto::discovery::{POLICY_TYPE, SERVICE_TYPE};
use mizzen_api::tokenreview::Authenticator;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::limits::StreamLimits;
use crate::metrics::Metrics;
use crate::sds::{Caller, CallerPolicy, authenticate_caller};
use crate::xds::{Snapshot, StreamState};

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

/// The aggregated discovery service.
pub struct Discovery {
    /// Services, from [`crate::discovery::follow`].
    pub services: Snapshots,
    /// Workload policies, from [`crate::policy::follow`].
    pub policies: Snapshots,
    pub authenticator: Arc<Authenticator>,
    pub policy: CallerPolicy,
    pub metrics: Arc<Metrics>,
    /// Shared with SDS: streams per identity and in total.
    pub limits: Arc<StreamLimits>,
    /// Largest response; larger pushes are split ([`crate::xds::Push`]).
    pub max_message_bytes: usize,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// One resource type on a stream: what the client follows, where the
/// resources come from, and its counters.
struct Feed {
    state: StreamState,
    pushes: Counter,
    nacks: Counter,
}

/// The resource types of one caller's stream.
struct Feeds {
    services: Feed,
    policy: Feed,
}

impl Feeds {
    fn new(caller: &Caller, metrics: &Metrics) -> Self {
        Self {
            services: Feed {
                state: StreamState::new(SERVICE_TYPE),
                pushes: metrics.discovery_pushes.clone(),
                nacks: metrics.discovery_nacks.clone(),
            },
            policy: Feed {
                state: StreamState::pinned(POLICY_TYPE, caller.workload.clone()),
                pushes: metrics.policy_pushes.clone(),
                nacks: metrics.policy_nacks.clone(),
            },
        }
    }

    fn of(&mut self, type_url: &str, caller: &Caller) -> Result<&mut Feed, Status> {
        match type_url {
            SERVICE_TYPE => Ok(&mut self.services),
            POLICY_TYPE if caller.workload.is_none() => Err(Status::permission_denied(format!(
                "{POLICY_TYPE} is served to a pod's proxy only: the token of {} is not bound to a pod",
                caller.id
            ))),
            POLICY_TYPE => Ok(&mut self.policy),
            other => Err(Status::invalid_argument(format!(
                "this stream serves {SERVICE_TYPE} and {POLICY_TYPE}, not {other:?}"
            ))),
        }
    }
}

async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What one stream's task needs.
struct Serving {
    caller: Caller,
    services: Snapshots,
    policies: Snapshots,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Serving {
    /// Serves the stream until the client leaves (`Ok`) or it must end.
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) -> Result<(), Status> {
        let id = self.caller.id.clone();
        let mut feeds = Feeds::new(&self.caller, &self.metrics);
        let mut nonce: u64 = 0;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(req) = msg? else { return Ok(()) };
                    let feed = feeds.of(&req.type_url, &self.caller)?;
                    if !req.response_nonce.is_empty() {
                        match &req.error_detail {
                            Some(err) => {
                                feed.nacks.inc();
                                warn!(%id, type_url = %req.type_url, nonce = %req.response_nonce,
                                    error = %err.message, "proxy rejected resources (NACK)");
                            }
                            None => debug!(%id, type_url = %req.type_url, nonce = %req.response_nonce, "ACK"),
                        }
                    }
                    feed.state.subscribe(&req)?;
                }
                _ = changed(&mut self.services) => {}
                _ = changed(&mut self.policies) => {}
                _ = self.caller.token_expired() => return Err(self.caller.expired_status()),
            }
            for (feed, snapshots) in [
                (&mut feeds.services, &mut self.services),
                (&mut feeds.policy, &mut self.policies),
            ] {
                let Some(snap) = snapshots.borrow_and_update().clone() else {
                    continue;
                };
                let Some(mut push) = feed.state.push(&snap) else {
                    continue;
                };
                debug!(%id, type_url = feed.state.type_url(), items = push.len(), "pushing");
                // Built one at a time: a stream holds at most the response
                // being sent and the one queued, not the whole push.
                while let Some(mut resp) = push.next_response(self.max_message_bytes) {
                    nonce += 1;
                    resp.nonce = nonce.to_string();
                    if self.tx.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    feed.pushes.inc();
                }
            }
        }
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
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DeltaDiscoveryResponse, Status>>(1);
        let metrics = self.metrics.clone();
        metrics.discovery_streams_open.inc();
        info!(%id, workload = ?caller.workload, "discovery stream opened");
        let serving = Serving {
            caller,
            services: self.services.clone(),
            policies: self.policies.clone(),
            metrics: metrics.clone(),
            max_message_bytes: self.max_message_bytes,
            tx: tx.clone(),
        };
        tokio::spawn(async move {
            let _slot = slot;
            let result = serving.run(inbound).await;
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
