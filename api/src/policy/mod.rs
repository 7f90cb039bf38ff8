//! The `security.mizzen.dev/v1` policy resources.
//!
//! Field names and meanings follow Istio's `security.istio.io/v1`
//! `AuthorizationPolicy` and `PeerAuthentication`, so an Istio policy works
//! after changing its `apiVersion`. Istio's waypoint-only fields
//! (`targetRef`, `targetRefs`) are not part of the schema: the API server
//! refuses them rather than silently ignoring a selector the mesh cannot
//! honour.
//!
//! These are data types; the semantics (CUSTOM, then DENY, then ALLOW; no
//! ALLOW policy means allow) live in the components that enforce them.

mod admission;

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Mizzen's policy resources.
pub const GROUP: &str = "security.mizzen.dev";
/// The served and stored version.
pub const VERSION: &str = "v1";

/// Selects the workloads (pods) a policy applies to by their labels. An
/// absent selector selects every workload in the policy's namespace (or the
/// whole mesh for a policy in the root namespace).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must carry, all of them, to be selected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Access control for workloads in the mesh.
///
/// Evaluation: CUSTOM policies first, then DENY, then ALLOW. A request
/// matching any DENY policy is denied; if no ALLOW policy selects the
/// workload the request is allowed; otherwise it is allowed only when an
/// ALLOW policy matches it. AUDIT policies only mark matching requests.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.mizzen.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    singular = "authorizationpolicy",
    shortname = "mzap",
    category = "mizzen",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action","description":"The action taken when a rule matches"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status","description":"Whether Mizzen enforces the policy as written"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason","description":"Why it is or is not accepted"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.action) || self.action != 'CUSTOM'",
     "message": "action CUSTOM is not supported yet: Mizzen has no external authorizers",
     "fieldPath": ".action"},
    {"rule": "!has(self.provider) || (has(self.action) && self.action == 'CUSTOM')",
     "message": "provider is only for action CUSTOM",
     "fieldPath": ".provider"}
]))]
pub struct AuthorizationPolicySpec {
    /// The workloads this policy applies to; absent means every workload in
    /// the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Rules matched against each connection or request. For ALLOW, no rules
    /// means nothing is allowed; one empty rule allows everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What happens when a rule matches. Default `ALLOW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The extension provider that decides, for `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// The action of an [`AuthorizationPolicy`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow a request only if it matches a rule.
    #[default]
    Allow,
    /// Deny a request if it matches any rule.
    Deny,
    /// Audit a request if it matches any rule; does not change the decision.
    Audit,
    /// Delegate the decision to the extension provider in `provider`.
    Custom,
}

/// An external authorizer named in the mesh configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ExtensionProvider {
    /// Name of the provider.
    pub name: String,
}

/// A rule matches when all of its non-empty parts match: any `from`, any
/// `to`, and every `when`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources; absent matches any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations; absent matches any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Extra conditions, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// One source of a [`Rule`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RuleFrom {
    /// The source's properties.
    #[serde(default)]
    pub source: Source,
}

/// One operation of a [`Rule`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RuleTo {
    /// The operation's properties.
    #[serde(default)]
    pub operation: Operation,
}

/// Properties of the peer. Fields are ANDed; values within a field are ORed.
/// Strings support exact, prefix (`abc*`), suffix (`*abc`) and presence
/// (`*`) matching.
///
/// Principals and namespaces come from the peer's verified mTLS identity: a
/// plaintext peer has neither, so a rule requiring them never matches it and
/// a `notPrincipals`/`notNamespaces` rule always does.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.requestPrincipals) && !has(self.notRequestPrincipals)",
     "message": "requestPrincipals and notRequestPrincipals need RequestAuthentication (JWT), which Mizzen does not support yet"}
]))]
#[schemars(transform = admission::source)]
pub struct Source {
    /// Peer identities, as `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's form).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Request principals (`<iss>/<sub>` of a validated JWT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer IP addresses or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs as reported by a trusted proxy header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Properties of the request. Fields are ANDed; values within a field are
/// ORed. `hosts`, `methods` and `paths` apply to HTTP only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = admission::operation)]
pub struct Operation {
    /// HTTP `Host`/`:authority` values, compared case-insensitively.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings (`"8080"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (`GET`), or gRPC as `POST`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Normalised request paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An extra condition, such as `key: request.headers[x-token]`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.key in ['source.ip', 'remote.ip', 'source.namespace', 'source.principal', 'destination.ip', 'destination.port', 'connection.sni'] || (self.key.startsWith('request.headers[') && self.key.endsWith(']') && size(self.key) > 17)",
     "message": "key must be one of source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni or request.headers[<name>] (request.auth.* needs RequestAuthentication, which Mizzen does not support yet)",
     "fieldPath": ".key"},
    {"rule": "(has(self.values) && size(self.values) > 0) || (has(self.notValues) && size(self.notValues) > 0)",
     "message": "a condition needs values or notValues"}
]))]
#[schemars(transform = admission::condition)]
pub struct Condition {
    /// The attribute, e.g. `source.ip`, `request.headers[User-Agent]`.
    pub key: String,
    /// Values that match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Values that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// What Mizzen made of a policy: the `status` subresource of both policy
/// kinds, written by the CA (one writer for the cluster, not one per node).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: `True` when the policy is enforced as written; `False`
    /// with the reason when it is not (it then fails closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<StatusCondition>,
}

/// One condition of a [`PolicyStatus`], with the fields and meanings of
/// Kubernetes' `metav1.Condition` (k8s-openapi's type would need its
/// `schemars` feature, which derives schemas for every Kubernetes type).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// The aspect this condition describes (`Accepted`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word for programs and `kubectl get -o wide`.
    pub reason: String,
    /// What a person needs to know, e.g. which field is wrong.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The mutual TLS mode a workload accepts from its peers.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "security.mizzen.dev",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    singular = "peerauthentication",
    shortname = "mzpa",
    category = "mizzen",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode","description":"The mTLS mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status","description":"Whether Mizzen enforces the policy as written"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason","description":"Why it is or is not accepted"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || has(self.selector)",
     "message": "portLevelMtls needs a selector: ports are the selected workloads' ports",
     "fieldPath": ".portLevelMtls"}
]))]
pub struct PeerAuthenticationSpec {
    /// The workloads this applies to; absent means the whole namespace (or the
    /// whole mesh in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port without a port-level setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per-port overrides keyed by the workload's port number (`"8080"`);
    /// only valid together with a `selector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// The `mtls` block of a [`PeerAuthentication`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct MutualTls {
    /// Default `UNSET`: inherit from the parent scope (PERMISSIVE at the top).
    #[serde(default)]
    pub mode: MtlsMode,
}

/// How a workload treats plaintext and mTLS connections.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the namespace or mesh-wide policy.
    #[default]
    Unset,
    /// Plaintext only.
    Disable,
    /// Accept both mTLS and plaintext.
    Permissive,
    /// mTLS only; plaintext is refused.
    Strict,
}

/// Every CRD this crate defines, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use crate::routing::spec::{DestinationRule, VirtualService};
    vec![
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        VirtualService::crd(),
        DestinationRule::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly as checked in at
/// `manifests/crds.yaml`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated from mizzen-api's types by `cargo run -p mizzen-api --bin mizzen-crds`.\n\
         # Do not edit: a test fails when this file and the types disagree.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Istio policy taken as it is, with only the apiVersion changed.
    #[test]
    fn istio_authorization_policy_yaml_deserializes() {
        let yaml = r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
        notIpBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
        notPorts: ["9090"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
      notValues: ["bad"]
"#;
        let ap: AuthorizationPolicy = serde_yaml::from_str(yaml).expect("parses");
        assert_eq!(ap.spec.action, Some(Action::Allow));
        let sel = ap.spec.selector.as_ref().expect("selector");
        assert_eq!(sel.match_labels.get("app").map(String::as_str), Some("httpbin"));
        let rule = &ap.spec.rules[0];
        assert_eq!(rule.from[0].source.principals, ["cluster.local/ns/default/sa/sleep"]);
        assert_eq!(rule.from[1].source.not_ip_blocks, ["10.0.0.0/8"]);
        assert_eq!(rule.to[1].operation.not_ports, ["9090"]);
        assert_eq!(rule.when[0].not_values, ["bad"]);
        // and it serialises back to the same field names
        let back = serde_json::to_value(&ap).expect("serialise");
        assert_eq!(
            back["spec"]["rules"][0]["from"][1]["source"]["notIpBlocks"][0],
            "10.0.0.0/8"
        );
    }

    #[test]
    fn peer_authentication_yaml_deserializes() {
        let yaml = r#"
apiVersion: security.mizzen.dev/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    "8080":
      mode: DISABLE
"#;
        let pa: PeerAuthentication = serde_yaml::from_str(yaml).expect("parses");
        assert_eq!(pa.spec.mtls.as_ref().map(|m| m.mode), Some(MtlsMode::Strict));
        assert_eq!(pa.spec.port_level_mtls["8080"].mode, MtlsMode::Disable);
    }

    #[test]
    fn unknown_action_is_refused() {
        let r: Result<AuthorizationPolicySpec, _> = serde_json::from_str(r#"{"action":"allow"}"#);
        assert!(r.is_err(), "actions are upper case, as in Istio");
    }

    #[test]
    fn crds_have_group_and_names() {
        let crds = crds();
        let names: Vec<_> = crds.iter().filter_map(|c| c.metadata.name.clone()).collect();
        assert_eq!(
            names,
            [
                "authorizationpolicies.security.mizzen.dev",
                "peerauthentications.security.mizzen.dev",
                "virtualservices.networking.mizzen.dev",
                "destinationrules.networking.mizzen.dev",
            ]
        );
        for c in &crds {
            let group = if c.spec.names.kind.ends_with("Policy") || c.spec.names.kind == "PeerAuthentication" {
                GROUP
            } else {
                crate::routing::spec::GROUP
            };
            assert_eq!(c.spec.group, group);
            assert_eq!(c.spec.versions[0].name, VERSION);
            assert_eq!(c.spec.scope, "Namespaced");
        }
    }
}
