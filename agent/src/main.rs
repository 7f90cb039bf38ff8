//! `mizzen-agent`: parse configuration, follow the trust bundle, serve SDS
//! and the aggregated discovery stream (Services, workload policy).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use mizzen_agent::ads::Discovery;
use mizzen_agent::ca_client::CaSigner;
use mizzen_agent::config::Config;
use mizzen_agent::limits::StreamLimits;
use mizzen_agent::metrics::Metrics;
use mizzen_agent::sds::{CallerPolicy, Sds};
use mizzen_agent::secrets::{Rotation, SecretManager};
use mizzen_api::runtime;
use mizzen_api::tokenreview::Authenticator;
use tokio::sync::watch;
use tracing::info;

/// Binds the SDS socket: stale socket removed, mode 0660, group `gid`.
fn bind_socket(config: &Config) -> anyhow::Result<tokio::net::UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove stale socket {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::os::unix::fs::chown(path, None, Some(config.socket_group))
        .with_context(|| format!("give {} to group {}", path.display(), config.socket_group))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("mizzen-agent: {e}");
        std::process::exit(2);
    }
    runtime::init_tracing(&config.log_format);
    info!(config = ?config, "starting mizzen-agent {}", env!("CARGO_PKG_VERSION"));

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let registry_metrics = metrics.clone();
    runtime::serve_admin(
        config.admin_addr,
        ready.clone(),
        "not ready: no trust bundle yet\n",
        move || registry_metrics.encode(),
    )
    .await
    .with_context(|| format!("bind admin address {}", config.admin_addr))?;

    let client = kube::Client::try_default()
        .await
        .context("connect to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let (roots_tx, roots_rx) = watch::channel(None);
    tokio::spawn(mizzen_agent::roots::follow(
        client.clone(),
        config.namespace.clone(),
        config.root_configmap.clone(),
        roots_tx,
    ));
    {
        let (mut roots, ready) = (roots_rx.clone(), ready.clone());
        tokio::spawn(async move {
            while roots.borrow_and_update().is_none() {
                if roots.changed().await.is_err() {
                    return;
                }
            }
            ready.store(true, Ordering::Relaxed);
        });
    }

    let signer = CaSigner::new(
        config.ca_addr.clone(),
        config.ca_server_name.clone(),
        config.agent_token_file.clone(),
        roots_rx.clone(),
    );
    let rotation = Rotation {
        ttl: config.cert_ttl,
        fraction: config.rotation_fraction,
        jitter: config.rotation_jitter,
        backoff_initial: config.backoff_initial,
        backoff_max: config.backoff_max,
    };
    let manager = SecretManager::new(signer, rotation, config.max_concurrent_ca_calls, metrics.clone());
    {
        let (manager, metrics) = (manager.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let left = manager
                    .oldest_expiry()
                    .map(|t| {
                        t.duration_since(SystemTime::now())
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0)
                    })
                    .unwrap_or(0);
                metrics.oldest_cert_expiry_seconds.set(left);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
    let (services_tx, services_rx) = watch::channel(None);
    tokio::spawn(mizzen_agent::discovery::follow(
        client.clone(),
        config.trust_domain.clone(),
        config.discovery_debounce,
        services_tx,
        metrics.clone(),
    ));
    let (policies_tx, policies_rx) = watch::channel(None);
    let scope = mizzen_agent::policy::Scope {
        root_namespace: config.root_namespace.clone(),
        node_name: Some(config.node_name.clone()).filter(|n| !n.is_empty()),
        debounce: config.discovery_debounce,
    };
    tokio::spawn(mizzen_agent::policy::follow(
        client.clone(),
        scope,
        policies_tx,
        metrics.clone(),
    ));
    let authenticator = Arc::new(Authenticator::new(
        client,
        config.audience.clone(),
        config.token_review_cache_ttl,
    ));
    let policy = CallerPolicy {
        trust_domain: config.trust_domain.clone(),
        node_name: Some(config.node_name.clone()).filter(|n| !n.is_empty()),
    };
    let limits = StreamLimits::new(config.max_streams, config.max_streams_per_identity);
    let discovery = Discovery {
        services: services_rx,
        policies: policies_rx,
        authenticator: authenticator.clone(),
        policy: policy.clone(),
        metrics: metrics.clone(),
        limits: limits.clone(),
        max_message_bytes: usize::try_from(config.max_discovery_message_bytes).unwrap_or(usize::MAX),
    };
    let sds = Sds {
        manager,
        authenticator,
        roots: roots_rx,
        policy,
        metrics,
        limits,
    };

    let listener = bind_socket(&config)?;
    info!(socket = %config.socket.display(), "SDS and discovery listening");
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .add_service(SecretDiscoveryServiceServer::new(sds).max_decoding_message_size(1 << 20))
        .add_service(AggregatedDiscoveryServiceServer::new(discovery).max_decoding_message_size(1 << 20))
        .serve_with_incoming_shutdown(incoming, runtime::shutdown_signal())
        .await
        .context("SDS server")?;
    let _ = std::fs::remove_file(&config.socket);
    info!("stopped");
    Ok(())
}
