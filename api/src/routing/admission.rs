//! What the admission webhook checks of a traffic rule beyond its schema:
//! that it compiles ([`compile`], [`compile_subsets`]), so that
//! `kubectl apply` refuses weights that do not add up, a bad regex or
//! duration, an undefined retry condition… with the field's path, rather
//! than storing a rule that would apply to nothing (the CA's status says
//! the same of rules stored while the webhook was unavailable).

use serde_json::Value;

use super::spec::{DestinationRuleSpec, VirtualServiceSpec};
use super::{compile, compile_subsets};

/// Why `kubectl apply` refuses a rule: the field's path from `spec` and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Checks the `spec` of a rule of `kind` in `namespace`; `None` for kinds
/// this does not judge.
pub fn check(kind: &str, namespace: &str, spec: &Value) -> Option<Result<(), Refused>> {
    let unparsed = |e: serde_json::Error| Refused(format!("spec: {e}"));
    let at = |e: super::RouteError| Refused(format!("spec.{e}"));
    Some(match kind {
        "VirtualService" => serde_json::from_value::<VirtualServiceSpec>(spec.clone())
            .map_err(unparsed)
            .and_then(|s| compile(&s, namespace).map(drop).map_err(at)),
        "DestinationRule" => serde_json::from_value::<DestinationRuleSpec>(spec.clone())
            .map_err(unparsed)
            .and_then(|s| compile_subsets(&s, namespace).map(drop).map_err(at)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_that_does_not_compile_is_refused_naming_the_field() {
        let bad = serde_json::json!({"hosts": ["web"], "http": [{"route": [
            {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
            {"destination": {"host": "web", "subset": "v2"}, "weight": 20}]}]});
        let err = check("VirtualService", "demo", &bad)
            .expect("judged")
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "spec.http[0].route: weights must be given for every destination and add up to 100, not 110"
        );
        let ok = serde_json::json!({"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]});
        assert_eq!(check("VirtualService", "demo", &ok), Some(Ok(())));
        let dr = serde_json::json!({"host": "web", "subsets": [{"name": "v1"}, {"name": "v1"}]});
        let err = check("DestinationRule", "demo", &dr)
            .expect("judged")
            .expect_err("refused");
        assert!(err.to_string().starts_with("spec.subsets[1].name: "), "{err}");
        assert_eq!(check("AuthorizationPolicy", "demo", &dr), None);
    }
}
