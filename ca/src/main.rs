//! `mizzen-ca`: parse configuration, load the signing bundle, serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use mizzen_api::proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mizzen_api::runtime;
use mizzen_ca::auth::{Authenticator, Policy};
use mizzen_ca::config::Config;
use mizzen_ca::metrics::Metrics;
use mizzen_ca::service::{CaService, Ttls};
use mizzen_ca::{policy_status, route_status, serving, store};
use tracing::{error, info, warn};

/// Largest CreateCertificate request accepted (a CSR is a few KiB).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Publishes the signing chain's expiry and warns, hourly, when it is near.
async fn watch_expiry(not_after: SystemTime, window: Duration, metrics: Arc<Metrics>) {
    let unix = not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    metrics.signing_expiry_timestamp.set(unix as i64);
    loop {
        let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        if left < window {
            metrics.signing_expiring.set(1);
            warn!(
                expires_in_hours = left.as_secs() / 3600,
                "the CA's signing certificate expires soon: plug in a new CA (Secret cacerts) before it does"
            );
        } else {
            metrics.signing_expiring.set(0);
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("mizzen-ca: {e}");
        std::process::exit(2);
    }
    runtime::init_tracing(&config.log_format);
    info!(config = ?config, "starting mizzen-ca {}", env!("CARGO_PKG_VERSION"));

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let registry_metrics = metrics.clone();
    runtime::serve_admin(config.admin_addr, ready.clone(), "not ready\n", move || {
        registry_metrics.encode()
    })
    .await
    .with_context(|| format!("bind admin address {}", config.admin_addr))?;

    let client = kube::Client::try_default()
        .await
        .context("connect to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    if config.policy_status {
        let claims = route_status::Claims::new();
        tokio::spawn(policy_status::run(client.clone(), metrics.clone(), claims.clone()));
        tokio::spawn(route_status::run(client.clone(), metrics.clone(), claims));
    }
    let (authority, source) = store::load_bundle(
        &client,
        &config.namespace,
        &config.plugin_secret,
        &config.ca_secret,
        &config.trust_domain,
        config.root_ttl,
    )
    .await?;
    let authority = Arc::new(authority);
    info!(?source, signing_not_after = ?authority.signing_not_after(), "signing bundle loaded");
    tokio::spawn(watch_expiry(
        authority.signing_not_after(),
        config.expiry_warning,
        metrics.clone(),
    ));
    {
        let (client, root, metrics) = (client.clone(), authority.root_pem().to_owned(), metrics.clone());
        let name = config.root_configmap.clone();
        tokio::spawn(async move {
            if let Err(e) = store::publish_roots(client, name, root, metrics).await {
                error!(error = %e, "trust bundle publisher stopped");
            }
        });
    }

    let names = serving::ServingNames {
        dns: config.serving_dns.clone(),
        ips: config.serving_ips.clone(),
        ttl: Duration::from_secs(7 * 86_400),
    };
    let resolver = serving::Resolver::new(&authority, &names).context("issue the serving certificate")?;
    tokio::spawn(resolver.clone().renew_forever(authority.clone(), names));
    let tls = Arc::new(serving::server_config(&resolver)?);
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("bind gRPC address {}", config.grpc_addr))?;

    let service = CaService {
        authority,
        agents: Arc::new(Authenticator::with_limit(
            client.clone(),
            config.audience.clone(),
            config.token_review_cache_ttl,
            config.max_concurrent_reviews,
        )),
        workloads: Arc::new(Authenticator::with_limit(
            client,
            config.audience.clone(),
            config.token_review_cache_ttl,
            config.max_concurrent_reviews,
        )),
        policy: Policy {
            trust_domain: config.trust_domain.clone(),
            trusted_agents: config.trusted_agents.clone(),
            allow_direct: config.allow_direct_workload_calls,
        },
        ttls: Ttls {
            default: config.default_ttl,
            max: config.max_ttl,
        },
        metrics: metrics.clone(),
    };
    let incoming = serving::incoming(
        listener,
        tls,
        serving::ConnectionLimits {
            max: config.max_connections,
            handshake_timeout: config.handshake_timeout,
        },
        metrics.connections_refused.clone(),
    );
    let grpc = IstioCertificateServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    info!(addr = %config.grpc_addr, "gRPC server listening");
    ready.store(true, Ordering::Relaxed);
    // Connections are recycled every half hour (clients reconnect at once),
    // so an idle one cannot hold its place for ever.
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .max_connection_age(Duration::from_secs(1800))
        .max_connection_age_grace(Duration::from_secs(60))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming, async {
            runtime::shutdown_signal().await;
            ready.store(false, Ordering::Relaxed);
        })
        .await
        .context("gRPC server")?;
    info!("stopped");
    Ok(())
}
