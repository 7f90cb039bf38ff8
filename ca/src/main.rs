//! Mizzen's certificate authority, issuing SPIFFE X.509-SVIDs to workloads.
//!
//! Not built yet: see issue 3. Only the command-line surface exists, so that
//! packaging and manifests can refer to the binary.

use clap::Parser;

/// Mizzen's certificate authority, issuing SPIFFE X.509-SVIDs to workloads.
#[derive(Debug, Parser)]
#[command(name = "mizzen-ca", version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("mizzen-ca is not implemented yet (tracked in issue 3)")
}
