use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

struct Labels(BTreeMap<String, String>);

impl NamespaceLabels for Labels {
    async fn meta(&self, _ns: &str) -> Result<NamespaceMeta, LookupError> {
        Ok(NamespaceMeta {
            labels: self.0.clone(),
            ..Default::default()
        })
    }
}

/// An API server that cannot be reached.
struct Unreachable;

impl NamespaceLabels for Unreachable {
    async fn meta(&self, ns: &str) -> Result<NamespaceMeta, LookupError> {
        Err(LookupError {
            namespace: ns.into(),
            reason: "connection refused".into(),
        })
    }
}

#[tokio::test]
async fn an_unknown_namespace_fails_closed() {
    let body = serde_json::to_vec(&admission(pod_json(), "Pod", "CREATE")).expect("json");
    let (out, verdict) = review(&body, &Unreachable, &InjectConfig::default(), true)
        .await
        .expect("answered");
    assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["response"]["allowed"], false, "{v}");
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("labels")
    );
}

fn enabled() -> Labels {
    Labels(BTreeMap::from([(
        inject::INJECT_LABEL.to_string(),
        "enabled".to_string(),
    )]))
}

fn admission(object: serde_json::Value, kind: &str, op: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "4b0e3c1a-7f2c-4d2a-9a57-1c3f0d2b9e11",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": op,
            "userInfo": {"username": "admin"},
            "object": object,
            "dryRun": false
        }
    })
}

fn pod_json() -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "demo"},
        "spec": {"containers": [{"name": "app", "image": "app"}]}})
}

async fn run(body: &[u8]) -> Result<(serde_json::Value, Verdict), Unanswerable> {
    let (out, verdict) = review(body, &enabled(), &InjectConfig::default(), true).await?;
    Ok((serde_json::from_slice(&out).expect("the response is JSON"), verdict))
}

/// The patch bytes: kube-rs writes them as a JSON array of numbers, which
/// the API server decodes into []byte like base64 text.
fn patch_of(resp: &serde_json::Value) -> json_patch::Patch {
    let bytes: Vec<u8> = match &resp["response"]["patch"] {
        serde_json::Value::String(b64) => {
            serde_json::from_value::<k8s_openapi::ByteString>(serde_json::json!(b64))
                .expect("base64")
                .0
        }
        other => serde_json::from_value(other.clone()).expect("patch bytes"),
    };
    serde_json::from_slice(&bytes).expect("json patch")
}

#[tokio::test]
async fn pod_create_gets_a_patch_that_applies() {
    let (resp, verdict) = run(&serde_json::to_vec(&admission(pod_json(), "Pod", "CREATE")).expect("json"))
        .await
        .expect("ok");
    assert_eq!(verdict, Verdict::Injected);
    assert_eq!(resp["response"]["uid"], "4b0e3c1a-7f2c-4d2a-9a57-1c3f0d2b9e11");
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let mut doc = pod_json();
    json_patch::patch(&mut doc, &patch_of(&resp)).expect("applies");
    assert!(doc["metadata"]["annotations"][inject::STATUS_ANNOTATION].is_string());
}

/// A meshed namespace that sets a default for its pods.
struct Annotated;

impl NamespaceLabels for Annotated {
    async fn meta(&self, _ns: &str) -> Result<NamespaceMeta, LookupError> {
        Ok(NamespaceMeta {
            labels: [("mizzen.dev/inject".to_owned(), "enabled".to_owned())].into(),
            annotations: [(inject::ANN_DISCOVERY_NAMESPACES.to_owned(), "*".to_owned())].into(),
        })
    }
}

#[tokio::test]
async fn a_namespace_annotation_is_its_pods_default() {
    let body = serde_json::to_vec(&admission(pod_json(), "Pod", "CREATE")).expect("json");
    let (out, verdict) = review(&body, &Annotated, &InjectConfig::default(), true)
        .await
        .expect("answered");
    assert_eq!(verdict, Verdict::Injected);
    let resp: serde_json::Value = serde_json::from_slice(&out).expect("json");
    let mut doc = pod_json();
    json_patch::patch(&mut doc, &patch_of(&resp)).expect("applies");
    let env = doc.to_string();
    assert!(
        env.contains(r#"{"name":"MIZZEN_DISCOVERY_NAMESPACES","value":"*"}"#),
        "the proxy follows what the namespace says: {env}"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_answer() {
    // No uid to answer: an error for the HTTP layer.
    for body in [&b""[..], b"{", b"[]", b"null", br#"{"request": {}}"#] {
        assert!(run(body).await.is_err(), "{:?}", String::from_utf8_lossy(body));
    }
    // A uid but nonsense around it: a well-formed refusal with that uid.
    let (resp, verdict) = run(br#"{"request": {"uid": "u-1", "kind": 5}}"#)
        .await
        .expect("answered");
    assert_eq!(resp["response"]["uid"], "u-1");
    assert_eq!(resp["response"]["allowed"], false);
    assert!(matches!(verdict, Verdict::Invalid(_)));
    // Other kinds and operations pass untouched.
    let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let (resp, verdict) = run(&serde_json::to_vec(&admission(cm, "ConfigMap", "CREATE")).expect("json"))
        .await
        .expect("ok");
    assert_eq!(
        (verdict, resp["response"]["allowed"].clone()),
        (Verdict::Ignored, serde_json::json!(true))
    );
    assert!(resp["response"]["patch"].is_null());
    let (_, verdict) = run(&serde_json::to_vec(&admission(pod_json(), "Pod", "UPDATE")).expect("json"))
        .await
        .expect("ok");
    assert_eq!(verdict, Verdict::Ignored);
    // A "pod" that is not one.
    let bad =
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": "no"}});
    let (resp, verdict) = run(&serde_json::to_vec(&admission(bad, "Pod", "CREATE")).expect("json"))
        .await
        .expect("ok");
    assert_eq!(resp["response"]["allowed"], false);
    assert!(
        resp["response"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("does not parse"),
        "{resp}"
    );
    assert!(matches!(verdict, Verdict::Invalid(_)));
    // A bad annotation is refused, naming it.
    let mut p = pod_json();
    p["metadata"]["annotations"] = serde_json::json!({"mizzen.dev/exclude-inbound-ports": "x"});
    let (resp, verdict) = run(&serde_json::to_vec(&admission(p, "Pod", "CREATE")).expect("json"))
        .await
        .expect("ok");
    assert_eq!(resp["response"]["allowed"], false);
    assert!(
        resp["response"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("mizzen.dev/exclude-inbound-ports")
    );
    assert!(matches!(verdict, Verdict::Denied(_)));
}

fn random_string(rng: &mut StdRng) -> String {
    const PARTS: &[&str] = &[
        "80",
        "8080",
        ",",
        "abc",
        "10.0.0.0/8",
        "/",
        "-1",
        "65536",
        " ",
        "Mi",
        "100m",
        "ü",
        "\0",
        "e3",
        "http",
        "::1/128",
    ];
    (0..rng.random_range(0..4))
        .map(|_| PARTS[rng.random_range(0..PARTS.len())])
        .collect()
}

fn random_probe(rng: &mut StdRng) -> serde_json::Value {
    let port = if rng.random_bool(0.5) {
        serde_json::json!(rng.random_range(1..65535))
    } else {
        serde_json::json!(["http", "missing", "grpc"][rng.random_range(0..3)])
    };
    match rng.random_range(0..4) {
        0 => serde_json::json!({"httpGet": {"path": "/h", "port": port}}),
        1 => serde_json::json!({"tcpSocket": {"port": port}}),
        2 => serde_json::json!({"grpc": {"port": rng.random_range(1..65535)}}),
        _ => serde_json::json!({"exec": {"command": ["true"]}}),
    }
}

fn random_pod(rng: &mut StdRng) -> serde_json::Value {
    let mut containers = Vec::new();
    for i in 0..rng.random_range(1..4) {
        let mut c = serde_json::json!({"name": format!("c{i}"), "image": "x",
            "ports": [{"name": "http", "containerPort": 8080}]});
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if rng.random_bool(0.5) {
                c[probe] = random_probe(rng);
            }
        }
        containers.push(c);
    }
    let mut pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "demo"}, "spec": {"containers": containers}});
    if rng.random_bool(0.3) {
        pod["spec"]["initContainers"] = serde_json::json!([{"name": "setup", "image": "x"}]);
    }
    if rng.random_bool(0.1) {
        pod["spec"]["hostNetwork"] = serde_json::json!(true);
    }
    if rng.random_bool(0.2) {
        pod["spec"]["volumes"] = serde_json::json!([{"name": "data", "emptyDir": {}}]);
    }
    let keys = [
        inject::ANN_EXCLUDE_INBOUND_PORTS,
        inject::ANN_EXCLUDE_OUTBOUND_PORTS,
        inject::ANN_EXCLUDE_OUTBOUND_CIDRS,
        inject::ANN_PROXY_CPU,
        inject::ANN_PROXY_MEMORY,
        inject::ANN_LOG_LEVEL,
        inject::STATUS_ANNOTATION,
    ];
    let mut ann = serde_json::Map::new();
    for k in keys {
        if rng.random_bool(0.15) {
            ann.insert(k.into(), serde_json::json!(random_string(rng)));
        }
    }
    pod["metadata"]["annotations"] = serde_json::Value::Object(ann);
    if rng.random_bool(0.2) {
        let value = ["true", "false", "x"][rng.random_range(0..3)];
        pod["metadata"]["labels"] = serde_json::json!({(inject::INJECT_LABEL): value});
    }
    pod
}

/// Property: for arbitrary pods, no panic, and every patch applies cleanly
/// to its pod and yields a pod that is injected exactly once.
#[tokio::test]
async fn arbitrary_pods_never_panic_and_patches_apply() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut injected, mut other) = (0, 0);
    for _ in 0..3000 {
        let pod = random_pod(&mut rng);
        let native = rng.random_bool(0.5);
        let body = serde_json::to_vec(&admission(pod.clone(), "Pod", "CREATE")).expect("json");
        let (out, verdict) = review(&body, &enabled(), &InjectConfig::default(), native)
            .await
            .expect("answered");
        let resp: serde_json::Value = serde_json::from_slice(&out).expect("json");
        if verdict == Verdict::Injected {
            injected += 1;
            let mut doc = pod.clone();
            json_patch::patch(&mut doc, &patch_of(&resp)).unwrap_or_else(|e| panic!("patch fails on {pod}: {e}"));
            let patched: Pod = serde_json::from_value(doc).expect("a pod");
            let spec = patched.spec.expect("spec");
            let all: Vec<_> = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .map(|c| c.name.clone())
                .collect();
            assert_eq!(all.iter().filter(|n| *n == inject::PROXY_NAME).count(), 1, "{pod}");
            assert_eq!(all.iter().filter(|n| *n == inject::INIT_NAME).count(), 1, "{pod}");
        } else {
            other += 1;
        }
    }
    assert!(
        injected > 500 && other > 100,
        "the generator covers both paths: {injected} / {other}"
    );
}

/// Property: arbitrary bytes and mangled reviews never panic the handler.
#[tokio::test]
async fn arbitrary_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(7);
    let good = serde_json::to_vec(&admission(pod_json(), "Pod", "CREATE")).expect("json");
    for i in 0..3000 {
        let body: Vec<u8> = if i % 2 == 0 {
            (0..rng.random_range(0..256)).map(|_| rng.random()).collect()
        } else {
            let mut b = good.clone();
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            b
        };
        let _ = review(&body, &enabled(), &InjectConfig::default(), true).await;
    }
}
