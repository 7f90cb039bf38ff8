//! gRPC contracts, generated from `proto/` at build time.

/// `istio.v1.auth`: the certificate-signing service of Istio's CA.
#[allow(missing_docs, unreachable_pub, clippy::all, missing_debug_implementations)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

/// `mizzen.discovery.v1`: the Services, endpoints and workload policies the agent serves to
/// proxies over delta xDS.
#[allow(missing_docs, unreachable_pub, clippy::all, missing_debug_implementations)]
pub mod discovery {
    tonic::include_proto!("mizzen.discovery.v1");

    /// The type URL of [`Service`] resources.
    pub const SERVICE_TYPE: &str = "type.googleapis.com/mizzen.discovery.v1.Service";
    /// The type URL of [`WorkloadPolicy`] resources.
    pub const POLICY_TYPE: &str = "type.googleapis.com/mizzen.discovery.v1.WorkloadPolicy";
}
