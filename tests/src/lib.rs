//! Test support for Mizzen's end-to-end tests, and the tests themselves
//! (under `tests/`).
//!
//! Everything here drives real parts: [`Cluster`] is a real kube-apiserver,
//! etcd, controller manager and scheduler on loopback, started by
//! `scripts/kube.sh`; [`NetnsPod`] is a Linux network namespace with its own
//! veth and IP on a test bridge; [`tls`] makes throw-away certificates with
//! rcgen. Fixtures clean up after themselves and, through the
//! [`reaper`], when the test binary exits in any way.

pub mod ads;
pub mod ca_client;
pub mod capture;
pub mod cluster;
pub mod daemon;
pub mod http_mesh;
pub mod k8s;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod reaper;
pub mod sds;
pub mod status;
pub mod tls;
pub mod traffic;
pub mod wait;

pub use cluster::{Cluster, Kubectl};
pub use netns::NetnsPod;
pub use wait::{eventually, eventually_some};

/// A command's stdout when it exited 0 (for `eventually_some` loops).
pub fn stdout_if_success(out: &std::process::Output) -> Option<String> {
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A binary built from this workspace (`mizzen-ca`, `mizzen-agent`, ...),
/// next to the running test's own target directory. `scripts/test.sh`
/// builds them before the tests run; with plain `cargo test`, run
/// `cargo build --workspace --bins` first.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The release build of workspace binary `name` (`target/release/<name>`),
/// for benchmarks. `scripts/test.sh` builds the proxy's and the agent's.
pub fn release_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let debug = workspace_bin(name);
    let release = debug
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?
        .join("release")
        .join(name);
    anyhow::ensure!(
        release.exists(),
        "{} is missing: build it with `cargo build --release -p {name}` (scripts/test.sh does)",
        release.display()
    );
    Ok(release)
}

/// A TCP port on 127.0.0.1 for a server a test starts, from
/// `scripts/ports.sh`: below the kernel's ephemeral range, so no outgoing
/// connection on the machine can take it before the server binds it, and
/// never handed to two servers of concurrent tests (see the script).
///
/// Panics when the script fails (it says why).
pub fn free_port() -> u16 {
    static PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut ports = PORTS.lock().unwrap_or_else(|p| p.into_inner());
    if ports.is_empty() {
        *ports = reserve_ports(16);
        ports.reverse();
    }
    ports.pop().expect("reserve_ports returns as many ports as asked")
}

fn reserve_ports(n: usize) -> Vec<u16> {
    let script = cluster::repo_root().join("scripts/ports.sh");
    let out = std::process::Command::new(&script)
        .arg(n.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|e| panic!("{}: bad port {l:?}: {e}", script.display()))
        })
        .collect();
    assert_eq!(ports.len(), n, "{} printed {ports:?}", script.display());
    ports
}

/// Runs the bash `script` in `dir` (openssl recipes and the like); its
/// output is the error when it fails.
pub async fn bash_in(dir: &std::path::Path, script: &str) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

/// The `p` quantile (0 to 1, nearest rank) of `sorted`, an ascending
/// slice; `None` when it is empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let i = (last as f64 * p).round() as usize;
    sorted.get(i.min(last)).copied()
}
