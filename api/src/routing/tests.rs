use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::spec::VirtualServiceSpec;
use super::*;

/// A request as routing sees it.
#[derive(Default)]
struct Req {
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    port: u16,
    labels: BTreeMap<&'static str, &'static str>,
}

impl RequestView for Req {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn query(&self) -> Option<&str> {
        self.query
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn source_label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).copied()
    }
}

fn get(path: &'static str) -> Req {
    Req {
        method: "GET",
        path,
        port: 9080,
        ..Req::default()
    }
}

fn spec(v: serde_json::Value) -> VirtualServiceSpec {
    serde_json::from_value(v).expect("a valid spec")
}

fn table(v: serde_json::Value) -> RouteTable {
    compile(&spec(v), "bookinfo").expect("compiles").table
}

fn subset_for(t: &RouteTable, req: &Req) -> Option<String> {
    decide(t, req, 0)
        .ok()
        .and_then(|d| d.destination.and_then(|d| d.subset.clone()))
}

#[test]
fn the_workshop_header_route_sends_jason_to_v2_and_everyone_else_to_v1() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}
        ]
    }));
    let mut jason = get("/reviews/0");
    jason.headers.push(("end-user", "jason"));
    let mut other = get("/reviews/0");
    other.headers.push(("end-user", "json"));
    assert_eq!(subset_for(&t, &jason).as_deref(), Some("v2"));
    assert_eq!(subset_for(&t, &other).as_deref(), Some("v1"));
    assert_eq!(subset_for(&t, &get("/reviews/0")).as_deref(), Some("v1"));
    let d = decide(&t, &jason, 0).expect("routed");
    assert_eq!(
        (d.index, d.destination.map(|d| d.service.as_str())),
        (0, Some("bookinfo/reviews"))
    );
}

#[test]
fn weights_split_requests_in_proportion_to_the_roll() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
            {"destination": {"host": "reviews", "subset": "v3"}, "weight": 10}
        ]}]
    }));
    let n: u64 = 100_000;
    let mut v3: u64 = 0;
    for i in 0..n {
        // Rolls spread evenly over u32.
        let roll = u32::try_from(i * (u64::from(u32::MAX) + 1) / n).expect("in range");
        if subset_for_roll(&t, roll) == "v3" {
            v3 += 1;
        }
    }
    // 10 % of evenly spread rolls, give or take the one on the boundary.
    assert!(v3.abs_diff(n / 10) <= 1, "{v3} of {n} to v3");
    assert_eq!(subset_for_roll(&t, 0), "v1");
    assert_eq!(subset_for_roll(&t, u32::MAX), "v3");
}

fn subset_for_roll(t: &RouteTable, roll: u32) -> String {
    decide(t, &get("/"), roll)
        .expect("routed")
        .destination
        .and_then(|d| d.subset.clone())
        .unwrap_or_default()
}

#[test]
fn each_condition_of_a_match_is_checked() {
    let with = |h: &'static str, v: &'static str| {
        let mut r = get("/");
        r.headers.push((h, v));
        r
    };
    let query = |q: &'static str| Req {
        query: Some(q),
        ..get("/")
    };
    let mut labelled = get("/");
    labelled.labels.insert("app", "productpage");
    let table_cases: Vec<(serde_json::Value, Req, bool)> = vec![
        (json!({"uri": {"exact": "/ratings"}}), get("/ratings"), true),
        (json!({"uri": {"exact": "/ratings"}}), get("/ratings/1"), false),
        (json!({"uri": {"prefix": "/api/"}}), get("/api/v1"), true),
        (json!({"uri": {"prefix": "/api/"}}), get("/apix"), false),
        // A regex matches the whole path, as Envoy's safe_regex does.
        (json!({"uri": {"regex": "/items/[0-9]+"}}), get("/items/42"), true),
        (json!({"uri": {"regex": "/items/[0-9]+"}}), get("/items/42/x"), false),
        (json!({"uri": {"regex": "/items/\\d+"}}), get("/items/7"), true),
        (json!({"method": {"exact": "GET"}}), get("/"), true),
        (json!({"method": {"exact": "POST"}}), get("/"), false),
        (json!({"headers": {"x-canary": {}}}), with("x-canary", "anything"), true),
        (json!({"headers": {"x-canary": {}}}), get("/"), false),
        (
            json!({"headers": {"End-User": {"prefix": "ja"}}}),
            with("end-user", "jason"),
            true,
        ),
        (json!({"withoutHeaders": {"x-debug": {}}}), get("/"), true),
        (json!({"withoutHeaders": {"x-debug": {}}}), with("x-debug", "1"), false),
        (
            json!({"withoutHeaders": {"x-debug": {"exact": "1"}}}),
            with("x-debug", "0"),
            true,
        ),
        (json!({"queryParams": {"v": {"exact": "2"}}}), query("a=1&v=2"), true),
        (json!({"queryParams": {"v": {"exact": "2"}}}), query("v=3"), false),
        (json!({"queryParams": {"v": {"exact": "2"}}}), get("/"), false),
        (json!({"port": 9080}), get("/"), true),
        (json!({"port": 8080}), get("/"), false),
        (json!({"sourceLabels": {"app": "productpage"}}), labelled, true),
        (json!({"sourceLabels": {"app": "productpage"}}), get("/"), false),
        // Every condition of one match must hold.
        (
            json!({"uri": {"prefix": "/"}, "method": {"exact": "POST"}}),
            get("/"),
            false,
        ),
    ];
    for (m, req, want) in table_cases {
        let t = table(json!({
            "hosts": ["reviews"],
            "http": [{"match": [m.clone()], "route": [{"destination": {"host": "reviews"}}]}]
        }));
        assert_eq!(decide(&t, &req, 0).is_ok(), want, "{m} for {} {}", req.method, req.path);
    }
}

#[test]
fn a_route_with_several_matches_applies_when_any_holds_and_unmatched_requests_are_not_routed() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [{"match": [{"uri": {"exact": "/a"}}, {"uri": {"exact": "/b"}}],
                  "route": [{"destination": {"host": "reviews"}}]}]
    }));
    assert!(decide(&t, &get("/a"), 0).is_ok());
    assert!(decide(&t, &get("/b"), 0).is_ok());
    assert_eq!(decide(&t, &get("/c"), 0).err(), Some(NoRoute::NoMatch));
}

#[test]
fn hosts_name_services_by_short_name_namespace_or_fqdn() {
    let cases = [
        ("reviews", Ok("bookinfo/reviews")),
        ("reviews.prod", Ok("prod/reviews")),
        ("reviews.prod.svc", Ok("prod/reviews")),
        ("reviews.prod.svc.cluster.local", Ok("prod/reviews")),
        ("*.prod.svc.cluster.local", Err("wildcard_host")),
        ("Reviews", Err("not_a_service")),
        ("a.b.c", Err("not_a_service")),
        ("", Err("not_a_service")),
    ];
    for (host, want) in cases {
        let got = compile::service_of("hosts[0]", host, "bookinfo");
        assert_eq!(got.as_deref().map_err(RouteError::reason), want, "{host:?}");
    }
}

#[test]
fn timeouts_retries_and_faults_are_compiled() {
    let t = table(json!({
        "hosts": ["ratings"],
        "http": [{
            "route": [{"destination": {"host": "ratings", "port": {"number": 9080}}}],
            "timeout": "1.5s",
            "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx, connect-failure,503"},
            "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 12.5}},
                      "abort": {"httpStatus": 503}}
        }]
    }));
    let r = &t.routes[0];
    assert_eq!(r.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(
        r.retries,
        Some(Retries {
            attempts: 3,
            per_try_timeout: Some(Duration::from_millis(500)),
            retry_on: vec!["5xx".into(), "connect-failure".into(), "503".into()],
        })
    );
    assert_eq!(
        r.fault,
        Some(Fault {
            delay: Some((Duration::from_secs(7), 125_000)),
            abort: Some((503, 1_000_000)),
        })
    );
    assert_eq!(r.destinations[0].port, Some(9080));
    let t = table(json!({
        "hosts": ["ratings"],
        "http": [{"route": [{"destination": {"host": "ratings"}}], "timeout": "0s",
                  "retries": {"attempts": 0}}]
    }));
    assert_eq!(
        (t.routes[0].timeout, t.routes[0].retries.clone()),
        (None, None),
        "0 turns them off"
    );
}

#[test]
fn what_cannot_be_honoured_is_refused_naming_the_field() {
    let route = |extra: serde_json::Value| {
        let mut r = json!({"route": [{"destination": {"host": "reviews"}}]});
        for (k, v) in extra.as_object().expect("object") {
            r[k] = v.clone();
        }
        json!({"hosts": ["reviews"], "http": [r]})
    };
    let cases: Vec<(serde_json::Value, &str, &str)> = vec![
        (json!({"hosts": [], "http": []}), "no_hosts", "hosts"),
        (
            json!({"hosts": ["reviews"], "http": [{"route": []}]}),
            "no_destination",
            "http[0].route",
        ),
        (
            json!({"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 40}]}]}),
            "weights",
            "http[0].route",
        ),
        (
            json!({"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100}]}]}),
            "weights",
            "http[0].route",
        ),
        (
            route(json!({"match": [{"uri": {"exact": "/a", "prefix": "/b"}}]})),
            "string_match",
            "http[0].match[0].uri",
        ),
        (
            route(json!({"match": [{"uri": {}}]})),
            "string_match",
            "http[0].match[0].uri",
        ),
        (
            route(json!({"match": [{"uri": {"regex": "(unclosed"}}]})),
            "regex",
            "http[0].match[0].uri",
        ),
        (route(json!({"timeout": "soon"})), "duration", "http[0].timeout"),
        (
            route(json!({"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 150.0}}}})),
            "percent",
            "http[0].fault.abort.percentage.value",
        ),
        (
            route(json!({"fault": {"abort": {"httpStatus": 42}}})),
            "status",
            "http[0].fault.abort.httpStatus",
        ),
        (
            route(json!({"match": [{"port": 70000}]})),
            "port",
            "http[0].match[0].port",
        ),
        (
            route(json!({"retries": {"attempts": -1}})),
            "attempts",
            "http[0].retries.attempts",
        ),
        (
            route(json!({"retries": {"attempts": 2, "retryOn": "5xx,sometimes"}})),
            "retry_on",
            "http[0].retries.retryOn",
        ),
    ];
    for (v, reason, field) in cases {
        let err = compile(&spec(v.clone()), "bookinfo").expect_err("refused");
        assert_eq!(err.reason(), reason, "{v}: {err}");
        assert!(err.to_string().starts_with(field), "{err} names {field}");
    }
}

#[test]
fn fields_mizzen_does_not_implement_are_refused_by_name() {
    for (field, value) in [
        ("corsPolicy", json!({})),
        ("mirrorPercent", json!(50)),
        ("directResponse", json!({"status": 200})),
        ("delegate", json!({"name": "other"})),
    ] {
        let mut route = json!({"route": [{"destination": {"host": "reviews"}}]});
        route[field] = value;
        let err = serde_json::from_value::<VirtualServiceSpec>(json!({"hosts": ["reviews"], "http": [route]}))
            .expect_err("refused");
        assert!(err.to_string().contains(&format!("unknown field `{field}`")), "{err}");
    }
    let err =
        serde_json::from_value::<VirtualServiceSpec>(json!({"hosts": ["reviews"], "tls": []})).expect_err("refused");
    assert!(err.to_string().contains("unknown field `tls`"), "{err}");
    let err = serde_json::from_value::<VirtualServiceSpec>(json!({"hosts": ["reviews"], "tcp": [
        {"match": [{"destinationSubnets": ["10.0.0.0/8"]}], "route": [{"destination": {"host": "reviews"}}]}]}))
    .expect_err("refused");
    assert!(err.to_string().contains("unknown field `destinationSubnets`"), "{err}");
}

#[test]
fn the_workshop_tcp_shift_sends_connections_by_port_and_weight() {
    let t = table(json!({
        "hosts": ["tcp-echo"],
        "tcp": [
            {"match": [{"port": 31400}],
             "route": [{"destination": {"host": "tcp-echo", "subset": "v1"}, "weight": 80},
                       {"destination": {"host": "tcp-echo", "subset": "v2"}, "weight": 20}]},
            {"match": [{"sourceLabels": {"role": "tester"}}],
             "route": [{"destination": {"host": "tcp-echo", "subset": "v2"}}]},
        ],
    }));
    let labels = std::collections::BTreeMap::new();
    let subset = |port: u16, labels: &std::collections::BTreeMap<String, String>, roll: u32| {
        super::decide::decide_tcp(&t, port, labels, roll).and_then(|d| d.subset.clone())
    };
    assert_eq!(subset(31400, &labels, 0).as_deref(), Some("v1"));
    assert_eq!(subset(31400, &labels, u32::MAX).as_deref(), Some("v2"));
    // 80 % of the rolls, spread evenly (the middle of each thousandth), go
    // to v1.
    let v1 = (0..1000u32)
        .filter(|i| subset(31400, &labels, i * (u32::MAX / 1000) + u32::MAX / 2000).as_deref() == Some("v1"))
        .count();
    assert_eq!(v1, 800);
    assert_eq!(subset(9000, &labels, 0), None, "no route: as without the rule");
    let tester = std::collections::BTreeMap::from([("role".to_owned(), "tester".to_owned())]);
    assert_eq!(subset(9000, &tester, 0).as_deref(), Some("v2"));
    let bad = compile(
        &spec(json!({"hosts": ["tcp-echo"], "tcp": [{"route": [
            {"destination": {"host": "tcp-echo", "subset": "v1"}, "weight": 80},
            {"destination": {"host": "tcp-echo", "subset": "v2"}, "weight": 30}]}]})),
        "bookinfo",
    )
    .expect_err("refused");
    assert_eq!(
        bad.to_string(),
        "tcp[0].route: weights must be given for every destination and add up to 100, not 110"
    );
}

#[test]
fn durations_read_as_istio_writes_them() {
    let cases = [
        ("10s", Some(Duration::from_secs(10))),
        ("1.5s", Some(Duration::from_millis(1500))),
        ("500ms", Some(Duration::from_millis(500))),
        ("1m30s", Some(Duration::from_secs(90))),
        ("-1s", None),
        ("ten", None),
    ];
    for (text, want) in cases {
        let v = json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}], "timeout": text}]});
        let got = compile(&spec(v), "ns").map(|c| c.table.routes[0].timeout);
        assert_eq!(got.ok().flatten(), want, "{text}");
    }
}

#[test]
fn subsets_select_pods_by_all_their_labels() {
    let dr: spec::DestinationRuleSpec = serde_json::from_value(json!({
        "host": "reviews.bookinfo.svc.cluster.local",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2", "track": "stable"}}
        ]
    }))
    .expect("spec");
    let s = compile_subsets(&dr, "bookinfo").expect("compiles");
    assert_eq!(s.service, "bookinfo/reviews");
    let pod = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert_eq!(
        s.selects("v1", &pod(&[("app", "reviews"), ("version", "v1")])),
        Some(true)
    );
    assert_eq!(s.selects("v2", &pod(&[("version", "v2")])), Some(false), "all labels");
    assert_eq!(
        s.selects("v2", &pod(&[("version", "v2"), ("track", "stable")])),
        Some(true)
    );
    assert_eq!(s.selects("v9", &pod(&[("version", "v9")])), None, "undefined");
}

#[test]
fn subsets_routes_name_without_a_rule_are_reported() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
            {"destination": {"host": "reviews", "subset": "v3"}, "weight": 50}
        ]}]
    }));
    let dr: spec::DestinationRuleSpec =
        serde_json::from_value(json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}))
            .expect("spec");
    let defined = [compile_subsets(&dr, "bookinfo").expect("compiles")];
    assert_eq!(undefined_subsets(&t, &defined), vec![("bookinfo/reviews", "v3")]);
    assert_eq!(
        undefined_subsets(&t, &[]),
        vec![("bookinfo/reviews", "v1"), ("bookinfo/reviews", "v3")]
    );
}

#[test]
fn destination_rules_refuse_what_they_cannot_honour() {
    let cases = [
        (
            json!({"host": "reviews", "subsets": [{"name": "v1"}, {"name": "v1"}]}),
            "duplicate_subset",
        ),
        (json!({"host": "reviews", "subsets": [{"name": "V1"}]}), "subset_name"),
        (json!({"host": "*.local"}), "wildcard_host"),
    ];
    for (v, reason) in cases {
        let dr: spec::DestinationRuleSpec = serde_json::from_value(v.clone()).expect("spec");
        let err = compile_subsets(&dr, "bookinfo").expect_err("refused");
        assert_eq!(err.reason(), reason, "{v}: {err}");
    }
    let err = serde_json::from_value::<spec::DestinationRuleSpec>(
        json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("unknown field `tls`"), "{err}");
}

#[test]
fn a_redirect_route_has_no_destination_and_cannot_have_one() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [{"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 308}},
                 {"route": [{"destination": {"host": "reviews"}}]}]
    }));
    let d = decide(&t, &get("/old/x"), 0).expect("routed");
    assert!(d.destination.is_none());
    assert_eq!(d.route.redirect.as_ref().map(|r| r.code), Some(308));
    let both = compile(
        &spec(
            json!({"hosts": ["r"], "http": [{"redirect": {"uri": "/x"}, "route": [{"destination": {"host": "r"}}]}]}),
        ),
        "ns",
    )
    .expect_err("refused");
    assert_eq!(both.to_string(), "http[0].redirect: cannot be used with route");
    let code = compile(
        &spec(json!({"hosts": ["r"], "http": [{"redirect": {"redirectCode": 200}}]})),
        "ns",
    )
    .expect_err("refused");
    assert_eq!(code.reason(), "status");
}

#[test]
fn a_prefix_rewrite_replaces_the_matched_prefix_and_any_other_the_whole_path() {
    let t = table(json!({
        "hosts": ["reviews"],
        "http": [{"match": [{"uri": {"exact": "/exact"}}, {"uri": {"prefix": "/api/v1/"}}],
                  "rewrite": {"uri": "/v2/"},
                  "route": [{"destination": {"host": "reviews"}}]}]
    }));
    let rewritten = |path: &'static str| {
        let d = decide(&t, &get(path), 0).expect("routed");
        decide::rewritten_path("/v2/", d.matched, path)
    };
    assert_eq!(rewritten("/api/v1/items"), "/v2/items");
    assert_eq!(rewritten("/exact"), "/v2/");
}

#[test]
fn header_operations_name_valid_headers_only() {
    let ok = table(
        json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
        "headers": {"request": {"set": {"X-Version": "v2"}, "add": {"x-extra": "1"}, "remove": ["Cookie"]}}}]}),
    );
    let ops = &ok.routes[0].request_headers;
    assert_eq!(ops.set, [("x-version".to_string(), "v2".to_string())]);
    assert_eq!(ops.remove, ["cookie"]);
    for bad in [
        json!({"request": {"set": {"bad name": "x"}}}),
        json!({"request": {"set": {"x-ok": "line\nbreak"}}}),
        json!({"response": {"remove": ["x-mizzen-response-flags"]}}),
        json!({"request": {"set": {"host": "elsewhere"}}}),
    ] {
        let err = compile(
            &spec(json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}], "headers": bad}]})),
            "ns",
        )
        .expect_err("refused");
        assert_eq!(err.reason(), "header", "{bad}: {err}");
    }
}

#[test]
fn a_mirror_is_a_destination_with_a_share() {
    let t = table(
        json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r", "subset": "v1"}}],
        "mirror": {"host": "r", "subset": "v2"}, "mirrorPercentage": {"value": 25.0}}]}),
    );
    let m = t.routes[0].mirror.as_ref().expect("mirror");
    assert_eq!((m.destination.subset.as_deref(), m.share), (Some("v2"), 250_000));
    let err = compile(
        &spec(json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}], "mirrorPercentage": {"value": 5.0}}]})),
        "ns",
    )
    .expect_err("refused");
    assert_eq!(err.reason(), "conflict");
}
