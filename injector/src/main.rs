//! `mizzen-injector`: `serve` the admission webhook, or `inject` manifests.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use mizzen_api::runtime;
use mizzen_injector::config::{NativeSidecars, SharedConfig};
use mizzen_injector::webhook::{self, LookupError, NamespaceLabels, NamespaceMeta, Verdict};
use mizzen_injector::{manual, tls};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

/// Mizzen's sidecar injector.
#[derive(Debug, Parser)]
#[command(name = "mizzen-injector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the mutating admission webhook (POST /inject over HTTPS).
    Serve(ServeArgs),
    /// Inject the mesh into manifests: `mizzen-injector inject -f app.yaml | kubectl apply -f -`.
    Inject(InjectArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Native {
    Yes,
    No,
}

#[derive(Debug, clap::Args)]
struct InjectArgs {
    /// Manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Injection template (YAML); defaults apply when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Native sidecars need Kubernetes >= 1.29.
    #[arg(long, value_enum, default_value = "yes")]
    native_sidecars: Native,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// HTTPS listen address of the webhook.
    #[arg(long, env = "MIZZEN_INJECTOR_ADDR", default_value = "0.0.0.0:15017")]
    addr: SocketAddr,
    /// Admin listen address: /healthz, /readyz, /metrics.
    #[arg(long, env = "MIZZEN_INJECTOR_ADMIN_ADDR", default_value = "0.0.0.0:15018")]
    admin_addr: SocketAddr,
    /// Injection template (YAML, reloaded when it changes); defaults apply when absent.
    #[arg(
        long,
        env = "MIZZEN_INJECTOR_CONFIG",
        default_value = "/etc/mizzen/injector/config.yaml"
    )]
    config: PathBuf,
    /// Namespace of the injector (its webhook CA Secret lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mizzen-system")]
    namespace: String,
    /// Secret holding the webhook CA (created once).
    #[arg(long, default_value = "mizzen-injector-ca")]
    ca_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the injector keeps current.
    #[arg(long, default_value = "mizzen-injector")]
    webhook_config: String,
    /// ValidatingWebhookConfiguration (traffic rules, POST /validate) whose
    /// caBundle the injector keeps current.
    #[arg(long, default_value = "mizzen-validation")]
    validating_webhook_config: String,
    /// DNS names in the serving certificate.
    #[arg(
        long = "serving-dns",
        value_delimiter = ',',
        default_value = "mizzen-injector.mizzen-system.svc,mizzen-injector.mizzen-system.svc.cluster.local"
    )]
    serving_dns: Vec<String>,
    /// IP addresses in the serving certificate.
    #[arg(long = "serving-ip", value_delimiter = ',')]
    serving_ips: Vec<IpAddr>,
    /// Most webhook connections open at once; more are closed at once.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Most reviews parsed and answered at once (each holds its pod in memory).
    #[arg(long, default_value_t = 16)]
    max_concurrent_reviews: usize,
    /// Time a client has to send a request's headers, and then its body
    /// (the API server sends both at once; it gives up after the webhook's
    /// timeoutSeconds, 10).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Log format: text or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "MIZZEN_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

type Labels = Vec<(&'static str, &'static str)>;

struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Histogram,
    /// Connections closed at once because --max-connections were open.
    connections_refused: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("mizzen_injector");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Admission reviews, by result", requests.clone());
        let latency = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "review_duration_seconds",
            "Time to answer an admission review",
            latency.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Webhook connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            connections_refused,
        }
    }
}

/// Namespace labels and annotations from a watch cache, falling back to a
/// GET for namespaces the cache has not seen yet.
#[derive(Clone)]
struct Namespaces {
    store: Store<Namespace>,
    api: Api<Namespace>,
}

impl NamespaceLabels for Namespaces {
    async fn meta(&self, namespace: &str) -> Result<NamespaceMeta, LookupError> {
        let meta = |ns: &Namespace| NamespaceMeta {
            labels: ns.metadata.labels.clone().unwrap_or_default(),
            annotations: ns.metadata.annotations.clone().unwrap_or_default(),
        };
        if let Some(ns) = self.store.get(&ObjectRef::new(namespace)) {
            return Ok(meta(&ns));
        }
        match self.api.get_opt(namespace).await {
            Ok(ns) => Ok(ns.as_ref().map(meta).unwrap_or_default()),
            Err(e) => {
                warn!(%namespace, error = %e, "cannot read namespace labels");
                Err(LookupError {
                    namespace: namespace.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

#[derive(Clone)]
struct App {
    config: SharedConfig,
    native: bool,
    namespaces: Namespaces,
    metrics: Arc<Metrics>,
    /// Bounds reviews in flight, and so the memory their pods take.
    reviews: Arc<tokio::sync::Semaphore>,
    request_timeout: Duration,
}

/// Counts a request that got no review and answers it with `code`.
fn shed(app: &App, result: &'static str, code: StatusCode, why: &str) -> Response {
    app.metrics.requests.get_or_create(&vec![("result", result)]).inc();
    warn!(result, "admission request not reviewed: {why}");
    (code, format!("{why}\n")).into_response()
}

/// The body within the size limit and the deadline (a client sending
/// slowly holds a connection, not the injector), and a place among the
/// reviews in flight; or the answer that refuses the request.
async fn admitted(
    app: &App,
    body: axum::body::Body,
    deadline: tokio::time::Instant,
) -> Result<(axum::body::Bytes, tokio::sync::SemaphorePermit<'_>), Response> {
    use http_body_util::BodyExt;
    let body = match tokio::time::timeout_at(
        deadline,
        http_body_util::Limited::new(body, webhook::MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return Err(shed(
                app,
                "body_refused",
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body: {e}"),
            ));
        }
        Err(_) => {
            return Err(shed(
                app,
                "body_timeout",
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow",
            ));
        }
    };
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, app.reviews.acquire()).await else {
        return Err(shed(
            app,
            "overloaded",
            StatusCode::SERVICE_UNAVAILABLE,
            "too many reviews in flight",
        ));
    };
    Ok((body, permit))
}

async fn inject_handler(State(app): State<App>, body: axum::body::Body) -> Response {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + app.request_timeout;
    let (body, _permit) = match admitted(&app, body, deadline).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let cfg = app.config.get();
    let result = webhook::review(&body, &app.namespaces, &cfg, app.native).await;
    app.metrics.latency.observe(start.elapsed().as_secs_f64());
    answered(&app, result)
}

/// Traffic rules: refused when they would not compile.
async fn validate_handler(State(app): State<App>, body: axum::body::Body) -> Response {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + app.request_timeout;
    let (body, _permit) = match admitted(&app, body, deadline).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let result = webhook::validate(&body);
    app.metrics.latency.observe(start.elapsed().as_secs_f64());
    answered(&app, result)
}

/// The HTTP answer of a review, counted and logged.
fn answered(app: &App, result: Result<(Vec<u8>, Verdict), webhook::Unanswerable>) -> Response {
    match result {
        Ok((out, verdict)) => {
            app.metrics
                .requests
                .get_or_create(&vec![("result", verdict.label())])
                .inc();
            match &verdict {
                Verdict::Denied(reason) | Verdict::Invalid(reason) => {
                    warn!(result = verdict.label(), %reason, "admission refused")
                }
                other => debug!(result = other.label(), "admission answered"),
            }
            ([("content-type", "application/json")], out).into_response()
        }
        Err(e) => {
            app.metrics
                .requests
                .get_or_create(&vec![("result", "unanswerable")])
                .inc();
            warn!(error = %e, "unanswerable admission request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

async fn native_sidecars(client: &kube::Client, setting: NativeSidecars) -> bool {
    match setting {
        NativeSidecars::Always => true,
        NativeSidecars::Never => false,
        NativeSidecars::Auto => match client.apiserver_version().await {
            Ok(v) => {
                let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
                let native = v.major == "1" && minor >= 29;
                info!(version = %v.git_version, native, "native sidecars chosen from the API server version");
                native
            }
            Err(e) => {
                warn!(error = %e, "cannot read the API server version; using regular sidecars");
                false
            }
        },
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    mizzen_api::runtime::check_log_format(&args.log_format).map_err(|e| anyhow::anyhow!(e))?;
    runtime::init_tracing(&args.log_format);
    info!(config = ?args, "starting mizzen-injector {}", env!("CARGO_PKG_VERSION"));
    let config = SharedConfig::load(Some(&args.config)).map_err(|e| anyhow::anyhow!(e))?;
    tokio::spawn(config.clone().watch(args.config.clone()));
    let client = kube::Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;
    let native = native_sidecars(&client, config.get().native_sidecars).await;

    let ns_api = Api::<Namespace>::all(client.clone());
    let (store, writer) = reflector::store();
    let rf = reflector::reflector(
        writer,
        watcher(ns_api.clone(), watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(rf.for_each(|_| async {}));

    let ca = Arc::new(tls::WebhookCa::load_or_create(&client, &args.namespace, &args.ca_secret).await?);
    let names = tls::ServingNames {
        dns: args.serving_dns.clone(),
        ips: args.serving_ips.clone(),
        ttl: Duration::from_secs(7 * 86_400),
    };
    let resolver = mizzen_api::tls::ReloadingResolver::new(ca.serving(&names.dns, &names.ips, names.ttl)?);
    tokio::spawn(tls::renew_forever(ca.clone(), names, resolver.clone()));
    tokio::spawn(tls::keep_ca_bundle::<MutatingWebhookConfiguration>(
        client.clone(),
        args.webhook_config.clone(),
        ca.cert_pem.clone(),
    ));
    tokio::spawn(tls::keep_ca_bundle::<ValidatingWebhookConfiguration>(
        client.clone(),
        args.validating_webhook_config.clone(),
        ca.cert_pem.clone(),
    ));
    let tls_config = Arc::new(mizzen_api::tls::server_config(resolver, &[b"http/1.1"])?);

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let app = App {
        config,
        native,
        namespaces: Namespaces { store, api: ns_api },
        metrics: metrics.clone(),
        reviews: Arc::new(tokio::sync::Semaphore::new(args.max_concurrent_reviews.max(1))),
        request_timeout: args.request_timeout,
    };
    let router = Router::new()
        .route("/inject", post(inject_handler))
        .route("/validate", post(validate_handler))
        .layer(DefaultBodyLimit::max(webhook::MAX_BODY))
        .with_state(app);
    let connections = Arc::new(tokio::sync::Semaphore::new(args.max_connections.max(1)));
    let exported = metrics.clone();
    runtime::serve_admin(args.admin_addr, ready.clone(), "not ready\n", move || {
        runtime::encode_metrics(&exported.registry)
    })
    .await
    .with_context(|| format!("bind {}", args.admin_addr))?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("bind {}", args.addr))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    info!(addr = %args.addr, "webhook listening");
    ready.store(true, Ordering::Relaxed);
    let shutdown = runtime::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            debug!(%peer, "too many webhook connections: closing this one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, timeout) = (acceptor.clone(), router.clone(), args.request_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let svc = hyper_util::service::TowerToHyperService::new(router);
            // Headers must arrive within the timeout, also on a kept-alive
            // connection waiting for its next request.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    ready.store(false, Ordering::Relaxed);
    Ok(())
}

fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let input = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("read standard input")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("read {}", args.file))?
    };
    let config = SharedConfig::load(args.config.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?
        .get();
    let (out, report) = manual::inject_documents(&input, &config, matches!(args.native_sidecars, Native::Yes))?;
    for line in report {
        eprintln!("mizzen-injector: {line}");
    }
    print!("{out}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Inject(args) => inject(args),
    }
}
