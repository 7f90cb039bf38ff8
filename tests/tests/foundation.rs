//! The test foundation itself, against real parts: the control plane built
//! by `scripts/kube.sh`, the generated CRDs, ServiceAccount tokens, admission
//! webhooks on loopback, and network-namespace pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use mizzen_api::policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, Rule, RuleFrom, Source,
};
use mizzen_tests::tls::TestCa;
use mizzen_tests::{Cluster, NetnsPod, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};

const TIMEOUT: Duration = Duration::from_secs(60);

fn pod(name: &str, sa: &str, labels: &[(&str, &str)], node: Option<&str>) -> anyhow::Result<Pod> {
    let labels: BTreeMap<_, _> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut spec = serde_json::json!({
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "mizzen-testapp"}],
    });
    if let Some(node) = node {
        spec["nodeSelector"] = serde_json::json!({ "kubernetes.io/hostname": node });
    }
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))?)
}

async fn apply_crds(cluster: &Cluster) -> anyhow::Result<()> {
    let out = mizzen_tests::mesh::apply_crds(cluster).await?;
    assert!(
        out.contains("authorizationpolicies.security.mizzen.dev"),
        "kubectl apply said: {out}"
    );
    Ok(())
}

/// The generated CRDs install with the real kubectl, and a policy created
/// through `kube::Api` arrives through a watch, as agents will see it.
#[tokio::test]
async fn crds_apply_and_policy_arrives_through_a_watch() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    apply_crds(cluster).await?;
    let ns = cluster.namespace(&client, "crd-watch", &[]).await?;
    let api = Api::<AuthorizationPolicy>::namespaced(client.clone(), &ns);

    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    // Wait for the initial list to finish so the create below is a live event.
    tokio::time::timeout(TIMEOUT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev?, watcher::Event::InitDone) {
                return Ok::<_, anyhow::Error>(());
            }
        }
        Err(anyhow!("watch ended before its initial list"))
    })
    .await
    .context("initial list")??;

    let mut policy = AuthorizationPolicy::new(
        "deny-test-ns",
        AuthorizationPolicySpec {
            action: Some(Action::Deny),
            rules: vec![Rule {
                from: vec![RuleFrom {
                    source: Source {
                        namespaces: vec!["test".into()],
                        ..Default::default()
                    },
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    policy.metadata.namespace = Some(ns.clone());
    api.create(&PostParams::default(), &policy).await?;

    let seen = tokio::time::timeout(TIMEOUT, async {
        while let Some(ev) = events.next().await {
            if let watcher::Event::Apply(p) = ev?
                && p.metadata.name.as_deref() == Some("deny-test-ns")
            {
                return Ok::<_, anyhow::Error>(p);
            }
        }
        Err(anyhow!("watch ended"))
    })
    .await
    .context("waiting for the policy on the watch")??;
    assert_eq!(seen.spec, policy.spec, "the watched policy is the one created");

    // kubectl reads it back with the CRD's printer column.
    let table = cluster
        .kubectl(["get", "authorizationpolicies", "-n", &ns])
        .run()
        .await?;
    assert!(
        table.contains("deny-test-ns") && table.contains("DENY"),
        "kubectl get: {table}"
    );

    // The structural schema refuses what the types do not allow.
    let (status, _, stderr) = cluster
        .kubectl(["apply", "-f", "-"])
        .stdin(format!(
            "apiVersion: security.mizzen.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: {ns}}}\nspec: {{action: MAYBE}}\n"
        ))
        .output()
        .await?;
    assert!(!status.success(), "an unknown action must be refused");
    assert!(stderr.contains("MAYBE"), "the error names the bad value: {stderr}");
    Ok(())
}

/// A pod-bound token for the `mizzen-ca` audience reviews as the pod's
/// ServiceAccount, with the pod's name, UID and node; the scheduler binds
/// the pod to a registered node; wrong audiences and deleted pods fail.
/// What the mesh cannot enforce is refused at `kubectl apply`, with a
/// message naming it, by the CRDs' CEL rules (a real API server
/// evaluating them): never stored and silently ignored.
#[tokio::test]
async fn unenforceable_policies_are_refused_at_admission_with_a_message() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    apply_crds(cluster).await?;
    let ns = cluster.namespace(&client, "crd-cel", &[]).await?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let refusal = |kind: &str, spec: serde_json::Value| {
        let (client, ns, dry_run) = (client.clone(), ns.clone(), dry_run.clone());
        let kind = kind.to_owned();
        async move {
            let doc = serde_json::json!({
                "apiVersion": "security.mizzen.dev/v1", "kind": kind,
                "metadata": {"name": "x", "namespace": ns}, "spec": spec,
            });
            let result = if kind == "AuthorizationPolicy" {
                let p: AuthorizationPolicy = serde_json::from_value(doc)?;
                Api::<AuthorizationPolicy>::namespaced(client, &ns)
                    .create(&dry_run, &p)
                    .await
                    .map(drop)
            } else {
                let p: PeerAuthentication = serde_json::from_value(doc)?;
                Api::<PeerAuthentication>::namespaced(client, &ns)
                    .create(&dry_run, &p)
                    .await
                    .map(drop)
            };
            match result {
                Ok(()) => Ok::<_, anyhow::Error>(None),
                Err(kube::Error::Api(status)) => Ok(Some(status.message)),
                Err(e) => Err(e.into()),
            }
        }
    };
    let cases = [
        (
            "AuthorizationPolicy",
            serde_json::json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
            "action CUSTOM is not supported yet",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
            "requestPrincipals and notRequestPrincipals need RequestAuthentication",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
            "key must be one of",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
            "a condition needs values or notValues",
        ),
        (
            "PeerAuthentication",
            serde_json::json!({"portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            "portLevelMtls needs a selector",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}),
            "source.principals[0]: Invalid value",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["Team_A"]}}]}]}),
            "source.notNamespaces[0]: Invalid value",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/api/*/admin"]}}]}]}),
            "operation.paths[0]: Invalid value",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": [""]}}]}]}),
            "operation.methods[0]: Invalid value",
        ),
        (
            "AuthorizationPolicy",
            serde_json::json!({"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["*admin*"]}]}]}),
            "when[0].values[0]: Invalid value",
        ),
    ];
    for (kind, spec, want) in cases {
        let message = refusal(kind, spec.clone()).await?;
        assert!(
            message.as_deref().is_some_and(|m| m.contains(want)),
            "{kind} {spec}: refused with {want:?}? got {message:?}"
        );
    }
    // What the mesh enforces is accepted.
    let valid = serde_json::json!({"rules": [{"when": [{"key": "request.headers[x-version]", "values": ["v1"]}]}]});
    assert_eq!(refusal("AuthorizationPolicy", valid).await?, None);
    let wildcards = serde_json::json!({"rules": [{
        "from": [{"source": {"principals": ["*", "cluster.local/ns/a/*", "*/sa/b"], "namespaces": ["team-*", "*-prod"]}}],
        "to": [{"operation": {"hosts": ["*.example.com"], "paths": ["/api/*", "*.css"], "methods": ["GET"]}}],
    }]});
    assert_eq!(refusal("AuthorizationPolicy", wildcards).await?, None);
    Ok(())
}

#[tokio::test]
async fn pod_bound_token_reviews_as_the_pod() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let ns = cluster.namespace(&client, "token", &[]).await?;
    let node = format!("node-{ns}");
    cluster.register_node(&client, &node).await?;

    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("workload".into());
    sas.create(&PostParams::default(), &sa).await?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let created = pods
        .create(&PostParams::default(), &pod("web", "workload", &[], Some(&node))?)
        .await?;
    let uid = created.metadata.uid.clone().context("pod has a uid")?;

    // The real scheduler binds it to the node.
    eventually(TIMEOUT, "the scheduler to bind the pod", || {
        let pods = pods.clone();
        let node = node.clone();
        async move {
            let p = pods.get("web").await?;
            Ok(p.spec.and_then(|s| s.node_name).as_deref() == Some(node.as_str()))
        }
    })
    .await?;

    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["mizzen-ca".into()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some("web".into()),
                uid: Some(uid.clone()),
            }),
            expiration_seconds: Some(600),
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("workload", &PostParams::default(), &request)
        .await?
        .status
        .context("token request has a status")?
        .token;

    let reviews = Api::<TokenReview>::all(client.clone());
    let review = |audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };

    let status = reviews
        .create(&PostParams::default(), &review("mizzen-ca"))
        .await?
        .status
        .context("review status")?;
    assert_eq!(status.authenticated, Some(true), "review: {status:?}");
    assert_eq!(status.audiences.as_deref(), Some(&["mizzen-ca".to_owned()][..]));
    let user = status.user.context("reviewed user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    assert_eq!(one("authentication.kubernetes.io/pod-name").as_deref(), Some("web"));
    assert_eq!(one("authentication.kubernetes.io/pod-uid"), Some(uid));
    assert_eq!(one("authentication.kubernetes.io/node-name"), Some(node.clone()));

    // The same token for another audience is refused.
    let wrong = reviews
        .create(&PostParams::default(), &review("someone-else"))
        .await?
        .status;
    assert_ne!(
        wrong.and_then(|s| s.authenticated),
        Some(true),
        "wrong audience must not authenticate"
    );

    // Once the pod is gone the token is worthless.
    pods.delete(
        "web",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    eventually(TIMEOUT, "the token of the deleted pod to stop authenticating", || {
        let reviews = reviews.clone();
        let r = review("mizzen-ca");
        async move {
            let s = reviews.create(&PostParams::default(), &r).await?.status;
            Ok(s.and_then(|s| s.authenticated) != Some(true))
        }
    })
    .await?;
    Ok(())
}

/// A webhook served on 127.0.0.1 and registered with a URL clientConfig is
/// called by the real API server for pods in its namespace only.
#[tokio::test]
async fn registered_webhook_mutates_pods_in_its_namespace() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let ns = cluster.namespace(&client, "webhook", &[]).await?;
    let other = cluster.namespace(&client, "webhook-other", &[]).await?;

    let ca = TestCa::new("webhook-test-ca")?;
    let served = ca.server_cert(&["127.0.0.1"])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn(label_webhook::serve(listener, served, calls.clone()));

    cluster
        .register_mutating_webhook(
            &client,
            "label",
            &format!("https://{addr}/mutate"),
            &ca.cert_pem(),
            &ns,
            |_| {},
        )
        .await?;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    // The API server picks new webhook configurations up asynchronously.
    let mut n = 0;
    eventually(TIMEOUT, "the webhook to label a new pod", || {
        n += 1;
        let pods = pods.clone();
        let name = format!("p{n}");
        async move {
            let p = pods
                .create(&PostParams::default(), &pod(&name, "default", &[], None)?)
                .await?;
            Ok(p.metadata
                .labels
                .unwrap_or_default()
                .get("mizzen.dev/test-webhook")
                .map(String::as_str)
                == Some("seen"))
        }
    })
    .await?;
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // What the API server stored carries the mutation, not only the response.
    let stored = pods.get(&format!("p{n}")).await?;
    assert_eq!(
        stored
            .metadata
            .labels
            .unwrap_or_default()
            .get("mizzen.dev/test-webhook")
            .map(String::as_str),
        Some("seen")
    );

    // A namespace the webhook is not registered for is left alone.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let untouched = Api::<Pod>::namespaced(client.clone(), &other)
        .create(&PostParams::default(), &pod("q", "default", &[], None)?)
        .await?;
    assert!(
        !untouched
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("mizzen.dev/test-webhook")
    );
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "webhook was called for another namespace"
    );
    server.abort();
    Ok(())
}

/// A command in one network-namespace pod reaches a server in another, over
/// the test bridge, each running as the UID asked for.
#[tokio::test]
async fn netns_pods_reach_each_other() -> anyhow::Result<()> {
    let testapp = env!("CARGO_BIN_EXE_mizzen-testapp");
    let server_pod = NetnsPod::create("server")?;
    let client_pod = NetnsPod::create("client")?;
    assert_ne!(server_pod.ip(), client_pod.ip());

    let mut server = server_pod
        .command_as(1337, 1337, testapp)
        .args(["echo-server", "0.0.0.0:8080"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    let first = tokio::time::timeout(TIMEOUT, lines.next_line()).await??;
    assert_eq!(first.as_deref(), Some("listening 0.0.0.0:8080"));

    let who = client_pod
        .command_as(1000, 1000, testapp)
        .arg("whoami")
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), "uid=1000 gid=1000");

    let out = client_pod
        .command_as(1000, 1000, testapp)
        .args(["connect", &format!("{}:8080", server_pod.ip()), "hello"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "connect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = reply.trim().splitn(4, ' ').collect();
    assert_eq!(fields.first(), Some(&"1337"), "server runs as uid 1337: {reply}");
    assert!(
        fields
            .get(1)
            .is_some_and(|peer| peer.starts_with(&format!("{}:", client_pod.ip()))),
        "the server sees the client pod's own IP: {reply}"
    );
    assert_eq!(
        fields.get(2).copied(),
        Some(format!("{}:8080", server_pod.ip()).as_str())
    );
    assert_eq!(fields.get(3), Some(&"hello"));

    // Each pod has its own loopback: the server is not on the client's.
    let local = client_pod
        .command(testapp)
        .args(["connect", "127.0.0.1:8080", "x"])
        .output()
        .await?;
    assert!(
        !local.status.success(),
        "the client pod's loopback must not reach the server pod"
    );

    // Deleting the pod's network takes its processes with it.
    let netns = server_pod.netns().to_owned();
    drop(server_pod);
    let status = tokio::time::timeout(TIMEOUT, server.wait()).await??;
    assert!(!status.success(), "the server was killed");
    let list = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&netns),
        "{netns} was deleted"
    );
    Ok(())
}

/// A minimal mutating webhook: adds the label `mizzen.dev/test-webhook=seen`.
/// Written against the AdmissionReview wire format directly, independent of
/// Mizzen's injector.
mod label_webhook {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};
    use mizzen_tests::tls::Issued;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    pub(crate) async fn serve(
        listener: tokio::net::TcpListener,
        cert: Issued,
        calls: Arc<AtomicUsize>,
    ) -> anyhow::Result<()> {
        let certs = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        loop {
            let (tcp, _) = listener.accept().await?;
            let acceptor = acceptor.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(req, calls.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    }

    async fn handle(req: Request<Incoming>, calls: Arc<AtomicUsize>) -> anyhow::Result<Response<Full<Bytes>>> {
        calls.fetch_add(1, Ordering::SeqCst);
        let body = req.into_body().collect().await?.to_bytes();
        let review: serde_json::Value = serde_json::from_slice(&body)?;
        let uid = review["request"]["uid"].clone();
        let has_labels = review["request"]["object"]["metadata"]["labels"].is_object();
        let mut patch = Vec::new();
        if !has_labels {
            patch.push(serde_json::json!({"op": "add", "path": "/metadata/labels", "value": {}}));
        }
        patch.push(
            serde_json::json!({"op": "add", "path": "/metadata/labels/mizzen.dev~1test-webhook", "value": "seen"}),
        );
        let patch = serde_json::to_vec(&patch)?;
        let response = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": serde_json::to_value(k8s_openapi::ByteString(patch))?,
            }
        });
        Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&response)?)))?)
    }
}
