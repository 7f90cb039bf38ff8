//! The agent's discovery stream, read by an independent client (grpcio with
//! Envoy's published protos) on the real control plane: Services and their
//! EndpointSlices become resources with meshed flags and SPIFFE IDs;
//! changes arrive incrementally (only what changed, removals by name);
//! ACK and NACK are understood; callers without a token are refused.

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mizzen_api::proto::discovery::{MORE, SERVICE_TYPE, Service as DiscoveredService};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::ca_and_agent;
use mizzen_tests::{Cluster, eventually};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TIMEOUT: Duration = Duration::from_secs(60);
const NODE: &str = "discovery-node";

/// The Python client, driven line by line.
struct Client {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Client {
    async fn start(socket: &std::path::Path, token_file: &str) -> anyhow::Result<Self> {
        Self::subscribed(socket, token_file, &[]).await
    }

    /// A client subscribed to `names` (none: everything).
    async fn subscribed(socket: &std::path::Path, token_file: &str, names: &[&str]) -> anyhow::Result<Self> {
        let script = mizzen_tests::cluster::repo_root().join("tests/discovery_client.py");
        let mut child = tokio::process::Command::new(mizzen_tests::sds::python()?)
            .arg(script)
            .arg(socket)
            .arg(token_file)
            .arg(SERVICE_TYPE)
            .arg(names.join(","))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self { child, lines })
    }

    async fn next(&mut self) -> anyhow::Result<serde_json::Value> {
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .context("no discovery response in time")??
            .context("the client exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    async fn say(&mut self, command: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Reads responses (ACKing each) until `done` holds for one.
    async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let resp = self.next().await?;
            self.say("ACK").await?;
            if done(&resp) {
                return Ok(resp);
            }
        }
        bail!("timed out waiting for {what}")
    }
}

fn names(resp: &serde_json::Value, key: &str) -> Vec<String> {
    resp[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.get("name").unwrap_or(r).as_str().unwrap_or_default().to_owned())
        .collect()
}

fn decode(resp: &serde_json::Value, name: &str) -> anyhow::Result<DiscoveredService> {
    let r = resp["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .with_context(|| format!("{name} in {resp}"))?;
    assert_eq!(r["type_url"], SERVICE_TYPE);
    let hex = r["value_hex"].as_str().unwrap_or_default();
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(DiscoveredService::decode(bytes.as_slice())?)
}

/// A pod `caller` of ServiceAccount `caller` on `node` in `ns`, and a file
/// holding its pod-bound token for the agent.
async fn caller_token(cluster: &Cluster, client: &kube::Client, ns: &str, node: &str) -> anyhow::Result<String> {
    service_account(client, ns, "caller").await?;
    let caller = pod_on_node(client, ns, "caller", "caller", node).await?;
    let token_file = cluster.dir().join(format!("{ns}-token"));
    std::fs::write(
        &token_file,
        token(client, ns, "caller", Some(&caller), "mizzen-ca").await?,
    )?;
    Ok(token_file.to_string_lossy().into_owned())
}

#[tokio::test]
async fn services_and_endpoints_stream_incrementally_to_an_independent_client() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let (_ca, agent) = ca_and_agent(cluster, NODE, &[]).await?;
    let ns = cluster.namespace(&client, "disco", &[]).await?;
    service_account(&client, &ns, "web").await?;
    let token_file = caller_token(cluster, &client, &ns, NODE).await?;

    // A meshed pod (as the injector leaves it) and an unmeshed one, on
    // another node: nothing runs them, so their IPs are reported here (the
    // agent takes an address's identity from the pod holding it); the
    // EndpointSlice is written by hand.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for (name, meshed, ip) in [("web-meshed", true, "10.77.0.1"), ("web-plain", false, "10.77.0.2")] {
        let mut containers = vec![serde_json::json!({"name": "app", "image": "web"})];
        if meshed {
            containers.push(serde_json::json!({"name": "mizzen-proxy", "image": "mizzen-proxy"}));
        }
        let labels = if meshed {
            serde_json::json!({"security.mizzen.dev/tlsMode": "mizzen"})
        } else {
            serde_json::json!({})
        };
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": "web", "nodeName": "elsewhere", "containers": containers},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let svc = |name: &str| -> anyhow::Result<Service> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": 80, "appProtocol": "http"}]},
        }))?)
    };
    let web = services.create(&PostParams::default(), &svc("web")?).await?;
    let vip = web.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns);
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.77.0.1"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-meshed"}},
            {"addresses": ["10.77.0.2"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-plain"}},
            {"addresses": ["10.77.0.3"], "conditions": {"ready": false},
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-plain"}},
        ],
    }))?;
    slices.create(&PostParams::default(), &slice).await?;

    // No token: refused.
    let mut anonymous = Client::start(&agent.socket, "-").await?;
    let refused = anonymous.next().await?;
    assert_eq!(refused["error"], "UNAUTHENTICATED", "{refused}");

    // The first response holds every Service; ours is complete.
    let mut stream = Client::start(&agent.socket, &token_file).await?;
    let web_name = format!("{ns}/web");
    let first = stream
        .until("web with both ready endpoints", |r| {
            decode(r, &format!("{ns}/web")).is_ok_and(|s| s.endpoints.len() == 2)
        })
        .await?;
    assert_eq!(first["type_url"], SERVICE_TYPE);
    let web = decode(&first, &web_name)?;
    assert_eq!(web.cluster_ips, std::slice::from_ref(&vip));
    assert_eq!((web.ports[0].port, web.ports[0].app_protocol.as_str()), (80, "http"));
    let meshed = web
        .endpoints
        .iter()
        .find(|e| e.addresses == ["10.77.0.1"])
        .context("meshed endpoint")?;
    assert!(meshed.meshed);
    assert_eq!(meshed.spiffe_id, format!("spiffe://cluster.local/ns/{ns}/sa/web"));
    assert_eq!(meshed.ports["http"], 8080);
    let plain = web
        .endpoints
        .iter()
        .find(|e| e.addresses == ["10.77.0.2"])
        .context("plain endpoint")?;
    assert!(!plain.meshed, "a pod without the proxy is not meshed");

    // A new Service arrives alone; the others are not resent.
    services.create(&PostParams::default(), &svc("api")?).await?;
    let added = stream
        .until("the api Service", |r| {
            names(r, "resources").contains(&format!("{ns}/api"))
        })
        .await?;
    // (Other tests' Services may change in the same push.)
    assert!(!names(&added, "resources").contains(&web_name), "{added}");

    // The meshed pod stops being meshed (label removed): web is resent.
    pods.patch(
        "web-meshed",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {"security.mizzen.dev/tlsMode": null}}})),
    )
    .await?;
    let changed = stream
        .until("web to be updated", |r| {
            names(r, "resources").contains(&format!("{ns}/web"))
        })
        .await?;
    assert!(decode(&changed, &web_name)?.endpoints.iter().all(|e| !e.meshed));

    // A NACK is counted by the agent.
    services.create(&PostParams::default(), &svc("nacked")?).await?;
    let resp = stream.next().await?;
    assert!(names(&resp, "resources").contains(&format!("{ns}/nacked")), "{resp}");
    stream.say("NACK this proxy cannot use it").await?;
    eventually(TIMEOUT, "the agent to count the NACK", || {
        let daemon = &agent.daemon;
        async move { Ok(metric(&daemon.metrics().await?, "mizzen_agent_discovery_nacks_total") >= 1.0) }
    })
    .await?;

    // A deleted Service is removed by name.
    services.delete("web", &DeleteParams::default()).await?;
    let removed = stream
        .until("web to be removed", |r| {
            names(r, "removed").contains(&format!("{ns}/web"))
        })
        .await?;
    assert!(!names(&removed, "resources").contains(&web_name));
    let text = agent.daemon.metrics().await?;
    assert!(metric(&text, "mizzen_agent_discovery_streams_open") >= 1.0, "{text}");
    assert!(metric(&text, "mizzen_agent_discovery_pushes_total") >= 4.0, "{text}");
    stream.say("QUIT").await?;
    Ok(())
}

#[tokio::test]
async fn a_first_state_larger_than_the_message_limit_comes_in_bounded_parts() -> anyhow::Result<()> {
    const LIMIT: u64 = 4096;
    const SERVICES: usize = 60;
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let node = "discovery-split-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[&format!("--max-discovery-message-bytes={LIMIT}")]).await?;
    let ns = cluster.namespace(&client, "disco-split", &[]).await?;
    let token_file = caller_token(cluster, &client, &ns, node).await?;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    for i in 0..SERVICES {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("svc-{i:02}")},
            "spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 9090, "appProtocol": "grpc"}]},
        }))?;
        services.create(&PostParams::default(), &svc).await?;
    }
    eventually(TIMEOUT, "the agent to know every Service", || {
        let daemon = &agent.daemon;
        async move { Ok(metric(&daemon.metrics().await?, "mizzen_agent_discovery_services") >= SERVICES as f64) }
    })
    .await?;

    let mut stream = Client::start(&agent.socket, &token_file).await?;
    let mut parts = Vec::new();
    loop {
        let part = stream.next().await?;
        stream.say("ACK").await?;
        let more = part["system_version_info"] == MORE;
        parts.push(part);
        if !more {
            break;
        }
    }
    assert!(parts.len() >= 2, "{} part(s)", parts.len());
    for part in &parts {
        let bytes = part["bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(bytes <= LIMIT, "a part of {bytes} bytes");
    }
    let got: std::collections::BTreeSet<String> = parts.iter().flat_map(|p| names(p, "resources")).collect();
    for i in 0..SERVICES {
        assert!(got.contains(&format!("{ns}/svc-{i:02}")), "svc-{i:02} missing");
    }
    assert_eq!(
        got.len(),
        parts.iter().map(|p| names(p, "resources").len()).sum::<usize>(),
        "each once"
    );
    stream.say("QUIT").await?;
    Ok(())
}

#[tokio::test]
async fn a_client_subscribed_to_a_namespace_gets_that_namespace_only() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let node = "discovery-scope-node";
    let (_ca, agent) = ca_and_agent(cluster, node, &[]).await?;
    let ns = cluster.namespace(&client, "disco-scope", &[]).await?;
    let elsewhere = cluster.namespace(&client, "disco-elsewhere", &[]).await?;
    let token_file = caller_token(cluster, &client, &ns, node).await?;
    let svc = |name: &str| -> anyhow::Result<Service> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))?)
    };
    for namespace in [&ns, &elsewhere] {
        Api::<Service>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &svc("web")?)
            .await?;
    }
    let mut stream = Client::subscribed(&agent.socket, &token_file, &[&format!("{ns}/*")]).await?;
    let first = stream
        .until("the namespace's web", |r| {
            names(r, "resources").contains(&format!("{ns}/web"))
        })
        .await?;
    let foreign: Vec<String> = names(&first, "resources")
        .into_iter()
        .filter(|n| !n.starts_with(&format!("{ns}/")))
        .collect();
    assert!(foreign.is_empty(), "Services of other namespaces: {foreign:?}");

    // A Service created in another namespace is not pushed; one in the
    // subscribed namespace is.
    Api::<Service>::namespaced(client.clone(), &elsewhere)
        .create(&PostParams::default(), &svc("api")?)
        .await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &svc("api")?)
        .await?;
    let added = stream
        .until("the namespace's api", |r| {
            names(r, "resources").contains(&format!("{ns}/api"))
        })
        .await?;
    assert!(
        names(&added, "resources")
            .iter()
            .all(|n| n.starts_with(&format!("{ns}/"))),
        "{added}"
    );
    stream.say("QUIT").await?;
    Ok(())
}
