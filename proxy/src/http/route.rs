//! A VirtualService applied to one request on the client's side, after
//! its Service was resolved: the route its match picks, the destination
//! (Service, subset, port) the route's weights pick, then the route's
//! fault (delay, abort), timeout and retries around sending it
//! ([`mizzen_api::routing`] decides; this module acts).
//!
//! - No route matches: 404 with flag `NR`, as Envoy answers.
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
use hyper::body::Body as _;
use hyper::http::request::Parts;
use hyper::{Request, StatusCode, Version};
use mizzen_api::routing::policy::Failure;
use mizzen_api::routing::{RequestView, Retries, Route, RouteTable, decide};

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
    fn source_label(&self, _key: &str) -> Option<&str> {
        // Routes with `sourceLabels` are refused when compiled.
        None
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
        flag,
        error: error.into(),
    }
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
    let (parts, body) = req.into_parts();
    let head = Head {
        parts: &parts,
        port: target.port,
    };
    let decision = decide(table, &head, rand::random())
        .map_err(|e| refusal(StatusCode::NOT_FOUND, ResponseFlag::NoRoute, e.to_string()))?;
    let (route, d) = (decision.route, decision.destination);
    let Some(service) = routes.target(&d.service, d.port, dst) else {
        let port = d.port.map_or_else(|| "its port".to_owned(), |p| format!("port {p}"));
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoHealthyUpstream,
            format!("the route's destination {} has no {port} this proxy knows", d.service),
        ));
    };
    let chosen = match &d.subset {
        None => service.clone(),
        Some(name) => service.subsets.get(name).cloned().unwrap_or_else(|| {
            Arc::new(Target {
                service: format!("{} subset {name}", d.service),
                backends: Vec::new(),
                ..(**service).clone()
            })
        }),
    };
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
        f
    })
}

/// The failure a refusal stands for, for retry conditions (`None`: not
/// worth another attempt).
fn failure_of(r: &Refusal) -> Option<Failure> {
    match r.flag {
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
    fn backoff_stays_below_a_doubling_bound() {
        for n in 1..12 {
            let bound = BASE_BACKOFF.saturating_mul(1 << (n - 1).min(8)).min(MAX_BACKOFF);
            for _ in 0..50 {
                assert!(backoff(n) <= bound, "retry {n}");
            }
        }
    }
}
