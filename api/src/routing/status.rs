//! The `Accepted` condition of a traffic rule: whether the mesh applies a
//! `VirtualService` or `DestinationRule` as written. A rule that does not
//! compile applies to nothing: its Services are routed as if it did not
//! exist (an older rule naming the same Service still applies). The
//! condition has the policies' shape and is written the same way
//! ([`crate::authz::status::next`]).

use crate::authz::status::{Verdict, camel};

use super::spec::{DestinationRule, VirtualService};
use super::{RouteError, compile, compile_subsets};

fn verdict(compiled: Result<(), RouteError>) -> Verdict {
    match compiled {
        Ok(()) => Verdict::Accepted,
        Err(e) => Verdict::Rejected {
            reason: camel(e.reason()),
            message: format!("{e}; until it is fixed, the rule applies to nothing"),
        },
    }
}

/// The verdict on a `VirtualService`.
pub fn of_virtual_service(vs: &VirtualService) -> Verdict {
    let namespace = vs.metadata.namespace.as_deref().unwrap_or("default");
    verdict(compile(&vs.spec, namespace).map(drop))
}

/// The verdict on a `DestinationRule`.
pub fn of_destination_rule(dr: &DestinationRule) -> Verdict {
    let namespace = dr.metadata.namespace.as_deref().unwrap_or("default");
    verdict(compile_subsets(&dr.spec, namespace).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_that_does_not_compile_is_rejected_naming_the_field() {
        let vs: VirtualService = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.mizzen.dev/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {"hosts": ["web"], "http": [{"route": [
                {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "web", "subset": "v2"}, "weight": 20}]}]},
        }))
        .expect("parses");
        let Verdict::Rejected { reason, message } = of_virtual_service(&vs) else {
            panic!("accepted")
        };
        assert_eq!(reason, "Weights");
        assert!(message.starts_with("http[0].route: "), "{message}");
        let dr: DestinationRule = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.mizzen.dev/v1", "kind": "DestinationRule",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {"host": "web", "subsets": [{"name": "v1"}, {"name": "v1"}]},
        }))
        .expect("parses");
        assert!(matches!(of_destination_rule(&dr), Verdict::Rejected { reason, .. } if reason == "DuplicateSubset"));
    }
}
