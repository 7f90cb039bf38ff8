//! The CA client: Istio's `CreateCertificate` over TLS, trusting the mesh
//! root from the trust bundle, authenticated with the workload's token and
//! the agent's own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mizzen_api::proto::istio_ca::IstioCertificateRequest;
use mizzen_api::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::secrets::{SignError, Signer};

/// The metadata key carrying the agent's own token (see the CA).
pub const AGENT_AUTHORIZATION: &str = "x-mizzen-agent-authorization";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls the CA. The TLS channel is rebuilt when the trust bundle changes.
pub struct CaSigner {
    endpoint: String,
    server_name: String,
    agent_token_file: PathBuf,
    roots: watch::Receiver<Option<Arc<String>>>,
    channel: Mutex<Option<(Arc<String>, Channel)>>,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner")
            .field("endpoint", &self.endpoint)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl CaSigner {
    pub fn new(
        endpoint: String,
        server_name: String,
        agent_token_file: PathBuf,
        roots: watch::Receiver<Option<Arc<String>>>,
    ) -> Self {
        Self {
            endpoint,
            server_name,
            agent_token_file,
            roots,
            channel: Mutex::new(None),
        }
    }

    fn channel(&self) -> Result<Channel, SignError> {
        let root = self
            .roots
            .borrow()
            .clone()
            .ok_or_else(|| SignError::Unavailable("no trust bundle yet (ConfigMap mizzen-root-ca)".into()))?;
        let mut cached = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, ch)) = cached.as_ref()
            && **r == *root
        {
            return Ok(ch.clone());
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root.as_bytes()))
            .domain_name(self.server_name.clone());
        let ch = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| SignError::Local(format!("CA address {:?}: {e}", self.endpoint)))?
            .tls_config(tls)
            .map_err(|e| SignError::Local(format!("CA TLS settings: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        *cached = Some((root, ch.clone()));
        Ok(ch)
    }
}

fn bearer(token: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, SignError> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| SignError::Local("token is not ASCII".into()))
}

impl Signer for CaSigner {
    async fn sign(&self, csr_pem: String, workload_token: String, ttl: Duration) -> Result<Vec<String>, SignError> {
        let channel = self.channel()?;
        let agent_token = tokio::fs::read_to_string(&self.agent_token_file).await.map_err(|e| {
            SignError::Local(format!(
                "read the agent's token {}: {e}",
                self.agent_token_file.display()
            ))
        })?;
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: ttl.as_secs() as i64,
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", bearer(&workload_token)?);
        req.metadata_mut().insert(AGENT_AUTHORIZATION, bearer(&agent_token)?);
        req.set_timeout(CALL_TIMEOUT);
        match IstioCertificateServiceClient::new(channel)
            .create_certificate(req)
            .await
        {
            Ok(r) => Ok(r.into_inner().cert_chain),
            Err(s) => Err(match s.code() {
                Code::Unauthenticated => SignError::Unauthenticated(s.message().to_owned()),
                Code::PermissionDenied | Code::InvalidArgument => SignError::Refused(s.message().to_owned()),
                _ => SignError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
            }),
        }
    }
}
