//! `mizzen-proxy`: the pod's traffic capture (`init`) and the sidecar
//! (`proxy`).

use clap::{Parser, Subcommand, ValueEnum};
use mizzen_proxy::app::{self, ProxyArgs};
use mizzen_proxy::init::{self, Family, InitConfig};

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
        Command::Proxy(a) => a.workers(),
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
        Command::Proxy(a) => match app::run(a).await {
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
