//! Authorization: Istio's `AuthorizationPolicy` semantics as pure
//! functions, so the agent can compile policies once per change and the
//! proxy evaluate them per connection and request without I/O.
//!
//! - [`path`]: request paths normalised before matching.
//! - [`eval`]: compiled policies and [`evaluate`].
//! - `compile` (with the `k8s` feature): the CRD compiled, with what
//!   cannot be enforced refused by name.
//! - `peer` (with the `k8s` feature): `PeerAuthentication` resolved for
//!   one workload.
//! - `status` (with the `k8s` feature): the `Accepted` condition a
//!   policy's status carries.

pub mod eval;
pub mod path;

#[cfg(feature = "k8s")]
pub mod compile;
#[cfg(feature = "k8s")]
pub mod peer;
#[cfg(test)]
mod properties;
#[cfg(feature = "k8s")]
pub mod status;
#[cfg(all(test, feature = "k8s"))]
mod tests;

pub use eval::{CompiledPolicy, Connection, Decision, DenyReason, Request, evaluate};
