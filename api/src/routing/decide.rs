//! Which route a request takes, and which of its destinations.

use super::{Destination, L4Match, Match, Route, RouteTable};

/// What routing reads of a request.
pub trait RequestView {
    fn method(&self) -> &str;
    /// The path, without the query string.
    fn path(&self) -> &str;
    /// The query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// The first value of a header, by its lower-case name.
    fn header(&self, name: &str) -> Option<&str>;
    /// The Service port the request was sent to.
    fn port(&self) -> u16;
    /// A label of the client's pod.
    fn source_label(&self, key: &str) -> Option<&str>;
}

/// The route a request takes and the destination the roll picked.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'t> {
    /// The route's index in its table (a metric label with the name).
    pub index: usize,
    pub route: &'t Route,
    /// `None` for a redirect.
    pub destination: Option<&'t Destination>,
    /// The route's match that held (`None` for a route without matches).
    pub matched: Option<&'t Match>,
}

/// Why a request is not routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// No route's match holds (Istio answers 404 with flag `NR`).
    #[error("no route matches the request")]
    NoMatch,
    /// The matching route has no destination.
    #[error("the matching route has no destination")]
    NoDestination,
}

impl NoRoute {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            NoRoute::NoMatch => "no_match",
            NoRoute::NoDestination => "no_destination",
        }
    }
}

/// The value of query parameter `key` (the first), `""` when it has none.
pub fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// Whether every condition of `m` holds for `req`.
pub fn holds(m: &Match, req: &impl RequestView) -> bool {
    m.port.is_none_or(|p| p == req.port())
        && m.method.as_ref().is_none_or(|s| s.matches(req.method()))
        && m.uri.as_ref().is_none_or(|s| s.matches(req.path()))
        && m.headers.iter().all(|(name, s)| {
            req.header(name)
                .is_some_and(|v| s.as_ref().is_none_or(|s| s.matches(v)))
        })
        && m.without_headers.iter().all(|(name, s)| match (req.header(name), s) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(v), Some(s)) => !s.matches(v),
        })
        && m.query_params
            .iter()
            .all(|(k, s)| query_value(req.query(), k).is_some_and(|v| s.matches(v)))
        && m.source_labels
            .iter()
            .all(|(k, v)| req.source_label(k) == Some(v.as_str()))
}

/// The destination of `route` that `roll` (uniform over `u32`) picks by
/// weight; `None` only for a route without destinations (which
/// [`compile`](super::compile()) never makes).
pub fn pick(route: &Route, roll: u32) -> Option<&Destination> {
    weighted(&route.destinations, route.total_weight, roll)
}

/// The one of `destinations` (weights adding up to `total`) that `roll`
/// picks.
fn weighted(destinations: &[Destination], total: u32, roll: u32) -> Option<&Destination> {
    // Scaled, not a remainder, so that every roll maps evenly.
    let mut point = (u64::from(roll) * u64::from(total)) >> 32;
    for d in destinations {
        let w = u64::from(d.weight);
        if point < w {
            return Some(d);
        }
        point -= w;
    }
    // Only when the weights add up to less than the total.
    destinations.last()
}

/// Where the first of `table`'s TCP routes whose match a connection to
/// Service port `port` from a pod labelled `labels` satisfies sends it,
/// for `roll`; `None` when no TCP route matches (the connection goes to
/// the Service as without routes).
pub fn decide_tcp<'t>(
    table: &'t RouteTable,
    port: u16,
    labels: &std::collections::BTreeMap<String, String>,
    roll: u32,
) -> Option<&'t Destination> {
    let holds =
        |m: &L4Match| m.port.is_none_or(|p| p == port) && m.source_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
    let route = table
        .tcp
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(holds))?;
    weighted(&route.destinations, route.total_weight, roll)
}

/// The first route of `table` whose match `req` satisfies (a route
/// without matches takes every request), and its destination for `roll`.
pub fn decide<'t>(table: &'t RouteTable, req: &impl RequestView, roll: u32) -> Result<Decision<'t>, NoRoute> {
    let (index, route, matched) = table
        .routes
        .iter()
        .enumerate()
        .find_map(|(i, r)| {
            if r.matches.is_empty() {
                return Some((i, r, None));
            }
            r.matches.iter().find(|m| holds(m, req)).map(|m| (i, r, Some(m)))
        })
        .ok_or(NoRoute::NoMatch)?;
    let destination = match route.redirect {
        Some(_) => None,
        None => Some(pick(route, roll).ok_or(NoRoute::NoDestination)?),
    };
    Ok(Decision {
        index,
        route,
        destination,
        matched,
    })
}

/// The path `rewrite` makes of `path`, which `matched` matched: the
/// prefix a `uri.prefix` match matched is replaced, any other path
/// whole (Istio's `rewrite.uri`).
pub fn rewritten_path(rewrite: &str, matched: Option<&Match>, path: &str) -> String {
    match matched.and_then(|m| m.uri.as_ref()) {
        Some(super::StringMatch::Prefix(p)) => match path.strip_prefix(p.as_str()) {
            Some(rest) => format!("{rewrite}{rest}"),
            None => rewrite.to_owned(),
        },
        _ => rewrite.to_owned(),
    }
}
