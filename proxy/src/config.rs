//! The proxy's timeouts, typed, with their defaults in one place, and the
//! pod's environment, read in one place.

use std::net::IpAddr;
use std::time::Duration;

/// How long each step of a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Outbound: TCP connect to an endpoint, and then its TLS handshake.
    pub connect: Duration,
    /// Inbound: a peer proxy's TLS handshake, after its ClientHello.
    pub handshake: Duration,
    /// Inbound: connecting to the app on the pod's own address.
    pub app_connect: Duration,
    /// Inbound: a new connection's first bytes (a whole ClientHello).
    pub detect: Duration,
    /// Outbound, on a Service port whose protocol is not declared: how long
    /// the app has to send its first bytes before the connection is
    /// treated as TCP (server-first protocols wait this long once).
    pub sniff: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            app_connect: Duration::from_secs(5),
            detect: Duration::from_secs(5),
            sniff: Duration::from_millis(300),
        }
    }
}

/// What the injector tells the proxy through its environment.
#[derive(Debug, Clone)]
pub struct PodEnv {
    /// `POD_NAME`.
    pub pod_name: Option<String>,
    /// `POD_NAMESPACE`.
    pub namespace: Option<String>,
    /// `SERVICE_ACCOUNT`.
    pub service_account: Option<String>,
    /// `INSTANCE_IP`, the pod's IP.
    pub instance_ip: Option<IpAddr>,
    /// `MIZZEN_APP_PROBES`: the app's original probes (JSON).
    pub app_probes: Option<String>,
    /// `MIZZEN_LOG_LEVEL` (default `info`; `RUST_LOG` wins).
    pub log_level: String,
    /// `MIZZEN_POD_LABELS`: the pod's labels as it was admitted (JSON), for
    /// routes' `sourceLabels`; empty when unset or not a JSON object of
    /// strings.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl PodEnv {
    /// Reads the environment (unset and empty variables are `None`).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            pod_name: var("POD_NAME"),
            namespace: var("POD_NAMESPACE"),
            service_account: var("SERVICE_ACCOUNT"),
            instance_ip: var("INSTANCE_IP").and_then(|ip| ip.parse().ok()),
            app_probes: var("MIZZEN_APP_PROBES"),
            log_level: var("MIZZEN_LOG_LEVEL").unwrap_or_else(|| "info".into()),
            labels: var("MIZZEN_POD_LABELS")
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_default(),
        }
    }

    /// The identity certificates must carry, when known.
    pub fn identity(&self) -> Option<crate::identity::Workload> {
        Some(crate::identity::Workload {
            namespace: self.namespace.clone()?,
            service_account: self.service_account.clone()?,
        })
    }

    /// The workload and namespace of request metrics and spans (`unknown`
    /// outside a pod).
    pub fn workload(&self) -> (String, String) {
        (
            self.pod_name
                .as_deref()
                .map_or_else(|| "unknown".into(), |p| crate::workload::of_pod(p).to_owned()),
            self.namespace.clone().unwrap_or_else(|| "unknown".into()),
        )
    }
}
