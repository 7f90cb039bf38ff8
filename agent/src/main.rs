//! Mizzen's node agent, serving workload keys and certificates over Envoy SDS.
//!
//! Not built yet: see issue 4. Only the command-line surface exists, so that
//! packaging and manifests can refer to the binary.

use clap::Parser;

/// Mizzen's node agent, serving workload keys and certificates over Envoy SDS.
#[derive(Debug, Parser)]
#[command(name = "mizzen-agent", version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("mizzen-agent is not implemented yet (tracked in issue 4)")
}
