//! Istio's documented examples and semantics, as tables: each policy is
//! YAML as an Istio user writes it (with Mizzen's apiVersion), compiled
//! and evaluated against connections and requests.

use std::net::IpAddr;

use super::compile::{CompileError, compile};
use super::eval::{CompiledPolicy, Connection, Decision, DenyReason, Request, evaluate};
use super::path::normalize;
use crate::SpiffeId;
use crate::policy::AuthorizationPolicy;

fn policy(yaml: &str) -> CompiledPolicy {
    let p: AuthorizationPolicy = serde_yaml::from_str(yaml).expect("policy YAML");
    compile(&p).expect("compiles")
}

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const OTHER: &str = "spiffe://cluster.local/ns/test/sa/other";

/// A request: method, raw path, host, headers (lower-case names).
type RequestCase = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// One case: who calls (a SPIFFE ID, or `None` for plaintext), from which
/// IP, and the request (`None` for a TCP port).
struct Case {
    peer: Option<&'static str>,
    ip: &'static str,
    port: u16,
    request: Option<RequestCase>,
}

fn http(peer: Option<&'static str>, method: &'static str, path: &'static str) -> Case {
    Case {
        peer,
        ip: "10.1.2.3",
        port: 8000,
        request: Some((method, path, "httpbin.foo:8000", vec![])),
    }
}

fn tcp(peer: Option<&'static str>, port: u16) -> Case {
    Case {
        peer,
        ip: "10.1.2.3",
        port,
        request: None,
    }
}

fn decide(policies: &[CompiledPolicy], c: &Case) -> Decision {
    let peer = c.peer.map(|p| SpiffeId::parse(p).expect("id"));
    let conn = Connection {
        peer: peer.as_ref(),
        source_ip: c.ip.parse::<IpAddr>().expect("ip"),
        destination_ip: "10.9.9.9".parse().expect("ip"),
        destination_port: c.port,
        sni: None,
    };
    let owned;
    let headers: Vec<(String, String)>;
    let request = match &c.request {
        Some((method, path, host, h)) => {
            headers = h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            owned = normalize(path).expect("path");
            Some(Request {
                method,
                path: &owned,
                host,
                headers: &headers,
            })
        }
        None => None,
    };
    evaluate(policies, &conn, request.as_ref())
}

fn allowed(policies: &[CompiledPolicy], c: &Case) -> bool {
    decide(policies, c).allowed()
}

const ALLOW_SLEEP_GET: &str = r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["test"]}
    to:
    - operation: {methods: ["GET"], paths: ["/info*"]}
    - operation: {methods: ["POST"], paths: ["/data"]}
    when:
    - key: request.headers[version]
      values: ["v1", "v2"]
"#;

#[test]
fn istios_allow_example_needs_any_from_any_to_and_every_when() {
    let p = [policy(ALLOW_SLEEP_GET)];
    let with_version = |peer, method, path, v| Case {
        request: Some((method, path, "httpbin.foo", vec![("version", v)])),
        ..http(peer, method, path)
    };
    assert!(allowed(&p, &with_version(Some(SLEEP), "GET", "/info/x", "v1")));
    assert!(
        allowed(&p, &with_version(Some(OTHER), "POST", "/data", "v2")),
        "namespace test"
    );
    assert!(
        !allowed(&p, &with_version(Some(SLEEP), "GET", "/info", "v3")),
        "when fails"
    );
    assert!(
        !allowed(&p, &with_version(Some(SLEEP), "DELETE", "/info", "v1")),
        "no operation"
    );
    assert!(
        !allowed(&p, &with_version(Some(SLEEP), "POST", "/info", "v1")),
        "POST only on /data"
    );
    assert!(
        !allowed(&p, &with_version(None, "GET", "/info", "v1")),
        "plaintext has no principal"
    );
    assert!(
        !allowed(&p, &http(Some(SLEEP), "GET", "/info")),
        "the header is missing"
    );
    assert!(
        !allowed(&p, &with_version(Some(SLEEP), "get", "/info", "v1")),
        "methods compare exactly"
    );
}

#[test]
fn deny_wins_and_no_allow_policy_means_allow() {
    let deny = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: ["POST"]}}]}]
"#,
    );
    assert!(allowed(&[], &http(None, "POST", "/")), "no policy: allowed");
    assert!(
        allowed(std::slice::from_ref(&deny), &http(None, "GET", "/")),
        "only DENY: the rest is allowed"
    );
    assert_eq!(
        decide(std::slice::from_ref(&deny), &http(Some(SLEEP), "POST", "/")),
        Decision::Deny {
            policy: Some("foo/deny-post".into()),
            rule: Some(0),
            reason: DenyReason::DenyMatched,
            audited: vec![]
        }
    );
    let allow_all = policy(
        "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: foo}\nspec:\n  rules: [{}]\n",
    );
    assert!(
        !allowed(&[deny, allow_all.clone()], &http(Some(SLEEP), "POST", "/")),
        "DENY before ALLOW"
    );
    assert!(
        allowed(&[allow_all], &http(None, "DELETE", "/x")),
        "rules: [{{}}] allows everything"
    );
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    let nothing = policy(
        "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: foo}\nspec: {}\n",
    );
    assert_eq!(
        decide(&[nothing], &http(Some(SLEEP), "GET", "/")),
        Decision::Deny {
            policy: None,
            rule: None,
            reason: DenyReason::NoAllowMatched,
            audited: vec![]
        }
    );
}

#[test]
fn plaintext_peers_never_match_principals_and_always_match_not_principals() {
    let deny_not_sleep = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: foo}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/default/sa/sleep"]}}]}]
"#,
    );
    assert!(allowed(
        std::slice::from_ref(&deny_not_sleep),
        &http(Some(SLEEP), "GET", "/")
    ));
    assert!(!allowed(
        std::slice::from_ref(&deny_not_sleep),
        &http(Some(OTHER), "GET", "/")
    ));
    assert!(
        !allowed(std::slice::from_ref(&deny_not_sleep), &http(None, "GET", "/")),
        "plaintext is not sleep (ISB-2021-004)"
    );
    let any_authenticated = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: mtls-only, namespace: foo}
spec:
  rules: [{from: [{source: {principals: ["*"]}}]}]
"#,
    );
    assert!(allowed(
        std::slice::from_ref(&any_authenticated),
        &tcp(Some(OTHER), 5432)
    ));
    assert!(
        !allowed(&[any_authenticated], &tcp(None, 5432)),
        "`*` needs an identity"
    );
}

#[test]
fn on_tcp_allow_rules_with_http_fields_never_match_and_deny_rules_drop_them() {
    let allow_get = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  rules: [{to: [{operation: {methods: ["GET"], ports: ["5432"]}}]}]
"#,
    );
    assert!(
        !allowed(&[allow_get], &tcp(Some(SLEEP), 5432)),
        "an ALLOW needing HTTP never matches TCP"
    );
    let deny_get_on_port = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: ["GET"], ports: ["5432"]}}]}]
"#,
    );
    assert!(
        !allowed(std::slice::from_ref(&deny_get_on_port), &tcp(Some(SLEEP), 5432)),
        "a DENY keeps its TCP fields: port 5432 is denied"
    );
    assert!(
        allowed(&[deny_get_on_port], &tcp(Some(SLEEP), 6379)),
        "other ports are not"
    );
}

#[test]
fn hosts_compare_without_case_or_port() {
    let deny_host = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: hosts, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {hosts: ["admin.example.com"]}}]}]
"#,
    );
    for host in [
        "admin.example.com",
        "ADMIN.Example.com",
        "admin.example.com:8080",
        "Admin.example.com:443",
    ] {
        let c = Case {
            request: Some(("GET", "/", host, vec![])),
            ..http(None, "GET", "/")
        };
        assert!(
            !allowed(std::slice::from_ref(&deny_host), &c),
            "{host} is the denied host (CVE-2021-39155)"
        );
    }
}

#[test]
fn path_tricks_do_not_escape_a_deny_on_admin() {
    let deny_admin = [policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"#,
    )];
    for path in [
        "/admin",
        "/admin/x",
        "//admin/x",
        "/public/../admin/x",
        "/%61dmin/x",
        "/admin;x/y",
        "/./admin",
        "/admin?x=/public",
    ] {
        assert!(!allowed(&deny_admin, &http(None, "GET", path)), "{path}");
    }
    assert!(
        allowed(&deny_admin, &http(None, "GET", "/administrator")),
        "a different path"
    );
}

#[test]
fn every_value_of_a_repeated_header_is_checked() {
    let allow_v1 = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: v1, namespace: foo}
spec:
  rules: [{when: [{key: "request.headers[X-Version]", values: ["v1"]}]}]
"#,
    );
    let deny_evil = policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: evil, namespace: foo}
spec:
  action: DENY
  rules: [{when: [{key: "request.headers[x-user]", values: ["evil"]}]}]
"#,
    );
    let with = |h: Vec<(&'static str, &'static str)>| Case {
        request: Some(("GET", "/", "h", h)),
        ..http(None, "GET", "/")
    };
    assert!(allowed(
        std::slice::from_ref(&allow_v1),
        &with(vec![("x-version", "v1")])
    ));
    assert!(
        !allowed(
            std::slice::from_ref(&allow_v1),
            &with(vec![("x-version", "v1"), ("x-version", "v2")])
        ),
        "an ALLOW needs every value to match"
    );
    assert!(
        !allowed(
            std::slice::from_ref(&deny_evil),
            &with(vec![("x-user", "good"), ("x-user", "evil")])
        ),
        "a DENY needs one"
    );
    assert!(allowed(&[deny_evil], &with(vec![("x-user", "good")])));
}

#[test]
fn ip_blocks_and_conditions_on_addresses() {
    let p = [policy(
        r#"
apiVersion: security.mizzen.dev/v1
kind: AuthorizationPolicy
metadata: {name: ips, namespace: foo}
spec:
  rules:
  - from: [{source: {ipBlocks: ["10.1.0.0/16"], notIpBlocks: ["10.1.9.0/24"]}}]
    when: [{key: destination.port, values: ["8000"]}]
"#,
    )];
    let from = |ip: &'static str, port: u16| Case {
        ip,
        port,
        ..http(None, "GET", "/")
    };
    assert!(allowed(&p, &from("10.1.2.3", 8000)));
    assert!(!allowed(&p, &from("10.1.9.3", 8000)), "notIpBlocks");
    assert!(!allowed(&p, &from("10.2.0.1", 8000)), "outside ipBlocks");
    assert!(!allowed(&p, &from("10.1.2.3", 9000)), "destination.port");
}

#[test]
fn audit_policies_are_reported_and_change_nothing() {
    let audit = policy(
        "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: watch, namespace: foo}\nspec:\n  action: AUDIT\n  rules: [{to: [{operation: {paths: [\"/secret*\"]}}]}]\n",
    );
    assert_eq!(
        decide(&[audit], &http(None, "GET", "/secret/1")),
        Decision::Allow {
            audited: vec!["foo/watch".into()]
        }
    );
}

#[test]
fn what_cannot_be_enforced_is_refused_by_name() {
    let refused = |spec: &str| {
        let yaml = format!(
            "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: x, namespace: foo}}\nspec:\n{spec}"
        );
        let p: AuthorizationPolicy = serde_yaml::from_str(&yaml).expect("yaml");
        compile(&p).expect_err(spec)
    };
    assert_eq!(
        refused("  action: CUSTOM\n  provider: {name: ext}\n"),
        CompileError::Custom
    );
    assert_eq!(
        refused("  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n"),
        CompileError::RequestAuthentication("requestPrincipals")
    );
    assert_eq!(
        refused("  rules: [{when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]\n"),
        CompileError::RequestAuthentication("request.auth.*")
    );
    assert!(matches!(
        refused("  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]\n"),
        CompileError::IpBlock { .. }
    ));
    assert!(matches!(
        refused("  rules: [{to: [{operation: {ports: [\"http\"]}}]}]\n"),
        CompileError::Port { .. }
    ));
    assert!(matches!(
        refused("  rules: [{when: [{key: experimental.envoy.filters.x, values: [x]}]}]\n"),
        CompileError::ConditionKey(_)
    ));
}

/// Values that would never match are refused, not read literally: in a
/// DENY rule each would silently deny less than it says.
#[test]
fn values_that_could_never_match_are_refused_by_field() {
    let refused = |rule: &str| {
        let yaml = format!(
            "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: x, namespace: foo}}\nspec:\n  action: DENY\n  rules: [{rule}]\n"
        );
        let p: AuthorizationPolicy = serde_yaml::from_str(&yaml).expect("yaml");
        compile(&p).err()
    };
    let cases: &[(&str, Option<CompileError>)] = &[
        (
            "{from: [{source: {principals: [\"\"]}}]}",
            Some(CompileError::EmptyValue { field: "principals" }),
        ),
        (
            "{to: [{operation: {notPaths: [\"\"]}}]}",
            Some(CompileError::EmptyValue { field: "notPaths" }),
        ),
        (
            "{from: [{source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}}]}",
            Some(CompileError::SpiffePrincipal {
                field: "principals",
                value: "spiffe://cluster.local/ns/a/sa/b".into(),
            }),
        ),
        (
            "{when: [{key: source.principal, values: [\"spiffe://cluster.local/ns/a/sa/b\"]}]}",
            Some(CompileError::SpiffePrincipal {
                field: "when values",
                value: "spiffe://cluster.local/ns/a/sa/b".into(),
            }),
        ),
        (
            "{from: [{source: {principals: [\"cluster.local/ns/*/sa/b\"]}}]}",
            Some(CompileError::Wildcard {
                field: "principals",
                value: "cluster.local/ns/*/sa/b".into(),
            }),
        ),
        (
            "{to: [{operation: {paths: [\"*admin*\"]}}]}",
            Some(CompileError::Wildcard {
                field: "paths",
                value: "*admin*".into(),
            }),
        ),
        (
            "{from: [{source: {notNamespaces: [\"Team_A\"]}}]}",
            Some(CompileError::Namespace {
                field: "notNamespaces",
                value: "Team_A".into(),
            }),
        ),
        (
            "{from: [{source: {namespaces: [\"team-*\", \"*-prod\", \"*\"]}}]}",
            None,
        ),
        (
            "{from: [{source: {principals: [\"*\", \"cluster.local/ns/a/*\", \"*/sa/b\"]}}]}",
            None,
        ),
        (
            "{to: [{operation: {hosts: [\"*.Example.com\"], paths: [\"/api/*\"]}}]}",
            None,
        ),
    ];
    for (rule, want) in cases {
        assert_eq!(&refused(rule), want, "{rule}");
    }
}

#[test]
fn policies_apply_by_namespace_root_and_selector() {
    use std::collections::BTreeMap;

    use super::compile::applies;
    use crate::policy::WorkloadSelector;
    let labels: BTreeMap<String, String> = [("app".into(), "web".into()), ("version".into(), "v1".into())].into();
    let web = WorkloadSelector {
        match_labels: [("app".into(), "web".into())].into(),
    };
    let api = WorkloadSelector {
        match_labels: [("app".into(), "api".into())].into(),
    };
    assert!(
        applies("shop", None, "mizzen-system", "shop", &labels),
        "namespace-wide"
    );
    assert!(
        applies("mizzen-system", None, "mizzen-system", "shop", &labels),
        "mesh-wide"
    );
    assert!(applies("shop", Some(&web), "mizzen-system", "shop", &labels));
    assert!(!applies("shop", Some(&api), "mizzen-system", "shop", &labels));
    assert!(
        !applies("other", None, "mizzen-system", "shop", &labels),
        "another namespace's"
    );
}
