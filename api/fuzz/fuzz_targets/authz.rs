//! Coverage-guided fuzzing of what authorization reads from a request:
//! path normalisation (stable on its own output, never panicking) and
//! evaluation against policies that use every kind of matcher.
//!
//! Input: `METHOD SP HOST SP PATH [SP header=value]...`.

#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mizzen_api::authz::eval::{
    CompiledPolicy, ConditionKey, ConditionMatch, ConditionValues, Field, OperationMatch, PolicyAction, RuleMatch,
    SourceMatch, StringMatch,
};
use mizzen_api::authz::path::normalize;
use mizzen_api::authz::{Connection, Request, evaluate};

fn strings(any: &[&str], none: &[&str]) -> Field<StringMatch> {
    Field {
        any_of: (!any.is_empty()).then(|| any.iter().map(|s| StringMatch::parse(s)).collect()),
        none_of: none.iter().map(|s| StringMatch::parse(s)).collect(),
    }
}

fn policies() -> &'static [CompiledPolicy] {
    static P: OnceLock<Vec<CompiledPolicy>> = OnceLock::new();
    P.get_or_init(|| {
        vec![
            CompiledPolicy {
                name: "fuzz/deny-admin".into(),
                action: PolicyAction::Deny,
                rules: vec![RuleMatch {
                    to: vec![OperationMatch {
                        paths: strings(&["/admin", "/admin/*"], &[]),
                        methods: strings(&["POST", "DELETE"], &[]),
                        ..OperationMatch::default()
                    }],
                    ..RuleMatch::default()
                }],
            },
            CompiledPolicy {
                name: "fuzz/allow".into(),
                action: PolicyAction::Allow,
                rules: vec![RuleMatch {
                    from: vec![SourceMatch {
                        principals: strings(&["cluster.local/ns/*"], &[]),
                        ..SourceMatch::default()
                    }],
                    to: vec![OperationMatch {
                        hosts: strings(&["*.example.com"], &["admin.example.com"]),
                        paths: strings(&["/public*", "*.css"], &[]),
                        ..OperationMatch::default()
                    }],
                    when: vec![ConditionMatch {
                        key: ConditionKey::RequestHeader("x-version".into()),
                        values: ConditionValues::Strings(strings(&["v1", "v2*"], &["v2-beta"])),
                    }],
                }],
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split(' ');
    let (Some(method), Some(host), Some(raw)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let headers: Vec<(String, String)> = parts
        .filter_map(|h| h.split_once('='))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    let Ok(path) = normalize(raw) else {
        return;
    };
    assert_eq!(normalize(&path).as_deref(), Ok(path.as_str()), "normalisation is stable");
    let peer = mizzen_api::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").ok();
    let conn = Connection {
        peer: peer.as_ref(),
        source_ip: IpAddr::from([10, 0, 0, 2]),
        destination_ip: IpAddr::from([10, 0, 0, 1]),
        destination_port: 8080,
        sni: None,
    };
    let request = Request {
        method,
        path: &path,
        host,
        headers: &headers,
    };
    let decision = evaluate(policies(), &conn, Some(&request));
    if (method == "POST" || method == "DELETE") && (path == "/admin" || path.starts_with("/admin/")) {
        assert!(!decision.allowed(), "{path} must be denied");
    }
});
