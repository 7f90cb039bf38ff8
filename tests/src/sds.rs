//! A Rust SDS client over the agent's Unix socket, and helpers to read what
//! it receives.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A client connected to the Unix socket at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<SecretDiscoveryServiceClient<Channel>> {
    Ok(SecretDiscoveryServiceClient::new(channel(path).await?))
}

/// A gRPC channel to the agent's Unix socket at `path`.
pub async fn channel(path: &Path) -> anyhow::Result<Channel> {
    let path: PathBuf = path.to_owned();
    Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .context("connect to the agent's socket")
}

/// What a response carried.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub version: String,
    pub nonce: String,
    /// `default`: (chain PEM, key PEM).
    pub certificate: Option<(String, String)>,
    /// `ROOTCA`: trusted CA PEM.
    pub roots: Option<String>,
}

fn inline(ds: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>) -> anyhow::Result<String> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(String::from_utf8(b.clone())?),
        other => bail!("expected inline bytes, got {other:?}"),
    }
}

/// Decodes a response's secrets.
pub fn decode(resp: &DiscoveryResponse) -> anyhow::Result<Secrets> {
    let mut out = Secrets {
        version: resp.version_info.clone(),
        nonce: resp.nonce.clone(),
        ..Default::default()
    };
    for any in &resp.resources {
        if any.type_url != SECRET_TYPE {
            bail!("resource of type {}", any.type_url);
        }
        let s = Secret::decode(any.value.as_slice())?;
        match (s.name.as_str(), s.r#type) {
            ("default", Some(secret::Type::TlsCertificate(t))) => {
                out.certificate = Some((inline(t.certificate_chain.as_ref())?, inline(t.private_key.as_ref())?));
            }
            ("ROOTCA", Some(secret::Type::ValidationContext(v))) => out.roots = Some(inline(v.trusted_ca.as_ref())?),
            (name, t) => bail!("unexpected secret {name:?}: {t:?}"),
        }
    }
    Ok(out)
}

/// An open StreamSecrets stream.
#[derive(Debug)]
pub struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    inbound: tonic::Streaming<DiscoveryResponse>,
}

impl SdsStream {
    /// Opens a stream presenting `token` and asks for `names`.
    pub async fn open(path: &Path, token: &str, names: &[&str]) -> Result<Self, tonic::Status> {
        let mut client = connect(path)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(request(names, "", ""))
            .await
            .map_err(|_| tonic::Status::internal("send"))?;
        let outbound = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| tonic::Status::internal("token"))?,
        );
        let inbound = client.stream_secrets(req).await?.into_inner();
        Ok(Self { tx, inbound })
    }

    /// The next response.
    pub async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        self.inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::aborted("stream ended"))
    }

    /// NACKs `resp`: echoes its nonce with the previous good `version` and an error.
    pub async fn nack(&self, resp: &DiscoveryResponse, names: &[&str], version: &str) -> anyhow::Result<()> {
        let mut req = request(names, version, &resp.nonce);
        req.error_detail = Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: "test: refusing these secrets".into(),
            ..Default::default()
        });
        self.tx.send(req).await.context("send NACK")
    }

    /// ACKs `resp`, keeping the subscription to `names`.
    pub async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) -> anyhow::Result<()> {
        self.tx
            .send(request(names, &resp.version_info, &resp.nonce))
            .await
            .context("send ACK")
    }
}

/// A DiscoveryRequest for secrets.
pub fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// The Python interpreter of the venv `scripts/deps.sh` sets up with grpcio
/// and Envoy's published protos (xds-protos): the independent gRPC client.
pub fn python() -> anyhow::Result<std::path::PathBuf> {
    let cache = std::env::var("MIZZEN_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/mizzen"));
    let py = cache.join("py/bin/python");
    if !py.exists() {
        anyhow::bail!(
            "{} is missing: run scripts/deps.sh (it installs grpcio, xds-protos and websockets)",
            py.display()
        );
    }
    Ok(py)
}

/// Fetches `token`'s SVID from the agent at `socket`, as a proxy would, and
/// writes `chain.pem`, `key.pem` and `root.pem` into `dir` for openssl.
pub async fn svid_files(socket: &Path, token: &str, dir: &Path) -> anyhow::Result<()> {
    let mut stream = SdsStream::open(socket, token, &["default", "ROOTCA"]).await?;
    let (mut chain, mut key, mut root) = (None, None, None);
    while chain.is_none() || root.is_none() {
        let s = decode(&tokio::time::timeout(std::time::Duration::from_secs(60), stream.next()).await??)?;
        if let Some((c, k)) = s.certificate {
            (chain, key) = (Some(c), Some(k));
        }
        root = s.roots.or(root);
    }
    std::fs::write(dir.join("chain.pem"), chain.context("chain")?)?;
    std::fs::write(dir.join("key.pem"), key.context("key")?)?;
    std::fs::write(dir.join("root.pem"), root.context("root")?)?;
    Ok(())
}
