//! Properties of normalisation and evaluation over generated inputs
//! (proptest): what must hold for every path and every request, not only
//! the ones the tables thought of.

use std::net::IpAddr;

use proptest::prelude::*;

use super::eval::{CompiledPolicy, Connection, PolicyAction, Request, RuleMatch, evaluate};
use super::path::normalize;

/// Paths built from the characters that matter to normalisation.
fn raw_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just("%2e"),
            Just("%2F"),
            Just("%5c"),
            Just("%41"),
            Just("%"),
            Just(";"),
            Just("?"),
            Just("#"),
            Just("\\"),
            Just("a"),
            Just("admin"),
            Just("\u{0}"),
            Just("\u{e9}"),
        ],
        0..24,
    )
    .prop_map(|parts| format!("/{}", parts.concat()))
}

fn policy(action: PolicyAction) -> CompiledPolicy {
    CompiledPolicy {
        name: "p/everything".into(),
        action,
        rules: vec![RuleMatch::default()],
    }
}

proptest! {
    #[test]
    fn a_normalised_path_is_canonical_and_normalises_to_itself(raw in raw_path()) {
        if let Ok(n) = normalize(&raw) {
            prop_assert!(n.starts_with('/'));
            for bad in ["//", "/./", "/../", "?", "#", ";", "\\"] {
                prop_assert!(!n.contains(bad), "{n:?} from {raw:?} contains {bad:?}");
            }
            prop_assert!(!n.ends_with("/.") && !n.ends_with("/.."), "{n:?}");
            prop_assert!(!n.chars().any(|c| c.is_control()));
            prop_assert_eq!(normalize(&n), Ok(n.clone()));
        }
    }

    #[test]
    fn no_policy_allows_and_a_catch_all_deny_denies_whatever_the_request(
        method in "[A-Z]{1,7}",
        raw in raw_path(),
        host in "[a-zA-Z0-9.:-]{0,20}",
        port in 1u16..,
        octets in any::<[u8; 4]>(),
        http in any::<bool>(),
    ) {
        let path = normalize(&raw).unwrap_or_else(|_| "/".into());
        let conn = Connection {
            peer: None,
            source_ip: IpAddr::from(octets),
            destination_ip: IpAddr::from([10, 0, 0, 1]),
            destination_port: port,
            sni: None,
        };
        let request = Request { method: &method, path: &path, host: &host, headers: &[] };
        let request = http.then_some(&request);
        prop_assert!(evaluate(&[], &conn, request).allowed());
        prop_assert!(evaluate(&[policy(PolicyAction::Allow)], &conn, request).allowed());
        prop_assert!(!evaluate(&[policy(PolicyAction::Deny)], &conn, request).allowed());
        prop_assert!(
            !evaluate(&[policy(PolicyAction::Allow), policy(PolicyAction::Deny)], &conn, request).allowed(),
            "DENY wins over ALLOW"
        );
    }
}
