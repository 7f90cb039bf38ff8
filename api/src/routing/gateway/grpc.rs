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
