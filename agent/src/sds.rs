//! Envoy's Secret Discovery Service (state of the world) on the agent's
//! Unix socket.
//!
//! Resources: `default`, the caller's own certificate and key
//! (`tls_certificate`), and `ROOTCA`, the trust bundle
//! (`validation_context`). The caller proves its identity with its projected
//! ServiceAccount token in the `authorization` metadata of the stream; the
//! agent reviews it and only ever serves the certificate of that identity.
//!
//! Protocol, as Envoy speaks it: each request names the resources it wants;
//! each response carries every subscribed resource that exists, a
//! `version_info` and a fresh `nonce`; the client ACKs by echoing the nonce
//! (and NACKs by adding `error_detail`). A request whose nonce is not the
//! latest one sent is stale and ignored. A new certificate or trust bundle
//! is pushed on every open stream that subscribed to it. Other resource
//! types can be served on the same socket by adding a service next to this
//! one.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use mizzen_api::SpiffeId;
use mizzen_api::TrustDomain;
use mizzen_api::tokenreview::{AuthError, Authenticator, Reviewed, bearer};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::limits::StreamLimits;
use crate::metrics::Metrics;
use crate::secrets::{SecretManager, Signer, SvidWatch, TokenLease};
use crate::xds::{Acks, Answer};

/// The type URL of SDS resources.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload's own certificate.
pub const DEFAULT: &str = "default";
/// The trust bundle.
pub const ROOTCA: &str = "ROOTCA";

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// Who may ask, and for what.
#[derive(Debug, Clone)]
pub struct CallerPolicy {
    pub trust_domain: TrustDomain,
    /// When set, a caller's token must name a pod on this node.
    pub node_name: Option<String>,
}

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the token's pod is on node {token:?}, but this agent serves node {agent:?}")]
    WrongNode { token: Option<String>, agent: String },
    #[error("cannot form a SPIFFE ID: {0}")]
    BadIdentity(String),
}

impl CallerError {
    fn label(&self) -> &'static str {
        match self {
            CallerError::Auth(e) => e.label(),
            CallerError::WrongNode { .. } => "wrong_node",
            CallerError::BadIdentity(_) => "bad_identity",
        }
    }

    fn status(&self) -> Status {
        match self {
            CallerError::Auth(AuthError::Unavailable(_) | AuthError::Overloaded) => {
                Status::unavailable(self.to_string())
            }
            CallerError::Auth(_) => Status::unauthenticated(self.to_string()),
            _ => Status::permission_denied(self.to_string()),
        }
    }
}

/// The identity a reviewed caller may receive: its own, on this node only.
pub fn caller_identity(reviewed: &Reviewed, policy: &CallerPolicy) -> Result<SpiffeId, CallerError> {
    if let Some(agent) = &policy.node_name
        && reviewed.node_name.as_deref() != Some(agent.as_str())
    {
        return Err(CallerError::WrongNode {
            token: reviewed.node_name.clone(),
            agent: agent.clone(),
        });
    }
    SpiffeId::workload(&policy.trust_domain, &reviewed.namespace, &reviewed.service_account)
        .map_err(|e| CallerError::BadIdentity(e.to_string()))
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

fn pack(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// The SDS service.
pub struct Sds<S> {
    pub manager: Arc<SecretManager<S>>,
    pub authenticator: Arc<Authenticator>,
    pub roots: watch::Receiver<Option<Arc<String>>>,
    pub policy: CallerPolicy,
    pub metrics: Arc<Metrics>,
    /// Shared with discovery: streams per identity and in total.
    pub limits: Arc<StreamLimits>,
}

impl<S> std::fmt::Debug for Sds<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sds")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What one stream (or one fetch) has subscribed to.
struct Subscription {
    id: SpiffeId,
    token: String,
    expires_at: Option<SystemTime>,
    names: BTreeSet<String>,
    cert: Option<SvidWatch>,
    /// Offers the token for renewals while the stream lives.
    lease: Option<TokenLease>,
    roots: watch::Receiver<Option<Arc<String>>>,
}

impl Subscription {
    /// Sets the subscribed names; refuses names the agent does not serve.
    fn set_names<S: Signer>(&mut self, names: &[String], mgr: &Arc<SecretManager<S>>) -> Result<(), Status> {
        for n in names {
            if n != DEFAULT && n != ROOTCA {
                return Err(Status::not_found(format!(
                    "unknown secret {n:?}: this agent serves {DEFAULT:?} (the caller's certificate) and {ROOTCA:?}"
                )));
            }
        }
        self.names = names.iter().cloned().collect();
        if self.names.contains(DEFAULT) && self.cert.is_none() {
            let (cert, lease) = mgr.subscribe(&self.id, &self.token, self.expires_at);
            self.cert = Some(cert);
            self.lease = Some(lease);
        }
        Ok(())
    }

    /// The resources available now, with a version naming their contents.
    fn snapshot(&mut self) -> (Vec<Any>, String) {
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        if self.names.contains(DEFAULT)
            && let Some(svid) = self.cert.as_mut().and_then(|c| c.borrow_and_update().clone())
        {
            resources.push(pack(&Secret {
                name: DEFAULT.into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(svid.chain().as_bytes()),
                    private_key: inline(svid.key_pem.as_bytes()),
                    ..Default::default()
                })),
            }));
            versions.push(format!("{DEFAULT}={}", svid.serial));
        }
        if self.names.contains(ROOTCA)
            && let Some(root) = self.roots.borrow_and_update().clone()
        {
            resources.push(pack(&Secret {
                name: ROOTCA.into(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(root.as_bytes()),
                    ..Default::default()
                })),
            }));
            let digest = ring::digest::digest(&ring::digest::SHA256, root.as_bytes());
            let short: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
            versions.push(format!("{ROOTCA}={short}"));
        }
        (resources, versions.join(","))
    }

    fn complete(&self, resources: &[Any]) -> bool {
        resources.len() == self.names.len()
    }
}

async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    // A closed channel never changes again: wait forever rather than spin.
    let open = match rx {
        Some(r) => r.changed().await.is_ok(),
        None => false,
    };
    if !open {
        std::future::pending::<()>().await;
    }
}

/// A proxy on the socket, as the API server vouched for its token.
pub struct Caller {
    pub id: SpiffeId,
    /// The bearer token it presented (renewals are signed with it).
    pub token: String,
    /// When the token expires: the stream ends then, so that nothing is
    /// served on an expired token; the proxy reconnects with the fresh one
    /// the kubelet wrote.
    pub expires_at: Option<SystemTime>,
    /// `<namespace>/<pod>` of the pod the token is bound to (projected
    /// tokens are), as TokenReview said.
    pub workload: Option<String>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("id", &self.id)
            .field("token", &"...")
            .field("expires_at", &self.expires_at)
            .field("workload", &self.workload)
            .finish()
    }
}

impl Caller {
    /// Resolves when the caller's token expires (never, for a token
    /// without an `exp` claim).
    pub async fn token_expired(&self) {
        match self.expires_at {
            Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
            None => std::future::pending().await,
        }
    }

    /// The status a stream ends with when the token expired.
    pub fn expired_status(&self) -> Status {
        Status::unauthenticated(format!(
            "the token of {} expired; reconnect with the fresh token the kubelet wrote",
            self.id
        ))
    }
}

/// Reviews the token in a stream's `authorization` metadata and returns the
/// caller; a refusal is counted and logged.
pub async fn authenticate_caller(
    authenticator: &Authenticator,
    policy: &CallerPolicy,
    metrics: &Metrics,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Caller, Status> {
    let header = metadata
        .get("authorization")
        .map(|v| v.to_str().map_err(|_| AuthError::Malformed("authorization")))
        .transpose()
        .and_then(|h| bearer("authorization", h));
    let result = match header {
        Ok(token) => review_caller(authenticator, policy, token).await,
        Err(e) => Err(CallerError::Auth(e)),
    };
    result.map_err(|e: CallerError| {
        metrics.reject(e.label());
        warn!(reason = e.label(), error = %e, "refused a caller");
        e.status()
    })
}

async fn review_caller(
    authenticator: &Authenticator,
    policy: &CallerPolicy,
    token: String,
) -> Result<Caller, CallerError> {
    let reviewed = authenticator.review(&token).await?;
    let id = caller_identity(&reviewed, policy)?;
    Ok(Caller {
        id,
        token,
        expires_at: reviewed.expires_at,
        workload: reviewed.pod_name.map(|pod| format!("{}/{pod}", reviewed.namespace)),
    })
}

impl<S: Signer> Sds<S> {
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        authenticate_caller(&self.authenticator, &self.policy, &self.metrics, req.metadata()).await
    }
}

#[tonic::async_trait]
impl<S: Signer> SecretDiscoveryService for Sds<S> {
    type StreamSecretsStream = ResponseStream;
    type DeltaSecretsStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = self.authenticate(&request).await?;
        let id = caller.id.clone();
        let slot = self
            .limits
            .admit(&id)
            .inspect_err(|_| self.metrics.reject("too_many_streams"))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, Status>>(4);
        let mut sub = Subscription {
            id: id.clone(),
            token: caller.token.clone(),
            expires_at: caller.expires_at,
            names: BTreeSet::new(),
            cert: None,
            lease: None,
            roots: self.roots.clone(),
        };
        let (manager, metrics) = (self.manager.clone(), self.metrics.clone());
        let (authenticator, policy) = (self.authenticator.clone(), self.policy.clone());
        metrics.streams_open.inc();
        info!(%id, "SDS stream opened");
        tokio::spawn(async move {
            let _slot = slot;
            let mut acks = Acks::default();
            let result: Result<(), Status> = async {
                loop {
                    let mut cert = sub.cert.clone();
                    let mut roots = Some(sub.roots.clone());
                    let mut refused = sub.lease.as_ref().map(TokenLease::refused);
                    tokio::select! {
                        msg = inbound.message() => {
                            let Some(req) = msg? else { return Ok(()) };
                            if !req.type_url.is_empty() && req.type_url != SECRET_TYPE {
                                return Err(Status::invalid_argument(format!(
                                    "this stream serves {SECRET_TYPE}, not {:?}", req.type_url)));
                            }
                            let error = req.error_detail.as_ref().map(|e| e.message.as_str());
                            match acks.answer(&req.response_nonce, &req.version_info, error) {
                                Answer::Stale => {
                                    debug!(%id, nonce = %req.response_nonce, "ignoring a stale request");
                                    continue;
                                }
                                Answer::Nack(error) => {
                                    metrics.nacks.inc();
                                    warn!(%id, version = ?acks.version(), %error, "proxy rejected secrets (NACK)");
                                    continue;
                                }
                                Answer::Ack => debug!(%id, version = %req.version_info, "ACK"),
                                Answer::Fresh => {}
                            }
                            sub.set_names(&req.resource_names, &manager)?;
                        }
                        _ = changed(&mut cert) => {
                            // A new key goes only to a caller whose token
                            // still holds: not to a deleted pod's stream.
                            if let Err(e) = review_caller(&authenticator, &policy, caller.token.clone()).await {
                                metrics.reject(e.label());
                                return Err(e.status());
                            }
                        }
                        _ = changed(&mut roots) => {}
                        _ = changed(&mut refused) => {
                            if refused.as_ref().is_some_and(|r| *r.borrow()) {
                                metrics.reject("token_refused_by_ca");
                                return Err(Status::unauthenticated(format!(
                                    "the CA refused the token of {id}: its pod is gone or the token expired")));
                            }
                        }
                        _ = caller.token_expired() => return Err(caller.expired_status()),
                    }
                    let started = Instant::now();
                    let (resources, version) = sub.snapshot();
                    if resources.is_empty() {
                        continue;
                    }
                    let Some(nonce) = acks.send(&version) else {
                        continue;
                    };
                    let complete = sub.complete(&resources);
                    let resp = DiscoveryResponse {
                        version_info: version.clone(),
                        resources,
                        type_url: SECRET_TYPE.into(),
                        nonce,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    metrics.pushes.inc();
                    metrics.push_seconds.observe(started.elapsed().as_secs_f64());
                    debug!(%id, %version, complete, "pushed secrets");
                }
            }
            .await;
            metrics.streams_open.dec();
            match result {
                Ok(()) => info!(%id, "SDS stream closed"),
                Err(status) => {
                    warn!(%id, error = %status.message(), "SDS stream ended with an error");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_secrets(&self, request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let Caller {
            id, token, expires_at, ..
        } = self.authenticate(&request).await?;
        let req = request.into_inner();
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE {
            return Err(Status::invalid_argument(format!("this service serves {SECRET_TYPE}")));
        }
        let mut sub = Subscription {
            id,
            token,
            expires_at,
            names: BTreeSet::new(),
            cert: None,
            lease: None,
            roots: self.roots.clone(),
        };
        sub.set_names(&req.resource_names, &self.manager)?;
        // Wait, boundedly, until everything asked for exists.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (resources, version) = sub.snapshot();
            if sub.complete(&resources) {
                return Ok(Response::new(DiscoveryResponse {
                    version_info: version,
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: "fetch".into(),
                    ..Default::default()
                }));
            }
            let mut cert = sub.cert.clone();
            let mut roots = Some(sub.roots.clone());
            tokio::select! {
                _ = changed(&mut cert) => {}
                _ = changed(&mut roots) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Status::unavailable("the certificate is not available yet; the CA may be unreachable"));
                }
            }
        }
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "incremental SDS is not supported; use StreamSecrets",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewed(node: Option<&str>) -> Reviewed {
        Reviewed {
            namespace: "demo".into(),
            service_account: "web".into(),
            pod_name: Some("web-1".into()),
            pod_uid: None,
            node_name: node.map(Into::into),
            expires_at: None,
        }
    }

    #[test]
    fn callers_get_their_own_identity_on_this_node_only() {
        let policy = CallerPolicy {
            trust_domain: TrustDomain::default(),
            node_name: Some("node-a".into()),
        };
        assert_eq!(
            caller_identity(&reviewed(Some("node-a")), &policy)
                .expect("allowed")
                .as_str(),
            "spiffe://cluster.local/ns/demo/sa/web"
        );
        assert!(matches!(
            caller_identity(&reviewed(Some("node-b")), &policy),
            Err(CallerError::WrongNode { .. })
        ));
        assert!(matches!(
            caller_identity(&reviewed(None), &policy),
            Err(CallerError::WrongNode { .. })
        ));
        let anywhere = CallerPolicy {
            node_name: None,
            ..policy
        };
        assert!(caller_identity(&reviewed(None), &anywhere).is_ok());
    }
}
