//! Mizzen's certificate authority.
//!
//! Issues SPIFFE X.509-SVIDs over Istio's `CreateCertificate` gRPC API.
//! Callers prove who they are with Kubernetes ServiceAccount tokens
//! ([`auth`]); the CSR is checked against that identity ([`csr`]) and signed
//! ([`authority`]). The signing bundle lives in a Secret and the trust
//! bundle is published to every namespace ([`store`]). It also writes the
//! status of the policy resources ([`policy_status`]): one writer for the
//! cluster.
//!
//! It does not generate workload keys (the node agent does) and keeps no
//! record of issued certificates beyond an audit log line per issuance.

pub mod auth;
pub mod authority;
pub mod config;
pub mod csr;
pub mod metrics;
pub mod policy_status;
pub mod route_status;
pub mod service;
pub mod serving;
pub mod store;
