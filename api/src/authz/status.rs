//! The `Accepted` condition of a policy's `status`: whether Mizzen
//! enforces the policy exactly as written, and if not, why, and what it
//! enforces instead (an authorization policy that cannot be compiled fails
//! closed, see [`compile::fail_closed`](super::compile::fail_closed)).
//!
//! Pure: the CA reads each policy, asks [`next`] for the status it should
//! carry and writes it only when that differs from what is there, so that
//! its own writes (which it sees again through its watch) settle at once.

use crate::policy::{Action, AuthorizationPolicy, PeerAuthentication, PolicyStatus, StatusCondition};

use super::compile::compile;
use super::peer;

/// The condition type.
pub const ACCEPTED: &str = "Accepted";

/// What Mizzen makes of one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Enforced as written.
    Accepted,
    /// Not enforced as written.
    Rejected {
        /// CamelCase, e.g. `UnsupportedConditionKey`.
        reason: String,
        /// The problem, naming the field, and what is enforced instead.
        message: String,
    },
}

impl Verdict {
    /// The metric label: `accepted` or the snake_case reason.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Rejected { .. } => "rejected",
        }
    }
}

/// `bad_ip_block` → `BadIpBlock`.
pub(crate) fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The verdict on an `AuthorizationPolicy`.
pub fn of_authorization(p: &AuthorizationPolicy) -> Verdict {
    match compile(p) {
        Ok(_) => Verdict::Accepted,
        Err(e) => {
            let instead = match p.spec.action.unwrap_or_default() {
                Action::Allow => "an ALLOW policy that allows nothing",
                Action::Deny | Action::Custom => "a DENY of every request",
                Action::Audit => "an AUDIT policy that audits nothing",
            };
            Verdict::Rejected {
                reason: camel(e.reason()),
                message: format!("{e}; until it is fixed, the selected workloads enforce {instead}"),
            }
        }
    }
}

/// The verdict on a `PeerAuthentication`.
pub fn of_peer_authentication(p: &PeerAuthentication) -> Verdict {
    match peer::check(&p.spec) {
        Ok(()) => Verdict::Accepted,
        Err(e) => Verdict::Rejected {
            reason: camel(e.reason()),
            message: format!("{e}; that entry is ignored, so the port keeps the workload's mode"),
        },
    }
}

/// The status a policy at `generation` should carry given `verdict`, or
/// `None` when `current` already says so. `now` (RFC 3339) becomes the
/// transition time only when the condition's status changes.
pub fn next(
    current: Option<&PolicyStatus>,
    verdict: &Verdict,
    generation: Option<i64>,
    now: &str,
) -> Option<PolicyStatus> {
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    let (status, reason, message) = match verdict {
        Verdict::Accepted => ("True", ACCEPTED.to_owned(), "enforced as written".to_owned()),
        Verdict::Rejected { reason, message } => ("False", reason.clone(), message.clone()),
    };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(now.to_owned()),
    };
    let wanted = StatusCondition {
        type_: ACCEPTED.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        observed_generation: generation,
        last_transition_time,
    };
    if previous == Some(&wanted) {
        return None;
    }
    let mut conditions: Vec<StatusCondition> = current
        .map(|s| s.conditions.iter().filter(|c| c.type_ != ACCEPTED).cloned().collect())
        .unwrap_or_default();
    conditions.push(wanted);
    Some(PolicyStatus { conditions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AuthorizationPolicySpec, Condition, MtlsMode, MutualTls, PeerAuthenticationSpec, Rule};

    fn authz(action: Action, when_key: &str) -> AuthorizationPolicy {
        let mut p = AuthorizationPolicy::new(
            "p",
            AuthorizationPolicySpec {
                action: Some(action),
                rules: vec![Rule {
                    when: vec![Condition {
                        key: when_key.to_owned(),
                        values: vec!["x".to_owned()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        p.metadata.namespace = Some("demo".to_owned());
        p
    }

    #[test]
    fn reasons_are_camel_case() {
        for (snake, camel_case) in [
            ("bad_ip_block", "BadIpBlock"),
            ("custom_unsupported", "CustomUnsupported"),
            ("x", "X"),
        ] {
            assert_eq!(camel(snake), camel_case);
        }
    }

    #[test]
    fn verdicts_name_the_problem_and_what_is_enforced_instead() {
        assert_eq!(
            of_authorization(&authz(Action::Allow, "source.namespace")),
            Verdict::Accepted
        );
        for (action, instead) in [
            (Action::Allow, "allows nothing"),
            (Action::Deny, "DENY of every request"),
            (Action::Audit, "audits nothing"),
        ] {
            let Verdict::Rejected { reason, message } = of_authorization(&authz(action, "source.user")) else {
                panic!("{action:?} with an unsupported key is accepted");
            };
            assert_eq!(reason, "UnsupportedConditionKey");
            assert!(message.contains("source.user"), "{message}");
            assert!(message.contains(instead), "{action:?}: {message}");
        }
        let mut pa = PeerAuthentication::new("pa", PeerAuthenticationSpec::default());
        assert_eq!(of_peer_authentication(&pa), Verdict::Accepted);
        pa.spec.port_level_mtls = [("http".to_owned(), MutualTls { mode: MtlsMode::Strict })].into();
        assert!(matches!(of_peer_authentication(&pa), Verdict::Rejected { reason, .. } if reason == "BadPort"));
    }

    #[test]
    fn next_writes_only_what_changed_and_keeps_the_transition_time() {
        let first = next(None, &Verdict::Accepted, Some(1), "t1").expect("a first status");
        let c = &first.conditions[0];
        assert_eq!((c.status.as_str(), c.observed_generation), ("True", Some(1)));
        assert_eq!(c.last_transition_time.as_deref(), Some("t1"));
        assert_eq!(
            next(Some(&first), &Verdict::Accepted, Some(1), "t2"),
            None,
            "nothing changed"
        );

        let second = next(Some(&first), &Verdict::Accepted, Some(2), "t2").expect("a new generation");
        assert_eq!(second.conditions[0].observed_generation, Some(2));
        assert_eq!(
            second.conditions[0].last_transition_time.as_deref(),
            Some("t1"),
            "status did not change"
        );

        let rejected = Verdict::Rejected {
            reason: "BadPort".to_owned(),
            message: "m".to_owned(),
        };
        let third = next(Some(&second), &rejected, Some(3), "t3").expect("rejected");
        assert_eq!(third.conditions.len(), 1);
        let c = &third.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BadPort"));
        assert_eq!(c.last_transition_time.as_deref(), Some("t3"));
    }

    #[test]
    fn next_keeps_conditions_of_other_types() {
        let other = StatusCondition {
            type_: "Other".to_owned(),
            status: "True".to_owned(),
            reason: "R".to_owned(),
            ..Default::default()
        };
        let current = PolicyStatus {
            conditions: vec![other.clone()],
        };
        let out = next(Some(&current), &Verdict::Accepted, Some(1), "t").expect("added");
        assert_eq!(out.conditions.len(), 2);
        assert_eq!(out.conditions[0], other);
    }
}
