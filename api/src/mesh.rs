//! Names by which Mizzen's components recognise a meshed pod.

/// Label the injector puts on a pod it gave a proxy; value [`TLS_MODE_MIZZEN`].
pub const TLS_MODE_LABEL: &str = "security.mizzen.dev/tlsMode";
/// The value of [`TLS_MODE_LABEL`] on meshed pods: the proxy speaks mutual TLS.
pub const TLS_MODE_MIZZEN: &str = "mizzen";
/// The proxy's container name (a native sidecar or a regular container).
pub const PROXY_CONTAINER: &str = "mizzen-proxy";
