//! Compiled policies and their evaluation: a pure function of the
//! policies that apply to a workload, the connection and, on HTTP ports,
//! the request.
//!
//! Istio's semantics, so an Istio policy means the same here:
//! - any matching DENY policy denies; then, if no ALLOW policy applies to
//!   the workload, the request is allowed; otherwise only a matching ALLOW
//!   rule allows. AUDIT policies never change the decision; their matches
//!   are reported.
//! - A rule matches when any of its `from`, any of its `to` and all of its
//!   `when` match; an absent part matches anything. An ALLOW policy without
//!   rules matches nothing; a rule `{}` matches everything.
//! - Within a source or operation, fields are ANDed, values ORed; a `not*`
//!   field matches when none of its values does.
//! - A plaintext peer has no principal and no namespace: `principals` and
//!   `namespaces` (even `*`) never match it, `notPrincipals` and
//!   `notNamespaces` always do (Istio ISB-2021-004).
//! - Without a request (a TCP port), a rule needing HTTP fields (`hosts`,
//!   `methods`, `paths`, `request.headers[…]`) never matches in an ALLOW or
//!   AUDIT policy, and in a DENY policy those fields are ignored (the rule
//!   keeps only its TCP fields, so it denies more, never less).
//! - Hosts compare case-insensitively and without a port; methods exactly;
//!   paths after [`super::path::normalize`]. Every value of a repeated
//!   header is checked: in an ALLOW or AUDIT rule each value must satisfy
//!   the condition, in a DENY rule one value is enough.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::SpiffeId;

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl StringMatch {
    /// Istio's syntax: `*` alone, a leading `*`, a trailing `*`, or exact.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Present
        } else if let Some(rest) = s.strip_prefix('*') {
            StringMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = s.strip_suffix('*') {
            StringMatch::Prefix(rest.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        }
    }

    /// The same pattern, lower-cased (for hosts).
    pub fn lowercase(self) -> Self {
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
            StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
            StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
            StringMatch::Present => StringMatch::Present,
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(p) => v.ends_with(p.as_str()),
            StringMatch::Present => !v.is_empty(),
        }
    }
}

/// A field's values and its `not*` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    /// `None`: the field is absent (matches anything).
    pub any_of: Option<Vec<T>>,
    pub none_of: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            any_of: None,
            none_of: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any_of.is_none() && self.none_of.is_empty()
    }

    /// Whether a value that may be missing (`None`: a plaintext peer's
    /// principal) satisfies the field.
    fn check(&self, v: Option<&dyn Fn(&T) -> bool>) -> bool {
        let hit = |list: &[T]| v.is_some_and(|f| list.iter().any(f));
        self.any_of.as_ref().is_none_or(|l| hit(l)) && !hit(&self.none_of)
    }
}

/// A compiled `source`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceMatch {
    /// Compared with the peer's SPIFFE ID without `spiffe://`.
    pub principals: Field<StringMatch>,
    pub namespaces: Field<StringMatch>,
    pub ip_blocks: Field<IpNet>,
    /// The original client (this proxy trusts no forwarding header, so it
    /// is the connection's source).
    pub remote_ip_blocks: Field<IpNet>,
}

/// A compiled `operation`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationMatch {
    /// Lower-case patterns, compared with the host without its port.
    pub hosts: Field<StringMatch>,
    pub ports: Field<u16>,
    pub methods: Field<StringMatch>,
    /// Compared with the normalised path.
    pub paths: Field<StringMatch>,
}

/// A `when` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `request.headers[name]`, the name lower-cased.
    RequestHeader(String),
}

/// A compiled `when` condition's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionValues {
    Ips(Field<IpNet>),
    Strings(Field<StringMatch>),
}

/// A compiled `when` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionMatch {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleMatch {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<ConditionMatch>,
}

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    Allow,
    Deny,
    Audit,
}

/// A compiled policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `<namespace>/<name>`.
    pub name: String,
    pub action: PolicyAction,
    pub rules: Vec<RuleMatch>,
}

/// The connection being authorised.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` over plaintext.
    pub peer: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
}

/// The HTTP request being authorised.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// From [`super::path::normalize`].
    pub path: &'a str,
    /// `:authority` or `Host`, as sent.
    pub host: &'a str,
    /// Every header, names lower-case, repeated names repeated.
    pub headers: &'a [(String, String)],
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `audited` names the AUDIT policies that matched.
    Allow { audited: Vec<String> },
    Deny {
        /// The DENY policy that matched (`None`: no ALLOW policy matched).
        policy: Option<String>,
        /// The index of its rule that matched.
        rule: Option<usize>,
        reason: DenyReason,
        audited: Vec<String>,
    },
}

/// Why a request was denied: the `reason` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched (`policy` names it).
    DenyMatched,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyMatched => "deny_policy",
            DenyReason::NoAllowMatched => "no_allow_policy_matched",
        }
    }
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// How strictly a rule is read: DENY rules match more, ALLOW rules less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Allow,
    Deny,
}

fn principal(peer: Option<&SpiffeId>) -> Option<&str> {
    // `strip_prefix`, not `trim_start_matches`: this runs for every rule,
    // and the latter sets up a substring searcher on each call.
    peer.map(|p| p.as_str().strip_prefix("spiffe://").unwrap_or(p.as_str()))
}

fn namespace(peer: Option<&SpiffeId>) -> Option<&str> {
    peer.and_then(|p| p.path().strip_prefix("/ns/")?.split('/').next())
}

fn strings<'a>(f: &'a Field<StringMatch>, v: Option<&'a str>) -> bool {
    match v {
        Some(v) => f.check(Some(&|m: &StringMatch| m.matches(v))),
        None => f.check(None),
    }
}

fn ips(f: &Field<IpNet>, ip: IpAddr) -> bool {
    f.check(Some(&|n: &IpNet| n.contains(&ip)))
}

impl SourceMatch {
    fn matches(&self, c: &Connection<'_>) -> bool {
        strings(&self.principals, principal(c.peer))
            && strings(&self.namespaces, namespace(c.peer))
            && ips(&self.ip_blocks, c.source_ip)
            && ips(&self.remote_ip_blocks, c.source_ip)
    }
}

/// The host without a port, lower-cased.
fn bare_host(h: &str) -> String {
    let h = if h.starts_with('[') {
        h.split_once(']').map_or(h, |(a, _)| a).trim_start_matches('[')
    } else {
        h.rsplit_once(':')
            .map_or(h, |(a, p)| if p.bytes().all(|b| b.is_ascii_digit()) { a } else { h })
    };
    h.to_ascii_lowercase()
}

impl OperationMatch {
    fn http_only(&self) -> bool {
        !(self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty())
    }

    fn matches(&self, c: &Connection<'_>, r: Option<&Request<'_>>, reading: Reading) -> bool {
        let port = c.destination_port;
        if !self.ports.check(Some(&|p: &u16| *p == port)) {
            return false;
        }
        match r {
            Some(r) => {
                strings(&self.methods, Some(r.method))
                    && strings(&self.paths, Some(r.path))
                    && (self.hosts.is_empty() || strings(&self.hosts, Some(&bare_host(r.host))))
            }
            // TCP: HTTP fields never match for ALLOW; ignored for DENY.
            None => reading == Reading::Deny || !self.http_only(),
        }
    }
}

impl ConditionMatch {
    fn matches(&self, c: &Connection<'_>, r: Option<&Request<'_>>, reading: Reading) -> bool {
        let one = |v: Option<&str>| match &self.values {
            ConditionValues::Strings(f) => strings(f, v),
            ConditionValues::Ips(f) => v.and_then(|v| v.parse().ok()).is_some_and(|ip| ips(f, ip)),
        };
        let ip = |ip: IpAddr| match &self.values {
            ConditionValues::Ips(f) => ips(f, ip),
            ConditionValues::Strings(f) => strings(f, Some(&ip.to_string())),
        };
        match &self.key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp => ip(c.source_ip),
            ConditionKey::DestinationIp => ip(c.destination_ip),
            ConditionKey::DestinationPort => one(Some(&c.destination_port.to_string())),
            ConditionKey::SourceNamespace => one(namespace(c.peer)),
            ConditionKey::SourcePrincipal => one(principal(c.peer)),
            ConditionKey::ConnectionSni => one(c.sni),
            ConditionKey::RequestHeader(name) => match r {
                None => reading == Reading::Deny,
                Some(r) => {
                    let mut values = r
                        .headers
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, v)| v.as_str())
                        .peekable();
                    if values.peek().is_none() {
                        return one(None);
                    }
                    match reading {
                        Reading::Allow => values.all(|v| one(Some(v))),
                        Reading::Deny => values.any(|v| one(Some(v))),
                    }
                }
            },
        }
    }
}

impl RuleMatch {
    fn matches(&self, c: &Connection<'_>, r: Option<&Request<'_>>, reading: Reading) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c, r, reading)))
            && self.when.iter().all(|w| w.matches(c, r, reading))
    }
}

impl CompiledPolicy {
    /// The index of the first rule that matches.
    fn matching_rule(&self, c: &Connection<'_>, r: Option<&Request<'_>>) -> Option<usize> {
        let reading = match self.action {
            PolicyAction::Deny => Reading::Deny,
            PolicyAction::Allow | PolicyAction::Audit => Reading::Allow,
        };
        self.rules.iter().position(|rule| rule.matches(c, r, reading))
    }

    fn matches(&self, c: &Connection<'_>, r: Option<&Request<'_>>) -> bool {
        self.matching_rule(c, r).is_some()
    }
}

/// Decides a connection (`request` `None`, a TCP port) or a request under
/// `policies` (those that apply to the workload).
pub fn evaluate(policies: &[CompiledPolicy], c: &Connection<'_>, request: Option<&Request<'_>>) -> Decision {
    let audited: Vec<String> = policies
        .iter()
        .filter(|p| p.action == PolicyAction::Audit && p.matches(c, request))
        .map(|p| p.name.clone())
        .collect();
    let denied = policies
        .iter()
        .filter(|p| p.action == PolicyAction::Deny)
        .find_map(|p| p.matching_rule(c, request).map(|rule| (p, rule)));
    if let Some((p, rule)) = denied {
        return Decision::Deny {
            policy: Some(p.name.clone()),
            rule: Some(rule),
            reason: DenyReason::DenyMatched,
            audited,
        };
    }
    let mut allows = policies.iter().filter(|p| p.action == PolicyAction::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow { audited };
    }
    if allows.any(|p| p.matches(c, request)) {
        Decision::Allow { audited }
    } else {
        Decision::Deny {
            policy: None,
            rule: None,
            reason: DenyReason::NoAllowMatched,
            audited,
        }
    }
}
