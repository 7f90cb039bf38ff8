use super::*;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).expect("valid trust domain")
}

/// Valid IDs from the SPIFFE ID specification and its character rules.
#[test]
fn valid_ids_round_trip() {
    let cases: &[(&str, &str, &str)] = &[
        // (id, trust domain, path)
        ("spiffe://trust-domain-name", "trust-domain-name", ""),
        (
            "spiffe://staging.example.com/payments/mysql",
            "staging.example.com",
            "/payments/mysql",
        ),
        (
            "spiffe://staging.example.com/payments/web-fe",
            "staging.example.com",
            "/payments/web-fe",
        ),
        (
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "k8s-west.example.com",
            "/ns/staging/sa/default",
        ),
        (
            "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "example.com",
            "/9eebccd2-12bf-40a6-b262-65fe0487d453",
        ),
        (
            "spiffe://cluster.local/ns/default/sa/default",
            "cluster.local",
            "/ns/default/sa/default",
        ),
        (
            "spiffe://td_with_under.score/Path.With-All_Chars09",
            "td_with_under.score",
            "/Path.With-All_Chars09",
        ),
        // a segment may contain dots as long as it is not exactly "." or ".."
        ("spiffe://example.org/...", "example.org", "/..."),
        ("spiffe://example.org/.hidden/a..b", "example.org", "/.hidden/a..b"),
        ("spiffe://1.2.3.4/ip-like-domain", "1.2.3.4", "/ip-like-domain"),
    ];
    for (s, want_td, want_path) in cases {
        let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s} should be valid: {e}"));
        assert_eq!(id.trust_domain_name(), *want_td, "{s}");
        assert_eq!(id.trust_domain().as_str(), *want_td, "{s}");
        assert_eq!(id.path(), *want_path, "{s}");
        assert_eq!(id.to_string(), *s, "Display must round-trip {s}");
        let again: SpiffeId = id.to_string().parse().expect("reparse");
        assert_eq!(again, id);
        let rebuilt = SpiffeId::from_parts(&id.trust_domain(), id.path()).expect("from_parts");
        assert_eq!(rebuilt, id);
    }
}

/// Invalid IDs, each with the rule it breaks.
#[test]
fn invalid_ids_are_refused_with_reason() {
    use SpiffeIdError::*;
    let long_td = format!("spiffe://{}", "a".repeat(256));
    let long_path = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
    let cases: Vec<(&str, SpiffeIdError)> = vec![
        ("", Empty),
        ("example.org/path", WrongScheme),
        ("spiffe:example.org", WrongScheme),
        ("spiffe:/example.org", WrongScheme),
        ("SPIFFE://example.org", WrongScheme),
        ("https://example.org/path", WrongScheme),
        ("spiffe://", MissingTrustDomain),
        ("spiffe:///path", MissingTrustDomain),
        ("spiffe://Example.org/path", BadTrustDomainChar('E')),
        ("spiffe://example.org:8080/path", BadTrustDomainChar(':')),
        ("spiffe://user@example.org/path", BadTrustDomainChar('@')),
        ("spiffe://user:pass@example.org", BadTrustDomainChar(':')),
        ("spiffe://exa%41mple.org", BadTrustDomainChar('%')),
        ("spiffe://example.org?query=1", BadTrustDomainChar('?')),
        ("spiffe://example.org#frag", BadTrustDomainChar('#')),
        ("spiffe://exämple.org", BadTrustDomainChar('ä')),
        ("spiffe://example.org/", EmptySegment),
        ("spiffe://example.org//path", EmptySegment),
        ("spiffe://example.org/path/", EmptySegment),
        ("spiffe://example.org/a//b", EmptySegment),
        ("spiffe://example.org/.", DotSegment),
        ("spiffe://example.org/..", DotSegment),
        ("spiffe://example.org/a/./b", DotSegment),
        ("spiffe://example.org/a/../b", DotSegment),
        ("spiffe://example.org/path?query", BadPathChar('?')),
        ("spiffe://example.org/path#fragment", BadPathChar('#')),
        ("spiffe://example.org/pa%2Fth", BadPathChar('%')),
        ("spiffe://example.org/p@th", BadPathChar('@')),
        ("spiffe://example.org/sp ace", BadPathChar(' ')),
        ("spiffe://example.org/nul\0byte", BadPathChar('\0')),
        ("spiffe://example.org/pa\\th", BadPathChar('\\')),
        ("spiffe://example.org/ns/a:b", BadPathChar(':')),
        (long_td.as_str(), TrustDomainTooLong),
        (long_path.as_str(), TooLong),
    ];
    for (s, want) in cases {
        assert_eq!(SpiffeId::parse(s), Err(want.clone()), "{s:?}");
        // serde refuses the same input
        let json = serde_json::to_string(s).expect("json string");
        assert!(serde_json::from_str::<SpiffeId>(&json).is_err(), "{s:?} via serde");
    }
}

#[test]
fn longest_allowed_id_is_accepted() {
    let prefix = "spiffe://example.org/";
    let s = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
    assert_eq!(s.len(), MAX_ID_LEN);
    assert!(SpiffeId::parse(&s).is_ok());
    let td_max = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    assert!(TrustDomain::new(&td_max).is_ok());
}

#[test]
fn trust_domains() {
    assert_eq!(TrustDomain::default().as_str(), "cluster.local");
    assert_eq!(td("example.org").id().to_string(), "spiffe://example.org");
    assert_eq!(td("example.org").id().path(), "");
    for bad in ["", "Example.org", "spiffe://example.org", "example.org/path", "a:1"] {
        assert!(TrustDomain::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn workload_form() {
    let id = SpiffeId::workload(&td("cluster.local"), "demo", "web").expect("valid");
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(id.workload_parts(), Some(("demo", "web")));

    for not_workload in [
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/demo",
        "spiffe://cluster.local/ns/demo/sa",
        "spiffe://cluster.local/ns/demo/sa/web/extra",
        "spiffe://cluster.local/sa/web/ns/demo",
        "spiffe://cluster.local/NS/demo/sa/web",
    ] {
        let id: SpiffeId = not_workload.parse().expect("valid id");
        assert_eq!(id.workload_parts(), None, "{not_workload}");
    }

    let t = td("cluster.local");
    assert_eq!(SpiffeId::workload(&t, "", "web"), Err(SpiffeIdError::EmptySegment));
    assert_eq!(SpiffeId::workload(&t, "demo", ""), Err(SpiffeIdError::EmptySegment));
    assert_eq!(
        SpiffeId::workload(&t, "a/b", "web"),
        Err(SpiffeIdError::BadPathChar('/'))
    );
    assert_eq!(SpiffeId::workload(&t, "..", "web"), Err(SpiffeIdError::DotSegment));
    assert_eq!(
        SpiffeId::workload(&t, "demo", "w:b"),
        Err(SpiffeIdError::BadPathChar(':'))
    );
}

#[test]
fn serde_round_trip() {
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("valid");
    let json = serde_json::to_string(&id).expect("serialize");
    assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
    let back: SpiffeId = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, id);
}
