use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::UserInfo;

use super::*;

fn status(auth: bool, audiences: &[&str], user: &str, extra: &[(&str, &[&str])]) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(auth),
        audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
        user: Some(UserInfo {
            username: Some(user.into()),
            extra: Some(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }),
        error: None,
    }
}

#[test]
fn bearer_values() {
    assert_eq!(bearer("authorization", Some("Bearer abc.def")), Ok("abc.def".into()));
    assert_eq!(bearer("authorization", Some("bearer abc")), Ok("abc".into()));
    for bad in ["abc", "Bearer ", "Basic abc", "Bearer a b", "Bearer\tabc"] {
        assert!(bearer("authorization", Some(bad)).is_err(), "{bad:?}");
    }
    assert_eq!(bearer("authorization", None), Err(AuthError::Missing("authorization")));
    let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
    assert!(bearer("authorization", Some(&huge)).is_err());
}

#[test]
fn reviews_are_parsed_strictly() {
    let pod: &[(&str, &[&str])] = &[
        (EXTRA_POD_NAME, &["web-1"]),
        (EXTRA_POD_UID, &["uid-1"]),
        (EXTRA_NODE_NAME, &["node-a"]),
    ];
    let ok = parse_review(
        &status(true, &["mizzen-ca"], "system:serviceaccount:demo:web", pod),
        "mizzen-ca",
    )
    .expect("valid");
    assert_eq!(
        ok,
        Reviewed {
            namespace: "demo".into(),
            service_account: "web".into(),
            pod_name: Some("web-1".into()),
            pod_uid: Some("uid-1".into()),
            node_name: Some("node-a".into()),
            expires_at: None,
        }
    );

    let bad_users = [
        "system:serviceaccount:demo",
        "system:serviceaccount:demo:web:extra",
        "system:serviceaccount::web",
        "system:serviceaccount:demo:",
        "system:serviceaccount:Demo:web",
        "system:serviceaccount:de/mo:web",
        "system:serviceaccount:demo:we b",
        "system:node:node-a",
        "admin",
        "",
        "system:serviceaccounts:demo:web",
    ];
    for user in bad_users {
        let r = parse_review(&status(true, &["mizzen-ca"], user, &[]), "mizzen-ca");
        assert_eq!(r, Err(AuthError::NotServiceAccount(user.into())), "{user:?}");
    }
    // Authenticated, but not for our audience (or no audiences echoed).
    for auds in [&["other"][..], &[][..]] {
        let r = parse_review(&status(true, auds, "system:serviceaccount:demo:web", &[]), "mizzen-ca");
        assert_eq!(r, Err(AuthError::WrongAudience("mizzen-ca".into())));
    }
    let mut failed = status(false, &["mizzen-ca"], "system:serviceaccount:demo:web", &[]);
    failed.error = Some("token expired".into());
    assert_eq!(
        parse_review(&failed, "mizzen-ca"),
        Err(AuthError::NotAuthenticated("token expired".into()))
    );
    // Several values for a single-valued extra are not trusted.
    let two = parse_review(
        &status(
            true,
            &["mizzen-ca"],
            "system:serviceaccount:demo:web",
            &[(EXTRA_NODE_NAME, &["a", "b"])],
        ),
        "mizzen-ca",
    )
    .expect("valid");
    assert_eq!(two.node_name, None);
}

#[test]
fn token_expiry_reads_the_exp_claim() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"RS256"}"#),
        b64(r#"{"aud":["mizzen-ca"],"exp":1700000600}"#)
    );
    assert_eq!(
        token_expiry(&token),
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_600))
    );
    for bad in ["", "a.b.c", "x", &format!("h.{}.s", b64(r#"{"exp":"soon"}"#))] {
        assert_eq!(token_expiry(bad), None, "{bad}");
    }
}

#[test]
fn garbage_is_refused_before_any_review() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jwt = |claims: &str| format!("{}.{}.{}", b64(r#"{"alg":"RS256"}"#), b64(claims), b64("sig"));
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs()
        + 600;
    assert_eq!(
        precheck(&jwt(&format!(r#"{{"aud":["mizzen-ca"],"exp":{later}}}"#)), "mizzen-ca"),
        Ok(())
    );
    assert_eq!(
        precheck(&jwt(r#"{"aud":"mizzen-ca"}"#), "mizzen-ca"),
        Ok(()),
        "aud as a string, no exp"
    );
    for (token, why) in [
        ("random-garbage".to_string(), "not a JWT"),
        ("a.b.c.d".into(), "not a JWT"),
        (
            format!("{}.{}.", b64(r#"{"alg":"RS256"}"#), b64(r#"{"aud":"mizzen-ca"}"#)),
            "not a signed JWT",
        ),
        (
            format!("{}.{}.{}", b64("nope"), b64(r#"{"aud":"mizzen-ca"}"#), b64("s")),
            "no JWT header",
        ),
        (jwt(r#"{"aud":["someone-else"]}"#), "another audience"),
        (jwt(r#"{"aud":["mizzen-ca"],"exp":1000}"#), "expired"),
    ] {
        assert_eq!(precheck(&token, "mizzen-ca"), Err(AuthError::Unusable(why)), "{token}");
    }
}
