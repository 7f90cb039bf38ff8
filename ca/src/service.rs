//! The gRPC service: Istio's `CreateCertificate`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mizzen_api::proto::istio_ca::istio_certificate_service_server::IstioCertificateService;
use mizzen_api::proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{self, AGENT_AUTHORIZATION, AuthError, Authenticator, Policy};
use crate::authority::Authority;
use crate::csr::{self, Reject};
use crate::metrics::Metrics;

/// Lifetimes of issued certificates.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    /// Used when the request asks for none.
    pub default: Duration,
    /// Requests for more are clamped to this.
    pub max: Duration,
}

impl Ttls {
    /// The lifetime to issue for a request's `validity_duration` (seconds).
    pub fn for_request(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            self.default.min(self.max)
        } else {
            Duration::from_secs(requested_secs as u64).min(self.max)
        }
    }
}

/// The CA's gRPC service.
#[derive(Debug)]
pub struct CaService {
    pub authority: Arc<Authority>,
    /// Reviews node agents' tokens (cached: a few agents call often).
    pub agents: Arc<Authenticator>,
    /// Reviews workload tokens, only for callers already admitted: a flood
    /// of unauthenticated calls cannot take the reviews legitimate
    /// issuance needs.
    pub workloads: Arc<Authenticator>,
    pub policy: Policy,
    pub ttls: Ttls,
    pub metrics: Arc<Metrics>,
}

fn auth_status(e: &AuthError) -> Status {
    match e {
        AuthError::Unavailable(_) | AuthError::Overloaded => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn csr_status(e: &Reject) -> Status {
    match e {
        Reject::WrongIdentity { .. } | Reject::ExtraSans(_) | Reject::CaRequested => {
            Status::permission_denied(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl CaService {
    async fn review(&self, reviewer: &Authenticator, token: &str) -> Result<auth::Reviewed, AuthError> {
        let (r, asked) = reviewer.review_timed(token).await;
        // Only the reviews the API server did: cache hits and tokens
        // refused before a review cost it nothing.
        if let Some(took) = asked {
            self.metrics.token_review_seconds.observe(took.as_secs_f64());
        }
        r
    }

    fn reject(&self, reason: &'static str, status: Status, caller: &str) -> Status {
        self.metrics.reject(reason);
        warn!(%caller, reason, message = status.message(), "refused CreateCertificate");
        status
    }
}

fn metadata_str<'a>(req: &'a Request<IstioCertificateRequest>, key: &str) -> Result<Option<&'a str>, ()> {
    match req.metadata().get(key) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let workload_header = metadata_str(&request, "authorization").map_err(|_| {
            self.reject(
                "token_malformed",
                Status::unauthenticated("authorization is not ASCII"),
                &peer,
            )
        })?;
        let agent_header = metadata_str(&request, AGENT_AUTHORIZATION).map_err(|_| {
            self.reject(
                "token_malformed",
                Status::unauthenticated("agent authorization is not ASCII"),
                &peer,
            )
        })?;
        let workload_token = auth::bearer("authorization", workload_header)
            .map_err(|e| self.reject(e.label(), auth_status(&e), &peer))?;
        let agent_token = agent_header
            .map(|h| auth::bearer(AGENT_AUTHORIZATION, Some(h)))
            .transpose()
            .map_err(|e| self.reject(e.label(), auth_status(&e), &peer))?;

        // The agent first: a caller that is not a trusted agent costs at
        // most one review (none for garbage), and never one of a workload's.
        let agent = match &agent_token {
            Some(t) => Some(
                self.review(&self.agents, t)
                    .await
                    .map_err(|e| self.reject(e.label(), auth_status(&e), &format!("{peer} (agent token)")))?,
            ),
            None => None,
        };
        auth::admit_caller(agent.as_ref(), &self.policy)
            .map_err(|e| self.reject(e.label(), Status::permission_denied(e.to_string()), &peer))?;
        let workload = self
            .review(&self.workloads, &workload_token)
            .await
            .map_err(|e| self.reject(e.label(), auth_status(&e), &peer))?;
        let caller = match &agent {
            Some(a) => format!("agent {} on {}", a.name(), a.node_name.as_deref().unwrap_or("?")),
            None => format!("workload {} at {peer}", workload.name()),
        };
        let id = auth::authorize(&workload, agent.as_ref(), &self.policy)
            .map_err(|e| self.reject(e.label(), Status::permission_denied(e.to_string()), &caller))?;

        let start = Instant::now();
        let req = request.into_inner();
        let signing = csr::check(&req.csr, &id).map_err(|e| self.reject(e.label(), csr_status(&e), &caller))?;
        let ttl = self.ttls.for_request(req.validity_duration);
        let issued = self
            .authority
            .sign(&signing, ttl)
            .map_err(|e| self.reject("signing_failed", Status::internal(format!("cannot sign: {e}")), &caller))?;
        self.metrics.signing_seconds.observe(start.elapsed().as_secs_f64());
        self.metrics.issued.inc();
        let not_after = issued
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        info!(
            target: "audit",
            identity = %id,
            serial = %issued.serial_hex,
            not_after_unix = not_after,
            pod = workload.pod_name.as_deref().unwrap_or(""),
            node = workload.node_name.as_deref().unwrap_or(""),
            %caller,
            "issued certificate"
        );
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_and_clamps() {
        let t = Ttls {
            default: Duration::from_secs(86_400),
            max: Duration::from_secs(2 * 86_400),
        };
        assert_eq!(t.for_request(0), Duration::from_secs(86_400));
        assert_eq!(t.for_request(-5), Duration::from_secs(86_400));
        assert_eq!(t.for_request(30), Duration::from_secs(30));
        assert_eq!(t.for_request(i64::MAX), Duration::from_secs(2 * 86_400));
    }
}
