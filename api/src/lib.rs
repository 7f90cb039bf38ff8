//! Contracts shared by every Mizzen component.
//!
//! - [`spiffe`]: [`SpiffeId`] and [`TrustDomain`], validated on construction
//!   against the SPIFFE ID specification, and the Kubernetes workload form
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`policy`]: the `security.mizzen.dev/v1` custom resources
//!   [`AuthorizationPolicy`] and [`PeerAuthentication`], field-compatible with
//!   Istio's `security.istio.io/v1` so that existing policy YAML works after
//!   changing `apiVersion`.
//!
//! - [`proto`]: gRPC contracts: Istio's `IstioCertificateService`, which
//!   Mizzen's CA serves, and the discovery resources the agent serves.
//!
//! - [`tokenreview`]: Kubernetes TokenReview of ServiceAccount tokens,
//!   used by the CA and the node agent.
//!
//! - [`authz`]: authorization policy semantics (compile, normalise paths,
//!   evaluate) as pure functions.
//! - [`routing`]: `VirtualService` HTTP routes (match, weighted
//!   destinations, timeouts, retries, faults) compiled and decided as pure
//!   functions.
//! - [`tls`]: a serving certificate replaceable while serving.
//! - [`mesh`]: how components recognise a meshed pod.
//! - [`runtime`]: logs, the admin port and shutdown, the same in every server.
//!
//! This crate holds data types and their validation only: no I/O, no clients.

pub mod authz;
pub mod mesh;
#[cfg(feature = "k8s")]
pub mod policy;
pub mod proto;
pub mod routing;
pub mod runtime;
pub mod spiffe;
pub mod tls;
#[cfg(feature = "k8s")]
pub mod tokenreview;

#[cfg(feature = "k8s")]
pub use policy::{AuthorizationPolicy, PeerAuthentication};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
