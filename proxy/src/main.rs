//! Mizzen's sidecar proxy, carrying pod traffic over mutual TLS.
//!
//! Not built yet: see issue 6. Only the command-line surface exists, so that
//! packaging and manifests can refer to the binary.

use clap::Parser;

/// Mizzen's sidecar proxy, carrying pod traffic over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "mizzen-proxy", version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("mizzen-proxy is not implemented yet (tracked in issue 6)")
}
