use serde_json::json;

use super::grpc::GRPCRouteSpec;
use super::*;
use crate::routing::decide::rewritten_path;
use crate::routing::{RequestView, compile, decide};

fn route(v: serde_json::Value) -> HTTPRouteSpec {
    serde_json::from_value(v).expect("route")
}

fn bound<'a>(key: &'a str, created: &'a str, spec: &'a HTTPRouteSpec) -> Bound<'a> {
    Bound {
        key,
        created,
        spec,
        port: None,
    }
}

/// A GET of `path` with `headers`.
struct Req {
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

impl RequestView for Req {
    fn method(&self) -> &str {
        "GET"
    }
    fn path(&self) -> &str {
        self.path
    }
    fn query(&self) -> Option<&str> {
        None
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
    fn port(&self) -> u16 {
        80
    }
    fn source_label(&self, _: &str) -> Option<&str> {
        None
    }
}

fn get(path: &'static str) -> Req {
    Req {
        path,
        headers: Vec::new(),
    }
}

/// Where `req` goes under the routes bound to `demo/reviews`.
fn service_for(routes: &[Bound<'_>], req: &Req) -> Option<String> {
    let spec = translate("demo/reviews", routes);
    let table = compile(&spec, "demo").expect("the translation compiles").table;
    let d = decide(&table, req, 0).ok()?;
    d.destination.map(|d| d.service.clone())
}

fn reviews_parent() -> serde_json::Value {
    json!([{"group": "", "kind": "Service", "name": "reviews", "port": 9080}])
}

#[test]
fn a_route_binds_to_the_services_its_parent_refs_name_in_its_namespace() {
    let r = route(json!({"parentRefs": [
        {"group": "", "kind": "Service", "name": "reviews", "port": 9080},
        {"group": "", "kind": "Service", "name": "ratings", "namespace": "demo"},
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        {"group": "", "kind": "Service", "name": "other", "namespace": "elsewhere"}]}));
    assert_eq!(
        parents(&r, "demo"),
        [
            ("demo/reviews".to_string(), Some(9080)),
            ("demo/ratings".to_string(), None)
        ]
    );
    let err = check(&r, "demo").expect_err("a consumer route");
    assert!(err.to_string().starts_with("spec.parentRefs[3].namespace"), "{err}");
}

#[test]
fn a_header_match_sends_jason_to_v2_and_the_rest_to_v1() {
    let r = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}],
         "backendRefs": [{"name": "reviews-v2", "port": 9080}]},
        {"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]}));
    let routes = [bound("demo/r", "2026-01-01T00:00:00Z", &r)];
    let jason = Req {
        path: "/",
        headers: vec![("end-user", "jason")],
    };
    assert_eq!(service_for(&routes, &jason).as_deref(), Some("demo/reviews-v2"));
    assert_eq!(service_for(&routes, &get("/")).as_deref(), Some("demo/reviews-v1"));
}

#[test]
fn the_most_specific_match_wins_across_rules_and_routes() {
    let older = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "short", "port": 80}]},
        {"matches": [{"path": {"type": "Exact", "value": "/api/v1/exact"}}], "backendRefs": [{"name": "exact", "port": 80}]}]}));
    let newer = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v1/"}}], "backendRefs": [{"name": "long", "port": 80}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [{"name": "tie", "port": 80}]}]}));
    let routes = [
        bound("demo/newer", "2026-02-01T00:00:00Z", &newer),
        bound("demo/older", "2026-01-01T00:00:00Z", &older),
    ];
    let to = |p: &'static str| service_for(&routes, &get(p));
    assert_eq!(to("/api/v1/exact").as_deref(), Some("demo/exact"));
    assert_eq!(to("/api/v1/items").as_deref(), Some("demo/long"));
    // Equal prefixes: the older route wins.
    assert_eq!(to("/api/other").as_deref(), Some("demo/short"));
    // Prefixes match whole segments.
    assert_eq!(to("/apis"), None);
    assert_eq!(to("/api").as_deref(), Some("demo/short"));
}

#[test]
fn relative_weights_become_percentages_and_all_zero_answers_500() {
    assert_eq!(percentages(&[9, 1]), Some(vec![90, 10]));
    assert_eq!(percentages(&[1, 1, 1]), Some(vec![34, 33, 33]));
    assert_eq!(percentages(&[1, 0]), Some(vec![100, 0]));
    assert_eq!(percentages(&[0, 0]), None);
    let r = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"backendRefs": [{"name": "reviews-v1", "port": 9080, "weight": 0}]}]}));
    let spec = translate("demo/reviews", &[bound("demo/r", "t", &r)]);
    let abort = spec.http[0]
        .fault
        .as_ref()
        .and_then(|f| f.abort.as_ref())
        .map(|a| a.http_status);
    assert_eq!(abort, Some(500));
}

#[test]
fn a_prefix_rewrite_replaces_only_the_prefix_and_a_full_one_the_whole_path() {
    let prefix = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]}]}));
    let full = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/fixed"}}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]}]}));
    let rewritten = |r: &HTTPRouteSpec, path: &'static str| {
        let spec = translate("demo/reviews", &[bound("demo/r", "t", r)]);
        let table = compile(&spec, "demo").expect("compiles").table;
        let d = decide(&table, &get(path), 0).expect("routed");
        let uri = d
            .route
            .rewrite
            .as_ref()
            .and_then(|r| r.uri.as_deref())
            .expect("rewrite");
        rewritten_path(uri, d.matched, path)
    };
    assert_eq!(rewritten(&prefix, "/old"), "/new");
    assert_eq!(rewritten(&prefix, "/old/a/b"), "/new/a/b");
    assert_eq!(rewritten(&full, "/old/a"), "/fixed");
}

#[test]
fn what_mizzen_does_not_implement_is_refused_by_name() {
    let cases = [
        (json!({"hostnames": ["reviews.example.com"]}), "spec.hostnames"),
        (
            json!({"rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "y", "name": "z"}}]}]}),
            "spec.rules[0].filters[0].type ExtensionRef",
        ),
        (
            json!({"rules": [{"sessionPersistence": {"type": "Cookie"}}]}),
            "spec.rules[0].sessionPersistence",
        ),
        (
            json!({"rules": [{"backendRefs": [{"name": "x", "port": 80, "filters": [{"type": "RequestHeaderModifier"}]}]}]}),
            "spec.rules[0].backendRefs[0].filters",
        ),
    ];
    for (mut v, field) in cases {
        v["parentRefs"] = reviews_parent();
        let err = check(&route(v), "demo").expect_err("refused");
        assert!(err.to_string().starts_with(field), "{field}: {err}");
        assert_eq!(err.reason(), "UnsupportedValue");
    }
    let other_ns = route(json!({"parentRefs": reviews_parent(), "rules": [
        {"backendRefs": [{"name": "x", "namespace": "elsewhere", "port": 80}]}]}));
    assert_eq!(
        check(&other_ns, "demo").expect_err("refused").unresolved(),
        Some("RefNotPermitted")
    );
}

#[test]
fn filters_and_timeouts_carry_over() {
    let r = route(json!({"parentRefs": reviews_parent(), "rules": [{
        "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-version", "value": "v2"}], "remove": ["x-debug"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-routed", "value": "yes"}]}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}, "percent": 25}}],
        "timeouts": {"request": "10s", "backendRequest": "2s"},
        "backendRefs": [{"name": "reviews", "port": 9080}]}]}));
    let spec = translate("demo/reviews", &[bound("demo/r", "t", &r)]);
    let table = compile(&spec, "demo").expect("compiles").table;
    let route = &table.routes[0];
    assert_eq!(route.timeout, Some(std::time::Duration::from_secs(2)));
    assert_eq!(route.request_headers.set, [("x-version".to_string(), "v2".to_string())]);
    assert_eq!(
        route.response_headers.add,
        [("x-routed".to_string(), "yes".to_string())]
    );
    let mirror = route.mirror.as_ref().expect("mirror");
    assert_eq!(
        (mirror.destination.service.as_str(), mirror.share),
        ("demo/shadow", 250_000)
    );
    let redirect = route_redirect();
    let spec = translate("demo/reviews", &[bound("demo/r", "t", &redirect)]);
    let table = compile(&spec, "demo").expect("compiles").table;
    assert_eq!(table.routes[0].redirect.as_ref().map(|r| r.code), Some(302));
}

fn route_redirect() -> HTTPRouteSpec {
    route(json!({"parentRefs": reviews_parent(), "rules": [{
        "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"}}}]}]}))
}

// GRPCRoutes, read as HTTPRoutes.

fn grpc_route(v: serde_json::Value) -> GRPCRouteSpec {
    serde_json::from_value(v).expect("route")
}

/// The backend Service a call to `path` with `headers` reaches.
fn grpc_backend(
    spec: &GRPCRouteSpec,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
) -> Option<String> {
    let http = spec.as_http().expect("translates");
    check(&http, "demo").expect("applies");
    let bound = [Bound {
        key: "demo/r",
        created: "2026-01-01T00:00:00Z",
        spec: &http,
        port: None,
    }];
    let vs = translate("demo/echo", &bound);
    let table = compile(&vs, "demo").expect("compiles").table;
    decide(&table, &Req { path, headers }, 0)
        .ok()
        .and_then(|d| d.destination.map(|d| d.service.clone()))
}

#[test]
fn method_matches_route_by_service_and_method_most_specific_first() {
    let spec = grpc_route(serde_json::json!({
    "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
    "rules": [
        {"matches": [{"method": {"service": "demo.Echo"}}], "backendRefs": [{"name": "echo-service", "port": 80}]},
        {"matches": [{"method": {"method": "Health"}}], "backendRefs": [{"name": "echo-health", "port": 80}]},
        {"matches": [{"method": {"service": "demo.Echo", "method": "Unary"},
                      "headers": [{"name": "end-user", "value": "jason"}]}],
         "backendRefs": [{"name": "echo-jason", "port": 80}]},
        {"matches": [{"method": {"type": "RegularExpression", "service": "demo\\.v[0-9]+\\.Echo"}}],
         "backendRefs": [{"name": "echo-versioned", "port": 80}]},
        {"backendRefs": [{"name": "echo", "port": 80}]},
    ]}));
    let at = |path, headers| grpc_backend(&spec, path, headers);
    assert_eq!(
        at("/demo.Echo/Unary", vec![("end-user", "jason")]).as_deref(),
        Some("demo/echo-jason")
    );
    assert_eq!(at("/demo.Echo/Unary", vec![]).as_deref(), Some("demo/echo-service"));
    assert_eq!(at("/demo.Echo/Chat", vec![]).as_deref(), Some("demo/echo-service"));
    assert_eq!(
        at("/demo.EchoX/Chat", vec![]).as_deref(),
        Some("demo/echo"),
        "whole service names"
    );
    assert_eq!(at("/other.Svc/Health", vec![]).as_deref(), Some("demo/echo-health"));
    assert_eq!(at("/demo.v2.Echo/Chat", vec![]).as_deref(), Some("demo/echo-versioned"));
    assert_eq!(at("/other.Svc/Call", vec![]).as_deref(), Some("demo/echo"));
}

#[test]
fn what_mizzen_lacks_is_refused_by_the_grpc_routes_field() {
    let spec = grpc_route(serde_json::json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"sessionPersistence": {"sessionName": "s"}, "backendRefs": [{"name": "echo"}]}]}));
    let err = check(&spec.as_http().expect("translates"), "demo").expect_err("refused");
    assert_eq!(
        err.to_string(),
        "spec.rules[0].sessionPersistence: not implemented by Mizzen; the route applies to nothing until it is removed"
    );
    let spec = grpc_route(serde_json::json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"matches": [{"method": {"type": "Prefix", "service": "a"}}], "backendRefs": [{"name": "echo"}]}]}));
    let err = spec.as_http().expect_err("refused");
    assert_eq!(
        err.to_string(),
        "spec.rules[0].matches[0].method.type: \"Prefix\" is not valid here"
    );
}
