//! The validating endpoint: a `VirtualService` or `DestinationRule` that
//! would not compile is refused at `kubectl apply`, with the field's path
//! ([`mizzen_api::routing::admission`]). Anything else is allowed: this
//! endpoint judges traffic rules only, and the webhook's failure policy is
//! `Ignore` (the CA's `Accepted` status reports rules stored without it).

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use mizzen_api::routing::admission::check;
use mizzen_api::routing::spec::GROUP;

use super::{Unanswerable, Verdict, respond};

/// Answers one AdmissionReview body of the validating webhook.
pub fn validate(body: &[u8]) -> Result<(Vec<u8>, Verdict), Unanswerable> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| Unanswerable(format!("not an AdmissionReview: {e}")))?;
    let req: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| Unanswerable(e.to_string()))?;
    let base = AdmissionResponse::from(&req);
    let judged = req.kind.group == GROUP && matches!(req.operation, Operation::Create | Operation::Update);
    let Some(object) = req.object.as_ref().filter(|_| judged) else {
        return Ok((respond(base)?, Verdict::Ignored));
    };
    let namespace = req
        .namespace
        .as_deref()
        .or(object.metadata.namespace.as_deref())
        .unwrap_or("default");
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    match check(&req.kind.kind, namespace, &spec) {
        None => Ok((respond(base)?, Verdict::Ignored)),
        Some(Ok(())) => Ok((respond(base)?, Verdict::Valid)),
        Some(Err(refused)) => {
            let reason = refused.to_string();
            Ok((respond(base.deny(&reason))?, Verdict::Denied(reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(kind: &str, spec: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": GROUP, "version": "v1", "kind": kind},
                "resource": {"group": GROUP, "version": "v1", "resource": "virtualservices"},
                "operation": "CREATE", "namespace": "demo", "name": "r",
                "userInfo": {"username": "alice"},
                "object": {"apiVersion": format!("{GROUP}/v1"), "kind": kind,
                           "metadata": {"name": "r", "namespace": "demo"}, "spec": spec},
            }
        }))
        .expect("json")
    }

    fn answer(out: &[u8]) -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(out).expect("review")["response"].clone()
    }

    #[test]
    fn weights_that_do_not_add_up_are_refused_naming_the_field() {
        let spec = serde_json::json!({"hosts": ["web"], "http": [{"route": [
            {"destination": {"host": "web"}, "weight": 60}, {"destination": {"host": "web"}, "weight": 60}]}]});
        let (out, verdict) = validate(&review("VirtualService", spec)).expect("answered");
        let r = answer(&out);
        assert_eq!(r["allowed"], false);
        assert_eq!(r["uid"], "u1");
        let message = r["status"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("spec.http[0].route: weights"), "{message}");
        assert_eq!(verdict.label(), "denied");
    }

    #[test]
    fn a_rule_that_compiles_and_other_kinds_are_allowed() {
        let ok = serde_json::json!({"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]});
        let (out, verdict) = validate(&review("DestinationRule", ok)).expect("answered");
        assert_eq!(answer(&out)["allowed"], true);
        assert_eq!(verdict, Verdict::Valid);
        let (out, verdict) = validate(&review("Sidecar", serde_json::json!({}))).expect("answered");
        assert_eq!(answer(&out)["allowed"], true);
        assert_eq!(verdict, Verdict::Ignored);
    }
}
