//! Traffic management end to end, on the real control plane: a
//! `DestinationRule` names two subsets of Service `web` by pod label
//! (`web-a` is `version: v1`, `web-b` is `version: v2`), a
//! `VirtualService` routes it, both applied with the real kubectl in
//! Istio's YAML (only the apiVersion changed), and the client app's
//! requests are made with curl as the app's UID, so the client's proxy
//! routes them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use mizzen_tests::daemon::proxy_metric;
use mizzen_tests::http_mesh::{APP_UID, HttpMesh};
use mizzen_tests::traffic::{
    Answer, ROLLOUT, all_from, all_under, apply, at_once, by_pod, get, routed_ab, until, versioned,
};
use mizzen_tests::{Cluster, eventually_some};

#[tokio::test]
async fn a_header_match_sends_jason_to_v2_and_everyone_else_to_v1() -> anyhow::Result<()> {
    let m = versioned("traffic-ab").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts:
  - web
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: web
        subset: v2
  - route:
    - destination:
        host: web
        subset: v1
"#,
    )
    .await?;
    // The route is in place once both hold at once (the balancer alone
    // may send a run of requests to one replica, never jason's to one and
    // the others' to the other).
    routed_ab(&m).await?;
    let jason = get(&m, "/", &["end-user: jason"], 20).await?;
    assert_eq!(by_pod(&jason), BTreeMap::from([("web-b".into(), 20)]), "{jason:?}");
    let others = get(&m, "/", &["end-user: someone"], 20).await?;
    assert_eq!(by_pod(&others), BTreeMap::from([("web-a".into(), 20)]), "{others:?}");
    Ok(())
}

#[tokio::test]
async fn a_request_no_route_matches_gets_404_with_flag_nr() -> anyhow::Result<()> {
    let m = versioned("traffic-nr").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - match:
    - uri:
        prefix: /api/
    route:
    - destination: {host: web}
"#,
    )
    .await?;
    let answers = until(&m, "/other", &[], "404 for an unrouted path", |a| {
        a.iter().all(|a| a.status == 404)
    })
    .await?;
    assert!(
        answers.iter().all(|a| a.flags == "NR" && a.pod.is_none()),
        "{answers:?}"
    );
    let routed = get(&m, "/api/x", &[], 5).await?;
    assert!(routed.iter().all(|a| a.status == 200), "{routed:?}");
    Ok(())
}

#[tokio::test]
async fn a_90_10_split_holds_over_2000_requests_within_3_percent() -> anyhow::Result<()> {
    let m = versioned("traffic-split").await?;
    let split = |v1: u32, v2: u32| {
        format!(
            r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - headers: {{response: {{set: {{x-test-rule: split-{v1}-{v2}}}}}}}
    route:
    - destination: {{host: web, subset: v1}}
      weight: {v1}
    - destination: {{host: web, subset: v2}}
      weight: {v2}
"#
        )
    };
    apply(&m, &split(90, 10)).await?;
    until(&m, "/", &[], "the split in place", all_under("split-90-10")).await?;
    let answers = get(&m, "/", &[], 2000).await?;
    let counts = by_pod(&answers);
    let v2 = counts.get("web-b").copied().unwrap_or(0) as f64 / 2000.0;
    eprintln!("90/10 split over 2000 requests: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 2000);
    assert!(
        (v2 - 0.10).abs() <= 0.03,
        "v2 took {:.1} % of 2000: {counts:?}",
        v2 * 100.0
    );
    Ok(())
}

#[tokio::test]
async fn a_route_timeout_answers_504_ut_when_the_backend_is_slower() -> anyhow::Result<()> {
    let m = versioned("traffic-timeout").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
    timeout: 1s
"#,
    )
    .await?;
    let answers = until(&m, "/sleep/2000", &[], "504 for a 2 s answer", |a| {
        a.iter().all(|a| a.status == 504)
    })
    .await?;
    assert!(answers.iter().all(|a| a.flags == "UT"), "{answers:?}");
    // Faster answers are not cut.
    let quick = get(&m, "/sleep/100", &[], 5).await?;
    assert!(quick.iter().all(|a| a.status == 200), "{quick:?}");
    Ok(())
}

#[tokio::test]
async fn a_delay_fault_holds_every_request_for_its_fixed_delay() -> anyhow::Result<()> {
    let m = versioned("traffic-delay").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - fault:
      delay:
        fixedDelay: 1500ms
        percentage: {value: 100}
    route:
    - destination: {host: web}
"#,
    )
    .await?;
    eventually_some(ROLLOUT, "the delay in place", || async {
        let started = std::time::Instant::now();
        let a = get(&m, "/", &[], 2).await?;
        Ok((started.elapsed() >= Duration::from_secs(3) && a.iter().all(|a| a.status == 200)).then_some(()))
    })
    .await?;
    let (_, text) = proxy_metric(&m.client_ip, "mizzen_requests_total").await?;
    let flagged: f64 = text
        .lines()
        .filter(|l| l.starts_with("mizzen_requests_total{") && l.contains("response_flags=\"DI\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(flagged >= 2.0, "requests flagged DI: {flagged}\n{text}");
    Ok(())
}

#[tokio::test]
async fn an_abort_fault_of_half_answers_about_half_with_its_status() -> anyhow::Result<()> {
    let m = versioned("traffic-abort").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - fault:
      abort:
        httpStatus: 503
        percentage: {value: 50}
    route:
    - destination: {host: web}
"#,
    )
    .await?;
    until(&m, "/", &[], "aborts", |a| a.iter().any(|a| a.flags == "FI")).await?;
    let answers = get(&m, "/", &[], 400).await?;
    let aborted: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(
        aborted.iter().all(|a| a.flags == "FI" && a.pod.is_none()),
        "{aborted:?}"
    );
    let ok = answers.iter().filter(|a| a.status == 200).count();
    eprintln!("abort 50 %: {} of 400 aborted", aborted.len());
    assert_eq!(aborted.len() + ok, 400, "only 200s and aborts");
    // 400 draws of a fair coin: within ±15 % of half with certainty in
    // practice (more than 6 standard deviations).
    assert!((140..=260).contains(&aborted.len()), "{} of 400 aborted", aborted.len());
    Ok(())
}

#[tokio::test]
async fn retries_turn_a_30_percent_failing_backend_into_99_percent_success() -> anyhow::Result<()> {
    let m = versioned("traffic-retry").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
    retries:
      attempts: 5
      perTryTimeout: 2s
      retryOn: 5xx
"#,
    )
    .await?;
    eventually_some(ROLLOUT, "retries in place", || async {
        let (retries, _) = proxy_metric(&m.client_ip, "mizzen_proxy_retries_total").await?;
        if retries > 0.0 {
            return Ok(Some(()));
        }
        get(&m, "/fail/30", &[], 20).await?;
        Ok(None)
    })
    .await?;
    let (before, _) = proxy_metric(&m.client_ip, "mizzen_proxy_retries_total").await?;
    let answers = get(&m, "/fail/30", &[], 500).await?;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!(ok >= 495, "{ok} of 500 succeeded: {:?}", by_pod(&answers));
    // About 0.43 retries per request (0.3 + 0.09 + …); never more than the
    // requests themselves.
    let (after, _) = proxy_metric(&m.client_ip, "mizzen_proxy_retries_total").await?;
    let retries = after - before;
    eprintln!("30 % failing backend: {ok} of 500 succeeded with {retries} retries");
    assert!(retries > 50.0 && retries < 500.0, "{retries} retries for 500 requests");
    Ok(())
}

#[tokio::test]
async fn a_virtual_service_with_a_field_mizzen_lacks_is_refused_by_kubectl_naming_it() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let ns = cluster
        .namespace(&cluster.client().await?, "traffic-refused", &[])
        .await?;
    mizzen_tests::mesh::install_manifests(cluster).await?;
    let yaml = r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
    corsPolicy:
      allowOrigins: [{exact: "https://example.com"}]
"#;
    let err = cluster.apply(&ns, yaml).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("unknown field \"spec.http[0].corsPolicy\""), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_full_connection_pool_answers_503_uo_at_once() -> anyhow::Result<()> {
    let m = versioned("traffic-pool").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"#,
    )
    .await?;
    // Two slow requests at once: once the limits are in place, the second
    // waits for the first rather than going to the other replica.
    eventually_some(ROLLOUT, "the pool limits in place", || async {
        let flags: Vec<String> = at_once(&m, "/sleep/1000", 3)
            .await?
            .into_iter()
            .map(|a| a.flags)
            .collect();
        Ok(flags.iter().any(|f| f == "UO").then_some(()))
    })
    .await?;
    // 20 clients at once against answers that take 2 s.
    let answers = at_once(&m, "/sleep/2000", 20).await?;
    let overflowed: Vec<&Answer> = answers.iter().filter(|a| a.flags == "UO").collect();
    let served = answers.iter().filter(|a| a.status == 200).count();
    eprintln!(
        "pool of 1 + 1 pending, 20 clients: {served} served, {} overflowed",
        overflowed.len()
    );
    assert!(served >= 1, "{answers:?}");
    assert!(overflowed.len() >= 10, "{answers:?}");
    assert_eq!(served + overflowed.len(), 20, "{answers:?}");
    // At once: none of them waited for the 2 s answers.
    assert!(
        overflowed
            .iter()
            .all(|a| a.status == 503 && a.pod.is_none() && a.secs < 1.5),
        "{overflowed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_comes_back_after_its_ejection_time() -> anyhow::Result<()> {
    let m = HttpMesh::start_with("traffic-outlier", true, |pod| {
        if pod["metadata"]["name"] == "web-b" {
            pod["spec"]["containers"][0]["env"] = serde_json::json!([{"name": "ECHO_FAIL_PERCENT", "value": "100"}]);
        }
    })
    .await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 4s
      maxEjectionPercent: 100
"#,
    )
    .await?;
    let ejections = || async {
        proxy_metric(&m.client_ip, "mizzen_proxy_outlier_ejections_total")
            .await
            .map(|(n, _)| n)
    };
    eventually_some(ROLLOUT, "web-b ejected", || async {
        get(&m, "/", &[], 10).await?;
        Ok((ejections().await? >= 1.0).then_some(()))
    })
    .await?;
    let ejected_at = std::time::Instant::now();
    // Everything goes to web-a while web-b is out.
    let during = get(&m, "/", &[], 20).await?;
    // It comes back once its 4 s are up: a request reaches it again.
    let back = eventually_some(Duration::from_secs(20), "web-b back", || async {
        let a = get(&m, "/", &[], 4).await?;
        Ok(a.iter()
            .any(|a| a.pod.as_deref() == Some("web-b"))
            .then(|| ejected_at.elapsed()))
    })
    .await?;
    eprintln!("outlier: web-b ejected, back after {back:?}");
    assert!(
        during
            .iter()
            .all(|a| a.status == 200 && a.pod.as_deref() == Some("web-a")),
        "{during:?}"
    );
    assert!(
        back >= Duration::from_secs(3),
        "back after {back:?}, before its ejection time"
    );
    Ok(())
}

#[tokio::test]
async fn a_mirror_gets_copies_whose_answers_are_discarded() -> anyhow::Result<()> {
    let m = versioned("traffic-mirror").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web, subset: v1}
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 100}
"#,
    )
    .await?;
    let mirrored = || async {
        proxy_metric(&m.client_ip, "mizzen_proxy_mirrored_requests_total")
            .await
            .map(|(n, _)| n)
    };
    // The mirror copies, and the client's proxy knows v1's endpoint too
    // (discovery may bring the two pods' endpoints one at a time).
    eventually_some(ROLLOUT, "the mirror in place and v1 answering", || async {
        let answers = get(&m, "/", &[], 5).await?;
        let v1 = answers
            .iter()
            .all(|a| a.status == 200 && a.pod.as_deref() == Some("web-a"));
        Ok((v1 && mirrored().await? > 0.0).then_some(()))
    })
    .await?;
    let before = mirrored().await?;
    let answers = get(&m, "/", &[], 50).await?;
    assert_eq!(
        by_pod(&answers),
        BTreeMap::from([("web-a".into(), 50)]),
        "only v1 answers; the first: {:?}",
        &answers[..3]
    );
    // v2 received every copy (its own proxy counts them as served).
    let copies = eventually_some(Duration::from_secs(10), "50 copies answered", || async {
        let n = mirrored().await? - before;
        Ok((n >= 50.0).then_some(n))
    })
    .await?;
    let (_, served) = proxy_metric(&m.web_ips[1], "mizzen_requests_total").await?;
    let at_v2 = mizzen_tests::daemon::metric_where(&served, "mizzen_requests_total{reporter=\"destination\"");
    eprintln!("mirror: {copies} copies answered, v2 served {at_v2} in all");
    assert!(at_v2 >= 50.0, "v2's proxy served {at_v2}:\n{served}");
    Ok(())
}

#[tokio::test]
async fn a_rewrite_and_header_operations_reach_the_app_and_the_answer() -> anyhow::Result<()> {
    let m = versioned("traffic-rewrite").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - match:
    - uri: {prefix: /api/v1/}
    rewrite: {uri: /v2/}
    headers:
      request:
        set: {x-version: v2}
        remove: [x-debug]
      response:
        add: {x-routed-by: api}
    route:
    - destination: {host: web}
  - route:
    - destination: {host: web}
"#,
    )
    .await?;
    let url = m.url("/api/v1/items?page=2");
    let out = eventually_some(ROLLOUT, "the rewrite in place", || async {
        let out = m.curl(&["-i", "-H", "x-debug: 1", &url]).await?;
        Ok(out.contains("path /v2/items").then_some(out))
    })
    .await?;
    assert!(out.contains("header x-version: v2"), "{out}");
    assert!(!out.contains("header x-debug"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-routed-by: api"), "{out}");
    // Other paths are untouched.
    let other = m.curl(&["-i", &m.url("/other")]).await?;
    assert!(other.contains("path /other") && !other.contains("x-version"), "{other}");
    Ok(())
}

#[tokio::test]
async fn a_redirect_route_answers_its_code_with_the_new_location() -> anyhow::Result<()> {
    let m = versioned("traffic-redirect").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - match:
    - uri: {exact: /old}
    redirect: {uri: /new, redirectCode: 308}
  - route:
    - destination: {host: web}
"#,
    )
    .await?;
    let answers = until(&m, "/old", &[], "the redirect", |a| a.iter().all(|a| a.status == 308)).await?;
    assert!(answers.iter().all(|a| a.pod.is_none()), "{answers:?}");
    let head = m.curl(&["-i", &m.url("/old")]).await?;
    let want = format!("location: http://{}/new", m.vip);
    assert!(head.to_ascii_lowercase().contains(&want), "{head}");
    Ok(())
}

#[tokio::test]
async fn source_labels_route_requests_by_the_clients_pod_labels() -> anyhow::Result<()> {
    let m = versioned("traffic-source").await?;
    // A second client, labelled as a tester.
    let client = Cluster::get().client().await?;
    let mut tester = mizzen_tests::mesh::echo_pod("tester", "traffic-source");
    tester["metadata"]["labels"] = serde_json::json!({"role": "tester"});
    mizzen_tests::node::create_pod(&client, &m.ns, tester).await?;
    mizzen_tests::node::wait_ready(&client, &m.ns, "tester", mizzen_tests::http_mesh::TIMEOUT).await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts: [web]
  http:
  - match:
    - sourceLabels: {role: tester}
    route:
    - destination: {host: web, subset: v2}
  - route:
    - destination: {host: web, subset: v1}
"#,
    )
    .await?;
    // The tester's requests, each on a new connection, by the pod that
    // answered.
    let tester_pods = || async {
        let mut pods = Vec::new();
        for _ in 0..10 {
            let out = mizzen_tests::http_mesh::curl_in(&m.mesh, &m.ns, "tester", &[&m.url("/")]).await?;
            pods.extend(out.lines().filter_map(|l| l.strip_prefix("pod ")).map(str::to_owned));
        }
        anyhow::Ok(pods)
    };
    // In place once both hold in one poll (either alone can be the
    // balancer's choice before the rule arrives).
    eventually_some(ROLLOUT, "the client on v1 and the tester on v2", || async {
        let client = get(&m, "/", &[], 10).await?;
        let tester = tester_pods().await?;
        Ok((all_from("web-a")(&client) && tester.iter().all(|p| p == "web-b")).then_some(()))
    })
    .await?;
    let client = get(&m, "/", &[], 20).await?;
    assert_eq!(by_pod(&client), BTreeMap::from([("web-a".into(), 20)]), "{client:?}");
    let tester = tester_pods().await?;
    assert_eq!(tester, vec!["web-b".to_owned(); 10]);
    Ok(())
}

/// Istio's sample app in the test app's HTTP modes: `productpage` calls
/// `reviews`, whose v1 answers alone and whose v2 and v3 call `ratings`;
/// each answers with its pod name and nests what it called.
struct Bookinfo {
    mesh: mizzen_tests::mesh::MeshNode,
    ns: String,
    productpage: String,
}

impl Bookinfo {
    async fn start(node: &str) -> anyhow::Result<Self> {
        use mizzen_tests::http_mesh::{MESHED, TIMEOUT, service, web_pod};
        let cluster = Cluster::get();
        let client = cluster.client().await?;
        let mesh =
            mizzen_tests::mesh::MeshNode::start(cluster, node, &mizzen_tests::workspace_bin("mizzen-proxy"), &[])
                .await?;
        let ns = cluster.namespace(&client, "bookinfo", MESHED).await?;
        let mut vips = BTreeMap::new();
        for app in ["productpage", "reviews", "ratings"] {
            vips.insert(app, service(&client, &ns, app, app, "http").await?);
        }
        let pods = [
            ("productpage", "productpage", "v1", Some("reviews")),
            ("reviews-v1", "reviews", "v1", None),
            ("reviews-v2", "reviews", "v2", Some("ratings")),
            ("reviews-v3", "reviews", "v3", Some("ratings")),
            ("ratings", "ratings", "v1", None),
        ];
        for (name, app, version, calls) in pods {
            let mut pod = web_pod(name, node);
            pod["metadata"]["labels"] = serde_json::json!({"app": app, "version": version});
            if let Some(next) = calls {
                pod["spec"]["containers"][0]["env"] =
                    serde_json::json!([{"name": "ECHO_CALL", "value": format!("{}:80", vips[next])}]);
            }
            mizzen_tests::node::create_pod(&client, &ns, pod).await?;
        }
        mizzen_tests::node::create_pod(&client, &ns, mizzen_tests::mesh::echo_pod("client", node)).await?;
        for (name, ..) in pods {
            mizzen_tests::node::wait_ready(&client, &ns, name, TIMEOUT).await?;
        }
        mizzen_tests::node::wait_ready(&client, &ns, "client", TIMEOUT).await?;
        Cluster::get()
            .apply(
                &ns,
                r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#,
            )
            .await?;
        Ok(Self {
            mesh,
            productpage: format!("http://{}/", vips["productpage"]),
            ns,
        })
    }

    /// The product page as the client app sees it, with `headers`.
    async fn page(&self, headers: &[&str]) -> anyhow::Result<String> {
        let mut args: Vec<&str> = Vec::new();
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&self.productpage);
        mizzen_tests::http_mesh::curl_in(&self.mesh, &self.ns, "client", &args).await
    }
}

#[tokio::test]
async fn jason_sees_reviews_v2_mallory_v3_and_everyone_else_v1_through_the_front_end() -> anyhow::Result<()> {
    let b = Bookinfo::start("bookinfo-ab").await?;
    Cluster::get()
        .apply(
            &b.ns,
            r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - headers: {end-user: {exact: mallory}}
    route:
    - destination: {host: reviews, subset: v3}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
        )
        .await?;
    // In place once all three hold in one poll: before the rule arrives,
    // any one of them can hold by the balancer's choice alone.
    let jason = eventually_some(ROLLOUT, "jason on v2, mallory on v3, the others on v1", || async {
        let page = b.page(&["end-user: jason"]).await?;
        let mallory = b.page(&["end-user: mallory"]).await?;
        let other = b.page(&["end-user: someone"]).await?;
        let routed = page.contains("  pod reviews-v2")
            && mallory.contains("  pod reviews-v3")
            && other.contains("  pod reviews-v1");
        Ok(routed.then_some(page))
    })
    .await?;
    // v2 called ratings, which answered.
    assert!(jason.contains("    pod ratings"), "{jason}");
    for _ in 0..5 {
        let page = b.page(&["end-user: jason"]).await?;
        assert!(page.contains("  pod reviews-v2"), "{page}");
        let mallory = b.page(&["end-user: mallory"]).await?;
        assert!(
            mallory.contains("  pod reviews-v3") && mallory.contains("    pod ratings"),
            "{mallory}"
        );
        let other = b.page(&["end-user: someone"]).await?;
        assert!(
            other.contains("  pod reviews-v1") && !other.contains("ratings"),
            "{other}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_2s_delay_on_ratings_meets_the_1s_reviews_timeout_and_the_front_end_gets_504() -> anyhow::Result<()> {
    let b = Bookinfo::start("bookinfo-timeout").await?;
    Cluster::get()
        .apply(
            &b.ns,
            r#"
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
    timeout: 1s
---
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - fault:
      delay: {fixedDelay: 2s, percentage: {value: 100}}
    route:
    - destination: {host: ratings}
"#,
        )
        .await?;
    // The product page still answers; its call to reviews timed out in
    // its own proxy, while reviews waited on the delayed ratings.
    let page = eventually_some(ROLLOUT, "reviews to time out", || async {
        let page = b.page(&[]).await?;
        Ok(page.contains("upstream 504").then_some(page))
    })
    .await?;
    assert!(page.starts_with("pod productpage"), "{page}");
    assert!(page.contains("upstream request timeout"), "{page}");
    Ok(())
}

#[tokio::test]
async fn a_consistent_hash_on_a_header_keeps_each_user_on_one_pod() -> anyhow::Result<()> {
    let m = versioned("traffic-hash").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
    # Only to see when the rule is in place (the users' requests come one
    # at a time): the balancer alone can keep a user's ten requests on one
    # pod too.
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
"#,
    )
    .await?;
    eventually_some(ROLLOUT, "the rule in place", || async {
        let answers = at_once(&m, "/sleep/1000", 3).await?;
        Ok(answers.iter().any(|a| a.flags == "UO").then_some(()))
    })
    .await?;
    // Each user's requests all land on one pod.
    let users: Vec<String> = (0..16).map(|i| format!("x-user: user-{i}")).collect();
    let pods = eventually_some(ROLLOUT, "each user on one pod", || async {
        let mut pods = BTreeMap::new();
        for u in &users {
            let answers = get(&m, "/", &[u], 10).await?;
            let seen = by_pod(&answers);
            if seen.len() != 1 {
                return Ok(None);
            }
            pods.insert(u.clone(), seen.into_keys().next().unwrap_or_default());
        }
        // Sixteen users do not all hash to one of two pods (1 in 32,768
        // would).
        let distinct: std::collections::BTreeSet<&String> = pods.values().collect();
        Ok((distinct.len() == 2).then_some(pods))
    })
    .await?;
    eprintln!("consistent hash: {pods:?}");
    // And each stays there.
    for (u, pod) in &pods {
        let answers = get(&m, "/", &[u], 10).await?;
        assert_eq!(by_pod(&answers), BTreeMap::from([(pod.clone(), 10)]), "{u}");
    }
    Ok(())
}

#[tokio::test]
async fn a_consistent_hash_cookie_is_set_by_the_proxy_and_keeps_the_client_on_its_pod() -> anyhow::Result<()> {
    let m = versioned("traffic-cookie").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 3600s}
"#,
    )
    .await?;
    // A client without the cookie is given one with its first answer.
    // Twenty first answers (cookies drawn at random) come from both pods
    // (all from one of two would be 1 in 2^19) once the client's proxy
    // knows both endpoints; before, a cookie hashed over one endpoint
    // would move when the second arrived.
    let first = eventually_some(ROLLOUT, "the proxy setting cookies over both pods", || async {
        let a = get(&m, "/", &[], 20).await?;
        let pods: std::collections::BTreeSet<Option<&str>> = a.iter().map(|a| a.pod.as_deref()).collect();
        let set = a.iter().all(|a| a.status == 200 && a.set_cookie.is_some());
        Ok((set && pods.len() == 2).then_some(a))
    })
    .await?;
    for a in &first {
        let cookie = a.set_cookie.as_deref().unwrap_or_default();
        assert!(cookie.starts_with("session="), "{cookie}");
        assert!(cookie.contains("; Max-Age=3600; Path=/; HttpOnly"), "{cookie}");
    }
    // Sent back, it keeps the client on the pod that answered that first
    // request, and the proxy sets no other.
    for a in &first {
        let set = a.set_cookie.as_deref().unwrap_or_default();
        let pair = set.split(';').next().unwrap_or_default();
        let header = format!("Cookie: theme=dark; {pair}");
        let again = get(&m, "/", &[&header], 10).await?;
        assert!(again.iter().all(|b| b.set_cookie.is_none()), "{again:?}");
        assert_eq!(
            by_pod(&again),
            BTreeMap::from([(a.pod.clone().unwrap_or_default(), 10)]),
            "{header}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_port_level_policy_replaces_the_rules_policy_on_its_port() -> anyhow::Result<()> {
    let m = versioned("traffic-port-policy").await?;
    apply(
        &m,
        r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: ROUND_ROBIN}
"#,
    )
    .await?;
    // Port 80's policy is in place once sequential requests take the two
    // pods in turn (the default balancer would not, 20 times in a row).
    eventually_some(ROLLOUT, "round robin on port 80", || async {
        let a = get(&m, "/", &[], 20).await?;
        let turns = a.iter().all(|a| a.status == 200) && a.windows(2).all(|w| w[0].pod != w[1].pod);
        Ok(turns.then_some(()))
    })
    .await?;
    // It replaced the rule's policy whole: no pool limits on port 80.
    let answers = at_once(&m, "/sleep/500", 6).await?;
    assert!(
        answers.iter().all(|a| a.status == 200 && a.flags.is_empty()),
        "{answers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_route_change_applies_to_new_requests_and_in_flight_ones_finish() -> anyhow::Result<()> {
    let m = versioned("traffic-change").await?;
    let to = |subset: &str| {
        format!(
            "apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http:
  - headers: {{response: {{set: {{x-test-rule: {subset}}}}}}}
    route:
    - destination: {{host: web, subset: {subset}}}
"
        )
    };
    apply(&m, &to("v1")).await?;
    until(&m, "/", &[], "all on v1", |a| {
        all_under("v1")(a) && all_from("web-a")(a)
    })
    .await?;
    // A slow request in flight while the route moves to v2: curl sends it
    // long before kubectl's change can travel through the agent to the
    // client's proxy, so it is routed under v1.
    let (in_flight, moved) = tokio::join!(get(&m, "/sleep/4000", &[], 1), async {
        apply(&m, &to("v2")).await?;
        until(&m, "/", &[], "all on v2", |a| {
            all_under("v2")(a) && all_from("web-b")(a)
        })
        .await
    });
    moved?;
    let in_flight = in_flight?;
    assert_eq!(in_flight[0].status, 200, "{in_flight:?}");
    assert_eq!(
        in_flight[0].pod.as_deref(),
        Some("web-a"),
        "it finished where it was sent"
    );
    Ok(())
}

#[tokio::test]
async fn a_virtual_service_whose_weights_do_not_add_up_is_refused_by_kubectl_naming_the_field() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    mizzen_tests::mesh::install_manifests(cluster).await?;
    mizzen_tests::mesh::Injector::shared(cluster).await?;
    let ns = cluster.namespace(&client, "traffic-validate", &[]).await?;
    let validations =
        kube::Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(client);
    mizzen_tests::mesh::ca_bundles_set(
        &validations,
        "mizzen-validation",
        ROLLOUT,
        "the validating webhook's caBundle",
    )
    .await?;
    let yaml = |v2: u32| {
        format!(
            "apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {{host: web, subset: v1}}
      weight: 90
    - destination: {{host: web, subset: v2}}
      weight: {v2}
"
        )
    };
    let err = cluster.apply(&ns, &yaml(20)).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("spec.http[0].route: weights must be given for every destination and add up to 100, not 110"),
        "{text}"
    );
    cluster.apply(&ns, &yaml(10)).await?;
    Ok(())
}

/// Greetings of `n` connections in turn from the client app to `target`
/// (a server-first TCP app), by the pod that greeted.
async fn greetings(
    mesh: &mizzen_tests::mesh::MeshNode,
    ns: &str,
    target: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let out = mesh
        .node
        .command_as(ns, "client", APP_UID, mizzen_tests::workspace_bin("mizzen-testapp"))?
        .args(["banner-client", target, &n.to_string()])
        .output()
        .await?;
    if !out.status.success() {
        bail!("banner-client: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pods: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("banner "))
        .map(str::to_owned)
        .collect();
    if pods.len() != n {
        bail!("{} greetings from {n} connections", pods.len());
    }
    Ok(pods)
}

#[tokio::test]
async fn tcp_routes_shift_20_percent_of_connections_to_v2() -> anyhow::Result<()> {
    use mizzen_tests::http_mesh::{MESHED, TIMEOUT};
    use mizzen_tests::node::{create_pod, wait_ready};
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let node = "traffic-tcp";
    let mesh =
        mizzen_tests::mesh::MeshNode::start(cluster, node, &mizzen_tests::workspace_bin("mizzen-proxy"), &[]).await?;
    let ns = cluster.namespace(&client, "traffic-tcp", MESHED).await?;
    // Istio's TCP traffic shifting task: a server-first app on a port
    // named tcp-, so that it is relayed as TCP.
    let spec = serde_json::json!({
        "metadata": {"name": "tcp-echo"},
        "spec": {"selector": {"app": "tcp-echo"}, "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080}]},
    });
    let vip = mizzen_tests::k8s::create_service(&client, &ns, spec).await?;
    for version in ["v1", "v2"] {
        let name = format!("tcp-echo-{version}");
        let mut pod = mizzen_tests::mesh::echo_pod(&name, node);
        pod["metadata"]["labels"] = serde_json::json!({"app": "tcp-echo", "version": version});
        pod["spec"]["containers"][0]["args"] = serde_json::json!(["banner-server", "0.0.0.0:8080"]);
        create_pod(&client, &ns, pod).await?;
    }
    create_pod(&client, &ns, mizzen_tests::mesh::echo_pod("client", node)).await?;
    for name in ["tcp-echo-v1", "tcp-echo-v2", "client"] {
        wait_ready(&client, &ns, name, TIMEOUT).await?;
    }
    let shift = |v1: u32, v2: u32| {
        format!(
            r#"
apiVersion: networking.mizzen.dev/v1
kind: DestinationRule
metadata: {{name: tcp-echo}}
spec:
  host: tcp-echo
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.mizzen.dev/v1
kind: VirtualService
metadata: {{name: tcp-echo}}
spec:
  hosts: [tcp-echo]
  tcp:
  - match:
    - port: 80
    route:
    - destination: {{host: tcp-echo, subset: v1}}
      weight: {v1}
    - destination: {{host: tcp-echo, subset: v2}}
      weight: {v2}
"#
        )
    };
    let target = format!("{vip}:80");
    // All to v1 first (20 connections in a row on v1: 1 in 2^20 without
    // the rule).
    cluster.apply(&ns, &shift(100, 0)).await?;
    eventually_some(ROLLOUT, "all connections on v1", || async {
        let pods = greetings(&mesh, &ns, &target, 20).await?;
        Ok(pods.iter().all(|p| p == "tcp-echo-v1").then_some(()))
    })
    .await?;
    // Then 80/20: in place once v2 greets again.
    cluster.apply(&ns, &shift(80, 20)).await?;
    eventually_some(ROLLOUT, "v2 to get its share", || async {
        let pods = greetings(&mesh, &ns, &target, 20).await?;
        Ok(pods.iter().any(|p| p == "tcp-echo-v2").then_some(()))
    })
    .await?;
    let pods = greetings(&mesh, &ns, &target, 500).await?;
    let v2 = pods.iter().filter(|p| *p == "tcp-echo-v2").count();
    eprintln!("80/20 TCP shift over 500 connections: {v2} to v2");
    assert!(
        pods.iter().all(|p| p == "tcp-echo-v1" || p == "tcp-echo-v2"),
        "{pods:?}"
    );
    // 20 % ± 6 (over three standard deviations of 500 draws).
    assert!((70..=130).contains(&v2), "{v2} of 500 to v2");
    Ok(())
}
