//! Mizzen's node agent.
//!
//! Serves proxies on its node over Envoy's Secret Discovery Service on a
//! Unix socket ([`sds`]): each proxy's token is reviewed, a key and CSR are
//! made for its identity ([`identity`]), the CA signs it ([`ca_client`]),
//! and the certificate is cached, shared by proxies of the same identity and
//! renewed before it expires ([`secrets`]). The trust bundle follows the
//! `mizzen-root-ca` ConfigMap ([`roots`]). On the same socket, proxies
//! follow the cluster's Services and endpoints ([`discovery`]) and their own
//! workload's authorization and peer authentication ([`policy`]), on one
//! aggregated stream ([`ads`]; the per-stream bookkeeping is [`xds`]).
//!
//! The agent never decides an identity on its own authority: the CA issues
//! only what the proxy's own token proves.

pub mod ads;
pub mod ca_client;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod roots;
pub mod sds;
pub mod secrets;
pub mod watch;
pub mod xds;
