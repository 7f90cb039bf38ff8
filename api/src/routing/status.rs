//! The `Accepted` condition of a traffic rule: whether the mesh applies a
//! `VirtualService` or `DestinationRule` as written. A rule that does not
//! compile applies to nothing: its Services are routed as if it did not
//! exist (an older rule naming the same Service still applies). A
//! VirtualService naming a Service that Gateway API routes are bound to
//! is not used for that Service (the routes take precedence), and says
//! so: reason `Overridden`, naming the routes. The condition has the
//! policies' shape and is written the same way
//! ([`crate::authz::status::next`]).

use std::collections::BTreeMap;

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

/// The Services Gateway API routes are bound to (`<namespace>/<name>`),
/// each with those routes (`HTTPRoute demo/r`), in order.
pub type GatewayClaims = BTreeMap<String, Vec<String>>;

/// The verdict on a `VirtualService`, given the Services that Gateway API
/// routes take.
pub fn of_virtual_service(vs: &VirtualService, claims: &GatewayClaims) -> Verdict {
    let namespace = vs.metadata.namespace.as_deref().unwrap_or("default");
    let compiled = match compile(&vs.spec, namespace) {
        Ok(c) => c,
        Err(e) => return verdict(Err(e)),
    };
    let (taken, kept): (Vec<&String>, Vec<&String>) =
        compiled.services.iter().partition(|s| claims.contains_key(s.as_str()));
    if taken.is_empty() {
        return Verdict::Accepted;
    }
    let by: Vec<String> = taken
        .iter()
        .map(|s| format!("{s} ({})", claims[s.as_str()].join(", ")))
        .collect();
    let rest = if kept.is_empty() {
        "routes none of its hosts".to_owned()
    } else {
        format!(
            "still routes {}",
            kept.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )
    };
    Verdict::Rejected {
        reason: "Overridden".into(),
        message: format!(
            "Gateway API routes take precedence over VirtualServices, and route {}; this VirtualService {rest}",
            by.join(", ")
        ),
    }
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
        let Verdict::Rejected { reason, message } = of_virtual_service(&vs, &GatewayClaims::new()) else {
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

    #[test]
    fn a_virtual_service_whose_service_gateway_routes_take_says_which_won() {
        let vs: VirtualService = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.mizzen.dev/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {"hosts": ["web", "api"], "http": [{"route": [{"destination": {"host": "web"}}]}]},
        }))
        .expect("parses");
        assert_eq!(of_virtual_service(&vs, &GatewayClaims::new()), Verdict::Accepted);
        let mut claims = GatewayClaims::from([("demo/web".to_owned(), vec!["HTTPRoute demo/web".to_owned()])]);
        let Verdict::Rejected { reason, message } = of_virtual_service(&vs, &claims) else {
            panic!("accepted")
        };
        assert_eq!(reason, "Overridden");
        assert_eq!(
            message,
            "Gateway API routes take precedence over VirtualServices, and route demo/web (HTTPRoute demo/web); this VirtualService still routes demo/api"
        );
        claims.insert("demo/api".into(), vec!["GRPCRoute demo/a".into()]);
        let Verdict::Rejected { message, .. } = of_virtual_service(&vs, &claims) else {
            panic!("accepted")
        };
        assert!(
            message.ends_with("this VirtualService routes none of its hosts"),
            "{message}"
        );
    }
}
