//! Mizzen's sidecar proxy.
//!
//! - [`drain`]: graceful shutdown.
//! - [`init`]: the pod's traffic capture (the init container).
//! - [`identity`]: certificates from the node agent over SDS.
//! - [`inbound`]: mutual TLS termination for peers, forwarding to the app.
//! - [`probes`]: kubelet's rewritten app probes, run against the app.
//! - [`outbound`]: for now, transparent plaintext forwarding (discovery and
//!   mTLS origination are not built yet).

pub mod drain;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod outbound;
pub mod probes;
