//! Test support for Mizzen's end-to-end tests, and the tests themselves
//! (under `tests/`).
//!
//! Everything here drives real parts: [`Cluster`] is a real kube-apiserver,
//! etcd, controller manager and scheduler on loopback, started by
//! `scripts/kube.sh`; [`NetnsPod`] is a Linux network namespace with its own
//! veth and IP on a test bridge; [`tls`] makes throw-away certificates with
//! rcgen. Fixtures clean up after themselves and, through the
//! [`reaper`], when the test binary exits in any way.

pub mod cluster;
pub mod daemon;
pub mod k8s;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod reaper;
pub mod sds;
pub mod tls;
pub mod wait;

pub use cluster::{Cluster, Kubectl};
pub use netns::NetnsPod;
pub use wait::{eventually, eventually_some};

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

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The `p` quantile (0 to 1, nearest rank) of `sorted`, an ascending
/// slice; `None` when it is empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let i = (last as f64 * p).round() as usize;
    sorted.get(i.min(last)).copied()
}
