//! Which identity a caller may obtain.
//!
//! Two tokens may come with a request. `authorization: Bearer <token>` is
//! the workload's own projected ServiceAccount token; it decides the
//! identity. `x-mizzen-agent-authorization: Bearer <token>` is the node
//! agent's, when the agent calls on a workload's behalf; it decides whether
//! the caller may forward workload tokens at all, and for which node. Both
//! are reviewed with [`mizzen_api::tokenreview`]; [`authorize`] is the pure
//! decision.

pub use mizzen_api::tokenreview::{AuthError, Authenticator, Reviewed, bearer};
use mizzen_api::{SpiffeId, TrustDomain};

/// The metadata key carrying the node agent's own token.
pub const AGENT_AUTHORIZATION: &str = "x-mizzen-agent-authorization";

/// Which callers may obtain which identities.
#[derive(Debug, Clone)]
pub struct Policy {
    pub trust_domain: TrustDomain,
    /// ServiceAccounts (`namespace/name`) trusted to forward workload tokens.
    pub trusted_agents: Vec<String>,
    /// Accept a workload calling with only its own token, as Istio's agent does.
    pub allow_direct: bool,
}

/// Why an authenticated caller may not have a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("calls without a node agent token are disabled (--allow-direct-workload-calls)")]
    DirectNotAllowed,
    #[error("{0} is not a trusted node agent")]
    UntrustedAgent(String),
    #[error(
        "the token of {0} is not bound to a pod on a node (a projected token is; `kubectl create token` \
         without --bound-object-kind Pod is not): agents may forward only pod-bound tokens"
    )]
    NotPodBound(String),
    #[error("workload pod is on node {workload:?} but the agent's token names no node")]
    AgentNodeUnknown { workload: String },
    #[error("workload pod is on node {workload:?}, not on the agent's node {agent:?}")]
    NodeMismatch { workload: String, agent: String },
    #[error("cannot form a SPIFFE ID for {0}: {1}")]
    BadIdentity(String, String),
}

impl Denied {
    /// A short stable name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Denied::DirectNotAllowed => "direct_not_allowed",
            Denied::UntrustedAgent(_) => "untrusted_agent",
            Denied::NotPodBound(_) => "not_pod_bound",
            Denied::AgentNodeUnknown { .. } => "agent_node_unknown",
            Denied::NodeMismatch { .. } => "node_mismatch",
            Denied::BadIdentity(..) => "bad_identity",
        }
    }
}

/// Whether a call from `agent` (or directly, without one) may go on to
/// have its workload token reviewed at all. The CA asks this before
/// reviewing the workload's token, so callers that are not trusted agents
/// cost at most one review.
pub fn admit_caller(agent: Option<&Reviewed>, policy: &Policy) -> Result<(), Denied> {
    match agent {
        None if !policy.allow_direct => Err(Denied::DirectNotAllowed),
        Some(agent) if !policy.trusted_agents.iter().any(|t| *t == agent.name()) => {
            Err(Denied::UntrustedAgent(agent.name()))
        }
        _ => Ok(()),
    }
}

/// Decides the identity to certify for `workload`, called directly or
/// through `agent`.
pub fn authorize(workload: &Reviewed, agent: Option<&Reviewed>, policy: &Policy) -> Result<SpiffeId, Denied> {
    admit_caller(agent, policy)?;
    match agent {
        None => {}
        Some(agent) => {
            // A token minted by hand (`kubectl create token`) names no pod
            // and no node, so nothing would tie it to the agent's node.
            let Some(node) = &workload.node_name else {
                return Err(Denied::NotPodBound(workload.name()));
            };
            match &agent.node_name {
                None => {
                    return Err(Denied::AgentNodeUnknown { workload: node.clone() });
                }
                Some(a) if a != node => {
                    return Err(Denied::NodeMismatch {
                        workload: node.clone(),
                        agent: a.clone(),
                    });
                }
                Some(_) => {}
            }
        }
    }
    SpiffeId::workload(&policy.trust_domain, &workload.namespace, &workload.service_account)
        .map_err(|e| Denied::BadIdentity(workload.name(), e.to_string()))
}

#[cfg(test)]
mod tests;
