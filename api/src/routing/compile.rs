//! A `VirtualService` spec compiled into a [`RouteTable`]: regexes built,
//! hosts resolved to Services, weights, durations and percentages checked.
//! What cannot be honoured is refused with the field's path.

use std::time::Duration;

use crate::mesh::is_namespace_name;

use super::spec::{
    DestinationSpec, HeaderOperations, HttpMatchRequest, HttpRoute, HttpRouteDestination, L4MatchAttributes,
    StringMatchSpec, TcpRouteSpec, VirtualServiceSpec,
};
use super::{
    Destination, Fault, HeaderOps, L4Match, Match, Mirror, Redirect, Retries, Rewrite, Route, RouteTable, StringMatch,
    TcpRoute,
};

/// Regexes are compiled to at most this many bytes each, so that a route
/// cannot make a proxy build an automaton without bound.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Envoy's retry conditions that Istio's `retryOn` accepts.
const RETRY_ON: [&str; 13] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
];

/// Why a spec cannot be honoured as written; `field` is its path
/// (`http[0].match[1].uri`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("hosts: a VirtualService names at least one Service")]
    NoHosts,
    #[error("{field}: {host:?}: wildcards are not supported; name a Service")]
    Wildcard { field: String, host: String },
    #[error(
        "{field}: {host:?} is not a Service of this cluster (write <name>, <name>.<namespace> or <name>.<namespace>.svc.<domain>)"
    )]
    NotAService { field: String, host: String },
    #[error("{field}: a route needs at least one destination")]
    NoDestination { field: String },
    #[error("{field}: weights must be given for every destination and add up to 100, not {sum}")]
    Weights { field: String, sum: i64 },
    #[error("{field}: set exactly one of exact, prefix or regex")]
    StringMatch { field: String },
    #[error("{field}: {error}")]
    Regex { field: String, error: String },
    #[error("{field}: {value:?} is not a duration (like 10s, 500ms or 1.5s)")]
    Duration { field: String, value: String },
    #[error("{field}: {value} is not a percentage between 0 and 100")]
    Percent { field: String, value: f64 },
    #[error("{field}: {value} is not a port number")]
    Port { field: String, value: u32 },
    #[error("{field}: {value} is not an HTTP status (200 to 599)")]
    Status { field: String, value: i64 },
    #[error("{field}: {value} is not a number of attempts")]
    Attempts { field: String, value: i64 },
    #[error("{field}: retry condition {value:?} is not one Envoy knows ({})", RETRY_ON.join(", "))]
    RetryOn { field: String, value: String },
    #[error("{field}: {name:?} is not a subset name (lower-case letters, digits and `-`)")]
    SubsetName { field: String, name: String },
    #[error("{field}: subset {name:?} is defined twice")]
    DuplicateSubset { field: String, name: String },
    #[error("{field}: port {port} has a policy already")]
    DuplicatePort { field: String, port: u16 },
    #[error("{field}: cannot be used with {with}")]
    Conflict { field: String, with: &'static str },
    #[error("{field}: {name:?} is not a header this route may change")]
    Header { field: String, name: String },
    #[error("{field}: {value:?} is not valid here")]
    Value { field: String, value: String },
    #[error("{field}: {value} is not a count")]
    Count { field: String, value: i64 },
}

impl RouteError {
    /// The metric label / status reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoHosts => "no_hosts",
            RouteError::Wildcard { .. } => "wildcard_host",
            RouteError::NotAService { .. } => "not_a_service",
            RouteError::NoDestination { .. } => "no_destination",
            RouteError::Weights { .. } => "weights",
            RouteError::StringMatch { .. } => "string_match",
            RouteError::Regex { .. } => "regex",
            RouteError::Duration { .. } => "duration",
            RouteError::Percent { .. } => "percent",
            RouteError::Port { .. } => "port",
            RouteError::Status { .. } => "status",
            RouteError::Attempts { .. } => "attempts",
            RouteError::RetryOn { .. } => "retry_on",
            RouteError::SubsetName { .. } => "subset_name",
            RouteError::DuplicateSubset { .. } => "duplicate_subset",
            RouteError::DuplicatePort { .. } => "duplicate_port",
            RouteError::Count { .. } => "count",
            RouteError::Conflict { .. } => "conflict",
            RouteError::Header { .. } => "header",
            RouteError::Value { .. } => "value",
        }
    }
}

/// A VirtualService compiled: the Services it routes (`<namespace>/<name>`)
/// and their routes.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub services: Vec<String>,
    pub table: RouteTable,
}

/// Compiles `spec`, a VirtualService of `namespace`.
pub fn compile(spec: &VirtualServiceSpec, namespace: &str) -> Result<Compiled, RouteError> {
    if spec.hosts.is_empty() {
        return Err(RouteError::NoHosts);
    }
    let services = spec
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| service_of(&format!("hosts[{i}]"), h, namespace))
        .collect::<Result<Vec<_>, _>>()?;
    let routes = spec
        .http
        .iter()
        .enumerate()
        .map(|(i, r)| route(&format!("http[{i}]"), r, namespace))
        .collect::<Result<Vec<_>, _>>()?;
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .map(|(i, r)| tcp_route(&format!("tcp[{i}]"), r, namespace))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Compiled {
        services,
        table: RouteTable { routes, tcp },
    })
}

fn tcp_route(field: &str, r: &TcpRouteSpec, namespace: &str) -> Result<TcpRoute, RouteError> {
    let (destinations, total_weight) = destinations(field, &r.route, namespace)?;
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| l4_match(&format!("{field}.match[{i}]"), m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TcpRoute {
        matches,
        destinations,
        total_weight,
    })
}

fn l4_match(field: &str, m: &L4MatchAttributes) -> Result<L4Match, RouteError> {
    Ok(L4Match {
        port: m.port.map(|p| port(&format!("{field}.port"), p)).transpose()?,
        source_labels: m.source_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}

/// `<namespace>/<name>` of the Service `host` names, from `namespace`.
pub fn service_of(field: &str, host: &str, namespace: &str) -> Result<String, RouteError> {
    if host.contains('*') {
        return Err(RouteError::Wildcard {
            field: field.into(),
            host: host.into(),
        });
    }
    let labels: Vec<&str> = host.split('.').collect();
    let (name, ns) = match labels.as_slice() {
        [name] => (*name, namespace),
        [name, ns] => (*name, *ns),
        [name, ns, "svc", ..] => (*name, *ns),
        _ => ("", ""),
    };
    // Service and namespace names are both RFC 1123 labels.
    if !is_namespace_name(name) || !is_namespace_name(ns) {
        return Err(RouteError::NotAService {
            field: field.into(),
            host: host.into(),
        });
    }
    Ok(format!("{ns}/{name}"))
}

fn route(field: &str, r: &HttpRoute, namespace: &str) -> Result<Route, RouteError> {
    let redirect = redirect(field, r)?;
    let (destinations, total_weight) = match &redirect {
        Some(_) if !r.route.is_empty() => {
            return Err(RouteError::Conflict {
                field: format!("{field}.redirect"),
                with: "route",
            });
        }
        Some(_) => (Vec::new(), 0),
        None => destinations(field, &r.route, namespace)?,
    };
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| match_of(&format!("{field}.match[{i}]"), m))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match &r.timeout {
        None => None,
        Some(t) => Some(duration(&format!("{field}.timeout"), t)?).filter(|d| !d.is_zero()),
    };
    let headers = r.headers.as_ref();
    Ok(Route {
        name: r.name.clone(),
        matches,
        destinations,
        total_weight,
        timeout,
        retries: retries(field, r)?,
        fault: fault(field, r)?,
        mirror: mirror(field, r, namespace)?,
        request_headers: header_ops(
            &format!("{field}.headers.request"),
            headers.and_then(|h| h.request.as_ref()),
        )?,
        response_headers: header_ops(
            &format!("{field}.headers.response"),
            headers.and_then(|h| h.response.as_ref()),
        )?,
        rewrite: rewrite(field, r)?,
        redirect,
    })
}

/// A destination spec at `field`.
fn destination(field: &str, d: &DestinationSpec, weight: u32, namespace: &str) -> Result<Destination, RouteError> {
    let port = match &d.port {
        None => None,
        Some(p) => Some(port(&format!("{field}.port.number"), p.number)?),
    };
    if let Some(s) = d.subset.as_deref().filter(|s| !is_namespace_name(s)) {
        return Err(RouteError::SubsetName {
            field: format!("{field}.subset"),
            name: s.into(),
        });
    }
    Ok(Destination {
        service: service_of(&format!("{field}.host"), &d.host, namespace)?,
        subset: d.subset.clone(),
        port,
        weight,
    })
}

/// A route's weighted destinations (`route`, at `field.route`) and
/// their total weight.
fn destinations(
    field: &str,
    route: &[HttpRouteDestination],
    namespace: &str,
) -> Result<(Vec<Destination>, u32), RouteError> {
    if route.is_empty() {
        return Err(RouteError::NoDestination {
            field: format!("{field}.route"),
        });
    }
    let lone = route.len() == 1;
    let mut destinations = Vec::with_capacity(route.len());
    let mut sum: i64 = 0;
    for (i, d) in route.iter().enumerate() {
        let f = format!("{field}.route[{i}]");
        let weight = match d.weight {
            None if lone => 100,
            Some(w) if (0..=100).contains(&w) => w,
            _ => {
                return Err(RouteError::Weights {
                    field: format!("{field}.route"),
                    sum: route.iter().filter_map(|d| d.weight).sum(),
                });
            }
        };
        sum += weight;
        let weight = u32::try_from(weight).unwrap_or(0);
        destinations.push(destination(
            &format!("{f}.destination"),
            &d.destination,
            weight,
            namespace,
        )?);
    }
    if (!lone && sum != 100) || sum == 0 {
        return Err(RouteError::Weights {
            field: format!("{field}.route"),
            sum,
        });
    }
    Ok((destinations, u32::try_from(sum).unwrap_or(100)))
}

fn mirror(field: &str, r: &HttpRoute, namespace: &str) -> Result<Option<Mirror>, RouteError> {
    let Some(d) = &r.mirror else {
        if r.mirror_percentage.is_some() {
            return Err(RouteError::Conflict {
                field: format!("{field}.mirrorPercentage"),
                with: "no mirror",
            });
        }
        return Ok(None);
    };
    Ok(Some(Mirror {
        destination: destination(&format!("{field}.mirror"), d, 100, namespace)?,
        share: millionths(
            &format!("{field}.mirrorPercentage.value"),
            r.mirror_percentage.as_ref().map(|p| p.value),
        )?,
    }))
}

/// Whether `name` is an HTTP field name (RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` is an HTTP field value (visible ASCII, spaces, tabs).
fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

fn header_ops(field: &str, spec: Option<&HeaderOperations>) -> Result<HeaderOps, RouteError> {
    let Some(spec) = spec else {
        return Ok(HeaderOps::default());
    };
    let name = |f: &str, n: &str| -> Result<String, RouteError> {
        // Pseudo-headers and the proxies' own are not the route's to change.
        let lower = n.to_ascii_lowercase();
        if !is_header_name(n) || lower.starts_with("x-mizzen-") || lower == "host" {
            return Err(RouteError::Header {
                field: format!("{field}.{f}"),
                name: n.into(),
            });
        }
        Ok(lower)
    };
    let pairs = |f: &str, m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| {
                let n = name(f, k)?;
                if !is_header_value(v) {
                    return Err(RouteError::Header {
                        field: format!("{field}.{f}.{k}"),
                        name: v.clone(),
                    });
                }
                Ok((n, v.clone()))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(HeaderOps {
        remove: spec
            .remove
            .iter()
            .map(|n| name("remove", n))
            .collect::<Result<_, _>>()?,
        set: pairs("set", &spec.set)?,
        add: pairs("add", &spec.add)?,
    })
}

/// Whether `path` can be a request's path (origin form, no query).
fn is_path(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
}

/// Whether `authority` is a host name or address, with an optional port.
fn is_authority(authority: &str) -> bool {
    !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

fn rewrite(field: &str, r: &HttpRoute) -> Result<Option<Rewrite>, RouteError> {
    let Some(spec) = &r.rewrite else { return Ok(None) };
    if r.redirect.is_some() {
        return Err(RouteError::Conflict {
            field: format!("{field}.rewrite"),
            with: "redirect",
        });
    }
    check(&format!("{field}.rewrite.uri"), spec.uri.as_deref(), is_path)?;
    check(
        &format!("{field}.rewrite.authority"),
        spec.authority.as_deref(),
        is_authority,
    )?;
    Ok(Some(Rewrite {
        uri: spec.uri.clone(),
        authority: spec.authority.clone(),
    }))
}

fn check(field: &str, value: Option<&str>, ok: fn(&str) -> bool) -> Result<(), RouteError> {
    match value {
        Some(v) if !ok(v) => Err(RouteError::Value {
            field: field.into(),
            value: v.into(),
        }),
        _ => Ok(()),
    }
}

fn redirect(field: &str, r: &HttpRoute) -> Result<Option<Redirect>, RouteError> {
    let Some(spec) = &r.redirect else { return Ok(None) };
    let f = format!("{field}.redirect");
    check(&format!("{f}.uri"), spec.uri.as_deref(), is_path)?;
    check(&format!("{f}.authority"), spec.authority.as_deref(), is_authority)?;
    check(&format!("{f}.scheme"), spec.scheme.as_deref(), |s| {
        matches!(s, "http" | "https")
    })?;
    let code = match spec.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => {
            return Err(RouteError::Status {
                field: format!("{f}.redirectCode"),
                value: c,
            });
        }
    };
    Ok(Some(Redirect {
        uri: spec.uri.clone(),
        authority: spec.authority.clone(),
        port: spec.port.map(|p| port(&format!("{f}.port"), p)).transpose()?,
        scheme: spec.scheme.clone(),
        code,
    }))
}

fn retries(field: &str, r: &HttpRoute) -> Result<Option<Retries>, RouteError> {
    let Some(spec) = &r.retries else { return Ok(None) };
    let attempts = u32::try_from(spec.attempts)
        .ok()
        .filter(|a| *a <= 100)
        .ok_or_else(|| RouteError::Attempts {
            field: format!("{field}.retries.attempts"),
            value: spec.attempts,
        })?;
    if attempts == 0 {
        return Ok(None);
    }
    let per_try_timeout = match &spec.per_try_timeout {
        None => None,
        Some(t) => Some(duration(&format!("{field}.retries.perTryTimeout"), t)?),
    };
    let mut retry_on = Vec::new();
    for c in spec.retry_on.as_deref().unwrap_or("").split(',').map(str::trim) {
        let status = c.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s));
        if c.is_empty() {
            continue;
        }
        if !status && !RETRY_ON.contains(&c) {
            return Err(RouteError::RetryOn {
                field: format!("{field}.retries.retryOn"),
                value: c.into(),
            });
        }
        retry_on.push(c.to_owned());
    }
    Ok(Some(Retries {
        attempts,
        per_try_timeout,
        retry_on,
    }))
}

fn fault(field: &str, r: &HttpRoute) -> Result<Option<Fault>, RouteError> {
    let Some(spec) = &r.fault else { return Ok(None) };
    let mut fault = Fault::default();
    if let Some(d) = &spec.delay {
        let f = format!("{field}.fault.delay");
        fault.delay = Some((
            duration(&format!("{f}.fixedDelay"), &d.fixed_delay)?,
            millionths(&format!("{f}.percentage.value"), d.percentage.as_ref().map(|p| p.value))?,
        ));
    }
    if let Some(a) = &spec.abort {
        let f = format!("{field}.fault.abort");
        let status = u16::try_from(a.http_status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .ok_or_else(|| RouteError::Status {
                field: format!("{f}.httpStatus"),
                value: a.http_status,
            })?;
        fault.abort = Some((
            status,
            millionths(&format!("{f}.percentage.value"), a.percentage.as_ref().map(|p| p.value))?,
        ));
    }
    Ok(Some(fault))
}

/// A percentage (all when absent) in millionths.
fn millionths(field: &str, percent: Option<f64>) -> Result<u32, RouteError> {
    let value = percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&value) {
        return Err(RouteError::Percent {
            field: field.into(),
            value,
        });
    }
    // At most 1,000,000: the range was checked.
    Ok((value * 10_000.0).round() as u32)
}

pub(super) fn port(field: &str, value: u32) -> Result<u16, RouteError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| RouteError::Port {
            field: field.into(),
            value,
        })
}

/// `10s`, `1.5s`, `500ms`, `1m30s` (Go's and protobuf's duration forms).
pub(super) fn duration(field: &str, value: &str) -> Result<Duration, RouteError> {
    let bad = || RouteError::Duration {
        field: field.into(),
        value: value.into(),
    };
    let v = value.trim();
    if let Some(secs) = v.strip_suffix('s').filter(|s| !s.ends_with(['m', 'u', 'µ', 'n']))
        && let Ok(secs) = secs.parse::<f64>()
    {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    humantime::parse_duration(v).map_err(|_| bad())
}

/// A `StringMatch`; an empty one is `None` where `presence` allows it
/// (header matches: the header is present).
fn string_match(field: &str, m: &StringMatchSpec, presence: bool) -> Result<Option<StringMatch>, RouteError> {
    let bad = || RouteError::StringMatch { field: field.into() };
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) if presence => Ok(None),
        (Some(e), None, None) => Ok(Some(StringMatch::Exact(e.clone()))),
        (None, Some(p), None) => Ok(Some(StringMatch::Prefix(p.clone()))),
        (None, None, Some(r)) => regex::RegexBuilder::new(&format!("^(?:{r})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(|re| Some(StringMatch::Regex(re)))
            .map_err(|e| RouteError::Regex {
                field: field.into(),
                error: e.to_string(),
            }),
        _ => Err(bad()),
    }
}

fn required(field: &str, m: &StringMatchSpec) -> Result<StringMatch, RouteError> {
    string_match(field, m, false)?.ok_or_else(|| RouteError::StringMatch { field: field.into() })
}

fn match_of(field: &str, m: &HttpMatchRequest) -> Result<Match, RouteError> {
    let uri = m
        .uri
        .as_ref()
        .map(|u| required(&format!("{field}.uri"), u))
        .transpose()?;
    let method = m
        .method
        .as_ref()
        .map(|u| required(&format!("{field}.method"), u))
        .transpose()?;
    let headers = m
        .headers
        .iter()
        .map(|(k, v)| {
            let name = k.to_ascii_lowercase();
            let f = format!("{field}.headers.{k}");
            string_match(&f, v, true).map(|m| (name, m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let without_headers = m
        .without_headers
        .iter()
        .map(|(k, v)| {
            let f = format!("{field}.withoutHeaders.{k}");
            string_match(&f, v, true).map(|m| (k.to_ascii_lowercase(), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let query_params = m
        .query_params
        .iter()
        .map(|(k, v)| required(&format!("{field}.queryParams.{k}"), v).map(|m| (k.clone(), m)))
        .collect::<Result<Vec<_>, _>>()?;
    let port = m.port.map(|p| port(&format!("{field}.port"), p)).transpose()?;
    Ok(Match {
        uri,
        method,
        headers,
        without_headers,
        query_params,
        port,
        source_labels: m.source_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}
