//! Command-line and environment configuration of `mizzen-ca`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use mizzen_api::TrustDomain;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 24h or 90d: {e}"))
}

/// Mizzen's certificate authority: issues SPIFFE X.509-SVIDs to workloads
/// over Istio's CreateCertificate gRPC API, authenticating callers with
/// Kubernetes TokenReview.
#[derive(Debug, Clone, Parser)]
#[command(name = "mizzen-ca", version, about, long_about = None)]
pub struct Config {
    /// gRPC (TLS) listen address.
    #[arg(long, env = "MIZZEN_CA_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,

    /// Admin listen address: /healthz, /readyz, /metrics (nothing secret).
    #[arg(long, env = "MIZZEN_CA_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    pub admin_addr: SocketAddr,

    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "MIZZEN_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Namespace holding the CA's Secrets.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mizzen-system")]
    pub namespace: String,

    /// Secret the CA creates (once) for its self-signed root.
    #[arg(long, default_value = "mizzen-ca")]
    pub ca_secret: String,

    /// Operator-provided CA in Istio's cacerts layout; used instead when it exists.
    #[arg(long, default_value = "cacerts")]
    pub plugin_secret: String,

    /// ConfigMap the trust bundle is published as, in every namespace.
    #[arg(long, default_value = "mizzen-root-ca")]
    pub root_configmap: String,

    /// Audience workload and agent tokens must carry.
    #[arg(long, env = "MIZZEN_CA_AUDIENCE", default_value = "mizzen-ca")]
    pub audience: String,

    /// ServiceAccounts (namespace/name) trusted to call on behalf of workloads.
    #[arg(
        long = "trusted-agent",
        default_value = "mizzen-system/mizzen-agent",
        value_delimiter = ','
    )]
    pub trusted_agents: Vec<String>,

    /// Write the `Accepted` condition into the status of every
    /// AuthorizationPolicy, PeerAuthentication, VirtualService and
    /// DestinationRule (`kubectl get mzap`), and Mizzen's entries into the
    /// status of HTTPRoutes bound to Services.
    #[arg(long, env = "MIZZEN_CA_POLICY_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub policy_status: bool,

    /// Accept workloads calling with only their own token (as Istio's agent does).
    #[arg(long, env = "MIZZEN_CA_ALLOW_DIRECT_WORKLOAD_CALLS")]
    pub allow_direct_workload_calls: bool,

    /// Lifetime of workload certificates when the request names none.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub default_ttl: Duration,

    /// Longest workload certificate lifetime; longer requests are clamped.
    #[arg(long, default_value = "48h", value_parser = duration)]
    pub max_ttl: Duration,

    /// Lifetime of a newly generated root and intermediate.
    #[arg(long, default_value = "3650d", value_parser = duration)]
    pub root_ttl: Duration,

    /// Warn (logs, metric) when the signing chain expires within this window.
    #[arg(long, default_value = "30d", value_parser = duration)]
    pub expiry_warning: Duration,

    /// How long a successful TokenReview is reused for the same token.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub token_review_cache_ttl: Duration,

    /// Most TokenReviews in flight at once, for agents' tokens and again
    /// for workloads' (more wait up to 2 s, then get UNAVAILABLE).
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_reviews: usize,

    /// Most client connections open at once (TLS handshakes included);
    /// more are closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// Time a client has to complete its TLS handshake.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// DNS names in the CA's serving certificate.
    #[arg(
        long = "serving-dns",
        value_delimiter = ',',
        default_value = "mizzen-ca.mizzen-system.svc,mizzen-ca.mizzen-system.svc.cluster.local,localhost"
    )]
    pub serving_dns: Vec<String>,

    /// IP addresses in the CA's serving certificate.
    #[arg(long = "serving-ip", value_delimiter = ',', default_value = "127.0.0.1")]
    pub serving_ips: Vec<IpAddr>,

    /// Log format: text or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "MIZZEN_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Config {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ttl.is_zero() || self.default_ttl.is_zero() {
            return Err("--default-ttl and --max-ttl must be positive".into());
        }
        if self.default_ttl > self.max_ttl {
            return Err(format!(
                "--default-ttl={:?} is not valid: it exceeds --max-ttl={:?}",
                self.default_ttl, self.max_ttl
            ));
        }
        for a in &self.trusted_agents {
            if a.split('/').count() != 2 || a.starts_with('/') || a.ends_with('/') {
                return Err(format!(
                    "--trusted-agent={a:?} is not valid: use namespace/serviceaccount"
                ));
            }
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
