//! A client of the CA's gRPC API (Istio's `IstioCertificateService`), and
//! CSRs to send it, for the CA's tests and benchmark.

use anyhow::Context;
use mizzen_api::proto::istio_ca::IstioCertificateRequest;
use mizzen_api::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::mesh::Ca;

/// A client of `ca`, verifying it against the mesh root `root_pem`.
pub async fn ca_client(ca: &Ca, root_pem: &str) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("mizzen-ca.mizzen-system.svc");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", ca.grpc_port))?
        .tls_config(tls)?
        .connect()
        .await
        .context("connect to mizzen-ca over TLS, verifying it against the mesh root")?;
    Ok(IstioCertificateServiceClient::new(channel))
}

/// A CSR and its key.
pub struct Csr {
    pub pem: String,
    pub key: KeyPair,
}

impl std::fmt::Debug for Csr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr").field("pem", &self.pem).finish_non_exhaustive()
    }
}

/// A P-256 CSR for `sans`, asking to be a CA when `ca`.
pub fn csr(sans: Vec<SanType>, ca: bool) -> Csr {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = sans;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    Csr {
        pem: p.serialize_request(&key).expect("csr").pem().expect("pem"),
        key,
    }
}

/// A URI SAN.
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri"))
}

/// A CreateCertificate request for `csr_pem` (one hour) with the
/// workload's and the agent's bearer tokens.
pub fn request(csr_pem: &str, workload: Option<&str>, agent: Option<&str>) -> tonic::Request<IstioCertificateRequest> {
    let mut r = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.into(),
        validity_duration: 3600,
        ..Default::default()
    });
    if let Some(t) = workload {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
    }
    if let Some(t) = agent {
        r.metadata_mut().insert(
            "x-mizzen-agent-authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}
