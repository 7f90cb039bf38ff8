//! `AuthorizationPolicy` resources compiled into [`CompiledPolicy`], once
//! per change, with every field checked: what the mesh cannot enforce is
//! refused by name (at admission, and again here), never ignored.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::eval::{
    CompiledPolicy, ConditionKey, ConditionMatch, ConditionValues, Field, OperationMatch, PolicyAction, RuleMatch,
    SourceMatch, StringMatch,
};
use crate::policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, Operation, Rule, Source, WorkloadSelector,
};

/// Why a policy cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("action CUSTOM is not supported yet (no external authorizers)")]
    Custom,
    #[error("{0} needs RequestAuthentication (JWT), which Mizzen does not support yet")]
    RequestAuthentication(&'static str),
    #[error("{field}: {value:?} is not an IP address or CIDR block")]
    IpBlock { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a port number")]
    Port { field: &'static str, value: String },
    #[error("when: key {0:?} is not supported")]
    ConditionKey(String),
    #[error("when: {0:?} has neither values nor notValues")]
    EmptyCondition(String),
}

impl CompileError {
    /// The metric label / admission reason.
    pub fn reason(&self) -> &'static str {
        match self {
            CompileError::Custom => "custom_unsupported",
            CompileError::RequestAuthentication(_) => "request_authentication_unsupported",
            CompileError::IpBlock { .. } => "bad_ip_block",
            CompileError::Port { .. } => "bad_port",
            CompileError::ConditionKey(_) => "unsupported_condition_key",
            CompileError::EmptyCondition(_) => "empty_condition",
        }
    }
}

fn patterns(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|s| StringMatch::parse(s)).collect()
}

fn string_field(any: &[String], none: &[String]) -> Field<StringMatch> {
    Field {
        any_of: (!any.is_empty()).then(|| patterns(any)),
        none_of: patterns(none),
    }
}

fn host_field(any: &[String], none: &[String]) -> Field<StringMatch> {
    let lower = |l: &[String]| l.iter().map(|s| StringMatch::parse(s).lowercase()).collect::<Vec<_>>();
    Field {
        any_of: (!any.is_empty()).then(|| lower(any)),
        none_of: lower(none),
    }
}

/// An address is a /32 (or /128) block.
fn ip_block(field: &'static str, s: &str) -> Result<IpNet, CompileError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| CompileError::IpBlock {
            field,
            value: s.to_owned(),
        })
}

fn ip_field(field: &'static str, any: &[String], none: &[String]) -> Result<Field<IpNet>, CompileError> {
    let parse = |l: &[String]| l.iter().map(|s| ip_block(field, s)).collect::<Result<Vec<_>, _>>();
    Ok(Field {
        any_of: if any.is_empty() { None } else { Some(parse(any)?) },
        none_of: parse(none)?,
    })
}

fn port_field(any: &[String], none: &[String]) -> Result<Field<u16>, CompileError> {
    let parse = |field: &'static str, l: &[String]| {
        l.iter()
            .map(|s| {
                s.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| CompileError::Port {
                        field,
                        value: s.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Field {
        any_of: if any.is_empty() {
            None
        } else {
            Some(parse("ports", any)?)
        },
        none_of: parse("notPorts", none)?,
    })
}

fn source(s: &Source) -> Result<SourceMatch, CompileError> {
    if !s.request_principals.is_empty() {
        return Err(CompileError::RequestAuthentication("requestPrincipals"));
    }
    if !s.not_request_principals.is_empty() {
        return Err(CompileError::RequestAuthentication("notRequestPrincipals"));
    }
    Ok(SourceMatch {
        principals: string_field(&s.principals, &s.not_principals),
        namespaces: string_field(&s.namespaces, &s.not_namespaces),
        ip_blocks: ip_field("ipBlocks", &s.ip_blocks, &s.not_ip_blocks)?,
        remote_ip_blocks: ip_field("remoteIpBlocks", &s.remote_ip_blocks, &s.not_remote_ip_blocks)?,
    })
}

fn operation(o: &Operation) -> Result<OperationMatch, CompileError> {
    Ok(OperationMatch {
        hosts: host_field(&o.hosts, &o.not_hosts),
        ports: port_field(&o.ports, &o.not_ports)?,
        methods: string_field(&o.methods, &o.not_methods),
        paths: string_field(&o.paths, &o.not_paths),
    })
}

fn condition(c: &Condition) -> Result<ConditionMatch, CompileError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(CompileError::EmptyCondition(c.key.clone()));
    }
    let key = match c.key.as_str() {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "connection.sni" => ConditionKey::ConnectionSni,
        k if k.starts_with("request.auth.") => return Err(CompileError::RequestAuthentication("request.auth.*")),
        k => match k.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
            Some(name) if !name.is_empty() => ConditionKey::RequestHeader(name.to_ascii_lowercase()),
            _ => return Err(CompileError::ConditionKey(c.key.clone())),
        },
    };
    let values = match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            ConditionValues::Ips(ip_field("when", &c.values, &c.not_values)?)
        }
        ConditionKey::DestinationPort => {
            port_field(&c.values, &c.not_values)?;
            ConditionValues::Strings(string_field(&c.values, &c.not_values))
        }
        _ => ConditionValues::Strings(string_field(&c.values, &c.not_values)),
    };
    Ok(ConditionMatch { key, values })
}

/// Compiles `p`, or says what in it cannot be enforced.
pub fn compile(p: &AuthorizationPolicy) -> Result<CompiledPolicy, CompileError> {
    compile_spec(name_of(p), &p.spec)
}

/// `<namespace>/<name>` of `p`.
pub fn name_of(p: &AuthorizationPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Compiles a policy's `spec`, naming it `name`.
pub fn compile_spec(name: String, spec: &AuthorizationPolicySpec) -> Result<CompiledPolicy, CompileError> {
    let action = match spec.action.unwrap_or_default() {
        Action::Allow => PolicyAction::Allow,
        Action::Deny => PolicyAction::Deny,
        Action::Audit => PolicyAction::Audit,
        Action::Custom => return Err(CompileError::Custom),
    };
    let rules = spec
        .rules
        .iter()
        .map(|r| {
            Ok(RuleMatch {
                from: r.from.iter().map(|f| source(&f.source)).collect::<Result<_, _>>()?,
                to: r.to.iter().map(|t| operation(&t.operation)).collect::<Result<_, _>>()?,
                when: r.when.iter().map(condition).collect::<Result<_, _>>()?,
            })
        })
        .collect::<Result<_, CompileError>>()?;
    Ok(CompiledPolicy { name, action, rules })
}

/// What stands in for a policy that cannot be compiled, so that it fails
/// closed: an ALLOW policy allows nothing (yet still makes the workload
/// deny what no other ALLOW policy allows); a DENY or CUSTOM policy denies
/// everything; an AUDIT policy audits nothing (it never decides).
pub fn fail_closed(spec: &AuthorizationPolicySpec) -> AuthorizationPolicySpec {
    match spec.action.unwrap_or_default() {
        Action::Allow => AuthorizationPolicySpec {
            action: Some(Action::Allow),
            ..Default::default()
        },
        Action::Audit => AuthorizationPolicySpec {
            action: Some(Action::Audit),
            ..Default::default()
        },
        Action::Deny | Action::Custom => AuthorizationPolicySpec {
            action: Some(Action::Deny),
            rules: vec![Rule::default()],
            ..Default::default()
        },
    }
}

/// Whether a policy in `policy_namespace` with `selector` applies to a
/// workload in `namespace` labelled `labels`: mesh-wide from the root
/// namespace, otherwise within its namespace, narrowed by the selector.
pub fn applies(
    policy_namespace: &str,
    selector: Option<&WorkloadSelector>,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    (policy_namespace == root_namespace || policy_namespace == namespace)
        && selector.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}
