//! Mizzen's sidecar proxy.
//!
//! - [`init`]: the pod's traffic capture (the init container).
//! - [`net`]: where a captured connection was going.
//! - [`identity`]: certificates from the node agent over SDS.
//! - [`discovery`]: Services and endpoints from the node agent, as routes.
//! - [`detect`]: sorting new inbound connections, bounded.
//! - [`tls`]: the mesh's TLS configurations and SPIFFE verification.
//! - [`app`]: the sidecar's settings and wiring.
//! - [`config`]: timeouts, typed, with their defaults; the pod's environment.
//! - [`protocol`]: what a Service port carries (Istio's selection rules,
//!   sniffing).
//! - [`inbound`]: mutual TLS termination for peers, forwarding to the app.
//! - [`outbound`]: the app's connections, balanced over a Service's
//!   endpoints ([`balance`]), with mutual TLS and secure naming to meshed
//!   ones; [`breaker`] bounds the requests to a destination.
//! - [`http`]: the per-request path for HTTP ports, both directions.
//! - [`workload`]: workload names for request metrics.
//! - [`probes`]: kubelet's rewritten app probes, run against the app.
//! - [`metrics`]: connections and bytes by direction, failures by reason.
//! - [`relay`]: the bidirectional copy, with pooled buffers.
//! - [`drain`]: graceful shutdown.

pub mod app;
pub mod balance;
pub mod breaker;
pub mod coalesce;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod policy;
pub mod probes;
pub mod protocol;
pub mod relay;
pub mod tls;
pub mod workload;
