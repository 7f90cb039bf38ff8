//! `mizzen-proxy`: the pod's traffic capture (`init`) and the sidecar
//! (`proxy`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand, ValueEnum};
use mizzen_api::runtime;
use mizzen_proxy::config::Timeouts;
use mizzen_proxy::discovery::{self, Routes};
use mizzen_proxy::drain::Connections;
use mizzen_proxy::identity::{self, SdsSource};
use mizzen_proxy::inbound::{self, Inbound, MtlsMode};
use mizzen_proxy::init::{self, Family, InitConfig};
use mizzen_proxy::metrics::ProxyMetrics;
use mizzen_proxy::outbound::Outbound;
use mizzen_proxy::{outbound, probes};
use tokio::sync::watch;
use tracing::info;

/// Mizzen's sidecar proxy, carrying pod traffic over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "mizzen-proxy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture the pod's TCP traffic into the proxy (run as the init container).
    Init(InitArgs),
    /// Run the sidecar proxy.
    Proxy(ProxyArgs),
    /// Wait until the proxy is ready (postStart hook of regular sidecars).
    Wait(WaitArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Ipv6 {
    /// When the pod has a non-link-local IPv6 address.
    Auto,
    On,
    Off,
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// UID whose traffic is never captured (the proxy's).
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// GID whose traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Where inbound connections are redirected.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Where outbound connections are redirected.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Inbound ports left alone (comma-separated), e.g. the proxy's 15020,15021.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone.
    #[arg(long, value_delimiter = ',', value_parser = init::parse_cidr)]
    exclude_outbound_cidrs: Vec<(std::net::IpAddr, u8)>,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// Also capture IPv6.
    #[arg(long, value_enum, default_value = "auto")]
    ipv6: Ipv6,
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The proxy's health port.
    #[arg(long, default_value_t = 15021)]
    health_port: u16,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_seconds: u64,
}

/// Polls /healthz/ready until it answers 200.
async fn run_wait(a: WaitArgs) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout_seconds);
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", a.health_port)).await {
            let _ = s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").await;
            let mut buf = [0u8; 16];
            if let Ok(n) = s.read(&mut buf).await
                && (buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"))
            {
                return true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// Inbound capture port: mTLS from peers, plaintext per --mtls-mode.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Outbound capture port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Admin port: /metrics.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Health port: /healthz/ready, 200 once the proxy holds a certificate.
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
    #[arg(long, default_value_t = identity::DEFAULT_TOKEN_POLL.as_secs())]
    token_poll_seconds: u64,
    /// Whether plaintext inbound connections are accepted.
    #[arg(long, value_enum, env = "MIZZEN_MTLS_MODE", default_value = "permissive")]
    mtls_mode: MtlsMode,
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

async fn run_proxy(a: ProxyArgs) -> anyhow::Result<()> {
    runtime::check_log_format(&a.log_format).map_err(|e| anyhow::anyhow!(e))?;
    let level = std::env::var("MIZZEN_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    runtime::init_tracing_with_default(&a.log_format, &level);
    info!(config = ?a, "starting mizzen-proxy {}", env!("CARGO_PKG_VERSION"));
    let source = SdsSource {
        socket: a.agent_socket.clone(),
        token_file: a.token_file.clone(),
        workload: identity::Workload::from_env(),
        token_poll: std::time::Duration::from_secs(a.token_poll_seconds.max(1)),
    };
    let (tx, rx) = watch::channel(None);
    tokio::spawn(identity::follow(source.clone(), tx));
    let (routes_tx, routes_rx) = watch::channel(None::<Arc<Routes>>);
    tokio::spawn(discovery::follow(source, routes_tx));

    let ready = Arc::new(AtomicBool::new(false));
    {
        let (mut certs, mut routes, ready) = (rx.clone(), routes_rx.clone(), ready.clone());
        tokio::spawn(async move {
            // Ready once it holds a certificate and the mesh's routes: an
            // app connection before then could not be secured.
            if certs.wait_for(Option::is_some).await.is_err() || routes.wait_for(Option::is_some).await.is_err() {
                return;
            }
            ready.store(true, Ordering::Relaxed);
            info!("ready: holding a certificate and the mesh's routes");
        });
    }
    let metrics = ProxyMetrics::default();
    {
        let (mut certs, metrics) = (rx.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut bundle: Option<String> = None;
            while certs.changed().await.is_ok() {
                let Some(m) = certs.borrow_and_update().clone() else {
                    continue;
                };
                metrics.certificate(&m.id, m.not_after);
                // The bundle changes only when the operator rotates the
                // mesh's root; anything else deserves a look.
                if bundle.as_ref().is_some_and(|b| *b != m.roots_pem) {
                    metrics.trust_bundle_changed();
                    tracing::warn!(id = %m.id, "the trust bundle changed: expected only during a CA rotation");
                }
                bundle = Some(m.roots_pem.clone());
            }
        });
    }
    let registry = metrics.registry();
    let registry = Arc::new(registry);
    let pod_ip = std::env::var("INSTANCE_IP").ok().and_then(|ip| ip.parse().ok());
    let probes = probes::Probes::parse(std::env::var("MIZZEN_APP_PROBES").ok().as_deref(), pod_ip)
        .map_err(|e| anyhow::anyhow!(e))?;
    let app_health = Router::new()
        .route("/app-health/{container}/{kind}", get(probes::handler))
        .with_state(Arc::new(probes));
    runtime::serve_admin_with(
        ([0, 0, 0, 0], a.admin_port).into(),
        ready.clone(),
        "no certificate or routes yet\n",
        move || runtime::encode_metrics(&registry),
        app_health,
    )
    .await
    .with_context(|| format!("bind admin port {}", a.admin_port))?;
    let ready_flag = ready.clone();
    let health = Router::new().route(
        "/healthz/ready",
        runtime::ready_route(ready, "no certificate or routes yet\n"),
    );
    let health_listener = tokio::net::TcpListener::bind(("0.0.0.0", a.health_port))
        .await
        .context("bind health port")?;
    tokio::spawn(async move { axum::serve(health_listener, health).await });

    let inbound_listeners = mizzen_proxy::net::bind_listeners(a.inbound_port).context("bind inbound port")?;
    let outbound_listeners = mizzen_proxy::net::bind_listeners(a.outbound_port).context("bind outbound port")?;
    let connections = Connections::default();
    let ms = std::time::Duration::from_millis;
    let timeouts = Timeouts {
        connect: ms(a.connect_timeout_ms),
        handshake: ms(a.handshake_timeout_ms),
        app_connect: ms(a.app_connect_timeout_ms),
        detect: ms(a.detect_timeout_ms),
        sniff: ms(a.sniff_timeout_ms),
    };
    let tracing = match &a.tracing_otlp_endpoint {
        Some(endpoint) => {
            let (workload, namespace) = mizzen_proxy::workload::local();
            let service = format!("{workload}.{namespace}");
            let t = mizzen_proxy::http::trace::Tracing::new(endpoint, a.tracing_sampling_percent, service)?;
            info!(
                endpoint,
                sampling_percent = a.tracing_sampling_percent,
                "exporting request spans"
            );
            Some(Arc::new(t))
        }
        None => None,
    };
    let mut outbound = Outbound::new(routes_rx, rx.clone(), metrics.clone(), timeouts);
    outbound.access_log = a.access_log;
    outbound.tracing = tracing.clone();
    let outbound = Arc::new(outbound);
    let mut accepting = Vec::new();
    for l in outbound_listeners {
        accepting.push(tokio::spawn(outbound::serve(l, outbound.clone(), connections.clone())));
    }
    let inbound = Arc::new(Inbound {
        material: rx.clone(),
        mode: a.mtls_mode,
        metrics: metrics.clone(),
        detection: inbound::Detection {
            undecided: mizzen_proxy::detect::Undecided::new(a.max_undecided),
        },
        timeouts,
        app: Default::default(),
        access_log: a.access_log,
        tracing: tracing.clone(),
    });
    for l in inbound_listeners {
        accepting.push(tokio::spawn(inbound::serve(l, inbound.clone(), connections.clone())));
    }
    runtime::shutdown_signal().await;
    // Drain: not ready, no new connections, open ones may finish.
    ready_flag.store(false, Ordering::Relaxed);
    for task in accepting {
        task.abort();
    }
    connections.drain();
    info!(open = connections.count(), drain_seconds = a.drain_seconds, "draining");
    let left = connections
        .drained(std::time::Duration::from_secs(a.drain_seconds))
        .await;
    info!(left, "drained; exiting");
    if let Some(t) = tracing {
        t.shutdown();
    }
    Ok(())
}

fn run_init(a: InitArgs) -> Result<(), init::InitError> {
    let cfg = InitConfig {
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        exclude_inbound_ports: a.exclude_inbound_ports,
        exclude_outbound_ports: a.exclude_outbound_ports,
        exclude_outbound_cidrs: a.exclude_outbound_cidrs,
    };
    let v6 = match a.ipv6 {
        Ipv6::On => true,
        Ipv6::Off => false,
        Ipv6::Auto => init::has_ipv6(),
    };
    let families: Vec<Family> = if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    };
    for family in families {
        if a.dry_run {
            println!("# {family:?}\n{}", init::rules(&cfg, family));
        } else {
            let applied = init::apply(&cfg, family)?;
            eprintln!(
                "mizzen-proxy init: {family:?} capture rules applied ({} rules)",
                applied.lines().filter(|l| l.starts_with("-A")).count()
            );
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let workers = match &cli.command {
        Command::Proxy(a) => a.workers,
        _ => 1,
    };
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mizzen-proxy: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> std::process::ExitCode {
    match cli.command {
        Command::Init(a) => match run_init(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mizzen-proxy init: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Proxy(a) => match run_proxy(a).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mizzen-proxy: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Wait(a) => {
            let secs = a.timeout_seconds;
            if run_wait(a).await {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("mizzen-proxy wait: the proxy was not ready within {secs} s");
                std::process::ExitCode::FAILURE
            }
        }
    }
}
