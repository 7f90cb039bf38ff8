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
    #[error("{field}: an empty value never matches")]
    EmptyValue { field: &'static str },
    #[error("{field}: {value:?}: `*` may only stand alone, begin a value (suffix match) or end it (prefix match)")]
    Wildcard { field: &'static str, value: String },
    #[error(
        "{field}: {value:?}: write principals without `spiffe://`, as `<trust-domain>/ns/<namespace>/sa/<account>`"
    )]
    SpiffePrincipal { field: &'static str, value: String },
    #[error("{field}: {value:?} is not a namespace name (lower-case letters, digits and `-`)")]
    Namespace { field: &'static str, value: String },
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
            CompileError::EmptyValue { .. } => "empty_value",
            CompileError::Wildcard { .. } => "bad_wildcard",
            CompileError::SpiffePrincipal { .. } => "spiffe_principal",
            CompileError::Namespace { .. } => "bad_namespace",
        }
    }
}

/// A field's name and its `not*` twin, for error messages.
type Names = (&'static str, &'static str);

/// What a string field holds, for the checks beyond Istio's wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    /// Istio's principal form, `<trust-domain>/ns/<ns>/sa/<sa>`.
    Principal,
    /// A namespace name (a DNS label).
    Namespace,
    /// Compared case-insensitively.
    Host,
}

/// One string value as a pattern. Refused rather than read literally,
/// since each would never match and so silently narrow a DENY: an empty
/// value, a `*` anywhere but at one end, a principal written with
/// `spiffe://`, a namespace that is not a DNS label.
fn pattern(field: &'static str, kind: Kind, s: &str) -> Result<StringMatch, CompileError> {
    let value = || s.to_owned();
    if s.is_empty() {
        return Err(CompileError::EmptyValue { field });
    }
    let inner = s.strip_prefix('*').unwrap_or(s);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if s != "*" && (inner.contains('*') || (s.starts_with('*') && s.ends_with('*'))) {
        return Err(CompileError::Wildcard { field, value: value() });
    }
    match kind {
        Kind::Principal if s.starts_with("spiffe://") => {
            return Err(CompileError::SpiffePrincipal { field, value: value() });
        }
        Kind::Namespace
            if !inner
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
        {
            return Err(CompileError::Namespace { field, value: value() });
        }
        _ => {}
    }
    let m = StringMatch::parse(s);
    Ok(if kind == Kind::Host { m.lowercase() } else { m })
}

/// A field and its `not*` twin, each value read by `one`. An empty list
/// is an absent field.
fn field<T>(
    names: Names,
    any: &[String],
    none: &[String],
    one: impl Fn(&'static str, &str) -> Result<T, CompileError>,
) -> Result<Field<T>, CompileError> {
    let list = |name, l: &[String]| l.iter().map(|s| one(name, s)).collect::<Result<Vec<_>, _>>();
    Ok(Field {
        any_of: if any.is_empty() {
            None
        } else {
            Some(list(names.0, any)?)
        },
        none_of: list(names.1, none)?,
    })
}

fn string_field(names: Names, kind: Kind, any: &[String], none: &[String]) -> Result<Field<StringMatch>, CompileError> {
    field(names, any, none, |name, s| pattern(name, kind, s))
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

fn port(field: &'static str, s: &str) -> Result<u16, CompileError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| CompileError::Port {
            field,
            value: s.to_owned(),
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
        principals: string_field(
            ("principals", "notPrincipals"),
            Kind::Principal,
            &s.principals,
            &s.not_principals,
        )?,
        namespaces: string_field(
            ("namespaces", "notNamespaces"),
            Kind::Namespace,
            &s.namespaces,
            &s.not_namespaces,
        )?,
        ip_blocks: field(("ipBlocks", "notIpBlocks"), &s.ip_blocks, &s.not_ip_blocks, ip_block)?,
        remote_ip_blocks: field(
            ("remoteIpBlocks", "notRemoteIpBlocks"),
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            ip_block,
        )?,
    })
}

fn operation(o: &Operation) -> Result<OperationMatch, CompileError> {
    Ok(OperationMatch {
        hosts: string_field(("hosts", "notHosts"), Kind::Host, &o.hosts, &o.not_hosts)?,
        ports: field(("ports", "notPorts"), &o.ports, &o.not_ports, port)?,
        methods: string_field(("methods", "notMethods"), Kind::Plain, &o.methods, &o.not_methods)?,
        paths: string_field(("paths", "notPaths"), Kind::Plain, &o.paths, &o.not_paths)?,
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
    const NAMES: Names = ("when values", "when notValues");
    let strings = |kind| string_field(NAMES, kind, &c.values, &c.not_values);
    let values = match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            ConditionValues::Ips(field(NAMES, &c.values, &c.not_values, ip_block)?)
        }
        ConditionKey::DestinationPort => {
            field(NAMES, &c.values, &c.not_values, port)?;
            ConditionValues::Strings(strings(Kind::Plain)?)
        }
        ConditionKey::SourcePrincipal => ConditionValues::Strings(strings(Kind::Principal)?),
        ConditionKey::SourceNamespace => ConditionValues::Strings(strings(Kind::Namespace)?),
        _ => ConditionValues::Strings(strings(Kind::Plain)?),
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
