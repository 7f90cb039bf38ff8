//! `mizzen-agent`: parse configuration, follow the trust bundle, serve SDS.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use mizzen_agent::ca_client::CaSigner;
use mizzen_agent::config::Config;
use mizzen_agent::metrics::Metrics;
use mizzen_agent::sds::{CallerPolicy, Sds};
use mizzen_agent::secrets::{Rotation, SecretManager};
use mizzen_api::tokenreview::Authenticator;
use tokio::sync::watch;
use tracing::{error, info};

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn readyz(State(a): State<Admin>) -> (StatusCode, &'static str) {
    if a.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no trust bundle yet\n")
    }
}

async fn metrics_handler(State(a): State<Admin>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        a.metrics.encode(),
    )
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

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
    init_tracing(&config.log_format);
    info!(config = ?config, "starting mizzen-agent {}", env!("CARGO_PKG_VERSION"));

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("bind admin address {}", config.admin_addr))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin).await {
            error!(error = %e, "admin server failed");
        }
    });

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
    let sds = Sds {
        manager,
        authenticator: Arc::new(Authenticator::new(
            client,
            config.audience.clone(),
            config.token_review_cache_ttl,
        )),
        roots: roots_rx,
        policy: CallerPolicy {
            trust_domain: config.trust_domain.clone(),
            node_name: Some(config.node_name.clone()).filter(|n| !n.is_empty()),
        },
        metrics,
    };

    let listener = bind_socket(&config)?;
    info!(socket = %config.socket.display(), "SDS listening");
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .add_service(SecretDiscoveryServiceServer::new(sds).max_decoding_message_size(1 << 20))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .context("SDS server")?;
    let _ = std::fs::remove_file(&config.socket);
    info!("stopped");
    Ok(())
}
