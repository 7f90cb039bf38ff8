//! The sidecar's wiring: its settings, the tasks that follow the agent,
//! the admin and health servers, the listeners, and drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use hyper::header::HeaderValue;
use mizzen_api::runtime;
use tokio::sync::watch;
use tracing::info;

use crate::config::{PodEnv, Timeouts};
use crate::discovery::{self, Routes};
use crate::drain::Connections;
use crate::http::trace::Tracing;
use crate::identity::{self, SdsSource, TlsMaterial};
use crate::inbound::{self, Inbound};
use crate::metrics::ProxyMetrics;
use crate::outbound::{self, Outbound};
use crate::policy::{Policy, PolicyRx};
use crate::probes;

/// `mizzen-proxy proxy`'s settings.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Inbound capture port: mTLS from peers, plaintext as the pod's
    /// PeerAuthentication allows.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Outbound capture port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Admin port: /metrics.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Health port: /healthz/ready, 200 once the proxy holds a certificate,
    /// the mesh's routes and its workload policy.
    #[arg(long, default_value_t = 15021)]
    health_port: u16,
    /// The node agent's socket (SDS and discovery).
    #[arg(long, default_value = "/var/run/mizzen/agent.sock")]
    agent_socket: PathBuf,
    /// The pod's projected ServiceAccount token (audience mizzen-ca).
    #[arg(long, default_value = "/var/run/secrets/mizzen/token")]
    token_file: PathBuf,
    /// How often to look for the kubelet's rotation of the token file, in
    /// seconds; the agent's streams are reopened with the new token.
    #[arg(long, default_value_t = crate::identity::DEFAULT_TOKEN_POLL.as_secs())]
    token_poll_seconds: u64,
    /// Inbound: how long a client has to send its first bytes (a whole
    /// ClientHello for TLS), in milliseconds. Server-first protocols (MySQL,
    /// SMTP) need their ports excluded from capture.
    #[arg(long, default_value_t = Timeouts::default().detect.as_millis() as u64)]
    detect_timeout_ms: u64,
    /// Inbound: most connections still sending their first bytes; a new
    /// one beyond this closes the oldest.
    #[arg(long, default_value_t = 1024)]
    max_undecided: usize,
    /// Outbound connect (and TLS handshake) timeout, in milliseconds.
    #[arg(long, default_value_t = Timeouts::default().connect.as_millis() as u64)]
    connect_timeout_ms: u64,
    /// Inbound: how long a peer proxy's TLS handshake may take, in milliseconds.
    #[arg(long, default_value_t = Timeouts::default().handshake.as_millis() as u64)]
    handshake_timeout_ms: u64,
    /// Inbound: how long connecting to the app may take, in milliseconds.
    #[arg(long, default_value_t = Timeouts::default().app_connect.as_millis() as u64)]
    app_connect_timeout_ms: u64,
    /// Outbound, on Service ports whose protocol is not declared (by
    /// appProtocol or port name): how long the app has to send its first
    /// bytes before the connection is relayed as TCP, in milliseconds.
    /// Server-first protocols wait this long once per connection; declare
    /// their ports `tcp-…` to avoid it.
    #[arg(long, default_value_t = Timeouts::default().sniff.as_millis() as u64)]
    sniff_timeout_ms: u64,
    /// Threads serving connections. One suits a sidecar: it handles one
    /// pod's traffic, and a single thread spends the least CPU per request.
    #[arg(long, env = "MIZZEN_PROXY_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Export a span per HTTP request to this OTLP/gRPC collector, e.g.
    /// http://otel-collector.observability:4317 (none: no spans; trace
    /// headers pass untouched).
    #[arg(long, env = "MIZZEN_TRACING_OTLP_ENDPOINT")]
    tracing_otlp_endpoint: Option<String>,
    /// Share of new traces recorded, 0 to 100 (requests already in a trace
    /// follow its sampled flag).
    #[arg(long, env = "MIZZEN_TRACING_SAMPLING_PERCENT", default_value_t = 1.0)]
    tracing_sampling_percent: f64,
    /// Follow the Services of these namespaces (comma-separated; `*`: every
    /// Service of the mesh), as Istio's Sidecar egress hosts do; any other
    /// Service is fetched from the agent on first use. Default: the pod's
    /// own namespace (POD_NAMESPACE), else every Service.
    #[arg(long, env = "MIZZEN_DISCOVERY_NAMESPACES", value_delimiter = ',', value_parser = namespace_name)]
    discovery_namespaces: Vec<String>,
    /// Write a JSON line per HTTP request to stdout (the access log).
    #[arg(long, env = "MIZZEN_ACCESS_LOG")]
    access_log: bool,
    /// On SIGTERM, how long open connections may finish before exiting.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// Log format: text or json. Levels come from MIZZEN_LOG_LEVEL or RUST_LOG.
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// A namespace name, as `--discovery-namespaces` takes them.
fn namespace_name(s: &str) -> Result<String, String> {
    if s == "*" || mizzen_api::mesh::is_namespace_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (lower-case letters, digits and -)"
        ))
    }
}

impl ProxyArgs {
    /// Threads serving connections.
    pub fn workers(&self) -> usize {
        self.workers
    }

    fn timeouts(&self) -> Timeouts {
        let ms = Duration::from_millis;
        Timeouts {
            connect: ms(self.connect_timeout_ms),
            handshake: ms(self.handshake_timeout_ms),
            app_connect: ms(self.app_connect_timeout_ms),
            detect: ms(self.detect_timeout_ms),
            sniff: ms(self.sniff_timeout_ms),
        }
    }
}

type Certificates = watch::Receiver<Option<Arc<TlsMaterial>>>;
type RoutesRx = watch::Receiver<Option<Arc<Routes>>>;

/// What the proxy follows of the agent.
struct FromAgent {
    certs: Certificates,
    routes: RoutesRx,
    policy: PolicyRx,
    /// True once all three arrived (an app connection before then could
    /// not be secured, an inbound one not authorised).
    ready: Arc<AtomicBool>,
    /// Services fetched on first use, when the proxy follows only some.
    on_demand: Option<Arc<discovery::OnDemand>>,
}

/// Follows the agent's certificates, routes and workload policy.
fn follow_agent(a: &ProxyArgs, pod: &PodEnv) -> FromAgent {
    let source = SdsSource {
        socket: a.agent_socket.clone(),
        token_file: a.token_file.clone(),
        workload: pod.identity(),
        token_poll: Duration::from_secs(a.token_poll_seconds.max(1)),
    };
    let (tx, certs) = watch::channel(None);
    tokio::spawn(identity::follow(source.clone(), tx));
    let (routes_tx, routes) = watch::channel(None::<Arc<Routes>>);
    let (policy_tx, policy) = watch::channel(None::<Arc<Policy>>);
    let scope = discovery::Scope::for_pod(&a.discovery_namespaces, pod.namespace.as_deref());
    let on_demand = scope.is_partial().then(discovery::OnDemand::new);
    let handle = on_demand.as_ref().map(|(od, _)| od.clone());
    tokio::spawn(discovery::follow(source, scope, on_demand, routes_tx, policy_tx));
    let ready = Arc::new(AtomicBool::new(false));
    let (mut c, mut r, mut p, flag) = (certs.clone(), routes.clone(), policy.clone(), ready.clone());
    tokio::spawn(async move {
        if c.wait_for(Option::is_some).await.is_err()
            || r.wait_for(Option::is_some).await.is_err()
            || p.wait_for(Option::is_some).await.is_err()
        {
            return;
        }
        flag.store(true, Ordering::Relaxed);
        info!("ready: holding a certificate, the mesh's routes and this pod's policy");
    });
    FromAgent {
        certs,
        routes,
        policy,
        ready,
        on_demand: handle,
    }
}

/// Records each certificate in the metrics and warns when the trust
/// bundle changes (expected only while the operator rotates the root).
fn watch_certificates(mut certs: Certificates, metrics: ProxyMetrics) {
    tokio::spawn(async move {
        let mut bundle: Option<String> = None;
        while certs.changed().await.is_ok() {
            let Some(m) = certs.borrow_and_update().clone() else {
                continue;
            };
            metrics.certificate(&m.id, m.not_after);
            if bundle.as_ref().is_some_and(|b| *b != m.roots_pem) {
                metrics.trust_bundle_changed();
                tracing::warn!(id = %m.id, "the trust bundle changed: expected only during a CA rotation");
            }
            bundle = Some(m.roots_pem.clone());
        }
    });
}

/// Records how many Services and endpoints the routes cover.
fn watch_routes(mut routes: watch::Receiver<Option<Arc<Routes>>>, metrics: ProxyMetrics) {
    tokio::spawn(async move {
        loop {
            let (services, endpoints) = routes
                .borrow_and_update()
                .as_ref()
                .map_or((0, 0), |r| (r.service_count(), r.endpoint_count()));
            metrics.discovery(services, endpoints);
            if routes.changed().await.is_err() {
                return;
            }
        }
    });
}

const NOT_READY: &str = "no certificate, routes or workload policy yet\n";

/// The admin server (metrics, app probes) and the health server.
async fn serve_admin(
    a: &ProxyArgs,
    pod: &PodEnv,
    metrics: &ProxyMetrics,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let registry = Arc::new(metrics.registry());
    let probes = probes::Probes::parse(pod.app_probes.as_deref(), pod.instance_ip).map_err(|e| anyhow::anyhow!(e))?;
    let app_health = Router::new()
        .route("/app-health/{container}/{kind}", get(probes::handler))
        .with_state(Arc::new(probes));
    runtime::serve_admin_with(
        ([0, 0, 0, 0], a.admin_port).into(),
        ready.clone(),
        NOT_READY,
        move || runtime::encode_metrics(&registry),
        app_health,
    )
    .await
    .with_context(|| format!("bind admin port {}", a.admin_port))?;
    let health = Router::new().route("/healthz/ready", runtime::ready_route(ready, NOT_READY));
    let health_listener = tokio::net::TcpListener::bind(("0.0.0.0", a.health_port))
        .await
        .context("bind health port")?;
    tokio::spawn(async move { axum::serve(health_listener, health).await });
    Ok(())
}

/// The span exporter, when a collector is configured.
fn tracing(a: &ProxyArgs, pod: &PodEnv) -> anyhow::Result<Option<Arc<Tracing>>> {
    let Some(endpoint) = &a.tracing_otlp_endpoint else {
        return Ok(None);
    };
    let (workload, namespace) = pod.workload();
    let t = Tracing::new(endpoint, a.tracing_sampling_percent, format!("{workload}.{namespace}"))?;
    info!(
        endpoint,
        sampling_percent = a.tracing_sampling_percent,
        "exporting request spans"
    );
    Ok(Some(Arc::new(t)))
}

/// Runs the sidecar until SIGTERM, then drains.
pub async fn run(a: ProxyArgs) -> anyhow::Result<()> {
    runtime::check_log_format(&a.log_format).map_err(|e| anyhow::anyhow!(e))?;
    let pod = PodEnv::from_env();
    runtime::init_tracing_with_default(&a.log_format, &pod.log_level);
    info!(config = ?a, "starting mizzen-proxy {}", env!("CARGO_PKG_VERSION"));
    let FromAgent {
        certs,
        routes,
        policy,
        ready,
        on_demand,
    } = follow_agent(&a, &pod);
    let (workload, namespace) = pod.workload();
    let workload_name = workload.clone();
    let metrics = ProxyMetrics::for_workload(workload, namespace);
    watch_certificates(certs.clone(), metrics.clone());
    watch_routes(routes.clone(), metrics.clone());
    serve_admin(&a, &pod, &metrics, ready.clone()).await?;

    let inbound_listeners = crate::net::bind_listeners(a.inbound_port).context("bind inbound port")?;
    let outbound_listeners = crate::net::bind_listeners(a.outbound_port).context("bind outbound port")?;
    let connections = Connections::default();
    let timeouts = a.timeouts();
    let tracing = tracing(&a, &pod)?;
    let mut outbound = Outbound::new(routes.clone(), certs.clone(), metrics.clone(), timeouts);
    outbound.workload = HeaderValue::from_str(&workload_name).ok();
    outbound.labels = pod.labels.clone();
    outbound.instance_ip = pod.instance_ip;
    outbound.access_log = a.access_log;
    outbound.on_demand = on_demand;
    outbound.tracing = tracing.clone();
    let outbound = Arc::new(outbound);
    tokio::spawn(crate::policy::enforce_changes(
        policy.clone(),
        connections.clone(),
        metrics.authz.clone(),
    ));
    let inbound = Arc::new(Inbound {
        material: certs,
        policy,
        metrics,
        detection: inbound::Detection {
            undecided: crate::detect::Undecided::new(a.max_undecided),
        },
        timeouts,
        app: Default::default(),
        access_log: a.access_log,
        tracing: tracing.clone(),
        routes,
    });
    let mut accepting = Vec::new();
    for l in outbound_listeners {
        accepting.push(tokio::spawn(outbound::serve(l, outbound.clone(), connections.clone())));
    }
    for l in inbound_listeners {
        accepting.push(tokio::spawn(inbound::serve(l, inbound.clone(), connections.clone())));
    }
    runtime::shutdown_signal().await;
    // Drain: not ready, no new connections, open ones may finish.
    ready.store(false, Ordering::Relaxed);
    for task in accepting {
        task.abort();
    }
    connections.drain();
    info!(open = connections.count(), drain_seconds = a.drain_seconds, "draining");
    let left = connections.drained(Duration::from_secs(a.drain_seconds)).await;
    info!(left, "drained; exiting");
    if let Some(t) = tracing {
        t.shutdown();
    }
    Ok(())
}
