//! Gateway API `GRPCRoute`s bound to a Service, read as the HTTPRoute
//! they are equivalent to ([`GRPCRouteSpec::as_http`]): a gRPC call is an
//! HTTP/2 `POST` of `/<service>/<method>`, so a method match is a path
//! match and everything else (headers, filters, backends, precedence,
//! status) is the HTTPRoute's.
//!
//! From the specification: a method match of type `Exact` (the default)
//! names a service, a method or both; `RegularExpression` matches either
//! part by a regex, an absent part matching any; a rule without matches
//! takes every call. Matches rank as the specification says (most
//! characters of service, then of method, then most header matches), not
//! by their translated paths.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{BackendRef, Filter, GatewayError, HTTPRouteSpec, NameMatch, ParentRef, PathMatch, RouteMatch, RouteRule};

/// A `GRPCRoute`'s spec, as far as Mizzen reads it. Fields Mizzen does
/// not implement land in `other` maps and are refused by name.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    namespaced,
    status = "super::RouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The fully qualified service (`package.Service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// The path match of `m`, at `field`.
fn path(field: &str, m: &GrpcMethodMatch) -> Result<PathMatch, GatewayError> {
    let (type_, value) = match (m.type_.as_deref().unwrap_or("Exact"), &m.service, &m.method) {
        (_, None, None) => {
            return Err(GatewayError::Invalid {
                field: format!("{field}.method"),
                value: "neither service nor method".into(),
            });
        }
        ("Exact", Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
        ("Exact", Some(s), None) => ("PathPrefix", format!("/{s}")),
        ("Exact", None, Some(m)) => ("RegularExpression", format!("/[^/]+/{}", regex::escape(m))),
        ("RegularExpression", s, m) => (
            "RegularExpression",
            format!(
                "/(?:{})/(?:{})",
                s.as_deref().unwrap_or("[^/]+"),
                m.as_deref().unwrap_or("[^/]+")
            ),
        ),
        (other, ..) => {
            return Err(GatewayError::Invalid {
                field: format!("{field}.method.type"),
                value: other.into(),
            });
        }
    };
    Ok(PathMatch {
        type_: Some(type_.into()),
        value: Some(value),
    })
}

impl GRPCRouteSpec {
    /// The HTTPRoute spec this route is equivalent to (same parents,
    /// rules, filters and backends; method matches as paths). Errors name
    /// the GRPCRoute's own fields.
    pub fn as_http(&self) -> Result<HTTPRouteSpec, GatewayError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let mut matches = Vec::with_capacity(rule.matches.len());
            for (j, m) in rule.matches.iter().enumerate() {
                let field = format!("spec.rules[{i}].matches[{j}]");
                let chars = |part: &Option<String>| part.as_ref().map_or(0, String::len);
                matches.push(RouteMatch {
                    path: m.method.as_ref().map(|method| path(&field, method)).transpose()?,
                    headers: m.headers.clone(),
                    grpc_precedence: Some(
                        m.method
                            .as_ref()
                            .map_or((0, 0), |x| (chars(&x.service), chars(&x.method))),
                    ),
                    ..Default::default()
                });
            }
            if matches.is_empty() {
                // Every call, ranked last.
                matches.push(RouteMatch {
                    grpc_precedence: Some((0, 0)),
                    ..Default::default()
                });
            }
            rules.push(RouteRule {
                name: rule.name.clone(),
                matches,
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                timeouts: None,
                other: rule.other.clone(),
            });
        }
        Ok(HTTPRouteSpec {
            parent_refs: self.parent_refs.clone(),
            hostnames: self.hostnames.clone(),
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::gateway::{Bound, check, translate};
    use crate::routing::{RequestView, compile, decide};

    fn route(v: serde_json::Value) -> GRPCRouteSpec {
        serde_json::from_value(v).expect("route")
    }

    /// A gRPC call of `path` with `headers`.
    struct Call {
        path: &'static str,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl RequestView for Call {
        fn method(&self) -> &str {
            "POST"
        }
        fn path(&self) -> &str {
            self.path
        }
        fn query(&self) -> Option<&str> {
            None
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn port(&self) -> u16 {
            80
        }
        fn source_label(&self, _: &str) -> Option<&str> {
            None
        }
    }

    /// The backend Service a call to `path` with `headers` reaches.
    fn backend(spec: &GRPCRouteSpec, path: &'static str, headers: Vec<(&'static str, &'static str)>) -> Option<String> {
        let http = spec.as_http().expect("translates");
        check(&http, "demo").expect("applies");
        let bound = [Bound {
            key: "demo/r",
            created: "2026-01-01T00:00:00Z",
            spec: &http,
            port: None,
        }];
        let vs = translate("demo/echo", &bound);
        let table = compile(&vs, "demo").expect("compiles").table;
        decide(&table, &Call { path, headers }, 0)
            .ok()
            .and_then(|d| d.destination.map(|d| d.service.clone()))
    }

    #[test]
    fn method_matches_route_by_service_and_method_most_specific_first() {
        let spec = route(serde_json::json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [
            {"matches": [{"method": {"service": "demo.Echo"}}], "backendRefs": [{"name": "echo-service", "port": 80}]},
            {"matches": [{"method": {"method": "Health"}}], "backendRefs": [{"name": "echo-health", "port": 80}]},
            {"matches": [{"method": {"service": "demo.Echo", "method": "Unary"},
                          "headers": [{"name": "end-user", "value": "jason"}]}],
             "backendRefs": [{"name": "echo-jason", "port": 80}]},
            {"matches": [{"method": {"type": "RegularExpression", "service": "demo\\.v[0-9]+\\.Echo"}}],
             "backendRefs": [{"name": "echo-versioned", "port": 80}]},
            {"backendRefs": [{"name": "echo", "port": 80}]},
        ]}));
        let at = |path, headers| backend(&spec, path, headers);
        assert_eq!(
            at("/demo.Echo/Unary", vec![("end-user", "jason")]).as_deref(),
            Some("demo/echo-jason")
        );
        assert_eq!(at("/demo.Echo/Unary", vec![]).as_deref(), Some("demo/echo-service"));
        assert_eq!(at("/demo.Echo/Chat", vec![]).as_deref(), Some("demo/echo-service"));
        assert_eq!(
            at("/demo.EchoX/Chat", vec![]).as_deref(),
            Some("demo/echo"),
            "whole service names"
        );
        assert_eq!(at("/other.Svc/Health", vec![]).as_deref(), Some("demo/echo-health"));
        assert_eq!(at("/demo.v2.Echo/Chat", vec![]).as_deref(), Some("demo/echo-versioned"));
        assert_eq!(at("/other.Svc/Call", vec![]).as_deref(), Some("demo/echo"));
    }

    #[test]
    fn what_mizzen_lacks_is_refused_by_the_grpc_routes_field() {
        let spec = route(serde_json::json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"sessionPersistence": {"sessionName": "s"}, "backendRefs": [{"name": "echo"}]}]}));
        let err = check(&spec.as_http().expect("translates"), "demo").expect_err("refused");
        assert_eq!(
            err.to_string(),
            "spec.rules[0].sessionPersistence: not implemented by Mizzen; the route applies to nothing until it is removed"
        );
        let spec = route(serde_json::json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"matches": [{"method": {"type": "Prefix", "service": "a"}}], "backendRefs": [{"name": "echo"}]}]}));
        let err = spec.as_http().expect_err("refused");
        assert_eq!(
            err.to_string(),
            "spec.rules[0].matches[0].method.type: \"Prefix\" is not valid here"
        );
    }
}
