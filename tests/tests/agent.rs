//! The real `mizzen-agent` and `mizzen-ca` processes on the real control
//! plane: SDS over the agent's socket with our client and an independent
//! one (grpcio with Envoy's published protos), rotation, CA outage.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::{Agent, Ca, SYSTEM, install_manifests, published_root};
use mizzen_tests::sds::{SdsStream, Secrets, decode};
use mizzen_tests::{Cluster, eventually, eventually_some};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(60);
const BOTH: &[&str] = &["default", "ROOTCA"];

fn leaf_facts(chain_pem: &str) -> anyhow::Result<(String, String, SystemTime)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&block.contents)?;
    let san = leaf.subject_alternative_name()?.context("SAN")?;
    let uri = match san.value.general_names.as_slice() {
        [x509_parser::extensions::GeneralName::URI(u)] => (*u).to_owned(),
        other => bail!("unexpected SANs {other:?}"),
    };
    let serial = leaf.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp() as u64);
    Ok((uri, serial, not_after))
}

/// `openssl verify -x509_strict` of the chain's leaf against `root`, and the
/// key belonging to the leaf (openssl's own public-key comparison).
async fn verify_with_openssl(dir: &Path, chain: &str, key: &str, root: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let certs: Vec<String> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|c| c.contains("BEGIN"))
        .map(str::to_owned)
        .collect();
    std::fs::write(dir.join("leaf.pem"), &certs[0])?;
    std::fs::write(dir.join("untrusted.pem"), certs[1..].concat())?;
    std::fs::write(dir.join("root.pem"), root)?;
    std::fs::write(dir.join("key.pem"), key)?;
    let script = "set -e
openssl verify -x509_strict -purpose sslserver -CAfile root.pem -untrusted untrusted.pem leaf.pem
a=$(openssl x509 -in leaf.pem -noout -pubkey)
b=$(openssl pkey -in key.pem -pubout)
[ \"$a\" = \"$b\" ] || { echo 'key does not match the certificate'; exit 1; }";
    mizzen_tests::bash_in(dir, script).await.context("openssl")
}

/// Reads responses (ACKing each) until one carries a certificate whose
/// serial is not `old`.
async fn next_certificate(stream: &mut SdsStream, old: Option<&str>) -> anyhow::Result<Secrets> {
    loop {
        let resp = stream.next().await.map_err(|s| anyhow::anyhow!("stream: {s:?}"))?;
        let secrets = decode(&resp)?;
        stream.ack(&resp, BOTH).await?;
        if let Some((chain, _)) = &secrets.certificate {
            let (_, serial, _) = leaf_facts(chain)?;
            if Some(serial.as_str()) != old {
                return Ok(secrets);
            }
        }
    }
}

/// The independent client's FetchSecrets, as JSON.
async fn python_fetch(socket: &Path, token: &str, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let token_file = dir.join(format!("py-token-{}", mizzen_tests::free_port()));
    std::fs::write(&token_file, token)?;
    let script = mizzen_tests::cluster::repo_root().join("tests/sds_client.py");
    let out = tokio::process::Command::new(mizzen_tests::sds::python()?)
        .arg(script)
        .arg(socket)
        .arg(&token_file)
        .args(BOTH)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "python client printed {text:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn agent_serves_sds_rotates_and_survives_a_ca_outage() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    let (node, other_node) = ("agent-node", "agent-other-node");
    for n in [node, other_node] {
        cluster.register_node(&client, n).await?;
    }
    let ca = Ca::start(cluster, None, &[]).await?;
    let root = published_root(&client, SYSTEM, "mizzen-root-ca").await?;
    let agent = Agent::start(
        cluster,
        node,
        ca.grpc_port,
        &[
            "--cert-ttl=10s",
            "--rotation-jitter=0",
            "--backoff-initial=200ms",
            "--backoff-max=1s",
            "--token-review-cache-ttl=1s",
        ],
    )
    .await?;

    let ns = cluster.namespace(&client, "agent-e2e", &[]).await?;
    service_account(&client, &ns, "web").await?;
    let web = pod_on_node(&client, &ns, "web-1", "web", node).await?;
    let web_token = token(&client, &ns, "web", Some(&web), "mizzen-ca").await?;
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let work = cluster.dir().join(format!("agent-{ns}"));
    std::fs::create_dir_all(&work)?;

    // Our client: both secrets arrive, ACKed.
    let mut stream = SdsStream::open(&agent.socket, &web_token, BOTH).await?;
    let mut first = Secrets::default();
    while first.certificate.is_none() || first.roots.is_none() {
        let resp = tokio::time::timeout(TIMEOUT, stream.next()).await??;
        assert_eq!(resp.type_url, mizzen_tests::sds::SECRET_TYPE);
        assert!(!resp.nonce.is_empty() && !resp.version_info.is_empty());
        let s = decode(&resp)?;
        stream.ack(&resp, BOTH).await?;
        first.certificate = s.certificate.or(first.certificate);
        first.roots = s.roots.or(first.roots);
    }
    let (chain, key) = first.certificate.clone().context("certificate")?;
    assert_eq!(
        first.roots.as_deref(),
        Some(root.as_str()),
        "ROOTCA is the published root"
    );
    verify_with_openssl(&work.join("first"), &chain, &key, &root).await?;
    let (uri, serial1, not_after1) = leaf_facts(&chain)?;
    assert_eq!(uri, id, "the proxy gets its own identity");
    // The spiffe crate accepts it as an X.509-SVID (with its PKCS#8 key).
    let ders: Vec<u8> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|c| c.contains("BEGIN"))
        .flat_map(|c| {
            x509_parser::pem::parse_x509_pem(c.as_bytes())
                .map(|(_, p)| p.contents)
                .unwrap_or_default()
        })
        .collect();
    let key_der = x509_parser::pem::parse_x509_pem(key.as_bytes())?.1.contents;
    let svid = spiffe::X509Svid::parse_from_der(&ders, &key_der).map_err(|e| anyhow::anyhow!("spiffe crate: {e}"))?;
    assert_eq!(svid.spiffe_id().to_string(), id);

    // Rotation: a new certificate on the same stream before the first expires.
    let rotated = tokio::time::timeout(TIMEOUT, next_certificate(&mut stream, Some(&serial1))).await??;
    let (chain2, key2) = rotated.certificate.context("rotated certificate")?;
    let (_, serial2, _) = leaf_facts(&chain2)?;
    assert_ne!(serial2, serial1);
    assert!(
        SystemTime::now() < not_after1,
        "rotated before the first certificate expired"
    );
    assert_ne!(key2, key, "a fresh key with each certificate");

    // A NACK is counted and does not make the agent resend the same secrets.
    let mut nacking = SdsStream::open(&agent.socket, &web_token, &["ROOTCA"]).await?;
    let resp = tokio::time::timeout(TIMEOUT, nacking.next()).await??;
    nacking.nack(&resp, &["ROOTCA"], "").await?;
    eventually(TIMEOUT, "the NACK to be counted", || async {
        Ok(metric(&agent.daemon.metrics().await?, "mizzen_agent_sds_nacks_total") >= 1.0)
    })
    .await?;
    let resent = tokio::time::timeout(Duration::from_secs(2), nacking.next()).await;
    assert!(
        resent.is_err(),
        "no resend of an unchanged trust bundle after a NACK: {resent:?}"
    );

    // The independent client (grpcio + Envoy's protos) fetches both secrets.
    let json = python_fetch(&agent.socket, &web_token, &work).await?;
    assert_eq!(json["type_url"], mizzen_tests::sds::SECRET_TYPE, "{json}");
    assert_eq!(json["secrets"]["ROOTCA"]["kind"], "validation_context", "{json}");
    assert_eq!(json["secrets"]["ROOTCA"]["trusted_ca"], root.as_str());
    assert_eq!(json["secrets"]["default"]["kind"], "tls_certificate");
    let py_chain = json["secrets"]["default"]["chain"].as_str().context("chain")?;
    let py_key = json["secrets"]["default"]["key"].as_str().context("key")?;
    assert_eq!(leaf_facts(py_chain)?.0, id);
    verify_with_openssl(&work.join("python"), py_chain, py_key, &root).await?;

    // Unknown resource names and types are errors, not silence.
    let err = match SdsStream::open(&agent.socket, &web_token, &["nope"]).await {
        Ok(mut s) => tokio::time::timeout(TIMEOUT, s.next())
            .await?
            .expect_err("unknown name must fail"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nope"));

    // A pod on another node, a deleted pod, no token: nothing.
    let far = pod_on_node(&client, &ns, "web-far", "web", other_node).await?;
    let far_token = token(&client, &ns, "web", Some(&far), "mizzen-ca").await?;
    let err = SdsStream::open(&agent.socket, &far_token, BOTH)
        .await
        .expect_err("another node's pod");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = SdsStream::open(&agent.socket, "", BOTH).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let gone = pod_on_node(&client, &ns, "web-gone", "web", node).await?;
    let gone_token = token(&client, &ns, "web", Some(&gone), "mizzen-ca").await?;
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(
            "web-gone",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;
    eventually(TIMEOUT, "the deleted pod's token to be refused", || {
        let (socket, t) = (agent.socket.clone(), gone_token.clone());
        async move {
            match SdsStream::open(&socket, &t, BOTH).await {
                Err(s) if s.code() == Code::Unauthenticated => Ok(true),
                _ => Ok(false),
            }
        }
    })
    .await?;

    // CA outage: the cached certificate keeps being served, failures are
    // counted, and a new certificate follows when the CA returns.
    let ca_port = ca.grpc_port;
    ca.daemon.kill().await?;
    let errors = eventually_some(TIMEOUT, "the agent to count CA failures", || async {
        let n = metric(&agent.daemon.metrics().await?, "mizzen_agent_ca_errors_total");
        Ok((n > 0.0).then_some(n))
    })
    .await?;
    let cached = python_fetch(&agent.socket, &web_token, &work).await?;
    let cached_chain = cached["secrets"]["default"]["chain"]
        .as_str()
        .context("served while the CA is down")?;
    assert_eq!(leaf_facts(cached_chain)?.0, id);
    let (_, cached_serial, _) = leaf_facts(cached_chain)?;
    assert!(
        agent.daemon.log_text().contains("cannot get a certificate"),
        "the failure is logged"
    );
    // A new trust bundle (say, a second root while migrating CAs) is pushed
    // on the open stream. The CA, being down, does not restore the old one.
    let extra_root = mizzen_tests::tls::TestCa::new("second root")?.cert_pem();
    let bundle = format!("{root}{extra_root}");
    cluster
        .kubectl([
            "-n",
            SYSTEM,
            "patch",
            "configmap",
            "mizzen-root-ca",
            "--type=merge",
            "-p",
        ])
        .arg(serde_json::json!({"data": {"root-cert.pem": bundle}}).to_string())
        .run()
        .await?;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let resp = stream.next().await.map_err(|s| anyhow::anyhow!("stream: {s:?}"))?;
            let s = decode(&resp)?;
            stream.ack(&resp, BOTH).await?;
            if s.roots.as_deref() == Some(bundle.as_str()) {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await??;

    let ca = Ca::start(cluster, Some(ca_port), &[]).await?;
    let recovered = tokio::time::timeout(TIMEOUT, next_certificate(&mut stream, Some(&cached_serial))).await??;
    let (chain3, key3) = recovered.certificate.context("certificate after recovery")?;
    verify_with_openssl(&work.join("recovered"), &chain3, &key3, &root).await?;

    let text = agent.daemon.metrics().await?;
    assert!(metric(&text, "mizzen_agent_ca_errors_total") >= errors);
    assert!(metric(&text, "mizzen_agent_sds_streams_open") >= 1.0, "{text}");
    assert!(metric(&text, "mizzen_agent_certificates_cached") >= 1.0, "{text}");
    assert!(
        metric(&text, "mizzen_agent_sds_rejected_total{reason=\"wrong_node\"}") >= 1.0,
        "{text}"
    );
    drop(ca);
    Ok(())
}
