//! A `DestinationRule`'s `trafficPolicy`, compiled: how endpoints are
//! picked ([`LoadBalancer`]), the circuit breaker's limits ([`Pool`]) and
//! outlier detection ([`Outlier`]), with the pure decisions the proxy
//! makes with them.
//!
//! Semantics follow Envoy's, as Istio configures it:
//! - `tcp.maxConnections` and `http.http2MaxRequests` both bound the
//!   requests one client proxy sends to the Service (or subset) at once
//!   (mesh traffic shares one HTTP/2 connection per endpoint, and an
//!   HTTP/1.1 request holds a connection of its own: either way, the bound
//!   is on requests); `http.http1MaxPendingRequests` bounds those waiting
//!   for a place. A request past both gets 503 with flag `UO` at once.
//! - Outlier detection counts each endpoint's consecutive failures: 5xx
//!   answers and local failures (no connection, a reset) for
//!   `consecutive5xxErrors`; 502, 503, 504 and local failures for
//!   `consecutiveGatewayErrors`. Crossing either ejects the endpoint at
//!   once for `baseEjectionTime` times its ejections so far (at most
//!   300 s, Envoy's `max_ejection_time`), unless `maxEjectionPercent` of
//!   the endpoints (at least one, unless it is 0) are ejected already. An
//!   ejected endpoint returns when its time is up, checked every
//!   `interval`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::compile::{RouteError, duration, port};
use super::spec::{ConnectionPoolSpec, HttpCookieSpec, LoadBalancerSpec, OutlierDetectionSpec, TrafficPolicySpec};

/// Envoy's cap on one ejection.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Circuit breaker limits of one client proxy towards a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Requests sent at once.
    pub max_active: u32,
    /// Requests waiting for a place.
    pub max_pending: u32,
}

/// Outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive 5xx or local failures that eject; 0: never.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors or local failures that eject; 0: never.
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// What a consistent hash hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value (lower-case name).
    Header(String),
    QueryParameter(String),
    /// The client pod's address.
    SourceIp,
    Cookie(Cookie),
}

/// A consistent hash's cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub path: Option<String>,
    /// How long a cookie the proxy sets lives (zero: the browser session);
    /// `None`: the proxy sets none.
    pub ttl: Option<Duration>,
}

impl Cookie {
    /// This cookie's value in the `Cookie` header values `headers`.
    pub fn find<'h>(&self, headers: impl IntoIterator<Item = &'h str>) -> Option<&'h str> {
        headers
            .into_iter()
            .flat_map(|h| h.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == self.name)
            .map(|(_, value)| value.trim_matches('"'))
    }

    /// The `Set-Cookie` value giving a client this cookie with `value`,
    /// if the proxy sets it.
    pub fn set(&self, value: &str) -> Option<String> {
        let ttl = self.ttl?;
        let mut header = format!("{}={value}", self.name);
        if !ttl.is_zero() {
            header.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
        }
        if let Some(path) = &self.path {
            header.push_str(&format!("; Path={path}"));
        }
        header.push_str("; HttpOnly");
        Some(header)
    }
}

/// How a client proxy picks among a destination's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    /// Two random choices, the one with fewer requests in flight (weighted
    /// by latency): Mizzen's default.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// Rendezvous hashing of the key; requests without one are balanced as
    /// by `LeastRequest`.
    ConsistentHash(HashKey),
}

/// A traffic policy, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub pool: Option<Pool>,
    pub outlier: Option<Outlier>,
}

impl TrafficPolicy {
    /// This policy with `subset`'s fields in place of its own.
    pub fn overridden_by(self, subset: TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: subset.load_balancer.or(self.load_balancer),
            pool: subset.pool.or(self.pool),
            outlier: subset.outlier.or(self.outlier),
        }
    }
}

/// A `trafficPolicy` as written, compiled: its own fields and its
/// `portLevelSettings`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyLevels {
    pub all_ports: TrafficPolicy,
    /// By Service port; each replaces `all_ports` whole on its port.
    pub ports: BTreeMap<u16, TrafficPolicy>,
}

impl PolicyLevels {
    /// The policy on Service port `port`.
    pub fn at_port(&self, port: u16) -> &TrafficPolicy {
        self.ports.get(&port).unwrap_or(&self.all_ports)
    }

    /// The policy of a subset with these (its own) levels on `port`, under
    /// the rule's `top` levels, as Istio merges them: the rule's policy on
    /// the port, with the fields the subset sets in place; or the subset's
    /// own port-level policy, whole, if it has one for the port.
    pub fn under(&self, top: &PolicyLevels, port: u16) -> TrafficPolicy {
        match self.ports.get(&port) {
            Some(own) => own.clone(),
            None => top.at_port(port).clone().overridden_by(self.all_ports.clone()),
        }
    }
}

/// 64-bit FNV-1a, then a finaliser (splitmix64) so that nearby inputs
/// land far apart: stable across processes and versions, unlike std's
/// randomly keyed hasher, so every client proxy agrees.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The index of the endpoint (by its name, e.g. `ip:port`) that `key`
/// goes to by rendezvous hashing: the highest hash of key and endpoint.
/// Removing an endpoint moves only the keys that went to it.
pub fn rendezvous<'a>(key: &[u8], endpoints: impl IntoIterator<Item = &'a [u8]>) -> Option<usize> {
    endpoints
        .into_iter()
        .enumerate()
        .max_by_key(|(_, e)| hash(&[key, e]))
        .map(|(i, _)| i)
}

fn load_balancer(field: &str, spec: &LoadBalancerSpec) -> Result<LoadBalancer, RouteError> {
    match (&spec.simple, &spec.consistent_hash) {
        (Some(_), Some(_)) | (None, None) => Err(RouteError::Conflict {
            field: field.into(),
            with: "set exactly one of simple and consistentHash",
        }),
        (Some(simple), None) => match simple.as_str() {
            "LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED" => Ok(LoadBalancer::LeastRequest),
            "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
            "RANDOM" => Ok(LoadBalancer::Random),
            other => Err(RouteError::Value {
                field: format!("{field}.simple"),
                value: other.into(),
            }),
        },
        (None, Some(h)) => {
            let source_ip = h.use_source_ip == Some(true);
            let key = match (
                &h.http_header_name,
                &h.http_query_parameter_name,
                source_ip,
                &h.http_cookie,
            ) {
                (Some(name), None, false, None) => HashKey::Header(name.to_ascii_lowercase()),
                (None, Some(name), false, None) => HashKey::QueryParameter(name.clone()),
                (None, None, true, None) => HashKey::SourceIp,
                (None, None, false, Some(c)) => {
                    HashKey::Cookie(cookie(&format!("{field}.consistentHash.httpCookie"), c)?)
                }
                _ => {
                    return Err(RouteError::Conflict {
                        field: format!("{field}.consistentHash"),
                        with: "set exactly one of httpHeaderName, httpQueryParameterName, useSourceIp and httpCookie",
                    });
                }
            };
            Ok(LoadBalancer::ConsistentHash(key))
        }
    }
}

/// A cookie name is an HTTP token (RFC 6265); its path is what a
/// `Set-Cookie` attribute may hold.
fn cookie(field: &str, spec: &HttpCookieSpec) -> Result<Cookie, RouteError> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if spec.name.is_empty() || !spec.name.chars().all(token) {
        return Err(RouteError::Value {
            field: format!("{field}.name"),
            value: spec.name.clone(),
        });
    }
    if let Some(path) = &spec.path
        && !(path.starts_with('/') && path.chars().all(|c| c.is_ascii_graphic() && c != ';'))
    {
        return Err(RouteError::Value {
            field: format!("{field}.path"),
            value: path.clone(),
        });
    }
    Ok(Cookie {
        name: spec.name.clone(),
        path: spec.path.clone(),
        ttl: spec
            .ttl
            .as_deref()
            .map(|t| duration(&format!("{field}.ttl"), t))
            .transpose()?,
    })
}

/// What came of one attempt, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No connection, or a reset before the answer.
    LocalFailure,
}

/// An endpoint's consecutive failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    pub five_xx: u32,
    pub gateway: u32,
}

impl Outlier {
    /// Counts `outcome` into `streak`; whether the endpoint should now be
    /// ejected (the streak then starts again).
    pub fn observe(&self, streak: &mut Streak, outcome: Outcome) -> bool {
        let (five_xx, gateway) = match outcome {
            Outcome::LocalFailure => (true, true),
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
        };
        streak.five_xx = if five_xx { streak.five_xx + 1 } else { 0 };
        streak.gateway = if gateway { streak.gateway + 1 } else { 0 };
        let eject = (self.consecutive_5xx > 0 && streak.five_xx >= self.consecutive_5xx)
            || (self.consecutive_gateway > 0 && streak.gateway >= self.consecutive_gateway);
        if eject {
            *streak = Streak::default();
        }
        eject
    }

    /// How long an endpoint's ejection number `ejections` (1 for its
    /// first) lasts.
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        self.base_ejection
            .saturating_mul(ejections.max(1))
            .min(MAX_EJECTION_TIME)
    }

    /// How many of `endpoints` may be ejected at once.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        match self.max_ejection_percent {
            0 => 0,
            p => (endpoints * p as usize / 100).max(1),
        }
    }
}

fn count(field: &str, value: Option<i64>, default: u32) -> Result<u32, RouteError> {
    match value {
        None => Ok(default),
        Some(v) => u32::try_from(v).map_err(|_| RouteError::Count {
            field: field.into(),
            value: v,
        }),
    }
}

fn pool(field: &str, spec: &ConnectionPoolSpec) -> Result<Pool, RouteError> {
    let max_connections = count(
        &format!("{field}.tcp.maxConnections"),
        spec.tcp.as_ref().and_then(|t| t.max_connections),
        u32::MAX,
    )?;
    let http = spec.http.as_ref();
    let max_requests = count(
        &format!("{field}.http.http2MaxRequests"),
        http.and_then(|h| h.http2_max_requests),
        u32::MAX,
    )?;
    let max_pending = count(
        &format!("{field}.http.http1MaxPendingRequests"),
        http.and_then(|h| h.http1_max_pending_requests),
        u32::MAX,
    )?;
    Ok(Pool {
        // Istio's 0 means the default (unlimited).
        max_active: [max_connections, max_requests]
            .into_iter()
            .filter(|n| *n > 0)
            .min()
            .unwrap_or(u32::MAX),
        max_pending: if max_pending == 0 { u32::MAX } else { max_pending },
    })
}

fn outlier(field: &str, spec: &OutlierDetectionSpec) -> Result<Outlier, RouteError> {
    let time = |name: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(v) => duration(&format!("{field}.{name}"), v),
    };
    let percent = count(&format!("{field}.maxEjectionPercent"), spec.max_ejection_percent, 10)?;
    if percent > 100 {
        return Err(RouteError::Percent {
            field: format!("{field}.maxEjectionPercent"),
            value: f64::from(percent),
        });
    }
    let interval = time("interval", &spec.interval, Duration::from_secs(10))?;
    if interval.is_zero() {
        return Err(RouteError::Duration {
            field: format!("{field}.interval"),
            value: "0s".into(),
        });
    }
    Ok(Outlier {
        consecutive_5xx: count(&format!("{field}.consecutive5xxErrors"), spec.consecutive_5xx_errors, 5)?,
        consecutive_gateway: count(
            &format!("{field}.consecutiveGatewayErrors"),
            spec.consecutive_gateway_errors,
            0,
        )?,
        interval,
        base_ejection: time("baseEjectionTime", &spec.base_ejection_time, Duration::from_secs(30))?,
        max_ejection_percent: percent,
    })
}

/// Compiles `spec`, found at `field`.
pub fn compile_policy(field: &str, spec: &TrafficPolicySpec) -> Result<PolicyLevels, RouteError> {
    let all_ports = fields(
        field,
        spec.load_balancer.as_ref(),
        spec.connection_pool.as_ref(),
        spec.outlier_detection.as_ref(),
    )?;
    let mut ports = BTreeMap::new();
    for (i, p) in spec.port_level_settings.iter().enumerate() {
        let field = format!("{field}.portLevelSettings[{i}]");
        let number = port(&format!("{field}.port.number"), p.port.number)?;
        let policy = fields(
            &field,
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
        )?;
        if ports.insert(number, policy).is_some() {
            return Err(RouteError::DuplicatePort {
                field: format!("{field}.port.number"),
                port: number,
            });
        }
    }
    Ok(PolicyLevels { all_ports, ports })
}

/// The three fields a policy and a port-level policy share, compiled.
fn fields(
    field: &str,
    load: Option<&LoadBalancerSpec>,
    connections: Option<&ConnectionPoolSpec>,
    outliers: Option<&OutlierDetectionSpec>,
) -> Result<TrafficPolicy, RouteError> {
    Ok(TrafficPolicy {
        load_balancer: load
            .map(|l| load_balancer(&format!("{field}.loadBalancer"), l))
            .transpose()?,
        pool: connections
            .map(|p| pool(&format!("{field}.connectionPool"), p))
            .transpose()?,
        outlier: outliers
            .map(|o| outlier(&format!("{field}.outlierDetection"), o))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(v: serde_json::Value) -> Result<TrafficPolicy, RouteError> {
        levels(v).map(|l| l.all_ports)
    }

    fn levels(v: serde_json::Value) -> Result<PolicyLevels, RouteError> {
        compile_policy("trafficPolicy", &serde_json::from_value(v).expect("parses"))
    }

    #[test]
    fn the_pool_bounds_requests_by_the_lower_of_its_limits() {
        let p = policy(serde_json::json!({"connectionPool": {
            "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 10}}}))
        .expect("compiles");
        assert_eq!(
            p.pool,
            Some(Pool {
                max_active: 1,
                max_pending: 1
            })
        );
        let unlimited =
            policy(serde_json::json!({"connectionPool": {"http": {"http2MaxRequests": 0}}})).expect("compiles");
        assert_eq!(
            unlimited.pool.map(|p| (p.max_active, p.max_pending)),
            Some((u32::MAX, u32::MAX))
        );
        let err = policy(serde_json::json!({"connectionPool": {"tcp": {"maxConnections": -1}}})).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "trafficPolicy.connectionPool.tcp.maxConnections: -1 is not a count"
        );
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_streak() {
        let o = policy(serde_json::json!({"outlierDetection": {"consecutive5xxErrors": 3}}))
            .expect("compiles")
            .outlier
            .expect("outlier");
        assert_eq!(
            (o.interval, o.base_ejection, o.max_ejection_percent),
            (Duration::from_secs(10), Duration::from_secs(30), 10)
        );
        let mut s = Streak::default();
        assert!(!o.observe(&mut s, Outcome::Status(500)));
        assert!(!o.observe(&mut s, Outcome::LocalFailure));
        assert!(!o.observe(&mut s, Outcome::Status(200)), "a success resets");
        assert!(!o.observe(&mut s, Outcome::Status(503)));
        assert!(!o.observe(&mut s, Outcome::Status(500)));
        assert!(o.observe(&mut s, Outcome::Status(502)), "the third in a row ejects");
        assert_eq!(s, Streak::default(), "and the streak starts again");
        assert!(!o.observe(&mut s, Outcome::Status(404)));
    }

    #[test]
    fn gateway_errors_count_only_502_to_504() {
        let o =
            policy(serde_json::json!({"outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2}}))
                .expect("compiles")
                .outlier
                .expect("outlier");
        let mut s = Streak::default();
        assert!(!o.observe(&mut s, Outcome::Status(500)));
        assert!(!o.observe(&mut s, Outcome::Status(500)), "500 is not a gateway error");
        assert!(!o.observe(&mut s, Outcome::Status(503)));
        assert!(o.observe(&mut s, Outcome::Status(504)));
    }

    #[test]
    fn ejections_grow_with_their_number_and_are_capped() {
        let o = policy(serde_json::json!({"outlierDetection": {"baseEjectionTime": "100s", "maxEjectionPercent": 50}}))
            .expect("compiles")
            .outlier
            .expect("outlier");
        assert_eq!(o.ejection_time(1), Duration::from_secs(100));
        assert_eq!(o.ejection_time(2), Duration::from_secs(200));
        assert_eq!(o.ejection_time(9), MAX_EJECTION_TIME);
        assert_eq!(o.max_ejected(3), 1);
        assert_eq!(o.max_ejected(10), 5);
        let none = Outlier {
            max_ejection_percent: 0,
            ..o
        };
        assert_eq!(none.max_ejected(10), 0);
        assert!(policy(serde_json::json!({"outlierDetection": {"maxEjectionPercent": 101}})).is_err());
        assert!(policy(serde_json::json!({"outlierDetection": {"interval": "0s"}})).is_err());
    }

    #[test]
    fn load_balancers_read_as_istio_writes_them() {
        let lb = |v: serde_json::Value| policy(serde_json::json!({"loadBalancer": v})).map(|p| p.load_balancer);
        assert_eq!(
            lb(serde_json::json!({"simple": "ROUND_ROBIN"})),
            Ok(Some(LoadBalancer::RoundRobin))
        );
        assert_eq!(
            lb(serde_json::json!({"simple": "RANDOM"})),
            Ok(Some(LoadBalancer::Random))
        );
        assert_eq!(
            lb(serde_json::json!({"consistentHash": {"httpHeaderName": "X-User"}})),
            Ok(Some(LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()))))
        );
        assert_eq!(
            lb(serde_json::json!({"consistentHash": {"useSourceIp": true}})),
            Ok(Some(LoadBalancer::ConsistentHash(HashKey::SourceIp)))
        );
        assert_eq!(
            lb(serde_json::json!({"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}})),
            Ok(Some(LoadBalancer::ConsistentHash(HashKey::Cookie(Cookie {
                name: "user".into(),
                path: None,
                ttl: Some(Duration::ZERO),
            }))))
        );
        for bad in [
            serde_json::json!({"simple": "MAGLEV"}),
            serde_json::json!({}),
            serde_json::json!({"consistentHash": {"httpHeaderName": "a", "useSourceIp": true}}),
            serde_json::json!({"consistentHash": {"httpHeaderName": "a", "httpCookie": {"name": "b"}}}),
            serde_json::json!({"consistentHash": {"httpCookie": {"name": "a b"}}}),
            serde_json::json!({"consistentHash": {"httpCookie": {"name": "a", "path": "/x;Domain=evil"}}}),
            serde_json::json!({"consistentHash": {"httpCookie": {"name": "a", "ttl": "soon"}}}),
        ] {
            assert!(lb(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn rendezvous_hashing_moves_only_the_keys_of_a_removed_endpoint() {
        let endpoints: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:80")).collect();
        let pick = |eps: &[String], key: &str| {
            rendezvous(key.as_bytes(), eps.iter().map(|e| e.as_bytes())).map(|i| eps[i].clone())
        };
        let keys: Vec<String> = (0..1000).map(|k| format!("user-{k}")).collect();
        let before: Vec<String> = keys.iter().filter_map(|k| pick(&endpoints, k)).collect();
        // Spread: every endpoint gets a fair share of 1000 keys.
        for e in &endpoints {
            let n = before.iter().filter(|b| *b == e).count();
            assert!((120..=280).contains(&n), "{e}: {n}");
        }
        let fewer: Vec<String> = endpoints.iter().filter(|e| *e != "10.0.0.3:80").cloned().collect();
        for (k, was) in keys.iter().zip(&before) {
            let now = pick(&fewer, k).expect("an endpoint");
            if was != "10.0.0.3:80" {
                assert_eq!(&now, was, "{k} moved though its endpoint stayed");
            }
        }
    }

    #[test]
    fn a_subset_policy_replaces_the_fields_it_sets() {
        let top = policy(serde_json::json!({"connectionPool": {"tcp": {"maxConnections": 5}},
                                             "outlierDetection": {"consecutive5xxErrors": 3}}))
        .expect("compiles");
        let subset = policy(serde_json::json!({"connectionPool": {"tcp": {"maxConnections": 1}}})).expect("compiles");
        let merged = top.clone().overridden_by(subset);
        assert_eq!(merged.pool.map(|p| p.max_active), Some(1));
        assert_eq!(merged.outlier, top.outlier);
    }

    #[test]
    fn a_port_level_policy_replaces_the_whole_policy_on_its_port() {
        let top = levels(serde_json::json!({
            "connectionPool": {"tcp": {"maxConnections": 5}},
            "outlierDetection": {"consecutive5xxErrors": 3},
            "portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "RANDOM"}}]}))
        .expect("compiles");
        assert_eq!(top.at_port(80).pool.map(|p| p.max_active), Some(5));
        let on_8080 = top.at_port(8080);
        assert_eq!(on_8080.load_balancer, Some(LoadBalancer::Random));
        // Not inherited: the defaults, as Istio documents.
        assert_eq!((on_8080.pool, on_8080.outlier), (None, None));
    }

    #[test]
    fn a_subset_merges_over_the_rules_policy_on_the_port_unless_it_has_its_own_for_it() {
        let top = levels(serde_json::json!({
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "portLevelSettings": [{"port": {"number": 8080}, "connectionPool": {"tcp": {"maxConnections": 2}}}]}))
        .expect("compiles");
        let subset = levels(serde_json::json!({
            "outlierDetection": {"consecutive5xxErrors": 1},
            "portLevelSettings": [{"port": {"number": 9090}, "loadBalancer": {"simple": "RANDOM"}}]}))
        .expect("compiles");
        let on_80 = subset.under(&top, 80);
        assert_eq!(on_80.load_balancer, Some(LoadBalancer::RoundRobin));
        assert_eq!(on_80.outlier.map(|o| o.consecutive_5xx), Some(1));
        let on_8080 = subset.under(&top, 8080);
        assert_eq!(on_8080.pool.map(|p| p.max_active), Some(2));
        assert_eq!(on_8080.load_balancer, None, "the rule's port policy replaced its own");
        assert_eq!(on_8080.outlier.map(|o| o.consecutive_5xx), Some(1));
        let on_9090 = subset.under(&top, 9090);
        assert_eq!(
            on_9090,
            TrafficPolicy {
                load_balancer: Some(LoadBalancer::Random),
                ..TrafficPolicy::default()
            }
        );
    }

    #[test]
    fn port_level_settings_name_a_port_once_and_a_real_one() {
        let twice = levels(serde_json::json!({"portLevelSettings": [
            {"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}},
            {"port": {"number": 80}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]}))
        .expect_err("refused");
        assert_eq!(
            twice.to_string(),
            "trafficPolicy.portLevelSettings[1].port.number: port 80 has a policy already"
        );
        let zero = levels(serde_json::json!({"portLevelSettings": [{"port": {"number": 0}}]})).expect_err("refused");
        assert_eq!(zero.reason(), "port");
        let bad = levels(serde_json::json!({"portLevelSettings": [
            {"port": {"number": 80}, "loadBalancer": {"simple": "MAGLEV"}}]}))
        .expect_err("refused");
        assert_eq!(
            bad.to_string(),
            "trafficPolicy.portLevelSettings[0].loadBalancer.simple: \"MAGLEV\" is not valid here"
        );
    }

    #[test]
    fn a_hash_cookie_is_read_among_others_and_set_only_with_a_ttl() {
        let cookie = |ttl: Option<Duration>, path: Option<&str>| Cookie {
            name: "user".into(),
            path: path.map(str::to_owned),
            ttl,
        };
        let c = cookie(Some(Duration::from_secs(3600)), Some("/"));
        assert_eq!(c.find(["a=1; user=\"abc\"", "b=2"]), Some("abc"));
        assert_eq!(c.find(["a=1", "user=xyz; b=2"]), Some("xyz"));
        assert_eq!(c.find(["users=1; a=user"]), None);
        assert_eq!(
            c.set("abc").as_deref(),
            Some("user=abc; Max-Age=3600; Path=/; HttpOnly")
        );
        assert_eq!(
            cookie(Some(Duration::ZERO), None).set("abc").as_deref(),
            Some("user=abc; HttpOnly"),
            "a session cookie"
        );
        assert_eq!(cookie(None, None).set("abc"), None);
    }
}
