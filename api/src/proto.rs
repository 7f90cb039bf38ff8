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
    /// Says, in a delta response's `system_version_info`, that the push it
    /// belongs to continues in the next response of the same type: a
    /// client applies its resources but acts on the whole (and counts the
    /// first state as received) only after a response without it.
    pub const MORE: &str = "mizzen.dev/more";
    /// Subscription names of the form `address/<ip>` follow the Services
    /// whose cluster IP or endpoint `<ip>` is; the agent answers one that
    /// no Service has with that name among the removed resources.
    pub const ADDRESS_PREFIX: &str = "address/";
}
