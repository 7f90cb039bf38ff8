//! Gateway API for meshes (GAMMA): `HTTPRoute`s and `GRPCRoute`s
//! ([`grpc`], read as the HTTPRoutes they are equivalent to) whose
//! `parentRefs` name a Service (`gateway.networking.k8s.io/v1`, the
//! published standard channel CRDs), translated into the VirtualService
//! spec the mesh already routes by ([`translate`]), so that both APIs
//! share one route table and one data path.
//!
//! Only what Mizzen implements is read; the API server has already
//! checked the rest against the published schema, so a field present
//! here but not implemented is refused by name in the route's status
//! ([`check`]) and the route applies to nothing, never partly.
//!
//! Semantics, from the Gateway API specification:
//! - A route applies to the Services its `parentRefs` name in its own
//!   namespace (a producer route); routes from other namespaces (consumer
//!   routes) are not supported yet. A `parentRef.port` narrows it to that
//!   Service port.
//! - Across every rule and match of every route bound to a Service, the
//!   most specific match wins: an `Exact` path, then the longest
//!   `PathPrefix`, then a method, then the most header matches, then the
//!   most query parameter matches; ties go to the oldest route (then
//!   `<namespace>/<name>`), then to rule and match order. A
//!   `RegularExpression` path ranks after prefixes.
//! - `PathPrefix` matches whole segments: `/foo` matches `/foo` and
//!   `/foo/bar`, not `/foobar`.
//! - `backendRefs` weights are relative (default 1); a rule whose weights
//!   are all 0, or that has none, answers 500.
//! - `timeouts.request` bounds the request; `timeouts.backendRequest`
//!   bounds the one attempt (the standard channel has no retries), so the
//!   shorter of the two applies.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{
    Abort, DestinationSpec, HeaderOperations, HeadersSpec, HttpFaultInjection, HttpMatchRequest, HttpRedirect,
    HttpRewrite, HttpRoute as VsRoute, HttpRouteDestination, Percent, PortSelector, StringMatchSpec,
    VirtualServiceSpec,
};

/// The API group of the Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The `controllerName` of Mizzen's route status entries.
pub const CONTROLLER_NAME: &str = "mizzen.dev/mesh";

/// An `HTTPRoute`'s spec, as far as Mizzen reads it. Fields Mizzen does
/// not implement land in `other` maps and are refused by [`check`].
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "RouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RouteRule>,
}

/// A Gateway API route kind the mesh applies, read as an HTTPRoute spec.
pub trait GammaRoute: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope> {
    /// The kind, for logs and metric labels.
    const KIND: &'static str;
    fn parent_refs(&self) -> &[ParentRef];
    fn route_status(&self) -> Option<&RouteStatus>;
    /// The HTTPRoute spec the route is (errors name the route's fields).
    fn as_http(&self) -> Result<std::borrow::Cow<'_, HTTPRouteSpec>, GatewayError>;
}

impl GammaRoute for HTTPRoute {
    const KIND: &'static str = "HTTPRoute";
    fn parent_refs(&self) -> &[ParentRef] {
        &self.spec.parent_refs
    }
    fn route_status(&self) -> Option<&RouteStatus> {
        self.status.as_ref()
    }
    fn as_http(&self) -> Result<std::borrow::Cow<'_, HTTPRouteSpec>, GatewayError> {
        Ok(std::borrow::Cow::Borrowed(&self.spec))
    }
}

impl GammaRoute for grpc::GRPCRoute {
    const KIND: &'static str = "GRPCRoute";
    fn parent_refs(&self) -> &[ParentRef] {
        &self.spec.parent_refs
    }
    fn route_status(&self) -> Option<&RouteStatus> {
        self.status.as_ref()
    }
    fn as_http(&self) -> Result<std::borrow::Cow<'_, HTTPRouteSpec>, GatewayError> {
        self.spec.as_http().map(std::borrow::Cow::Owned)
    }
}

/// What a route attaches to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether this names a Service (core group, kind `Service`).
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or("").is_empty() && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For a GRPCRoute's match read as this one: the characters of its
    /// service and of its method, which rank it instead of the path.
    #[serde(skip)]
    pub grpc_precedence: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fraction {
    pub numerator: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<i32>,
}

/// `status` of a route: one entry per parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<crate::policy::StatusCondition>,
}

/// Why a route cannot be applied as written; the status condition's
/// reason is [`GatewayError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{field}: not implemented by Mizzen; the route applies to nothing until it is removed")]
    Unsupported { field: String },
    #[error("{field}: {value:?} is not valid here")]
    Invalid { field: String, value: String },
    #[error("{field}: only Services in the route's own namespace can be backends")]
    Backend { field: String },
}

impl GatewayError {
    /// The `Accepted` condition's reason (the specification's name): a
    /// route the mesh cannot apply as written applies to nothing.
    pub fn reason(&self) -> &'static str {
        "UnsupportedValue"
    }

    /// The `ResolvedRefs` condition's reason, when a backend is the
    /// problem.
    pub fn unresolved(&self) -> Option<&'static str> {
        matches!(self, GatewayError::Backend { .. }).then_some("RefNotPermitted")
    }
}

fn unsupported(field: String) -> GatewayError {
    GatewayError::Unsupported { field }
}

/// The Services (`<namespace>/<name>`) `route` (of `namespace`) is bound
/// to, each with the port its parentRef narrows it to: its parentRefs of
/// kind Service in its own namespace.
pub fn parents(route: &HTTPRouteSpec, namespace: &str) -> Vec<(String, Option<u16>)> {
    route
        .parent_refs
        .iter()
        .filter(|p| p.is_service() && p.namespace.as_deref().is_none_or(|n| n == namespace))
        .map(|p| {
            (
                format!("{namespace}/{}", p.name),
                p.port.and_then(|n| u16::try_from(n).ok()),
            )
        })
        .collect()
}

/// Whether Mizzen can apply `route` as written: every field it uses is
/// implemented and every backend is a Service of its namespace.
pub fn check(route: &HTTPRouteSpec, namespace: &str) -> Result<(), GatewayError> {
    if !route.hostnames.is_empty() {
        return Err(unsupported("spec.hostnames".into()));
    }
    for (i, p) in route.parent_refs.iter().enumerate() {
        if p.section_name.is_some() {
            return Err(unsupported(format!("spec.parentRefs[{i}].sectionName")));
        }
        if p.is_service() && p.namespace.as_deref().is_some_and(|n| n != namespace) {
            return Err(unsupported(format!(
                "spec.parentRefs[{i}].namespace (a consumer route for another namespace's Service)"
            )));
        }
    }
    for (i, rule) in route.rules.iter().enumerate() {
        let _ = translate_rule(&format!("spec.rules[{i}]"), rule, namespace)?;
    }
    Ok(())
}

/// How a match ranks, most specific first: path kind (exact, prefix,
/// regex), path length (for a GRPCRoute: service characters, then method
/// characters), no method, header matches, query parameter matches.
type Rank = (
    u8,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
);

/// One translated (rule, match): its VirtualService route and its rank.
struct Ranked {
    rank: Rank,
    route: VsRoute,
}

/// `rule` of a route in `namespace` as VirtualService routes, one per
/// match (two for a `PathPrefix` that must keep prefix semantics).
fn translate_rule(field: &str, rule: &RouteRule, namespace: &str) -> Result<Vec<Ranked>, GatewayError> {
    if let Some(k) = rule.other.keys().next() {
        return Err(unsupported(format!("{field}.{k}")));
    }
    let base = base_route(field, rule, namespace)?;
    let default_match = [RouteMatch::default()];
    let matches = if rule.matches.is_empty() {
        &default_match[..]
    } else {
        &rule.matches[..]
    };
    let path_rewrite = rule
        .filters
        .iter()
        .find_map(|f| f.url_rewrite.as_ref().and_then(|u| u.path.as_ref()))
        .map(|p| p.type_.as_str());
    let mut out = Vec::new();
    for (j, m) in matches.iter().enumerate() {
        let f = format!("{field}.matches[{j}]");
        for (uri, kind, len) in path_matches(&f, m, path_rewrite)? {
            let mut route = base.clone();
            let mut vs_match = HttpMatchRequest {
                uri,
                ..Default::default()
            };
            vs_match.method = m.method.as_ref().map(|v| StringMatchSpec {
                exact: Some(v.clone()),
                ..Default::default()
            });
            for (k, h) in m.headers.iter().enumerate() {
                let sm = name_match(&format!("{f}.headers[{k}]"), h)?;
                vs_match.headers.entry(h.name.to_ascii_lowercase()).or_insert(sm);
            }
            for (k, q) in m.query_params.iter().enumerate() {
                let sm = name_match(&format!("{f}.queryParams[{k}]"), q)?;
                vs_match.query_params.entry(q.name.clone()).or_insert(sm);
            }
            // Under a prefix match (which ends with `/`), the replacement
            // keeps the `/` before the rest of the path.
            if vs_match.uri.as_ref().is_some_and(|u| u.prefix.is_some())
                && let Some(uri) = route.rewrite.as_mut().and_then(|rw| rw.uri.as_mut())
                && !uri.ends_with('/')
            {
                uri.push('/');
            }
            use std::cmp::Reverse;
            let rank = match m.grpc_precedence {
                Some((service, method)) => (
                    1,
                    Reverse(service),
                    Reverse(method),
                    false,
                    Reverse(m.headers.len()),
                    Reverse(0),
                ),
                None => (
                    kind,
                    Reverse(len),
                    Reverse(0),
                    m.method.is_none(),
                    Reverse(m.headers.len()),
                    Reverse(m.query_params.len()),
                ),
            };
            route.matches = vec![vs_match];
            out.push(Ranked { rank, route });
        }
    }
    Ok(out)
}

/// A match's path as VirtualService uri matches, each with its rank kind
/// (0 exact, 1 prefix, 2 regex) and length. A `PathPrefix` is an exact
/// match of the prefix and a prefix match of it with `/` (so that a
/// `ReplacePrefixMatch` rewrite replaces just the prefix), or, under a
/// `ReplaceFullPath` rewrite (`path_rewrite`), one regex.
fn path_matches(
    field: &str,
    m: &RouteMatch,
    path_rewrite: Option<&str>,
) -> Result<Vec<(Option<StringMatchSpec>, u8, usize)>, GatewayError> {
    let p = m.path.clone().unwrap_or_default();
    let kind = p.type_.as_deref().unwrap_or("PathPrefix");
    let value = p.value.unwrap_or_else(|| "/".into());
    let exact = |v: String| StringMatchSpec {
        exact: Some(v),
        ..Default::default()
    };
    Ok(match kind {
        "Exact" => vec![(Some(exact(value.clone())), 0, value.len())],
        "RegularExpression" => vec![(
            Some(StringMatchSpec {
                regex: Some(value.clone()),
                ..Default::default()
            }),
            2,
            value.len(),
        )],
        "PathPrefix" => {
            let trimmed = value.trim_end_matches('/');
            let prefix = |p: String| StringMatchSpec {
                prefix: Some(p),
                ..Default::default()
            };
            if trimmed.is_empty() {
                match path_rewrite {
                    Some("ReplacePrefixMatch") => vec![(Some(prefix("/".into())), 1, 0)],
                    _ => vec![(None, 1, 0)],
                }
            } else if path_rewrite == Some("ReplaceFullPath") {
                let regex = format!("{}(/.*)?", regex::escape(trimmed));
                let m = StringMatchSpec {
                    regex: Some(regex),
                    ..Default::default()
                };
                vec![(Some(m), 1, trimmed.len())]
            } else {
                vec![
                    (Some(exact(trimmed.to_owned())), 1, trimmed.len()),
                    (Some(prefix(format!("{trimmed}/"))), 1, trimmed.len()),
                ]
            }
        }
        other => {
            return Err(GatewayError::Invalid {
                field: format!("{field}.path.type"),
                value: other.into(),
            });
        }
    })
}

fn name_match(field: &str, m: &NameMatch) -> Result<StringMatchSpec, GatewayError> {
    match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(StringMatchSpec {
            exact: Some(m.value.clone()),
            ..Default::default()
        }),
        "RegularExpression" => Ok(StringMatchSpec {
            regex: Some(m.value.clone()),
            ..Default::default()
        }),
        other => Err(GatewayError::Invalid {
            field: format!("{field}.type"),
            value: other.into(),
        }),
    }
}

/// A backendRef as a destination (a Service of `namespace`, with a port).
fn destination(field: &str, b: &BackendRef, namespace: &str) -> Result<DestinationSpec, GatewayError> {
    let service = b.group.as_deref().unwrap_or("").is_empty() && b.kind.as_deref().unwrap_or("Service") == "Service";
    if !service || b.namespace.as_deref().is_some_and(|n| n != namespace) {
        return Err(GatewayError::Backend { field: field.into() });
    }
    if !b.filters.is_empty() {
        return Err(unsupported(format!("{field}.filters")));
    }
    Ok(DestinationSpec {
        host: format!("{}.{namespace}", b.name),
        subset: None,
        port: b
            .port
            .and_then(|p| u32::try_from(p).ok())
            .map(|number| PortSelector { number }),
    })
}

/// Relative weights as percentages adding up to 100 (largest remainder);
/// `None` when they are all 0.
fn percentages(weights: &[u64]) -> Option<Vec<i64>> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut shares: Vec<(usize, u64, u64)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (i, w * 100 / total, w * 100 % total))
        .collect();
    let mut left = 100 - shares.iter().map(|s| s.1).sum::<u64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by_key(|i| (std::cmp::Reverse(shares[*i].2), *i));
    for i in order {
        if left == 0 {
            break;
        }
        if weights[i] > 0 {
            shares[i].1 += 1;
            left -= 1;
        }
    }
    Some(shares.into_iter().map(|s| s.1 as i64).collect())
}

/// What every match of `rule` shares: destinations, filters, timeout.
fn base_route(field: &str, rule: &RouteRule, namespace: &str) -> Result<VsRoute, GatewayError> {
    let mut route = VsRoute {
        name: rule.name.clone(),
        ..Default::default()
    };
    let mut headers = HeadersSpec::default();
    for (i, f) in rule.filters.iter().enumerate() {
        let at = format!("{field}.filters[{i}]");
        match f.type_.as_str() {
            "RequestHeaderModifier" => headers.request = f.request_header_modifier.as_ref().map(header_ops),
            "ResponseHeaderModifier" => headers.response = f.response_header_modifier.as_ref().map(header_ops),
            "RequestRedirect" => route.redirect = Some(redirect(&at, f.request_redirect.as_ref())?),
            "URLRewrite" => route.rewrite = Some(rewrite(&at, f.url_rewrite.as_ref())?),
            "RequestMirror" => {
                let m = f
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| unsupported(format!("{at}.requestMirror")))?;
                route.mirror = Some(destination(
                    &format!("{at}.requestMirror.backendRef"),
                    &m.backend_ref,
                    namespace,
                )?);
                route.mirror_percentage = match (&m.percent, &m.fraction) {
                    (Some(p), _) => Some(Percent { value: f64::from(*p) }),
                    (None, Some(fr)) => Some(Percent {
                        value: f64::from(fr.numerator) * 100.0 / f64::from(fr.denominator.unwrap_or(100).max(1)),
                    }),
                    (None, None) => None,
                };
            }
            other => return Err(unsupported(format!("{at}.type {other}"))),
        }
    }
    if headers.request.is_some() || headers.response.is_some() {
        route.headers = Some(headers);
    }
    if route.redirect.is_none() {
        let weights: Vec<u64> = rule
            .backend_refs
            .iter()
            .map(|b| u64::try_from(b.weight.unwrap_or(1)).unwrap_or(0))
            .collect();
        match percentages(&weights) {
            Some(shares) => {
                for (i, (b, share)) in rule.backend_refs.iter().zip(shares).enumerate() {
                    if share == 0 {
                        continue;
                    }
                    route.route.push(HttpRouteDestination {
                        destination: destination(&format!("{field}.backendRefs[{i}]"), b, namespace)?,
                        weight: Some(share),
                    });
                }
            }
            None => {
                // No backend to send to: 500, as the specification says.
                route.fault = Some(HttpFaultInjection {
                    delay: None,
                    abort: Some(Abort {
                        http_status: 500,
                        percentage: None,
                    }),
                });
                route.route.push(HttpRouteDestination {
                    destination: DestinationSpec {
                        host: "unreachable".into(),
                        ..Default::default()
                    },
                    weight: None,
                });
            }
        }
    }
    if let Some(t) = &rule.timeouts {
        route.timeout = shorter(field, t)?;
    }
    Ok(route)
}

/// The shorter of a rule's two timeouts (Gateway API durations: `1h`,
/// `10s`, `500ms`; `0s` means none).
fn shorter(field: &str, t: &Timeouts) -> Result<Option<String>, GatewayError> {
    let parse = |name: &str, v: &Option<String>| -> Result<Option<std::time::Duration>, GatewayError> {
        match v {
            None => Ok(None),
            Some(s) => humantime::parse_duration(s)
                .map(|d| Some(d).filter(|d| !d.is_zero()))
                .map_err(|_| GatewayError::Invalid {
                    field: format!("{field}.timeouts.{name}"),
                    value: s.clone(),
                }),
        }
    };
    let request = parse("request", &t.request)?;
    let backend = parse("backendRequest", &t.backend_request)?;
    let shortest = match (request, backend) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(shortest.map(|d| format!("{}ms", d.as_millis())))
}

fn header_ops(m: &HeaderModifier) -> HeaderOperations {
    let pairs = |v: &[HeaderValue]| v.iter().map(|h| (h.name.clone(), h.value.clone())).collect();
    HeaderOperations {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    }
}

fn redirect(field: &str, r: Option<&RequestRedirect>) -> Result<HttpRedirect, GatewayError> {
    let r = r.ok_or_else(|| unsupported(format!("{field}.requestRedirect")))?;
    let uri = match &r.path {
        None => None,
        Some(p) if p.type_ == "ReplaceFullPath" => p.replace_full_path.clone(),
        Some(_) => return Err(unsupported(format!("{field}.requestRedirect.path.replacePrefixMatch"))),
    };
    Ok(HttpRedirect {
        uri,
        authority: r.hostname.clone(),
        port: r.port.and_then(|p| u32::try_from(p).ok()),
        scheme: r.scheme.clone(),
        redirect_code: Some(r.status_code.unwrap_or(302)),
    })
}

fn rewrite(field: &str, r: Option<&UrlRewrite>) -> Result<HttpRewrite, GatewayError> {
    let r = r.ok_or_else(|| unsupported(format!("{field}.urlRewrite")))?;
    let uri = match &r.path {
        None => None,
        Some(p) if p.type_ == "ReplaceFullPath" => p.replace_full_path.clone(),
        Some(p) => p.replace_prefix_match.clone(),
    };
    Ok(HttpRewrite {
        uri,
        authority: r.hostname.clone(),
    })
}

/// A route bound to a Service, for [`translate`].
#[derive(Debug, Clone, Copy)]
pub struct Bound<'a> {
    /// `<namespace>/<name>` of the route.
    pub key: &'a str,
    /// Its creation time (RFC 3339).
    pub created: &'a str,
    pub spec: &'a HTTPRouteSpec,
    /// The port its parentRef narrows it to.
    pub port: Option<u16>,
}

/// The VirtualService spec that routes `service` (`<namespace>/<name>`)
/// as `routes` (bound to it, each passing [`check`]) say, most specific
/// match first. Routes that fail [`check`] are left out.
pub fn translate(service: &str, routes: &[Bound<'_>]) -> VirtualServiceSpec {
    let namespace = service.split_once('/').map_or("", |(ns, _)| ns);
    let mut ordered: Vec<&Bound<'_>> = routes.iter().collect();
    ordered.sort_by_key(|b| (b.created, b.key));
    let mut ranked = Vec::new();
    for (order, b) in ordered.into_iter().enumerate() {
        if check(b.spec, namespace).is_err() {
            continue;
        }
        for (i, rule) in b.spec.rules.iter().enumerate() {
            let Ok(rules) = translate_rule(&format!("spec.rules[{i}]"), rule, namespace) else {
                continue;
            };
            for (j, mut r) in rules.into_iter().enumerate() {
                if let Some(port) = b.port {
                    for m in &mut r.route.matches {
                        m.port = Some(u32::from(port));
                    }
                }
                ranked.push((r.rank, order, i, j, r.route));
            }
        }
    }
    ranked.sort_by_key(|r| (r.0, r.1, r.2, r.3));
    let name = service.split_once('/').map_or(service, |(_, n)| n);
    VirtualServiceSpec {
        hosts: vec![format!("{name}.{namespace}")],
        http: ranked.into_iter().map(|r| r.4).collect(),
        tcp: Vec::new(),
    }
}

pub mod grpc;
pub mod status;
#[cfg(test)]
mod tests;
