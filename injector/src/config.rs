//! The injection template: images, ports and defaults, from a YAML file
//! (mounted from a ConfigMap) that is reloaded when it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Whether the proxy is a native sidecar (an init container with
/// `restartPolicy: Always`, Kubernetes >= 1.29) or a regular container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecars {
    /// Native when the API server is 1.29 or newer.
    #[default]
    Auto,
    Always,
    Never,
}

/// Everything the injector adds, with defaults for every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct InjectConfig {
    /// Image of both the init container and the proxy (`mizzen-proxy`).
    pub proxy_image: String,
    /// Whether a pod may choose its own proxy image with the
    /// `mizzen.dev/proxy-image` annotation (false: the init container runs
    /// as root with NET_ADMIN, so its image is the operator's choice).
    pub allow_proxy_image_annotation: bool,
    pub image_pull_policy: String,
    /// UID and GID of the proxy; its traffic is not redirected.
    pub proxy_uid: u32,
    pub inbound_capture_port: u16,
    pub outbound_capture_port: u16,
    /// Admin: metrics and the rewritten app probes.
    pub admin_port: u16,
    /// Health: `/healthz/ready`.
    pub health_port: u16,
    pub proxy_cpu_request: String,
    pub proxy_memory_request: String,
    pub proxy_cpu_limit: String,
    pub proxy_memory_limit: String,
    pub log_level: String,
    /// Host directory holding the node agent's socket.
    pub agent_socket_dir: String,
    /// Audience of the projected token the proxy presents.
    pub token_audience: String,
    pub token_expiration_seconds: i64,
    pub native_sidecars: NativeSidecars,
    /// For non-native sidecars: start the app only once the proxy is ready.
    pub hold_application_until_proxy_starts: bool,
    /// Inbound ports never redirected, for every pod.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound CIDRs never redirected, for every pod.
    pub exclude_outbound_cidrs: Vec<String>,
    /// Distributed tracing of HTTP requests by every proxy.
    pub tracing: Tracing,
}

/// Where proxies send the spans of the HTTP requests they carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Tracing {
    /// An OTLP/gRPC collector, e.g. `http://otel-collector.observability:4317`;
    /// none: proxies export no spans (trace headers still pass through).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0 to 100 (requests already part of a
    /// trace follow its sampling decision).
    pub sampling_percent: f64,
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_percent: 1.0,
        }
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/mizzen-mesh/mizzen-proxy:0.1.0".into(),
            allow_proxy_image_annotation: false,
            image_pull_policy: "IfNotPresent".into(),
            proxy_uid: 1337,
            inbound_capture_port: 15006,
            outbound_capture_port: 15001,
            admin_port: 15020,
            health_port: 15021,
            proxy_cpu_request: "10m".into(),
            proxy_memory_request: "32Mi".into(),
            proxy_cpu_limit: String::new(),
            proxy_memory_limit: "256Mi".into(),
            log_level: "info".into(),
            agent_socket_dir: "/var/run/mizzen".into(),
            token_audience: "mizzen-ca".into(),
            token_expiration_seconds: 3600,
            native_sidecars: NativeSidecars::Auto,
            hold_application_until_proxy_starts: true,
            exclude_inbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            tracing: Tracing::default(),
        }
    }
}

impl InjectConfig {
    /// Parses a YAML config file's contents.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let c: Self = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if !(0.0..=100.0).contains(&c.tracing.sampling_percent) {
            return Err(format!(
                "tracing.samplingPercent {} is not between 0 and 100",
                c.tracing.sampling_percent
            ));
        }
        if let Some(e) = &c.tracing.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("tracing.otlpEndpoint {e:?} is not an http:// or https:// URL"));
        }
        Ok(c)
    }
}

/// The current config, shared with the request handlers.
#[derive(Debug, Clone)]
pub struct SharedConfig(Arc<RwLock<Arc<InjectConfig>>>);

impl SharedConfig {
    pub fn new(c: InjectConfig) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(c))))
    }

    pub fn get(&self) -> Arc<InjectConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, c: InjectConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
    }

    /// Loads `path` (missing file = defaults).
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        Ok(Self::new(read(path)?))
    }

    /// Re-reads `path` whenever its modification time changes (ConfigMap
    /// updates swap a symlink, which changes it). A file that does not parse
    /// keeps the previous config and is logged.
    pub async fn watch(self, path: PathBuf) {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last: Option<SystemTime> = mtime(&path);
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = mtime(&path);
            if now == last {
                continue;
            }
            last = now;
            match read(Some(&path)) {
                Ok(c) => {
                    if *self.get() != c {
                        info!(path = %path.display(), "injection config reloaded");
                        self.set(c);
                    }
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "injection config not reloaded; keeping the previous one")
                }
            }
        }
    }
}

fn read(path: Option<&Path>) -> Result<InjectConfig, String> {
    match path {
        None => Ok(InjectConfig::default()),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => InjectConfig::from_yaml(&t).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(InjectConfig::default()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        assert_eq!(InjectConfig::from_yaml("").expect("empty"), InjectConfig::default());
        let c = InjectConfig::from_yaml("proxyImage: x:1\nnativeSidecars: never\n").expect("valid");
        assert_eq!(
            (c.proxy_image.as_str(), c.native_sidecars),
            ("x:1", NativeSidecars::Never)
        );
        assert!(
            InjectConfig::from_yaml("proxyImge: typo\n").is_err(),
            "a typo is not silently ignored"
        );
        assert!(InjectConfig::from_yaml("proxyUid: -1\n").is_err());
    }

    #[test]
    fn tracing_is_off_by_default_and_checked_when_set() {
        assert_eq!(InjectConfig::default().tracing.otlp_endpoint, None);
        let c = InjectConfig::from_yaml("tracing:\n  otlpEndpoint: http://collector:4317\n  samplingPercent: 100\n")
            .expect("valid");
        assert_eq!(c.tracing.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(c.tracing.sampling_percent, 100.0);
        for bad in [
            "tracing:\n  samplingPercent: 101\n",
            "tracing:\n  samplingPercent: -1\n",
            "tracing:\n  otlpEndpoint: collector:4317\n",
            "tracing:\n  endpoint: http://x\n",
        ] {
            let err = InjectConfig::from_yaml(bad).expect_err(bad);
            assert!(err.contains("tracing") || err.contains("endpoint"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn reloads_when_the_file_changes_and_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("mizzen-injector-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, "proxyImage: one\n").expect("write");
        let shared = SharedConfig::load(Some(&path)).expect("load");
        assert_eq!(shared.get().proxy_image, "one");
        tokio::spawn(shared.clone().watch(path.clone()));
        tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct mtime
        std::fs::write(&path, "proxyImage: two\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shared.get().proxy_image != "two" {
            assert!(std::time::Instant::now() < deadline, "config not reloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(&path, "proxyImage: [broken\n").expect("write");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            shared.get().proxy_image,
            "two",
            "a broken file keeps the last good config"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
