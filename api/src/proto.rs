//! gRPC contracts, generated from `proto/` at build time.

/// `istio.v1.auth`: the certificate-signing service of Istio's CA.
#[allow(missing_docs, unreachable_pub, clippy::all, missing_debug_implementations)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}
