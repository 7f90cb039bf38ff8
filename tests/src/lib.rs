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
pub mod netns;
pub mod reaper;
pub mod tls;
pub mod wait;

pub use cluster::{Cluster, Kubectl};
pub use netns::NetnsPod;
pub use wait::eventually;
