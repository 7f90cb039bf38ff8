//! Command-line and environment configuration of `mizzen-agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mizzen_api::TrustDomain;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 500ms, 30s or 24h: {e}"))
}

/// Mizzen's node agent: serves each proxy on this node its own key and
/// SPIFFE certificate, and the trust bundle, over Envoy SDS on a Unix socket.
#[derive(Debug, Clone, Parser)]
#[command(name = "mizzen-agent", version, about, long_about = None)]
pub struct Config {
    /// Unix socket proxies connect to (its directory is created).
    #[arg(long, env = "MIZZEN_AGENT_SOCKET", default_value = "/var/run/mizzen/agent.sock")]
    pub socket: PathBuf,

    /// Group owning the socket (mode 0660): the proxies' GID.
    #[arg(long, default_value_t = 1337)]
    pub socket_group: u32,

    /// The CA's gRPC address.
    #[arg(
        long,
        env = "MIZZEN_CA_ADDR",
        default_value = "https://mizzen-ca.mizzen-system.svc:15012"
    )]
    pub ca_addr: String,

    /// Name to verify in the CA's serving certificate.
    #[arg(long, default_value = "mizzen-ca.mizzen-system.svc")]
    pub ca_server_name: String,

    /// The agent's own projected token (audience mizzen-ca), re-read for every CA call.
    #[arg(
        long,
        env = "MIZZEN_AGENT_TOKEN_FILE",
        default_value = "/var/run/secrets/mizzen/token"
    )]
    pub agent_token_file: PathBuf,

    /// This node's name; callers' tokens must name a pod on it. Empty disables the check.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// Namespace of the trust bundle ConfigMap (the agent's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mizzen-system")]
    pub namespace: String,

    /// The trust bundle ConfigMap.
    #[arg(long, default_value = "mizzen-root-ca")]
    pub root_configmap: String,

    /// Audience proxies' tokens must carry.
    #[arg(long, default_value = "mizzen-ca")]
    pub audience: String,

    /// SPIFFE trust domain.
    #[arg(long, env = "MIZZEN_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Certificate lifetime to ask the CA for.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl: Duration,

    /// Renew at this fraction of a certificate's lifetime.
    #[arg(long, default_value_t = 0.5)]
    pub rotation_fraction: f64,

    /// Spread renewals by up to ± this fraction of the lifetime.
    #[arg(long, default_value_t = 0.1)]
    pub rotation_jitter: f64,

    /// First retry delay after a CA failure; doubles up to --backoff-max.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub backoff_initial: Duration,

    /// Longest retry delay after CA failures.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub backoff_max: Duration,

    /// Most CA calls in flight at once (a burst of new pods queues here).
    #[arg(long, default_value_t = 8)]
    pub max_concurrent_ca_calls: usize,

    /// How long a successful review of a proxy's token is reused.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub token_review_cache_ttl: Duration,

    /// Most SDS and discovery streams open at once on the socket.
    #[arg(long, default_value_t = 4096)]
    pub max_streams: usize,

    /// Most streams open at once for one identity (a pod opens two).
    #[arg(long, default_value_t = 512)]
    pub max_streams_per_identity: usize,

    /// Largest discovery response, in bytes: a push that is larger is split
    /// over several responses (all but the last marked as continued), so
    /// that clients with gRPC's default 4 MiB limit can follow any cluster.
    #[arg(long, default_value_t = 64 << 10, value_parser = clap::value_parser!(u64).range(4096..=(64 << 20)))]
    pub max_discovery_message_bytes: u64,

    /// How long discovery gathers a burst of changes (Services, endpoints, policies) before pushing.
    #[arg(long, default_value = "100ms", value_parser = duration)]
    pub discovery_debounce: Duration,

    /// The namespace whose AuthorizationPolicy and PeerAuthentication resources apply mesh-wide.
    #[arg(long, env = "MIZZEN_ROOT_NAMESPACE", default_value = "mizzen-system")]
    pub root_namespace: String,

    /// Admin listen address: /healthz, /readyz, /metrics (nothing secret).
    #[arg(long, env = "MIZZEN_AGENT_ADMIN_ADDR", default_value = "0.0.0.0:15030")]
    pub admin_addr: SocketAddr,

    /// Log format: text or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "MIZZEN_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Config {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.05..=0.95).contains(&self.rotation_fraction) {
            return Err(format!(
                "--rotation-fraction={} is not valid: use 0.05 to 0.95",
                self.rotation_fraction
            ));
        }
        if !(0.0..0.5).contains(&self.rotation_jitter) {
            return Err(format!(
                "--rotation-jitter={} is not valid: use 0 to 0.5",
                self.rotation_jitter
            ));
        }
        if self.cert_ttl.is_zero() || self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err("--cert-ttl and --backoff-initial must be positive, --backoff-max >= --backoff-initial".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "--log-format={:?} is not valid: use text or json",
                self.log_format
            ));
        }
        Ok(())
    }
}
