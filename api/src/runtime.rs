//! What every Mizzen server does the same way: structured logs, the admin
//! port (`/healthz`, `/readyz`, `/metrics`) and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::{error, info};

/// Logs to standard error, `text` or `json`; levels from `RUST_LOG`
/// (default `info`).
pub fn init_tracing(format: &str) {
    init_tracing_with_default(format, "info");
}

/// Like [`init_tracing`], with `default` levels when `RUST_LOG` is unset.
pub fn init_tracing_with_default(format: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Checks a `--log-format` value.
pub fn check_log_format(format: &str) -> Result<(), String> {
    match format {
        "text" | "json" => Ok(()),
        other => Err(format!("--log-format={other:?} is not valid: use text or json")),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
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

/// The Prometheus text exposition of `registry`.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// A GET route answering 200 once `ready` is set, 503 with `not_ready` before.
pub fn ready_route(ready: Arc<AtomicBool>, not_ready: &'static str) -> axum::routing::MethodRouter {
    get(move || {
        let ready = ready.clone();
        async move {
            if ready.load(Ordering::Relaxed) {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, not_ready)
            }
        }
    })
}

/// Serves `/healthz` (always ok), `/readyz` (200 once `ready` is set, 503
/// with `not_ready` before) and `/metrics` (from `metrics`) on `addr`.
/// Nothing here is secret or changes state.
pub async fn serve_admin(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    not_ready: &'static str,
    metrics: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    serve_admin_with(addr, ready, not_ready, metrics, Router::new()).await
}

/// [`serve_admin`] with the routes of `extra` too.
pub async fn serve_admin_with(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    not_ready: &'static str,
    metrics: impl Fn() -> String + Clone + Send + Sync + 'static,
    extra: Router,
) -> std::io::Result<()> {
    let router = extra
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", ready_route(ready, not_ready))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics(),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "admin server listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "admin server failed");
        }
    });
    Ok(())
}
