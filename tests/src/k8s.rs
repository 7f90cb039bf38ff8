//! Small Kubernetes helpers shared by the end-to-end tests.

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use kube::api::{Api, PostParams};

/// Creates ServiceAccount `ns/name` unless it exists.
/// Creates the Service `spec` (JSON) in `ns`; returns its cluster IP.
pub async fn create_service(client: &kube::Client, ns: &str, spec: serde_json::Value) -> anyhow::Result<String> {
    let svc: Service = serde_json::from_value(spec)?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service got no cluster IP")
}

pub async fn service_account(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(name.into());
    match Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("create ServiceAccount {ns}/{name}")),
    }
}

/// A pod bound straight to `node` (as if the scheduler had placed it);
/// nothing runs it (a test [`Node`](crate::node::Node) leaves it alone).
pub async fn pod_on_node(client: &kube::Client, ns: &str, name: &str, sa: &str, node: &str) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": {crate::node::UNMANAGED: "true"}},
        "spec": {"serviceAccountName": sa, "nodeName": node,
                 "containers": [{"name": "app", "image": "mizzen-testapp"}]},
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{name}"))
}

/// A one-hour token of `ns/sa` for `audience`, bound to `pod` when given
/// (as a projected token is).
pub async fn token(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: Option<&Pod>,
    audience: &str,
) -> anyhow::Result<String> {
    token_for(client, ns, sa, pod, audience, 3600).await
}

/// Like [`token`], valid for `seconds` (the API server's minimum is 600).
pub async fn token_for(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: Option<&Pod>,
    audience: &str,
    seconds: i64,
) -> anyhow::Result<String> {
    let bound = pod.map(|p| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
    });
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            bound_object_ref: bound,
            expiration_seconds: Some(seconds),
        },
        ..Default::default()
    };
    Ok(Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token for {ns}/{sa}"))?
        .status
        .context("token status")?
        .token)
}

/// The bytes of `key` in Secret `ns/name`, waiting up to `timeout` for them
/// to exist (a component under test may still be creating the Secret).
pub async fn secret_value(
    client: &kube::Client,
    ns: &str,
    name: &str,
    key: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<u8>> {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let what = format!("key {key} of Secret {ns}/{name}");
    crate::eventually_some(timeout, &what, || {
        let secrets = secrets.clone();
        async move {
            Ok(secrets
                .get_opt(name)
                .await?
                .and_then(|s| s.data)
                .and_then(|mut d| d.remove(key))
                .map(|v| v.0))
        }
    })
    .await
}
