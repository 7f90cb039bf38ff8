//! Mizzen's sidecar injector, a mutating admission webhook.
//!
//! Not built yet: see issue 5. Only the command-line surface exists, so that
//! packaging and manifests can refer to the binary.

use clap::Parser;

/// Mizzen's sidecar injector, a mutating admission webhook.
#[derive(Debug, Parser)]
#[command(name = "mizzen-injector", version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("mizzen-injector is not implemented yet (tracked in issue 5)")
}
