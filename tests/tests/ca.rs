//! The real `mizzen-ca` process against the real control plane, with its
//! manifests' RBAC, checked by independent tools: `openssl verify` and the
//! `spiffe` crate's X.509-SVID rules.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use mizzen_api::proto::istio_ca::IstioCertificateRequest;
use mizzen_tests::ca_client::{ca_client, csr, request, uri};
use mizzen_tests::daemon::metric;
use mizzen_tests::k8s::{pod_on_node, service_account, token};
use mizzen_tests::mesh::{Ca, SYSTEM, install_manifests, published_root};
use mizzen_tests::{Cluster, eventually, free_port, workspace_bin};
use rcgen::SanType;
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn openssl_verify(dir: &Path, chain: &[String], root: &str) -> anyhow::Result<String> {
    let leaf = dir.join("leaf.pem");
    let untrusted = dir.join("untrusted.pem");
    let root_file = dir.join("root.pem");
    std::fs::write(&leaf, &chain[0])?;
    std::fs::write(&untrusted, chain[1..].concat())?;
    std::fs::write(&root_file, root)?;
    let out = tokio::process::Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&root_file)
        .arg("-untrusted")
        .arg(&untrusted)
        .arg(&leaf)
        .output()
        .await
        .context("run openssl (apt-get install openssl)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("openssl verify failed: {text}");
    }
    Ok(text)
}

fn chain_der(chain: &[String]) -> Vec<u8> {
    chain.iter().flat_map(|p| pem_der(p)).collect()
}

fn pem_der(p: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(p.as_bytes())
        .expect("certificate PEM")
        .to_vec()
}

/// Issues a certificate to a real workload through a node agent, verifies
/// it independently, and refuses each kind of bad request with its reason.
#[tokio::test]
async fn ca_issues_svids_and_refuses_bad_requests() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    install_manifests(cluster).await?;
    for node in ["ca-node-a", "ca-node-b"] {
        cluster.register_node(&client, node).await?;
    }
    let ns = cluster.namespace(&client, "ca-e2e", &[]).await?;
    service_account(&client, &ns, "web").await?;
    let web_a = pod_on_node(&client, &ns, "web-a", "web", "ca-node-a").await?;
    let web_b = pod_on_node(&client, &ns, "web-b", "web", "ca-node-b").await?;
    let doomed = pod_on_node(&client, &ns, "doomed", "web", "ca-node-a").await?;
    let agent_pod = pod_on_node(&client, SYSTEM, &format!("agent-a-{ns}"), "mizzen-agent", "ca-node-a").await?;

    let kubeconfig = cluster
        .kubeconfig_for_service_account(&client, SYSTEM, "mizzen-ca")
        .await?;
    let ca = Ca::start_with(
        &kubeconfig,
        None,
        &["--token-review-cache-ttl=1s", "--default-ttl=1h", "--max-ttl=2h"],
    )
    .await?;

    // The trust bundle arrives in the workload's namespace.
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let root = published_root(&client, &ns, "mizzen-root-ca").await?;

    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let workload_token = token(&client, &ns, "web", Some(&web_a), "mizzen-ca").await?;
    let agent_token = token(&client, SYSTEM, "mizzen-agent", Some(&agent_pod), "mizzen-ca").await?;
    let mut grpc = ca_client(&ca, &root).await?;

    // The good path.
    let good = csr(vec![uri(&id)], false);
    let chain = grpc
        .create_certificate(request(&good.pem, Some(&workload_token), Some(&agent_token)))
        .await
        .map_err(|s| anyhow::anyhow!("issuance failed: {s:?}\n{}", ca.daemon.log_text()))?
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain.last(), Some(&root), "the chain ends at the published root");
    let tmp = cluster.dir().join(format!("ca-verify-{ns}"));
    std::fs::create_dir_all(&tmp)?;
    let verdict = openssl_verify(&tmp, &chain, &root).await?;
    assert!(verdict.contains("leaf.pem: OK"), "openssl: {verdict}");

    let svid = spiffe::X509Svid::parse_from_der(&chain_der(&chain), &good.key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the spiffe crate refuses the SVID: {e}"))?;
    assert_eq!(svid.spiffe_id().to_string(), id);

    // The certificate lasts what was asked (1 h), from now minus skew.
    let leaf_der = pem_der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)?;
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 3600 + 60);

    // Refusals: each with its gRPC code and reason, none issuing anything.
    let issued_before = metric(&ca.daemon.metrics().await?, "mizzen_ca_certificates_issued_total");
    assert_eq!(issued_before, 1.0);
    let other_aud = token(&client, &ns, "web", Some(&web_a), "someone-else").await?;
    let web_b_token = token(&client, &ns, "web", Some(&web_b), "mizzen-ca").await?;
    let minted = token(&client, &ns, "web", None, "mizzen-ca").await?;
    let dns_name = SanType::DnsName("web.demo.svc".try_into()?);
    let admin_id = format!("spiffe://cluster.local/ns/{ns}/sa/admin");
    let cases: Vec<(&str, tonic::Request<IstioCertificateRequest>, Code, &str)> = vec![
        (
            "no token",
            request(&good.pem, None, Some(&agent_token)),
            Code::Unauthenticated,
            "missing authorization",
        ),
        (
            // Refused before any TokenReview (issue #10 item 9).
            "garbage token",
            request(&good.pem, Some("not-a-jwt"), Some(&agent_token)),
            Code::Unauthenticated,
            "not a usable ServiceAccount token",
        ),
        (
            "wrong audience",
            request(&good.pem, Some(&other_aud), Some(&agent_token)),
            Code::Unauthenticated,
            "another audience",
        ),
        (
            "no agent token",
            request(&good.pem, Some(&workload_token), None),
            Code::PermissionDenied,
            "direct",
        ),
        (
            "workload as agent",
            request(&good.pem, Some(&workload_token), Some(&workload_token)),
            Code::PermissionDenied,
            "not a trusted node agent",
        ),
        (
            // Issue #10 item 3: `kubectl create token web --audience mizzen-ca`
            // names no pod and no node; a trusted agent may not forward it.
            "minted token without a pod",
            request(&good.pem, Some(&minted), Some(&agent_token)),
            Code::PermissionDenied,
            "not bound to a pod",
        ),
        (
            "pod on another node",
            request(&good.pem, Some(&web_b_token), Some(&agent_token)),
            Code::PermissionDenied,
            "ca-node-b",
        ),
        (
            "another identity",
            request(
                &csr(vec![uri(&admin_id)], false).pem,
                Some(&workload_token),
                Some(&agent_token),
            ),
            Code::PermissionDenied,
            "but the caller is",
        ),
        (
            "DNS SAN",
            request(
                &csr(vec![uri(&id), dns_name], false).pem,
                Some(&workload_token),
                Some(&agent_token),
            ),
            Code::PermissionDenied,
            "web.demo.svc",
        ),
        (
            "second URI SAN",
            request(
                &csr(vec![uri(&id), uri(&admin_id)], false).pem,
                Some(&workload_token),
                Some(&agent_token),
            ),
            Code::PermissionDenied,
            "other than exactly one URI SAN",
        ),
        (
            "CA request",
            request(
                &csr(vec![uri(&id)], true).pem,
                Some(&workload_token),
                Some(&agent_token),
            ),
            Code::PermissionDenied,
            "CA certificate",
        ),
        (
            "garbage CSR",
            request("hello", Some(&workload_token), Some(&agent_token)),
            Code::InvalidArgument,
            "PEM",
        ),
    ];
    for (name, req, code, needle) in cases {
        match grpc.create_certificate(req).await {
            Ok(_) => panic!("{name}: a certificate was issued"),
            Err(s) => {
                assert_eq!(s.code(), code, "{name}: {s:?}");
                assert!(
                    s.message().contains(needle),
                    "{name}: {:?} lacks {needle:?}",
                    s.message()
                );
            }
        }
    }

    // A token whose pod was deleted stops working (after the 1 s review cache).
    let doomed_token = token(&client, &ns, "web", Some(&doomed), "mizzen-ca").await?;
    grpc.create_certificate(request(&good.pem, Some(&doomed_token), Some(&agent_token)))
        .await?;
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(
            "doomed",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await?;
    // Until the API server's view of the pod catches up, the token still works.
    let issued_while_deleting = std::sync::atomic::AtomicUsize::new(0);
    eventually(TIMEOUT, "the deleted pod's token to be refused", || {
        let mut grpc = grpc.clone();
        let req = request(&good.pem, Some(&doomed_token), Some(&agent_token));
        let counter = &issued_while_deleting;
        async move {
            match grpc.create_certificate(req).await {
                Ok(_) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(false)
                }
                Err(s) if s.code() == Code::Unauthenticated => Ok(true),
                Err(s) => bail!("unexpected refusal {s:?}"),
            }
        }
    })
    .await?;

    let text = ca.daemon.metrics().await?;
    let successes = 2 + issued_while_deleting.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        metric(&text, "mizzen_ca_certificates_issued_total"),
        successes as f64,
        "only the good requests issued:\n{text}"
    );
    for reason in [
        "token_missing",
        "token_unusable",
        "direct_not_allowed",
        "untrusted_agent",
        "node_mismatch",
        "not_pod_bound",
        "wrong_identity",
        "extra_sans",
        "ca_requested",
        "bad_pem",
    ] {
        assert!(
            metric(
                &text,
                &format!("mizzen_ca_requests_rejected_total{{reason=\"{reason}\"}}")
            ) >= 1.0,
            "no rejection counted for {reason}:\n{text}"
        );
    }
    assert!(metric(&text, "mizzen_ca_signing_cert_expiry_timestamp_seconds") > 0.0);

    // Deleting the trust bundle ConfigMap brings it back.
    cms.delete("mizzen-root-ca", &DeleteParams::default()).await?;
    eventually(TIMEOUT, "mizzen-root-ca to be restored", || {
        let cms = cms.clone();
        let root = root.clone();
        async move {
            Ok(cms
                .get_opt("mizzen-root-ca")
                .await?
                .and_then(|c| c.data)
                .and_then(|mut d| d.remove("root-cert.pem"))
                == Some(root))
        }
    })
    .await?;

    // A restart keeps the root: the Secret is created once, never replaced.
    drop(ca);
    let ca = Ca::start_with(&kubeconfig, None, &[]).await?;
    let mut grpc = ca_client(&ca, &root)
        .await
        .context("the restarted CA serves a chain to the same root")?;
    let again = grpc
        .create_certificate(request(
            &csr(vec![uri(&id)], false).pem,
            Some(&workload_token),
            Some(&agent_token),
        ))
        .await?
        .into_inner()
        .cert_chain;
    assert_eq!(again.last(), Some(&root));
    Ok(())
}

/// Two replicas starting at once against an empty namespace agree on one root.
#[tokio::test]
async fn racing_replicas_agree_on_one_root() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let home = cluster.namespace(&client, "ca-race", &[]).await?;
    let args = [
        format!("--namespace={home}"),
        format!("--root-configmap={home}-root"),
        "--allow-direct-workload-calls".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = tokio::join!(
        Ca::start_with(cluster.kubeconfig(), None, &args),
        Ca::start_with(cluster.kubeconfig(), None, &args)
    );
    let (a, b) = (a?, b?);
    let secret = Api::<Secret>::namespaced(client.clone(), &home)
        .get("mizzen-ca")
        .await?;
    let root = String::from_utf8(
        secret
            .data
            .unwrap_or_default()
            .remove("root-cert.pem")
            .context("root")?
            .0,
    )?;

    // Both serve chains to that root, and issue to a direct caller when allowed.
    let ws = cluster.namespace(&client, "ca-race-ws", &[]).await?;
    service_account(&client, &ws, "web").await?;
    let t = token(&client, &ws, "web", None, "mizzen-ca").await?;
    let id = format!("spiffe://cluster.local/ns/{ws}/sa/web");
    for ca in [&a, &b] {
        let chain = ca_client(ca, &root)
            .await?
            .create_certificate(request(&csr(vec![uri(&id)], false).pem, Some(&t), None))
            .await?
            .into_inner()
            .cert_chain;
        assert_eq!(chain.last(), Some(&root));
    }
    Ok(())
}

/// An operator's CA made with openssl and plugged in as Secret `cacerts`
/// signs workloads; an inconsistent bundle stops the CA at start with a
/// message naming the file.
#[tokio::test]
async fn plugged_in_openssl_ca_is_used_and_checked() -> anyhow::Result<()> {
    let cluster = Cluster::get();
    let client = cluster.client().await?;
    let home = cluster.namespace(&client, "ca-plugin", &[]).await?;
    let dir = cluster.dir().join(format!("plugin-{home}"));
    std::fs::create_dir_all(&dir)?;
    let script = r#"set -e
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout root-key.pem -out root-cert.pem \
  -days 30 -subj "/O=example/CN=Example Root" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca-key.pem -out ca.csr -subj "/O=example/CN=Example Mesh CA"
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' > ca.ext
openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial -days 20 -extfile ca.ext -out ca-cert.pem
cat ca-cert.pem root-cert.pem > cert-chain.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other-key.pem
"#;
    mizzen_tests::bash_in(&dir, script).await.context("openssl")?;
    let read = |f: &str| std::fs::read(dir.join(f)).with_context(|| f.to_owned());
    let secret = |name: &str, key_file: &str| -> anyhow::Result<Secret> {
        let mut data = BTreeMap::new();
        for (k, f) in [
            ("ca-cert.pem", "ca-cert.pem"),
            ("ca-key.pem", key_file),
            ("cert-chain.pem", "cert-chain.pem"),
            ("root-cert.pem", "root-cert.pem"),
        ] {
            data.insert(k.to_owned(), k8s_openapi::ByteString(read(f)?));
        }
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.data = Some(data);
        Ok(s)
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), &home);

    // Inconsistent: the key is not the signing certificate's.
    secrets
        .create(&PostParams::default(), &secret("cacerts-bad", "other-key.pem")?)
        .await?;
    let bad = tokio::process::Command::new(workspace_bin("mizzen-ca"))
        .env("KUBECONFIG", cluster.kubeconfig())
        .args([format!("--namespace={home}"), "--plugin-secret=cacerts-bad".into()])
        .arg(format!("--grpc-addr=127.0.0.1:{}", free_port()))
        .arg(format!("--admin-addr=127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .output();
    let bad = tokio::time::timeout(TIMEOUT, bad).await??;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success(),
        "the CA must not start with an inconsistent bundle"
    );
    assert!(
        stderr.contains("ca-key.pem") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(
        secrets.get_opt("mizzen-ca").await?.is_none(),
        "no self-signed root was made instead"
    );

    secrets
        .create(&PostParams::default(), &secret("cacerts", "ca-key.pem")?)
        .await?;
    let args = [
        format!("--namespace={home}"),
        format!("--root-configmap={home}-root"),
        "--allow-direct-workload-calls".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ca = Ca::start_with(cluster.kubeconfig(), None, &args).await?;
    let root = String::from_utf8(read("root-cert.pem")?)?;
    service_account(&client, &home, "web").await?;
    let t = token(&client, &home, "web", None, "mizzen-ca").await?;
    let id = format!("spiffe://cluster.local/ns/{home}/sa/web");
    let chain = ca_client(&ca, &root)
        .await?
        .create_certificate(request(&csr(vec![uri(&id)], false).pem, Some(&t), None))
        .await?
        .into_inner()
        .cert_chain;
    let verdict = openssl_verify(&dir, &chain, &root).await?;
    assert!(verdict.contains("OK"), "{verdict}");
    // The leaf ends within the operator's intermediate's life.
    let (leaf_der, inter_der) = (pem_der(&chain[0]), pem_der(&chain[1]));
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)?;
    let (_, inter) = x509_parser::parse_x509_certificate(&inter_der)?;
    assert!(leaf.validity().not_after <= inter.validity().not_after);
    // The operator's intermediate expires in 20 days, inside the 30-day
    // warning window: logged and flagged in metrics.
    let text = ca.daemon.metrics().await?;
    assert_eq!(metric(&text, "mizzen_ca_signing_cert_expiring"), 1.0, "{text}");
    assert!(
        ca.daemon.log_text().contains("expires soon"),
        "{}",
        ca.daemon.log_text()
    );
    assert!(
        secrets.get_opt("mizzen-ca").await?.is_none(),
        "a plugged-in CA makes no root of its own"
    );
    Ok(())
}
