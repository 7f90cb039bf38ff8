//! The `status.parents` entries Mizzen writes into an HTTPRoute, one per
//! Service it names, as the Gateway API specifies: `controllerName`
//! [`CONTROLLER_NAME`], conditions `Accepted` (whether the mesh routes by
//! it as written) and `ResolvedRefs` (whether its backends are Services
//! it may send to). Entries of other controllers are kept. Pure: the CA
//! writes the result only when it differs from what is stored.

use super::{CONTROLLER_NAME, GammaRoute, RouteParentStatus, RouteStatus, check};
use crate::policy::StatusCondition;

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> StatusCondition {
    StatusCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: None,
    }
}

/// What Mizzen says of `route` for each Service it names.
fn ours(route: &impl GammaRoute) -> Vec<RouteParentStatus> {
    let namespace = route.meta().namespace.as_deref().unwrap_or("default");
    let generation = route.meta().generation;
    let verdict = route.as_http().and_then(|http| check(&http, namespace));
    let (accepted, resolved) = match &verdict {
        Ok(()) => (
            condition(
                "Accepted",
                true,
                "Accepted",
                "routed by the mesh as written".into(),
                generation,
            ),
            condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backend is a Service".into(),
                generation,
            ),
        ),
        Err(e) => (
            condition("Accepted", false, e.reason(), e.to_string(), generation),
            match e.unresolved() {
                Some(reason) => condition("ResolvedRefs", false, reason, e.to_string(), generation),
                None => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backend is a Service".into(),
                    generation,
                ),
            },
        ),
    };
    route
        .parent_refs()
        .iter()
        .filter(|p| p.is_service())
        .map(|p| RouteParentStatus {
            parent_ref: p.clone(),
            controller_name: CONTROLLER_NAME.into(),
            conditions: vec![accepted.clone(), resolved.clone()],
        })
        .collect()
}

/// `cond` with the transition time of the same condition in `before` when
/// its status did not change, else `now`.
fn stamped(cond: &StatusCondition, before: Option<&RouteParentStatus>, now: &str) -> StatusCondition {
    let previous = before.and_then(|b| b.conditions.iter().find(|c| c.type_ == cond.type_));
    let last_transition_time = match previous {
        Some(p) if p.status == cond.status => p.last_transition_time.clone(),
        _ => Some(now.to_owned()),
    };
    StatusCondition {
        last_transition_time,
        ..cond.clone()
    }
}

/// The status `route` should carry, or `None` when it already does.
pub fn next(route: &impl GammaRoute, now: &str) -> Option<RouteStatus> {
    let current = route.route_status().cloned().unwrap_or_default();
    let mine = |p: &RouteParentStatus| p.controller_name == CONTROLLER_NAME;
    let wanted: Vec<RouteParentStatus> = ours(route)
        .into_iter()
        .map(|mut p| {
            let before = current.parents.iter().find(|c| mine(c) && c.parent_ref == p.parent_ref);
            p.conditions = p.conditions.iter().map(|c| stamped(c, before, now)).collect();
            p
        })
        .collect();
    let existing: Vec<&RouteParentStatus> = current.parents.iter().filter(|p| mine(p)).collect();
    if existing.len() == wanted.len() && wanted.iter().zip(&existing).all(|(w, e)| w == *e) {
        return None;
    }
    let mut parents: Vec<RouteParentStatus> = current.parents.iter().filter(|p| !mine(p)).cloned().collect();
    parents.extend(wanted);
    Some(RouteStatus { parents })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::gateway::HTTPRoute;

    fn route(spec: serde_json::Value, status: Option<serde_json::Value>) -> HTTPRoute {
        let mut v = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "demo", "generation": 2},
            "spec": spec,
        });
        if let Some(s) = status {
            v["status"] = s;
        }
        serde_json::from_value(v).expect("route")
    }

    fn spec(backend_ns: &str) -> serde_json::Value {
        serde_json::json!({"parentRefs": [
            {"group": "", "kind": "Service", "name": "reviews"},
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "namespace": backend_ns, "port": 80}]}]})
    }

    #[test]
    fn each_service_parent_gets_accepted_and_resolved_refs_and_other_controllers_keep_theirs() {
        let theirs = serde_json::json!({"parents": [{"parentRef": {"name": "edge", "kind": "Gateway", "group": "gateway.networking.k8s.io"},
            "controllerName": "example.com/gateway", "conditions": []}]});
        let r = route(spec("demo"), Some(theirs));
        let status = next(&r, "2026-11-29T00:00:00Z").expect("written");
        assert_eq!(status.parents.len(), 2);
        assert_eq!(status.parents[0].controller_name, "example.com/gateway");
        let mine = &status.parents[1];
        assert_eq!(mine.parent_ref.name, "reviews");
        let summary: Vec<(&str, &str, Option<i64>)> = mine
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.observed_generation))
            .collect();
        assert_eq!(
            summary,
            [("Accepted", "True", Some(2)), ("ResolvedRefs", "True", Some(2))]
        );
        // Written once: the same route with that status needs nothing.
        let settled = HTTPRoute {
            status: Some(status),
            ..r
        };
        assert_eq!(next(&settled, "2026-11-29T01:00:00Z"), None);
    }

    #[test]
    fn a_backend_in_another_namespace_is_not_resolved_and_the_route_not_accepted() {
        let status = next(&route(spec("elsewhere"), None), "t").expect("written");
        let c = &status.parents[0].conditions;
        assert_eq!(
            (c[0].status.as_str(), c[0].reason.as_str()),
            ("False", "UnsupportedValue")
        );
        assert_eq!(
            (c[1].status.as_str(), c[1].reason.as_str()),
            ("False", "RefNotPermitted")
        );
        assert!(c[0].message.contains("backendRefs[0]"), "{}", c[0].message);
    }
}
