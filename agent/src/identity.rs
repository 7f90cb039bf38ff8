//! Workload keys, CSRs and the certificates the CA returns for them.

use std::time::{Duration, SystemTime};

use mizzen_api::SpiffeId;
use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::{Zeroize, Zeroizing};

/// A fresh private key and the CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM, wiped from memory when dropped.
    pub key_pem: Zeroizing<String>,
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"...")
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR whose only SAN is `id`.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<KeyAndCsr, rcgen::Error> {
    let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    key.zeroize();
    Ok(KeyAndCsr { key_pem, csr_pem })
}

/// A workload's key and certificate chain (leaf first).
pub struct Svid {
    pub id: SpiffeId,
    pub chain_pem: Vec<String>,
    pub key_pem: Zeroizing<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex; used as the SDS version.
    pub serial: String,
    /// When the agent received it.
    pub received: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"...")
            .finish_non_exhaustive()
    }
}

/// Why a CA response is not usable.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("the CA returned an empty chain")]
    EmptyChain,
    #[error("the CA returned a leaf that does not parse: {0}")]
    BadLeaf(String),
    #[error("the CA returned a certificate for {found:?}, not {expected}")]
    WrongIdentity { expected: SpiffeId, found: Vec<String> },
}

impl Svid {
    /// Checks the CA's answer for `id`: the leaf must parse and carry exactly
    /// the requested URI SAN. The agent does not hand a proxy an identity it
    /// did not ask for, whatever the CA says.
    pub fn from_ca(id: &SpiffeId, chain_pem: Vec<String>, key_pem: Zeroizing<String>) -> Result<Self, SvidError> {
        let leaf_pem = chain_pem.first().ok_or(SvidError::EmptyChain)?;
        let (_, block) =
            x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes()).map_err(|e| SvidError::BadLeaf(e.to_string()))?;
        let (_, leaf) = X509Certificate::from_der(&block.contents).map_err(|e| SvidError::BadLeaf(e.to_string()))?;
        let uris: Vec<String> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if uris.len() != 1 || uris[0] != id.as_str() {
            return Err(SvidError::WrongIdentity {
                expected: id.clone(),
                found: uris,
            });
        }
        let ts = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok(Self {
            id: id.clone(),
            serial: leaf.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
            not_before: ts(leaf.validity().not_before.timestamp()),
            not_after: ts(leaf.validity().not_after.timestamp()),
            chain_pem,
            key_pem,
            received: SystemTime::now(),
        })
    }

    /// The chain as one PEM document.
    pub fn chain(&self) -> String {
        self.chain_pem.concat()
    }

    /// When to renew: `fraction` of the usable lifetime (from receipt, since
    /// CAs backdate `notBefore` for clock skew), moved by up to ±`jitter` of
    /// it (`unit` is a random number in [0, 1)).
    pub fn refresh_at(&self, fraction: f64, jitter: f64, unit: f64) -> SystemTime {
        let start = self.received.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default().as_secs_f64();
        let f = (fraction + jitter * (2.0 * unit - 1.0)).clamp(0.05, 0.95);
        start + Duration::from_secs_f64(life * f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_names_only_the_identity_and_passes_the_cas_checks() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let kc = new_key_and_csr(&id).expect("generate");
        assert!(kc.key_pem.contains("BEGIN PRIVATE KEY"));
        let (_, block) = x509_parser::pem::parse_x509_pem(kc.csr_pem.as_bytes()).expect("pem");
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents).expect("csr");
        csr.verify_signature().expect("self-signed CSR");
        let sans: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => {
                    Some(s.general_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(sans, vec![format!("URI({id})")]);
        assert!(!format!("{kc:?}").contains("PRIVATE"), "keys never reach Debug output");
    }

    #[test]
    fn refresh_time_follows_fraction_and_jitter() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let svid = Svid {
            id: "spiffe://td/ns/a/sa/b".parse().expect("id"),
            chain_pem: vec![],
            key_pem: Zeroizing::new(String::new()),
            not_before: t0 - Duration::from_secs(60),
            not_after: t0 + Duration::from_secs(100),
            serial: "01".into(),
            received: t0,
        };
        assert_eq!(svid.refresh_at(0.5, 0.1, 0.5), t0 + Duration::from_secs(50));
        assert_eq!(svid.refresh_at(0.5, 0.1, 0.0), t0 + Duration::from_secs(40));
        assert!(svid.refresh_at(0.5, 0.1, 0.999) < t0 + Duration::from_secs(61));
        assert_eq!(
            svid.refresh_at(2.0, 0.0, 0.5),
            t0 + Duration::from_secs(95),
            "never at expiry"
        );
    }
}
