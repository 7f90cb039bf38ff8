use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::*;

const TYPE: &str = "type.googleapis.com/test.Thing";

fn snap(items: &[(&str, &str)]) -> Snapshot {
    pack(
        TYPE,
        items.iter().map(|(n, body)| (n.to_string(), body.as_bytes().to_vec())),
    )
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    resp.resources.iter().map(|r| r.name.as_str()).collect()
}

fn subscribing(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn versions_name_contents() {
    let a = snap(&[("x/a", "one")]);
    let b = snap(&[("x/a", "one")]);
    let c = snap(&[("x/a", "two")]);
    assert_eq!(a, b);
    assert_ne!(a.resources["x/a"].version, c.resources["x/a"].version);
}

#[test]
fn nothing_is_sent_before_the_client_asks() {
    let mut state = StreamState::new(TYPE);
    assert!(state.diff(&snap(&[("x/a", "1")]), "1".into()).is_none());
    assert!(!state.started());
}

#[test]
fn streams_carry_only_what_changed() {
    let first = snap(&[("demo/web", "1"), ("other/web", "1")]);
    let mut state = StreamState::new(TYPE);
    state.subscribe(&Default::default()).expect("valid");
    let resp = state.diff(&first, "1".into()).expect("everything at first");
    assert_eq!(names(&resp), ["demo/web", "other/web"]);
    assert_eq!(resp.type_url, TYPE);
    assert!(resp.removed_resources.is_empty());
    assert!(state.diff(&first, "2".into()).is_none(), "nothing changed");

    let next = snap(&[("demo/web", "2")]);
    let resp = state.diff(&next, "3".into()).expect("a change");
    assert_eq!(names(&resp), ["demo/web"]);
    assert_eq!(resp.removed_resources, ["other/web"]);
    assert_eq!(resp.nonce, "3");
}

#[test]
fn a_reconnecting_client_gets_only_what_it_lacks() {
    let snap = snap(&[("demo/web", "2")]);
    let mut initial: HashMap<String, String> = snap
        .resources
        .iter()
        .map(|(k, r)| (k.clone(), r.version.clone()))
        .collect();
    initial.insert("gone/svc".into(), "x".into());
    let mut again = StreamState::new(TYPE);
    again
        .subscribe(&DeltaDiscoveryRequest {
            initial_resource_versions: initial,
            ..Default::default()
        })
        .expect("valid");
    let resp = again.diff(&snap, "1".into()).expect("removal");
    assert!(resp.resources.is_empty());
    assert_eq!(resp.removed_resources, ["gone/svc"]);
}

#[test]
fn named_subscriptions_get_only_their_names() {
    let snap = snap(&[("demo/web", "1"), ("other/web", "1")]);
    let mut state = StreamState::new(TYPE);
    state.subscribe(&subscribing(&["other/web"])).expect("valid");
    let resp = state.diff(&snap, "1".into()).expect("one");
    assert_eq!(names(&resp), ["other/web"]);
    state
        .subscribe(&DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["other/web".into()],
            ..Default::default()
        })
        .expect("valid");
    let resp = state.diff(&snap, "2".into()).expect("removal on unsubscribe");
    assert_eq!(resp.removed_resources, ["other/web"]);
}

#[test]
fn a_pinned_stream_carries_its_names_whatever_the_client_asks() {
    let snap = snap(&[("demo/web-1", "mine"), ("demo/web-2", "theirs")]);
    let mut state = StreamState::pinned(TYPE, ["demo/web-1".to_string()]);
    state.subscribe(&subscribing(&["*", "demo/web-2"])).expect("valid");
    let resp = state.diff(&snap, "1".into()).expect("its own");
    assert_eq!(names(&resp), ["demo/web-1"]);
    // A claim to hold another pod's resource is not taken up either.
    let mut resumed = StreamState::pinned(TYPE, ["demo/web-1".to_string()]);
    resumed
        .subscribe(&DeltaDiscoveryRequest {
            initial_resource_versions: [
                ("demo/web-1".to_string(), snap.resources["demo/web-1"].version.clone()),
                ("demo/web-2".to_string(), "v".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .expect("valid");
    assert!(
        resumed.diff(&snap, "1".into()).is_none(),
        "it holds the current version of its own, and never held another's"
    );
}

// Issue #10, item 13: any local caller may subscribe; what one stream may
// hold is bounded.
#[test]
fn a_stream_may_not_subscribe_to_unbounded_names_or_versions() {
    let many: Vec<String> = (0..=MAX_NAMES_PER_STREAM).map(|i| format!("ns/svc-{i}")).collect();
    let err = StreamState::new(TYPE)
        .subscribe(&DeltaDiscoveryRequest {
            resource_names_subscribe: many.clone(),
            ..Default::default()
        })
        .expect_err("too many names");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let claims = many.into_iter().map(|n| (n, "v".to_string())).collect();
    let err = StreamState::new(TYPE)
        .subscribe(&DeltaDiscoveryRequest {
            initial_resource_versions: claims,
            ..Default::default()
        })
        .expect_err("too many initial versions");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let long = "n/".to_string() + &"x".repeat(MAX_NAME_LEN);
    let err = StreamState::new(TYPE)
        .subscribe(&subscribing(&[&long]))
        .expect_err("too long a name");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn acks_track_the_last_response() {
    let mut acks = Acks::default();
    assert_eq!(acks.answer("", "", None), Answer::Fresh);
    let n1 = acks.send("v1").expect("first response");
    assert_eq!(acks.send("v1"), None, "the client has v1");
    assert_eq!(acks.answer("0", "v0", None), Answer::Stale);
    assert_eq!(acks.answer(&n1, "v1", None), Answer::Ack);
    assert_eq!(acks.send("v1"), None, "acked: nothing to resend");
    let n2 = acks.send("v2").expect("a change");
    assert_eq!(
        acks.answer(&n1, "v1", None),
        Answer::Stale,
        "an answer to an older response"
    );
    assert_eq!(acks.answer(&n2, "v1", Some("bad")), Answer::Nack("bad".into()));
    assert_eq!(acks.version(), Some("v2"));
    assert_eq!(acks.send("v2"), None, "a NACKed version is not resent");
    assert_eq!(acks.answer("", "", None), Answer::Fresh);
    assert!(
        acks.send("v2").is_some(),
        "a fresh request is answered even if nothing changed"
    );
}
