//! The proxy's certificates, from the node agent's SDS stream.
//!
//! A stream asks for `default` (our key and SVID) and `ROOTCA` (the trust
//! bundle), ACKs what it can use and NACKs what it cannot, and reconnects
//! with backoff. Every usable update produces a fresh [`TlsMaterial`] on a
//! watch channel; listeners build their rustls configuration from the latest
//! one, so new connections use new certificates and open ones are untouched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use mizzen_api::SpiffeId;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;
use tracing::{info, warn};
use zeroize::Zeroizing;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const NAMES: [&str; 2] = ["default", "ROOTCA"];

/// Our certificate, key and the trust bundle, ready for rustls.
pub struct TlsMaterial {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: rustls::RootCertStore,
    pub serial: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// The single URI SAN of a certificate, as a SPIFFE ID.
pub fn spiffe_id_of(cert: &[u8]) -> Result<SpiffeId, String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("certificate: {e}"))?;
    let san = c
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no SAN")?;
    match san.value.general_names.as_slice() {
        [x509_parser::extensions::GeneralName::URI(u)] => SpiffeId::parse(u).map_err(|e| e.to_string()),
        other => Err(format!("not exactly one URI SAN: {} names", other.len())),
    }
}

#[derive(Default)]
struct Partial {
    chain_pem: Option<String>,
    key_pem: Option<Zeroizing<String>>,
    roots_pem: Option<String>,
}

fn inline(ds: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>) -> Result<Vec<u8>, String> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        _ => Err("only inline secrets are supported".into()),
    }
}

impl Partial {
    /// Takes a response's secrets; an unusable one is an error (NACK).
    fn update(&mut self, resp: &DiscoveryResponse) -> Result<(), String> {
        for any in &resp.resources {
            let s = Secret::decode(any.value.as_slice()).map_err(|e| format!("not a Secret: {e}"))?;
            match (s.name.as_str(), s.r#type) {
                ("default", Some(secret::Type::TlsCertificate(t))) => {
                    let chain = String::from_utf8(inline(t.certificate_chain.as_ref())?).map_err(|e| e.to_string())?;
                    let key =
                        Zeroizing::new(String::from_utf8(inline(t.private_key.as_ref())?).map_err(|e| e.to_string())?);
                    self.chain_pem = Some(chain);
                    self.key_pem = Some(key);
                }
                ("ROOTCA", Some(secret::Type::ValidationContext(v))) => {
                    self.roots_pem =
                        Some(String::from_utf8(inline(v.trusted_ca.as_ref())?).map_err(|e| e.to_string())?);
                }
                (name, _) => return Err(format!("unexpected secret {name:?}")),
            }
        }
        Ok(())
    }

    fn material(&self) -> Result<Option<TlsMaterial>, String> {
        let (Some(chain_pem), Some(key_pem), Some(roots_pem)) = (&self.chain_pem, &self.key_pem, &self.roots_pem)
        else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let id = spiffe_id_of(leaf)?;
        let serial = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("private key: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| format!("trust bundle: {e}"))?)
                .map_err(|e| format!("trust bundle: {e}"))?;
        }
        Ok(Some(TlsMaterial {
            id,
            chain,
            key,
            roots,
            serial,
        }))
    }
}

/// Where to reach the agent, and how to prove who we are.
#[derive(Debug, Clone)]
pub struct SdsSource {
    pub socket: PathBuf,
    pub token_file: PathBuf,
}

impl SdsSource {
    /// A gRPC channel to the agent's socket.
    pub async fn channel(&self) -> Result<tonic::transport::Channel, String> {
        let socket = self.socket.clone();
        Endpoint::from_static("http://mizzen-agent")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| format!("connect to the agent at {}: {e}", self.socket.display()))
    }

    /// A streaming request whose messages come from `rx`, carrying our
    /// token (re-read from its file: the kubelet rotates it).
    pub async fn request<T: Send + 'static>(
        &self,
        rx: mpsc::Receiver<T>,
    ) -> Result<tonic::Request<impl futures::Stream<Item = T> + Send + 'static>, String> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| format!("read token {}: {e}", self.token_file.display()))?;
        let outbound = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| "token is not ASCII".to_string())?,
        );
        Ok(req)
    }
}

/// The `error_detail` of a NACK: INVALID_ARGUMENT with `message`.
pub(crate) fn nack_status(message: String) -> envoy_types::pb::google::rpc::Status {
    envoy_types::pb::google::rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message,
        ..Default::default()
    }
}

fn request(version: &str, nonce: &str, error: Option<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names: NAMES.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        error_detail: error.map(nack_status),
        ..Default::default()
    }
}

async fn stream_once(src: &SdsSource, tx: &watch::Sender<Option<Arc<TlsMaterial>>>) -> Result<(), String> {
    let channel = src.channel().await?;
    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx.send(request("", "", None)).await.map_err(|_| "send")?;
    let req = src.request(req_rx).await?;
    let mut inbound = SecretDiscoveryServiceClient::new(channel)
        .stream_secrets(req)
        .await
        .map_err(|s| format!("agent refused the stream: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut partial = Partial::default();
    let mut good_version = String::new();
    loop {
        let resp = inbound
            .message()
            .await
            .map_err(|s| format!("stream failed: {:?}: {}", s.code(), s.message()))?
            .ok_or("the agent closed the stream")?;
        let mut next = Partial {
            chain_pem: partial.chain_pem.clone(),
            key_pem: partial.key_pem.clone(),
            roots_pem: partial.roots_pem.clone(),
        };
        let outcome = next.update(&resp).and_then(|()| next.material());
        match outcome {
            Ok(material) => {
                partial = next;
                good_version = resp.version_info.clone();
                if let Some(m) = material {
                    info!(id = %m.id, serial = %m.serial, "certificate updated");
                    tx.send_replace(Some(Arc::new(m)));
                }
                req_tx
                    .send(request(&good_version, &resp.nonce, None))
                    .await
                    .map_err(|_| "send ACK")?;
            }
            Err(e) => {
                warn!(error = %e, version = %resp.version_info, "rejecting secrets (NACK)");
                req_tx
                    .send(request(&good_version, &resp.nonce, Some(e)))
                    .await
                    .map_err(|_| "send NACK")?;
            }
        }
    }
}

/// Keeps `tx` fed from the agent, forever, reconnecting with backoff.
pub async fn follow(src: SdsSource, tx: watch::Sender<Option<Arc<TlsMaterial>>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = std::time::Instant::now();
        if let Err(e) = stream_once(&src, &tx).await {
            warn!(error = %e, retry_in = ?backoff, "SDS stream to the agent ended");
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200); // it was working: retry soon
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
