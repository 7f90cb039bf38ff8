//! `mizzen-proxy`: the pod's traffic capture (`init`) and, later, the
//! sidecar proxy itself.

use clap::{Parser, Subcommand, ValueEnum};
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
    /// Run the sidecar proxy (not built yet).
    Proxy,
    /// Wait until the proxy is ready (postStart hook for regular sidecars; not built yet).
    Wait,
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
    match Cli::parse().command {
        Command::Init(a) => match run_init(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mizzen-proxy init: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Proxy | Command::Wait => {
            eprintln!("mizzen-proxy: the proxy itself is not built yet (issue 6); only `init` works");
            std::process::ExitCode::from(2)
        }
    }
}
