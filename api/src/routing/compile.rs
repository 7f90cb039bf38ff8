//! A `VirtualService` spec compiled into a [`RouteTable`]: regexes built,
//! hosts resolved to Services, weights, durations and percentages checked.
//! What cannot be honoured is refused with the field's path.

use std::time::Duration;

use crate::mesh::is_namespace_name;

use super::spec::{HttpMatchRequest, HttpRoute, StringMatchSpec, VirtualServiceSpec};
use super::{Destination, Fault, Match, Retries, Route, RouteTable, StringMatch};

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
    #[error("{field}: {value} is not a count")]
    Count { field: String, value: i64 },
    #[error("{field}: not supported yet (Mizzen routes without it; remove it or route by headers)")]
    Unsupported { field: String },
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
            RouteError::Unsupported { .. } => "unsupported",
            RouteError::Count { .. } => "count",
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
    Ok(Compiled {
        services,
        table: RouteTable { routes },
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
    if r.route.is_empty() {
        return Err(RouteError::NoDestination {
            field: format!("{field}.route"),
        });
    }
    let lone = r.route.len() == 1;
    let mut destinations = Vec::with_capacity(r.route.len());
    let mut sum: i64 = 0;
    for (i, d) in r.route.iter().enumerate() {
        let f = format!("{field}.route[{i}]");
        let weight = match d.weight {
            None if lone => 100,
            Some(w) if (0..=100).contains(&w) => w,
            _ => {
                return Err(RouteError::Weights {
                    field: format!("{field}.route"),
                    sum: r.route.iter().filter_map(|d| d.weight).sum(),
                });
            }
        };
        sum += weight;
        let port = match &d.destination.port {
            None => None,
            Some(p) => Some(port(&format!("{f}.destination.port.number"), p.number)?),
        };
        destinations.push(Destination {
            service: service_of(&format!("{f}.destination.host"), &d.destination.host, namespace)?,
            subset: d.destination.subset.clone(),
            port,
            weight: u32::try_from(weight).unwrap_or(0),
        });
    }
    if (!lone && sum != 100) || sum == 0 {
        return Err(RouteError::Weights {
            field: format!("{field}.route"),
            sum,
        });
    }
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
    Ok(Route {
        name: r.name.clone(),
        matches,
        destinations,
        total_weight: u32::try_from(sum).unwrap_or(100),
        timeout,
        retries: retries(field, r)?,
        fault: fault(field, r)?,
    })
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

fn port(field: &str, value: u32) -> Result<u16, RouteError> {
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
    if !m.source_labels.is_empty() {
        // A proxy does not know its pod's labels yet.
        return Err(RouteError::Unsupported {
            field: format!("{field}.sourceLabels"),
        });
    }
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
