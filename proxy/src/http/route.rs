//! A VirtualService applied to one request on the client's side, after
//! its Service was resolved: the route its match picks, the destination
//! (Service, subset, port) the route's weights pick, then the route's
//! fault (delay, abort), timeout and retries around sending it
//! ([`mizzen_api::routing`] decides; this module acts).
//!
//! - No route matches: 404 with flag `NR`, as Envoy answers. A redirect
//!   route answers its code with `Location`.
//! - Header operations change the request on its way and the answer on
//!   its way back; a rewrite changes the path (the matched prefix, or the
//!   whole path) and the Host.
//! - A mirror gets a copy of a share of the requests without a body,
//!   whose answer is dropped (at most [`MAX_MIRRORS`] in flight).
//! - A subset no endpoint is in, or a Service the proxy does not know:
//!   503 `UH`.
//! - An injected abort: its status with flag `FI`; an injected delay
//!   marks the request `DI`. The delay is not part of the route's timeout
//!   (Envoy's fault filter runs before its router).
//! - The timeout covers every attempt: 504 `UT` when it passes.
//! - Retries: only requests without a body and not taken over (no
//!   upgrade), each new attempt avoiding the endpoints tried before, after
//!   a jittered backoff, and only while the retry budget allows
//!   ([`RetryBudget`]). Whether a failure may be retried, and never a sent
//!   request whose method is not idempotent, is
//!   [`Retries::allows`](mizzen_api::routing::Retries::allows). When
//!   retries run out on a retriable failure the last answer carries `URX`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, StatusCode, Version};
use mizzen_api::routing::decide::rewritten_path;
use mizzen_api::routing::policy::{Failure, applies};
use mizzen_api::routing::{
    Destination as RouteDestination, HeaderOps, Match, Mirror, NoRoute, Redirect, RequestView, Retries, Rewrite, Route,
    RouteTable, decide,
};

use super::outbound::{Forwarded, Refusal, forward};
use super::upgrade::Takeover;
use super::{Body, ResponseFlag};
use crate::discovery::{Destination, Routes, Target};
use crate::outbound::Outbound;

/// What routing reads of a request: its head, and the Service port it
/// was sent to.
struct Head<'a> {
    parts: &'a Parts,
    port: u16,
    /// The client pod's labels.
    labels: &'a std::collections::BTreeMap<String, String>,
}

impl RequestView for Head<'_> {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn path(&self) -> &str {
        self.parts.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn source_label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Retries in flight may be at most this share of the requests in flight
/// on routes with retries (Envoy's retry budget default)…
const BUDGET_PERCENT: usize = 20;
/// …or this many, whichever is more.
const MIN_RETRY_CONCURRENCY: usize = 3;
/// The first backoff's upper bound; each retry doubles it, up to
/// [`MAX_BACKOFF`] (Envoy's defaults).
const BASE_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Mirrored requests in flight at most, per proxy.
pub const MAX_MIRRORS: usize = 64;

/// Bounds retries by the live requests that may retry, so that retries
/// cannot multiply an outage.
#[derive(Debug, Default)]
pub struct RetryBudget {
    live: AtomicUsize,
    retrying: AtomicUsize,
}

/// Decrements its counter when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    fn live(&self) -> Counted<'_> {
        self.live.fetch_add(1, Ordering::Relaxed);
        Counted(&self.live)
    }

    /// A retry, if the budget has room for one more.
    fn admit(&self) -> Option<Counted<'_>> {
        let live = self.live.load(Ordering::Relaxed);
        let limit = (live * BUDGET_PERCENT / 100).max(MIN_RETRY_CONCURRENCY);
        self.retrying
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Counted(&self.retrying))
    }
}

/// The proxy's own answer for a request routing cannot send.
fn refusal(status: StatusCode, flag: ResponseFlag, error: impl Into<String>) -> Refusal {
    Refusal {
        status,
        flag: Some(flag),
        error: error.into(),
        location: None,
    }
}

/// The target of `d`, a route's destination, for a request that came for
/// `dst` ([`Routes::routed_target`]).
fn target_of(routes: &Routes, d: &RouteDestination, dst: SocketAddr) -> Result<Arc<Target>, Refusal> {
    routes.routed_target(d, dst).ok_or_else(|| {
        let port = d.port.map_or_else(|| "its port".to_owned(), |p| format!("port {p}"));
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoHealthyUpstream,
            format!("the route's destination {} has no {port} this proxy knows", d.service),
        )
    })
}

/// `authority` without its port, if it has one (`[::1]:80` → `[::1]`).
fn without_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => h,
        _ => authority,
    }
}

/// The answer of a redirect route to the request `parts`.
fn redirect(r: &Redirect, parts: &Parts) -> Refusal {
    let scheme = r.scheme.as_deref().or(parts.uri.scheme_str()).unwrap_or("http");
    let host = r
        .authority
        .as_deref()
        .or_else(|| super::headers::authority(&parts.uri, &parts.headers))
        .unwrap_or("");
    let host = match r.port {
        None => host.to_owned(),
        Some(p) => format!("{}:{p}", without_port(host)),
    };
    let path = r.uri.as_deref().unwrap_or(parts.uri.path());
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = HeaderValue::from_str(&format!("{scheme}://{host}{path}{query}")).ok();
    Refusal {
        status: StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        flag: None,
        error: String::new(),
        location,
    }
}

/// Applies `ops` to `headers`: remove, then set, then add.
fn change_headers(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    let valid = |(n, v): &(String, String)| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (name, value) in ops.set.iter().filter_map(valid) {
        headers.insert(name, value);
    }
    for (name, value) in ops.add.iter().filter_map(valid) {
        headers.append(name, value);
    }
}

/// `parts` rewritten: the path (keeping the query) and the authority.
fn rewrite(r: &Rewrite, matched: Option<&Match>, parts: &mut Parts) {
    let mut uri = parts.uri.clone().into_parts();
    if let Some(new) = &r.uri {
        let path = rewritten_path(new, matched, parts.uri.path());
        let target = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        uri.path_and_query = target.parse().ok().or(uri.path_and_query);
    }
    if let Some(authority) = &r.authority {
        if uri.authority.is_some() {
            uri.authority = authority.parse().ok().or(uri.authority);
        }
        if let Ok(v) = HeaderValue::from_str(authority) {
            parts.headers.insert(hyper::header::HOST, v);
        }
    }
    if let Ok(u) = hyper::Uri::from_parts(uri) {
        parts.uri = u;
    }
}

/// Copies the request `parts` (which has no body) to `m`'s destination,
/// its Host suffixed `-shadow` as Envoy does, and drops the answer; at
/// most [`MAX_MIRRORS`] at once, more are not copied.
fn mirror(o: &Arc<Outbound>, routes: &Routes, m: &Mirror, dst: SocketAddr, parts: &Parts) {
    let Ok(target) = target_of(routes, &m.destination, dst) else {
        return;
    };
    let Ok(slot) = o.mirrors.clone().try_acquire_owned() else {
        return;
    };
    let mut req = replay(parts);
    if let Some(host) = super::headers::authority(&parts.uri, &parts.headers)
        && let Ok(shadow) = HeaderValue::from_str(&format!("{host}-shadow"))
    {
        req.headers_mut().insert(hyper::header::HOST, shadow);
        let mut uri = req.uri().clone().into_parts();
        uri.authority = None;
        uri.scheme = None;
        if let Ok(u) = hyper::Uri::from_parts(uri) {
            *req.uri_mut() = u;
        }
    }
    let (o, version) = (o.clone(), parts.version);
    tokio::spawn(async move {
        let _slot = slot;
        if let Ok(f) = forward(&o, Some(Destination::Service(target)), version, None, req, &[]).await {
            o.metrics.mirrored();
            let mut body = f.response.into_body();
            while let Some(Ok(_)) = body.frame().await {}
        }
    });
}

/// Sends `req`, which came for `target` (a Service that `table` routes)
/// at `dst`, where its route says.
#[allow(clippy::too_many_arguments)]
pub(super) async fn routed(
    o: &Arc<Outbound>,
    routes: &Routes,
    target: &Target,
    table: &RouteTable,
    dst: SocketAddr,
    version: Version,
    takeover: Option<&Takeover>,
    req: Request<Body>,
) -> Result<Forwarded, Refusal> {
    let (mut parts, body) = req.into_parts();
    let head = Head {
        parts: &parts,
        port: target.port,
        labels: &o.labels,
    };
    let no_route = |e: NoRoute| refusal(StatusCode::NOT_FOUND, ResponseFlag::NoRoute, e.to_string());
    let decision = decide(table, &head, rand::random()).map_err(no_route)?;
    let route = decision.route;
    if let Some(r) = &route.redirect {
        return Err(redirect(r, &parts));
    }
    let d = decision.destination.ok_or_else(|| no_route(NoRoute::NoDestination))?;
    let chosen = target_of(routes, d, dst)?;
    let mut flag = None;
    if let Some(fault) = &route.fault {
        if let Some(delay) = fault.delay_for(rand::random()) {
            tokio::time::sleep(delay).await;
            flag = Some(ResponseFlag::DelayInjected);
        }
        if let Some(status) = fault.abort_for(rand::random()) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(refusal(status, ResponseFlag::FaultInjected, "fault filter abort"));
        }
    }
    change_headers(&route.request_headers, &mut parts.headers);
    if let Some(r) = &route.rewrite {
        rewrite(r, decision.matched, &mut parts);
    }
    if let Some(m) = &route.mirror
        && takeover.is_none()
        && body.is_end_stream()
        && applies(m.share, rand::random())
    {
        mirror(o, routes, m, dst, &parts);
    }
    let req = Request::from_parts(parts, body);
    let attempts = attempts(o, route, Destination::Service(chosen), version, takeover, req);
    let forwarded = match route.timeout {
        None => attempts.await,
        Some(limit) => tokio::time::timeout(limit, attempts).await.unwrap_or_else(|_| {
            Err(refusal(
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamRequestTimeout,
                "upstream request timeout",
            ))
        }),
    };
    forwarded.map(|mut f| {
        f.flag = f.flag.or(flag);
        change_headers(&route.response_headers, f.response.headers_mut());
        f
    })
}

/// The failure a refusal stands for, for retry conditions (`None`: not
/// worth another attempt).
fn failure_of(r: &Refusal) -> Option<Failure> {
    match r.flag? {
        ResponseFlag::UpstreamConnectionFailure => Some(Failure::Connect),
        ResponseFlag::UpstreamReset | ResponseFlag::UpstreamRequestTimeout => Some(Failure::Reset),
        _ => None,
    }
}

/// `parts` again, with an empty body: a retry of a request without one.
fn replay(parts: &Parts) -> Request<Body> {
    let mut r = Request::new(super::full(Bytes::new()));
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

/// The backoff before retry number `n` (1 for the first): uniform below
/// a bound that doubles each time.
fn backoff(n: u32) -> Duration {
    let bound = BASE_BACKOFF
        .saturating_mul(1 << n.saturating_sub(1).min(8))
        .min(MAX_BACKOFF);
    bound.mul_f64(rand::random::<f64>())
}

/// One attempt, bounded by the per-try timeout.
async fn attempt(
    o: &Arc<Outbound>,
    destination: &Destination,
    version: Version,
    takeover: Option<&Takeover>,
    req: Request<Body>,
    avoid: &[SocketAddr],
    per_try: Option<Duration>,
) -> Result<Forwarded, Refusal> {
    let sent = forward(o, Some(destination.clone()), version, takeover, req, avoid);
    match per_try {
        None => sent.await,
        Some(limit) => tokio::time::timeout(limit, sent).await.unwrap_or_else(|_| {
            Err(refusal(
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamRequestTimeout,
                "upstream per-try timeout",
            ))
        }),
    }
}

/// Sends `req` to `destination`, retrying as `route` allows.
async fn attempts(
    o: &Arc<Outbound>,
    route: &Route,
    destination: Destination,
    version: Version,
    takeover: Option<&Takeover>,
    req: Request<Body>,
) -> Result<Forwarded, Refusal> {
    let replayable = takeover.is_none() && req.body().is_end_stream();
    let retries: Option<&Retries> = route.retries.as_ref().filter(|_| replayable);
    let Some(retries) = retries else {
        let per_try = route.retries.as_ref().and_then(|r| r.per_try_timeout);
        return attempt(o, &destination, version, takeover, req, &[], per_try).await;
    };
    let _live = o.retry_budget.live();
    let (parts, _) = req.into_parts();
    let mut avoid = Vec::new();
    let mut n: u32 = 1;
    loop {
        let tried = attempt(
            o,
            &destination,
            version,
            None,
            replay(&parts),
            &avoid,
            retries.per_try_timeout,
        )
        .await;
        let failure = match &tried {
            Ok(f) => Some(Failure::Status(f.response.status().as_u16())),
            Err(r) => failure_of(r),
        };
        let Some(failure) = failure else { return tried };
        if !retries.allows(parts.method.as_str(), n, failure) {
            let exhausted = n > retries.attempts && retries.allows(parts.method.as_str(), 1, failure);
            return match tried {
                Ok(mut f) if exhausted => {
                    f.flag = Some(ResponseFlag::RetryLimitExceeded);
                    Ok(f)
                }
                other => other,
            };
        }
        let Some(_retry) = o.retry_budget.admit() else {
            return tried;
        };
        if let Ok(f) = &tried {
            avoid.push(f.backend.addr);
        }
        drop(tried);
        o.metrics.retried();
        tokio::time::sleep(backoff(n)).await;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_a_share_of_live_requests_and_at_least_three() {
        let budget = RetryBudget::default();
        let live: Vec<_> = (0..30).map(|_| budget.live()).collect();
        // 20 % of 30 is 6.
        let admitted: Vec<_> = (0..10).filter_map(|_| budget.admit()).collect();
        assert_eq!(admitted.len(), 6);
        drop(admitted);
        drop(live);
        let admitted: Vec<_> = (0..10).filter_map(|_| budget.admit()).collect();
        assert_eq!(admitted.len(), MIN_RETRY_CONCURRENCY);
    }

    #[test]
    fn a_port_is_taken_off_an_authority_but_not_off_an_ipv6_address() {
        assert_eq!(without_port("web:8080"), "web");
        assert_eq!(without_port("web"), "web");
        assert_eq!(without_port("[::1]:80"), "[::1]");
        assert_eq!(without_port("::1"), "::1");
    }

    #[test]
    fn header_operations_remove_then_set_then_add() {
        let ops = HeaderOps {
            remove: vec!["cookie".into()],
            set: vec![("x-version".into(), "v2".into())],
            add: vec![("x-version".into(), "extra".into())],
        };
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1"));
        h.insert("x-version", HeaderValue::from_static("v1"));
        change_headers(&ops, &mut h);
        assert!(h.get("cookie").is_none());
        let versions: Vec<_> = h.get_all("x-version").iter().collect();
        assert_eq!(versions, ["v2", "extra"]);
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_change() {
        let (parts, _) = Request::get("/old/x?q=1")
            .header("host", "web.demo:8080")
            .body(())
            .expect("request")
            .into_parts();
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: Some(9090),
            scheme: Some("https".into()),
            code: 308,
        };
        let answer = redirect(&r, &parts);
        assert_eq!(answer.status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            answer.location.as_ref().and_then(|v| v.to_str().ok()),
            Some("https://web.demo:9090/new?q=1")
        );
    }

    #[test]
    fn backoff_stays_below_a_doubling_bound() {
        for n in 1..12 {
            let bound = BASE_BACKOFF.saturating_mul(1 << (n - 1).min(8)).min(MAX_BACKOFF);
            for _ in 0..50 {
                assert!(backoff(n) <= bound, "retry {n}");
            }
        }
    }
}
