//! The admission endpoint: AdmissionReview in, AdmissionReview out.
//!
//! [`review`] turns a request body into a response body. Whatever the input
//! (malformed JSON, another kind, a pod that does not parse), the answer is
//! a well-formed AdmissionReview that names the problem; only a body without
//! a request UID to answer gets an HTTP 400.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::config::InjectConfig;
use crate::inject::{self, Outcome};

/// Largest AdmissionReview accepted (a pod is a few KiB; Kubernetes objects
/// are at most ~1.5 MiB in etcd).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// The result of one review, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    /// A traffic rule that compiles (the validating endpoint).
    Valid,
    Skipped(&'static str),
    Denied(String),
    Ignored,
    Invalid(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Valid => "valid",
            Verdict::Skipped(_) => "skipped",
            Verdict::Denied(_) => "denied",
            Verdict::Ignored => "ignored",
            Verdict::Invalid(_) => "invalid",
        }
    }
}

/// Just enough of a review to answer it: everything else is skipped.
#[derive(serde::Deserialize)]
struct Envelope {
    request: Option<EnvelopeRequest>,
}

#[derive(serde::Deserialize)]
struct EnvelopeRequest {
    uid: String,
    kind: Option<EnvelopeKind>,
    operation: Option<String>,
}

#[derive(serde::Deserialize)]
struct EnvelopeKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

#[derive(serde::Deserialize)]
struct UidOnly {
    request: Option<UidRequest>,
}

#[derive(serde::Deserialize)]
struct UidRequest {
    uid: String,
}

/// The uid of a review that did not parse, and whether it may be a pod
/// CREATE (the only request judged; unsure counts as yes).
fn envelope(body: &[u8]) -> Option<(String, bool)> {
    if let Ok(Envelope { request: Some(r) }) = serde_json::from_slice::<Envelope>(body) {
        let pod = r.kind.as_ref().is_none_or(|k| k.kind == "Pod" && k.group.is_empty());
        let create = r.operation.as_deref().is_none_or(|o| o == "CREATE");
        return Some((r.uid, pod && create));
    }
    let uid = serde_json::from_slice::<UidOnly>(body).ok()?.request?.uid;
    Some((uid, true))
}

/// A request body that cannot be answered at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswerable(pub String);

/// The namespace's labels could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot read the labels of namespace {namespace:?}: {reason}")]
pub struct LookupError {
    pub namespace: String,
    pub reason: String,
}

/// What [`review`] reads of the request's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceMeta {
    /// Whether its pods are meshed.
    pub labels: BTreeMap<String, String>,
    /// Defaults for its pods' customisation annotations.
    pub annotations: BTreeMap<String, String>,
}

/// What [`review`] needs to know about the request's namespace (nothing
/// for a namespace that does not exist), or why it is unknown.
pub trait NamespaceLabels {
    fn meta(&self, namespace: &str) -> impl std::future::Future<Output = Result<NamespaceMeta, LookupError>> + Send;
}

fn respond(resp: AdmissionResponse) -> Result<Vec<u8>, Unanswerable> {
    serde_json::to_vec(&resp.into_review()).map_err(|e| Unanswerable(format!("BUG: cannot encode response: {e}")))
}

/// Answers one AdmissionReview body.
pub async fn review(
    body: &[u8],
    namespaces: &impl NamespaceLabels,
    cfg: &InjectConfig,
    native: bool,
) -> Result<(Vec<u8>, Verdict), Unanswerable> {
    // Parsed straight into a Pod: fields a Pod does not have are skipped
    // without being kept, so a crafted body cannot inflate in memory the
    // way a generic JSON tree of it would.
    let parsed: Result<AdmissionReview<Pod>, _> = serde_json::from_slice(body);
    let req: AdmissionRequest<Pod> = match parsed.map_err(|e| e.to_string()).and_then(|r| {
        r.try_into()
            .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
    }) {
        Ok(req) => req,
        Err(reason) => {
            // Answer the request's UID if there is one to answer.
            let (uid, pod_create) = envelope(body)
                .ok_or_else(|| Unanswerable(format!("not an AdmissionReview with a request uid: {reason}")))?;
            let message = if pod_create {
                format!("malformed AdmissionReview, or the pod does not parse: {reason}")
            } else {
                format!("malformed AdmissionReview: {reason}")
            };
            let mut resp = AdmissionResponse::invalid(message);
            resp.uid = uid;
            if !pod_create {
                // Not ours to judge (another kind, or not a CREATE).
                resp.allowed = true;
                resp.result = Default::default();
                return Ok((respond(resp)?, Verdict::Ignored));
            }
            let verdict = Verdict::Invalid(reason);
            return Ok((respond(resp)?, verdict));
        }
    };
    let base = AdmissionResponse::from(&req);
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() || req.operation != Operation::Create {
        return Ok((respond(base)?, Verdict::Ignored));
    }
    let Some(pod) = req.object.clone() else {
        let reason = "the request carries no pod".to_string();
        return Ok((respond(base.deny(&reason))?, Verdict::Invalid(reason)));
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    // Unknown labels are not "no labels": the webhook is only called for
    // pods that should be meshed, so refuse rather than admit one unmeshed.
    let ns = match namespaces.meta(&namespace).await {
        Ok(ns) => ns,
        Err(e) => {
            let reason =
                format!("mizzen sidecar injection: {e}; refusing the pod rather than starting it outside the mesh");
            return Ok((respond(base.deny(&reason))?, Verdict::Denied(reason)));
        }
    };
    match inject::inject(&pod, &namespace, &ns.labels, &ns.annotations, cfg, native) {
        Ok(Outcome::Inject(patch)) => match base.clone().with_patch(patch) {
            Ok(resp) => Ok((respond(resp)?, Verdict::Injected)),
            Err(e) => {
                let reason = format!("BUG: cannot encode the patch: {e}");
                Ok((respond(base.deny(&reason))?, Verdict::Denied(reason)))
            }
        },
        Ok(Outcome::Skip(skip)) => Ok((respond(base)?, Verdict::Skipped(skip.label()))),
        Err(e) => {
            let reason = format!("mizzen sidecar injection: {e}");
            Ok((respond(base.deny(&reason))?, Verdict::Denied(reason)))
        }
    }
}

mod validate;
pub use validate::validate;

#[cfg(test)]
mod tests;
