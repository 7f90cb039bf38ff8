use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::*;

const TYPE: &str = "type.googleapis.com/test.Thing";

/// A snapshot as [`publish`] gives them: each of a new generation, with
/// no record of what changed.
fn snap(items: &[(&str, &str)]) -> Snapshot {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Snapshot {
        generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        ..pack(
            TYPE,
            items.iter().map(|(n, body)| (n.to_string(), body.as_bytes().to_vec())),
        )
    }
}

impl StreamState {
    /// The push that brings the client from what it holds to `snap`, in
    /// one response of any size, or `None` when it is up to date.
    fn diff(&mut self, snap: &Snapshot, nonce: String) -> Option<DeltaDiscoveryResponse> {
        let mut push = self.push(snap)?;
        let mut resp = push.next_response(usize::MAX)?;
        resp.nonce = nonce;
        Some(resp)
    }
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
    assert_eq!(a.resources, b.resources);
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

fn resource(name: &str, body: &str) -> (String, Option<Arc<Resource>>) {
    let snap = pack(TYPE, [(name.to_string(), body.as_bytes().to_vec())]);
    (name.to_string(), snap.resources.get(name).cloned())
}

#[test]
fn published_changes_name_what_changed_and_streams_compare_only_those() {
    let (tx, rx) = tokio::sync::watch::channel(None);
    assert!(publish_changes(
        &tx,
        [resource("x/a", "1"), resource("x/b", "1")],
        Default::default()
    ));
    let first = rx.borrow().clone().expect("published");
    assert_eq!(
        (first.generation, first.changed.is_none()),
        (1, true),
        "the first names nothing"
    );

    let mut state = StreamState::new(TYPE);
    state.subscribe(&Default::default()).expect("valid");
    let resp = state.diff(&first, "1".into()).expect("everything at first");
    assert_eq!(names(&resp), ["x/a", "x/b"]);

    assert!(
        !publish_changes(&tx, [resource("x/a", "1")], Default::default()),
        "the same version is no change"
    );
    assert!(publish_changes(
        &tx,
        [resource("x/a", "2"), ("x/b".into(), None)],
        Default::default()
    ));
    let second = rx.borrow().clone().expect("published");
    assert_eq!(second.generation, 2);
    let changed: Vec<&str> = second
        .changed
        .iter()
        .flat_map(|c| c.iter().map(String::as_str))
        .collect();
    assert_eq!(changed, ["x/a", "x/b"]);
    let resp = state.diff(&second, "2".into()).expect("the change");
    assert_eq!(names(&resp), ["x/a"]);
    assert_eq!(resp.removed_resources, ["x/b"]);
    assert!(state.diff(&second, "3".into()).is_none(), "already compared");
}

#[test]
fn a_stream_that_missed_a_snapshot_compares_everything() {
    let (tx, rx) = tokio::sync::watch::channel(None);
    publish_changes(&tx, [resource("x/a", "1"), resource("x/b", "1")], Default::default());
    let mut state = StreamState::new(TYPE);
    state.subscribe(&Default::default()).expect("valid");
    state.diff(&rx.borrow().clone().expect("first"), "1".into());
    publish_changes(&tx, [resource("x/a", "2")], Default::default());
    publish_changes(&tx, [resource("x/c", "1")], Default::default());
    let third = rx.borrow().clone().expect("third");
    let resp = state.diff(&third, "2".into()).expect("both changes");
    assert_eq!(names(&resp), ["x/a", "x/c"], "x/a changed in the snapshot it missed");
}

#[test]
fn a_push_is_split_into_responses_under_the_limit() {
    let items: Vec<(String, String)> = (0..50).map(|i| (format!("ns/svc-{i:02}"), "x".repeat(100))).collect();
    let snap = Snapshot {
        generation: 1,
        ..pack(TYPE, items.iter().map(|(n, b)| (n.clone(), b.clone().into_bytes())))
    };
    let mut state = StreamState::new(TYPE);
    state.subscribe(&Default::default()).expect("valid");
    let mut push = state.push(&snap).expect("everything");
    let mut got = Vec::new();
    let mut responses = Vec::new();
    while let Some(resp) = push.next_response(1_000) {
        use prost::Message;
        assert!(resp.encoded_len() <= 1_000, "{} bytes", resp.encoded_len());
        got.extend(resp.resources.iter().map(|r| r.name.clone()));
        responses.push(resp);
    }
    assert!(responses.len() >= 6, "{} responses", responses.len());
    let (last, before) = responses.split_last().expect("responses");
    assert!(before.iter().all(|r| r.system_version_info == MORE));
    assert_eq!(last.system_version_info, "", "the last response ends the push");
    let want: Vec<String> = items.into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, want, "every resource once, in order");
}

#[test]
fn a_resource_larger_than_the_limit_goes_alone() {
    let snap = Snapshot {
        generation: 1,
        ..pack(
            TYPE,
            [
                ("ns/big".to_string(), vec![7; 5_000]),
                ("ns/small".to_string(), vec![1; 10]),
            ],
        )
    };
    let mut state = StreamState::new(TYPE);
    state.subscribe(&Default::default()).expect("valid");
    let mut push = state.push(&snap).expect("everything");
    let first = push.next_response(1_000).expect("first");
    assert_eq!(names(&first), ["ns/big"]);
    assert_eq!(first.system_version_info, MORE);
    let second = push.next_response(1_000).expect("second");
    assert_eq!(names(&second), ["ns/small"]);
    assert!(push.next_response(1_000).is_none());
}

#[test]
fn a_namespace_subscription_follows_that_namespace_only() {
    let mut state = StreamState::new(TYPE);
    state.subscribe(&subscribing(&["demo/*", "other/api"])).expect("valid");
    let first = snap(&[("demo/web", "1"), ("other/api", "1"), ("other/web", "1")]);
    let resp = state.diff(&first, "1".into()).expect("demo's and the named one");
    assert_eq!(names(&resp), ["demo/web", "other/api"]);
    let next = snap(&[
        ("demo/web", "1"),
        ("demo/db", "1"),
        ("other/api", "1"),
        ("other/web", "2"),
    ]);
    let resp = state.diff(&next, "2".into()).expect("a new Service of demo");
    assert_eq!(names(&resp), ["demo/db"], "other/web changed but is not followed");
    let unsubscribing = DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["demo/*".into()],
        ..Default::default()
    };
    state.subscribe(&unsubscribing).expect("valid");
    let resp = state.diff(&next, "3".into()).expect("demo removed");
    assert!(resp.resources.is_empty());
    assert_eq!(resp.removed_resources, ["demo/db", "demo/web"]);
}

#[test]
fn a_namespace_subscription_must_name_a_namespace() {
    for bad in ["/*", "Demo/*", "-x/*", "a/b/*"] {
        let mut state = StreamState::new(TYPE);
        assert!(state.subscribe(&subscribing(&[bad])).is_err(), "{bad}");
    }
}

#[test]
fn an_address_subscription_follows_what_the_address_belongs_to() {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut addresses = crate::discovery::Addresses::default();
    let web = mizzen_api::proto::discovery::Service {
        cluster_ips: vec!["10.0.0.10".into()],
        ..Default::default()
    };
    addresses.update("demo/web", Some(&web));
    publish_changes(
        &tx,
        [resource("demo/web", "1"), resource("demo/db", "1")],
        addresses.snapshot(),
    );
    let first = rx.borrow().clone().expect("first");
    let mut state = StreamState::new(TYPE);
    state
        .subscribe(&subscribing(&["address/10.0.0.10", "address/192.0.2.1"]))
        .expect("valid");
    let resp = state.diff(&first, "1".into()).expect("an answer");
    assert_eq!(names(&resp), ["demo/web"], "the Service whose cluster IP it is");
    assert_eq!(
        resp.removed_resources,
        ["address/192.0.2.1"],
        "no Service has this address"
    );
    assert!(state.diff(&first, "2".into()).is_none(), "answered once");

    // The address moves to another Service: that one is followed now.
    let mut api = web.clone();
    api.name = "api".into();
    addresses.update("demo/web", None);
    addresses.update("demo/api", Some(&api));
    publish_changes(
        &tx,
        [("demo/web".into(), None), resource("demo/api", "1")],
        addresses.snapshot(),
    );
    let second = rx.borrow().clone().expect("second");
    let resp = state.diff(&second, "3".into()).expect("the move");
    assert_eq!(names(&resp), ["demo/api"]);
    assert_eq!(resp.removed_resources, ["demo/web"]);
    assert!(state.subscribe(&subscribing(&["address/not-an-ip"])).is_err());
}

#[test]
fn a_client_that_follows_nothing_existing_still_gets_a_first_answer() {
    let mut state = StreamState::new(TYPE);
    state.subscribe(&subscribing(&["empty/*"])).expect("valid");
    let snap = snap(&[("demo/web", "1")]);
    let resp = state.diff(&snap, "1".into()).expect("an empty first response");
    assert!(resp.resources.is_empty() && resp.removed_resources.is_empty());
    assert!(state.diff(&snap, "2".into()).is_none(), "once");
}
