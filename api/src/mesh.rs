//! Names by which Mizzen's components recognise a meshed pod, and the
//! form of a namespace name they accept.

/// Label the injector puts on a pod it gave a proxy; value [`TLS_MODE_MIZZEN`].
pub const TLS_MODE_LABEL: &str = "security.mizzen.dev/tlsMode";
/// The value of [`TLS_MODE_LABEL`] on meshed pods: the proxy speaks mutual TLS.
pub const TLS_MODE_MIZZEN: &str = "mizzen";
/// The proxy's container name (a native sidecar or a regular container).
pub const PROXY_CONTAINER: &str = "mizzen-proxy";

/// Whether `s` is a Kubernetes namespace name (an RFC 1123 label): 1 to 63
/// of `a-z`, `0-9` and `-`, neither first nor last a `-`.
pub fn is_namespace_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespace_names_are_rfc_1123_labels() {
        for ok in ["a", "demo", "team-a1", &"x".repeat(63)] {
            assert!(super::is_namespace_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Demo", "a_b", "a.b", "a/b", &"x".repeat(64)] {
            assert!(!super::is_namespace_name(bad), "{bad}");
        }
    }
}
