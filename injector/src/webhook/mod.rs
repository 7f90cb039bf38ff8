//! The admission endpoint: AdmissionReview in, AdmissionReview out.
//!
//! [`review`] turns a request body into a response body. Whatever the input
//! (malformed JSON, another kind, a pod that does not parse), the answer is
//! a well-formed AdmissionReview that names the problem; only a body without
//! a request UID to answer gets an HTTP 400.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
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
    Skipped(&'static str),
    Denied(String),
    Ignored,
    Invalid(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped(_) => "skipped",
            Verdict::Denied(_) => "denied",
            Verdict::Ignored => "ignored",
            Verdict::Invalid(_) => "invalid",
        }
    }
}

/// A request body that cannot be answered at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswerable(pub String);

/// What [`review`] needs to know about the request's namespace.
pub trait NamespaceLabels {
    fn labels(&self, namespace: &str) -> impl std::future::Future<Output = Option<BTreeMap<String, String>>> + Send;
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
    let parsed: Result<AdmissionReview<DynamicObject>, _> = serde_json::from_slice(body);
    let req: AdmissionRequest<DynamicObject> = match parsed.map_err(|e| e.to_string()).and_then(|r| {
        r.try_into()
            .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
    }) {
        Ok(req) => req,
        Err(reason) => {
            // Answer the request's UID if there is one to answer.
            let uid = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.pointer("/request/uid").and_then(|u| u.as_str()).map(str::to_owned))
                .ok_or_else(|| Unanswerable(format!("not an AdmissionReview with a request uid: {reason}")))?;
            let mut resp = AdmissionResponse::invalid(format!("malformed AdmissionReview: {reason}"));
            resp.uid = uid;
            let verdict = Verdict::Invalid(reason);
            return Ok((respond(resp)?, verdict));
        }
    };
    let base = AdmissionResponse::from(&req);
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() || req.operation != Operation::Create {
        return Ok((respond(base)?, Verdict::Ignored));
    }
    let pod: Pod = match req
        .object
        .as_ref()
        .map(|o| serde_json::to_value(o).and_then(serde_json::from_value))
    {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            let reason = format!("the pod does not parse: {e}");
            return Ok((respond(base.deny(&reason))?, Verdict::Invalid(reason)));
        }
        None => {
            let reason = "the request carries no pod".to_string();
            return Ok((respond(base.deny(&reason))?, Verdict::Invalid(reason)));
        }
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let labels = namespaces.labels(&namespace).await.unwrap_or_default();
    match inject::inject(&pod, &namespace, &labels, cfg, native) {
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

#[cfg(test)]
mod tests;
