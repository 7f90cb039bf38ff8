//! Traffic routing: Istio's `VirtualService` HTTP routes as pure functions,
//! so the agent can compile a Service's routes once per change and the
//! client's proxy decide each request without I/O.
//!
//! - [`spec`]: the fields of Istio's `networking.istio.io` `VirtualService`
//!   HTTP routes that Mizzen implements, under the same names (serde
//!   camelCase), so existing YAML reads unchanged.
//! - [`compile`]: a spec compiled into a [`RouteTable`] (regexes built,
//!   weights checked, durations parsed); what cannot be honoured is
//!   refused by name ([`RouteError`]), never silently ignored.
//! - [`decide`]: the first route whose match a request satisfies, and the
//!   weighted destination a roll of the dice picks.
//! - [`policy`]: what a route's fault and retry settings decide for one
//!   request (delay, abort, whether a failed attempt may be retried).
//! - [`subsets`]: a `DestinationRule`'s subsets (pods by labels), and the
//!   subsets routes name that no rule defines.
//! - [`traffic_policy`]: its `trafficPolicy`: circuit breaker limits and
//!   outlier detection, and the decisions they make.
//!
//! Semantics follow Istio: routes are tried in order and the first match
//! wins; within a match every condition must hold, and a route with several
//! matches applies when any holds; a route without matches matches every
//! request; a request no route matches is not routed (Istio answers 404).

#[cfg(feature = "k8s")]
pub mod admission;
pub mod compile;
pub mod decide;
#[cfg(feature = "k8s")]
pub mod gateway;
pub mod policy;
pub mod spec;
#[cfg(feature = "k8s")]
pub mod status;
pub mod subsets;
#[cfg(test)]
mod tests;
pub mod traffic_policy;

pub use compile::{Compiled, RouteError, compile};
pub use decide::{Decision, NoRoute, RequestView, decide};
pub use subsets::{Subsets, compile_subsets, undefined_subsets};

use std::time::Duration;

/// How a string is matched (Istio's `StringMatch`).
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matching the whole value (as Envoy's `safe_regex`).
    Regex(regex::Regex),
}

impl StringMatch {
    /// Whether `value` satisfies this match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// The conditions of one match; all must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    /// Matched against the path, without the query string.
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    /// Lower-case header names; a missing header fails its match, and a
    /// `None` match asks only that the header be present.
    pub headers: Vec<(String, Option<StringMatch>)>,
    /// Lower-case header names that must be absent (or, with a match, not
    /// match it).
    pub without_headers: Vec<(String, Option<StringMatch>)>,
    pub query_params: Vec<(String, StringMatch)>,
    /// The Service port the request was sent to.
    pub port: Option<u16>,
    /// Labels the client's pod must carry.
    pub source_labels: Vec<(String, String)>,
}

/// Where a share of a route's requests goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `<namespace>/<name>` of the Service.
    pub service: String,
    /// A DestinationRule subset (pods by labels), when named.
    pub subset: Option<String>,
    /// The Service port, when the route names one.
    pub port: Option<u16>,
    /// The share, out of the route's total weight.
    pub weight: u32,
}

/// Retries of a route (Istio's `HTTPRetry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy's retry conditions (`5xx`, `connect-failure`, …).
    pub retry_on: Vec<String>,
}

/// Faults a route injects (Istio's `HTTPFaultInjection`), each for a
/// share of requests in millionths (Istio's percentage with six digits).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(u16, u32)>,
}

/// Header changes, applied in Istio's order: remove, set, add. Names are
/// lower-case and valid; values are valid header values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// Where a share of requests is copied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub destination: Destination,
    /// In millionths.
    pub share: u32,
}

/// Istio's `HTTPRewrite`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

/// Istio's `HTTPRedirect`, checked: what is absent comes from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub code: u16,
}

/// One HTTP route.
/// What a TCP route's match asks of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L4Match {
    pub port: Option<u16>,
    pub source_labels: Vec<(String, String)>,
}

/// A TCP route, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRoute {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<Destination>,
    pub total_weight: u32,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: Option<String>,
    /// Any one of these; none means every request.
    pub matches: Vec<Match>,
    /// Empty only for a redirect.
    pub destinations: Vec<Destination>,
    /// The sum of `destinations`' weights (more than 0 but for a
    /// redirect).
    pub total_weight: u32,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    /// Answered instead of forwarding (then `destinations` is empty).
    pub redirect: Option<Redirect>,
}

/// A Service's HTTP routes, in order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    /// Routes for connections to TCP ports.
    pub tcp: Vec<TcpRoute>,
}
