//! Authorization and peer authentication of inbound traffic, from the
//! workload policy the agent pushes (`mizzen.discovery.v1.WorkloadPolicy`):
//! - [`decode`]: the resource compiled, all or nothing (a policy that does
//!   not parse or compile rejects the update, which is NACKed);
//! - [`Policy`]: decisions on connections (TCP ports) and requests (HTTP),
//!   by [`mizzen_api::authz::evaluate`], counted by policy, action and
//!   result;
//! - [`enforce_changes`]: when the policy changes, every open inbound
//!   connection and HTTP request is decided again and those no longer
//!   allowed are closed (Istio's sidecar leaves them open; we do not).
//!
//! Until the first policy arrives there is nothing to decide with, and the
//! inbound side refuses every connection (fail closed).

use std::net::SocketAddr;
use std::sync::Arc;

use mizzen_api::SpiffeId;
use mizzen_api::authz::compile::{CompileError, compile_spec};
use mizzen_api::authz::path::{PathError, normalize};
use mizzen_api::authz::peer::{Effective, Mode};
use mizzen_api::authz::{CompiledPolicy, Connection, Decision, Request, evaluate};
use mizzen_api::policy::AuthorizationPolicySpec;
use mizzen_api::proto::discovery as pb;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::drain::{ConnInfo, Connections, StreamInfo};
use crate::metrics::{Direction, Labels};

/// The policy in force; `None` until the agent sent the first one.
pub type PolicyRx = watch::Receiver<Option<Arc<Policy>>>;

/// Why a workload policy was rejected (NACKed).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {policy}: its spec is not valid JSON of the CRD's schema: {error}")]
    Spec { policy: String, error: serde_json::Error },
    #[error("policy {policy}: {error}")]
    Compile { policy: String, error: CompileError },
    #[error("mTLS mode {0} is not one this proxy knows")]
    Mode(i32),
}

/// A workload's authorization policies and peer authentication, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub authz: Vec<CompiledPolicy>,
    pub peer: Effective,
}

fn mode(m: i32) -> Result<Mode, PolicyError> {
    match pb::MtlsMode::try_from(m) {
        Ok(pb::MtlsMode::Permissive) => Ok(Mode::Permissive),
        Ok(pb::MtlsMode::Strict) => Ok(Mode::Strict),
        Ok(pb::MtlsMode::Disable) => Ok(Mode::Disable),
        Ok(pb::MtlsMode::Unspecified) | Err(_) => Err(PolicyError::Mode(m)),
    }
}

/// Compiles a workload policy, or says why it cannot be enforced.
pub fn decode(p: &pb::WorkloadPolicy) -> Result<Policy, PolicyError> {
    let authz = p
        .authorization
        .iter()
        .map(|a| {
            let spec: AuthorizationPolicySpec =
                serde_json::from_str(&a.spec_json).map_err(|error| PolicyError::Spec {
                    policy: a.name.clone(),
                    error,
                })?;
            compile_spec(a.name.clone(), &spec).map_err(|error| PolicyError::Compile {
                policy: a.name.clone(),
                error,
            })
        })
        .collect::<Result<_, _>>()?;
    let ports = p
        .port_mtls
        .iter()
        .map(|(port, m)| Ok((u16::try_from(*port).map_err(|_| PolicyError::Mode(*m))?, mode(*m)?)))
        .collect::<Result<_, PolicyError>>()?;
    Ok(Policy {
        authz,
        peer: Effective {
            mode: mode(p.mtls)?,
            ports,
        },
    })
}

/// An HTTP request's facts, owned, as authorisation reads them.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub method: String,
    /// Normalised ([`normalize`]).
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
}

impl RequestFacts {
    /// From a request's parts; a path that cannot be normalised is an
    /// error (and the request is denied).
    pub fn of(parts: &hyper::http::request::Parts) -> Result<Self, PathError> {
        let path = normalize(parts.uri.path())?;
        let host = crate::http::headers::authority(&parts.uri, &parts.headers)
            .unwrap_or_default()
            .to_owned();
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok(Self {
            method: parts.method.as_str().to_owned(),
            path,
            host,
            headers,
        })
    }

    fn as_request(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            host: &self.host,
            headers: &self.headers,
        }
    }
}

/// The connection facts of an inbound connection.
pub fn connection<'a>(peer: SocketAddr, dst: SocketAddr, identity: Option<&'a SpiffeId>) -> Connection<'a> {
    Connection {
        peer: identity,
        source_ip: peer.ip(),
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        sni: None,
    }
}

impl Policy {
    /// Whether any authorization policy applies (if not, everything is
    /// allowed and requests need not be read).
    pub fn authorizes(&self) -> bool {
        !self.authz.is_empty()
    }

    /// Decides a connection on a TCP port.
    pub fn connection(&self, c: &Connection<'_>) -> Decision {
        evaluate(&self.authz, c, None)
    }

    /// Decides an HTTP request.
    pub fn request(&self, c: &Connection<'_>, r: &RequestFacts) -> Decision {
        evaluate(&self.authz, c, Some(&r.as_request()))
    }

    /// Whether plaintext is accepted on the workload's `port`.
    pub fn accepts_plaintext(&self, port: u16) -> bool {
        self.peer.on(port).accepts_plaintext()
    }
}

/// Decisions, by policy, action and result.
#[derive(Debug, Clone, Default)]
pub struct AuthzMetrics {
    decisions: Family<Labels, Counter>,
    /// Connections and requests closed because a new policy denies them.
    revoked: Family<Labels, Counter>,
}

impl AuthzMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "authz_decisions",
            "Authorization decisions, by deciding policy (none: no policy decided), action and result",
            self.decisions.clone(),
        );
        r.register(
            "authz_revoked",
            "Open connections (kind=connection) and requests in flight (kind=request) closed because a new policy denies them",
            self.revoked.clone(),
        );
    }

    fn count(&self, policy: &str, action: &'static str, result: &'static str) {
        self.decisions
            .get_or_create(&vec![
                ("policy", policy.to_owned()),
                ("action", action.into()),
                ("result", result.into()),
            ])
            .inc();
    }

    /// Counts `d` (and every AUDIT policy that matched).
    fn record(&self, d: &Decision) {
        let audited = match d {
            Decision::Allow { audited } => {
                self.count("none", "ALLOW", "allowed");
                audited
            }
            Decision::Deny {
                policy: Some(p),
                audited,
                ..
            } => {
                self.count(p, "DENY", "denied");
                audited
            }
            Decision::Deny {
                policy: None, audited, ..
            } => {
                self.count("none", "ALLOW", "denied");
                audited
            }
        };
        for p in audited {
            self.count(p, "AUDIT", "audited");
        }
    }

    /// Counts a request denied because its path cannot be normalised.
    pub fn unreadable(&self) {
        self.count("none", "NONE", "unreadable");
    }

    /// Decides a new connection on a TCP port (`request` `None`) or a
    /// request under `policy`; counts the decision and logs a denial.
    pub fn decide(
        &self,
        policy: &Policy,
        (peer, dst): (SocketAddr, SocketAddr),
        identity: Option<&SpiffeId>,
        request: Option<&RequestFacts>,
    ) -> Decision {
        let c = connection(peer, dst, identity);
        let decision = match request {
            Some(r) => policy.request(&c, r),
            None => policy.connection(&c),
        };
        self.record(&decision);
        log_denial(
            &decision,
            peer,
            dst,
            identity,
            request.map_or("connection", |r| r.path.as_str()),
        );
        decision
    }

    fn revoked(&self, kind: &'static str, n: usize) {
        self.revoked
            .get_or_create(&vec![("kind", kind.into())])
            .inc_by(n as u64);
    }
}

/// Logs a denial with the policy and rule that decided it.
fn log_denial(d: &Decision, peer: SocketAddr, dst: SocketAddr, identity: Option<&SpiffeId>, what: &str) {
    if let Decision::Deny {
        policy, rule, reason, ..
    } = d
    {
        info!(%peer, %dst, identity = ?identity.map(SpiffeId::as_str), policy = policy.as_deref().unwrap_or("none"),
            rule = ?rule, reason = reason.as_str(), what, "denied by authorization policy");
    }
}

fn still_allowed_connection(policy: &Policy, c: &ConnInfo) -> bool {
    let Some(dst) = c.dst else { return true };
    if c.identity.is_none() && !policy.accepts_plaintext(dst.port()) {
        return false;
    }
    // HTTP connections are decided per request.
    c.http
        || policy
            .connection(&connection(c.peer, dst, c.identity.as_ref()))
            .allowed()
}

fn still_allowed_request(policy: &Policy, s: &StreamInfo) -> bool {
    if !policy.authorizes() {
        return true;
    }
    // A request that arrived while no policy applied was not read in
    // full: it is decided on its method, path and authority (a header
    // condition sees no header).
    let read;
    let facts = match &s.facts {
        Some(f) => f,
        None => {
            let path = s.path.split(['?', '#']).next().unwrap_or_default();
            let Ok(path) = normalize(path) else { return false };
            read = RequestFacts {
                method: s.method.clone(),
                path,
                host: s.authority.clone().unwrap_or_default(),
                headers: Vec::new(),
            };
            &read
        }
    };
    policy
        .request(&connection(s.peer, s.dst, s.identity.as_ref()), facts)
        .allowed()
}

/// Decides every open inbound connection and request again under
/// `policy` and closes those it no longer allows; returns how many.
pub fn reevaluate(policy: &Policy, registry: &Connections, metrics: &AuthzMetrics) -> (usize, usize) {
    let conns = registry.close_where(|c| c.direction == Direction::Inbound && !still_allowed_connection(policy, c));
    let streams =
        registry.close_streams_where(|s| s.direction == Direction::Inbound && !still_allowed_request(policy, s));
    metrics.revoked("connection", conns);
    metrics.revoked("request", streams);
    (conns, streams)
}

/// Re-evaluates what is open each time the policy changes, forever.
pub async fn enforce_changes(mut rx: PolicyRx, registry: Connections, metrics: AuthzMetrics) {
    while rx.changed().await.is_ok() {
        let Some(policy) = rx.borrow_and_update().clone() else {
            continue;
        };
        let (conns, streams) = reevaluate(&policy, &registry, &metrics);
        if conns + streams > 0 {
            warn!(
                connections = conns,
                requests = streams,
                "closed what the new policy denies"
            );
        }
    }
}

#[cfg(test)]
mod tests;
