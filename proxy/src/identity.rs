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

use futures::future::BoxFuture;

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
/// First reconnection delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the proxy looks for a rotated token by default (the kubelet
/// rotates at 80 % of the token's life, 48 min for an hour).
pub const DEFAULT_TOKEN_POLL: Duration = Duration::from_secs(5);

/// Our certificate, key and the trust bundle, ready for rustls.
pub struct TlsMaterial {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: rustls::RootCertStore,
    pub serial: String,
    /// When the certificate expires.
    pub not_after: std::time::SystemTime,
    /// The trust bundle as the agent sent it (PEM), to notice changes.
    pub roots_pem: String,
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

    fn material(&self, expected: Option<&Workload>) -> Result<Option<TlsMaterial>, String> {
        let (Some(chain_pem), Some(key_pem), Some(roots_pem)) = (&self.chain_pem, &self.key_pem, &self.roots_pem)
        else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let id = spiffe_id_of(leaf)?;
        if let Some(w) = expected
            && id.workload_parts() != Some((w.namespace.as_str(), w.service_account.as_str()))
        {
            return Err(format!(
                "the agent sent a certificate for {id}, but this pod runs as {}/{}: refusing it",
                w.namespace, w.service_account
            ));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("certificate: {e}"))?;
        let serial = parsed.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        let not_after = std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or_default());
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
            not_after,
            roots_pem: roots_pem.clone(),
        }))
    }
}

/// The pod's own ServiceAccount: the only identity the proxy accepts a
/// certificate for (from `POD_NAMESPACE` and `SERVICE_ACCOUNT`, which the
/// injector sets), whatever the socket answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
}

/// Where to reach the agent, and how to prove who we are.
#[derive(Debug, Clone)]
pub struct SdsSource {
    pub socket: PathBuf,
    pub token_file: PathBuf,
    /// The identity certificates must carry, when known.
    pub workload: Option<Workload>,
    /// How often the token file is checked for the kubelet's rotation.
    pub token_poll: Duration,
}

/// One stream to the agent with the given token, over `state` that
/// outlives the stream (what was received so far).
pub type StreamFn<S> = for<'a> fn(&'a SdsSource, &'a mut S, String) -> BoxFuture<'a, Result<(), String>>;

/// How a stream to the agent ended.
enum Ended {
    Failed(String),
    Closed,
    TokenRotated,
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

    /// The token as the kubelet last wrote it.
    pub async fn token(&self) -> Result<String, String> {
        tokio::fs::read_to_string(&self.token_file)
            .await
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("read token {}: {e}", self.token_file.display()))
    }

    /// Resolves once the token file holds another token than `current`.
    async fn token_rotated(&self, current: &str) {
        loop {
            tokio::time::sleep(self.token_poll).await;
            if self.token().await.is_ok_and(|t| t != current) {
                return;
            }
        }
    }

    /// Keeps `stream` running against the agent for ever: reconnects with
    /// backoff when it ends, and at once, with the new token, when the
    /// kubelet rotates the token file (the agent signs renewals with the
    /// token a stream presented, and ends a stream when its token expires).
    pub async fn follow<S: Send>(&self, what: &'static str, state: &mut S, stream: StreamFn<S>) {
        let mut backoff = BACKOFF_INITIAL;
        loop {
            let started = std::time::Instant::now();
            let ended = match self.token().await {
                Err(e) => Ended::Failed(e),
                Ok(token) => tokio::select! {
                    r = stream(self, state, token.clone()) => r.map_or_else(Ended::Failed, |()| Ended::Closed),
                    () = self.token_rotated(&token) => Ended::TokenRotated,
                },
            };
            match ended {
                Ended::TokenRotated => {
                    info!(
                        stream = what,
                        "the kubelet rotated the token: reopening the stream with it"
                    );
                    continue;
                }
                Ended::Failed(e) => warn!(stream = what, error = %e, retry_in = ?backoff, "stream to the agent ended"),
                Ended::Closed => warn!(stream = what, retry_in = ?backoff, "the agent closed the stream"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_INITIAL; // it was working: retry soon
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A streaming request whose messages come from `rx`, carrying `token`.
    pub fn request<T: Send + 'static>(
        &self,
        token: &str,
        rx: mpsc::Receiver<T>,
    ) -> Result<tonic::Request<impl futures::Stream<Item = T> + Send + 'static>, String> {
        let outbound = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
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

async fn stream_once(
    src: &SdsSource,
    tx: &mut watch::Sender<Option<Arc<TlsMaterial>>>,
    token: String,
) -> Result<(), String> {
    let channel = src.channel().await?;
    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx.send(request("", "", None)).await.map_err(|_| "send")?;
    let req = src.request(&token, req_rx)?;
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
        let outcome = next.update(&resp).and_then(|()| next.material(src.workload.as_ref()));
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

/// Keeps `tx` fed from the agent, for ever.
pub async fn follow(src: SdsSource, mut tx: watch::Sender<Option<Arc<TlsMaterial>>>) {
    src.follow("sds", &mut tx, |src, tx, token| Box::pin(stream_once(src, tx, token)))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

    /// A bundle and an SVID for `id` signed by it, as the agent sends them.
    fn partial(id: &str) -> Partial {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let key = KeyPair::generate().expect("key");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        Partial {
            chain_pem: Some(cert.pem()),
            key_pem: Some(Zeroizing::new(key.serialize_pem())),
            roots_pem: Some(issuer.pem()),
        }
    }

    fn workload(ns: &str, sa: &str) -> Workload {
        Workload {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn a_certificate_for_the_pods_own_service_account_is_used() {
        let p = partial("spiffe://cluster.local/ns/demo/sa/web");
        let m = p
            .material(Some(&workload("demo", "web")))
            .expect("usable")
            .expect("complete");
        assert_eq!(m.id.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
    }

    #[test]
    fn a_certificate_for_another_identity_is_refused() {
        // What a process squatting on the agent's socket would hand out.
        let p = partial("spiffe://cluster.local/ns/demo/sa/admin");
        let e = p.material(Some(&workload("demo", "web"))).expect_err("refused");
        assert!(e.contains("ns/demo/sa/admin"), "{e}");
    }
}
