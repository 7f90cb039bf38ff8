//! The signing authority: a CA certificate and key, the chain up to the
//! root, and X.509-SVID issuance.
//!
//! A bundle uses Istio's `cacerts` layout: `ca-cert.pem` (the signing
//! certificate), `ca-key.pem` (its PKCS#8 key), `cert-chain.pem` (the signing
//! certificate up to, possibly including, the root) and `root-cert.pem`.
//! [`Authority::from_bundle`] refuses a bundle whose parts do not fit
//! together, so a misconfigured plug-in CA fails at start-up and not when
//! the first workload asks.

use std::time::{Duration, SystemTime};

use mizzen_api::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::{KeyKind, SigningRequest};

/// Certificates are valid from this long before issuance, for clock skew.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A bundle's four PEM files.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert_chain: String,
    pub root_cert: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"...")
            .finish_non_exhaustive()
    }
}

/// Why a bundle or an issuance failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{file}: {reason}")]
    Bundle { file: &'static str, reason: String },
    #[error("cannot generate a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("the signing certificate expired at {0:?}; plug in a new CA")]
    Expired(SystemTime),
}

fn bundle_err(file: &'static str, reason: impl Into<String>) -> AuthorityError {
    AuthorityError::Bundle {
        file,
        reason: reason.into(),
    }
}

/// A parsed certificate we keep: its DER and the facts we need.
#[derive(Debug, Clone)]
struct Cert {
    der: Vec<u8>,
    pem: String,
    not_after: SystemTime,
}

/// PEM with LF line endings, as every other tool writes it.
pub fn cert_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn parse_pem_certs(file: &'static str, pem_text: &str) -> Result<Vec<Cert>, AuthorityError> {
    let mut out = Vec::new();
    for block in pem::parse_many(pem_text).map_err(|e| bundle_err(file, e.to_string()))? {
        if block.tag() != "CERTIFICATE" {
            return Err(bundle_err(file, format!("unexpected PEM block {:?}", block.tag())));
        }
        let der = block.contents().to_vec();
        let (rest, cert) = X509Certificate::from_der(&der).map_err(|e| bundle_err(file, e.to_string()))?;
        if !rest.is_empty() {
            return Err(bundle_err(file, "trailing bytes after a certificate"));
        }
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        out.push(Cert {
            pem: cert_pem(&der),
            der,
            not_after,
        });
    }
    if out.is_empty() {
        return Err(bundle_err(file, "no certificate found"));
    }
    Ok(out)
}

fn x509(der: &[u8]) -> X509Certificate<'_> {
    // Only called on DER that parse_pem_certs already parsed.
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .expect("BUG: certificate parsed before does not parse now")
}

fn is_ca(c: &X509Certificate<'_>) -> bool {
    let bc = matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let ku_ok = match c.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    bc && ku_ok
}

/// Issues X.509-SVIDs.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate first, the root last.
    chain: Vec<Cert>,
    root_pem: String,
    /// Earliest expiry along the chain: no leaf may outlive it.
    signing_not_after: SystemTime,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("signing_not_after", &self.signing_not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<SerialNumber, AuthorityError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthorityError::Random("SystemRandom failed".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and full length, so no leading-zero ambiguity
    Ok(SerialNumber::from_slice(&bytes))
}

fn odt(t: SystemTime) -> OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Authority {
    /// A new self-signed root (ECDSA P-256) and an intermediate signed by it
    /// that signs workloads, both valid for `ttl`. The root's key is not
    /// kept: the intermediate is the only key that can issue.
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<Bundle, AuthorityError> {
        let now = SystemTime::now();
        let ca_params = |cn: &str, path_len: Option<u8>| -> Result<CertificateParams, AuthorityError> {
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, td.as_str());
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(match path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into()?)];
            p.not_before = odt(now - CLOCK_SKEW);
            p.not_after = odt(now + ttl);
            p.serial_number = Some(random_serial()?);
            p.use_authority_key_identifier_extension = true;
            Ok(p)
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params("Mizzen root CA", None)?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Issuer::new(root_params, root_key);

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca_cert = ca_params("Mizzen workload CA", Some(0))?.signed_by(&ca_key, &root)?;
        Ok(Bundle {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            cert_chain: format!("{}{}", ca_cert.pem(), root_cert.pem()),
            root_cert: root_cert.pem(),
        })
    }

    /// Loads and checks a bundle.
    pub fn from_bundle(b: &Bundle, td: &TrustDomain) -> Result<Self, AuthorityError> {
        let ca = parse_pem_certs("ca-cert.pem", &b.ca_cert)?;
        let [ca] =
            <[Cert; 1]>::try_from(ca).map_err(|_| bundle_err("ca-cert.pem", "must hold exactly one certificate"))?;
        let chain = parse_pem_certs("cert-chain.pem", &b.cert_chain)?;
        let roots = parse_pem_certs("root-cert.pem", &b.root_cert)?;

        let ca_x = x509(&ca.der);
        if !is_ca(&ca_x) {
            return Err(bundle_err(
                "ca-cert.pem",
                "is not a CA certificate allowed to sign certificates",
            ));
        }
        let key = KeyPair::from_pem(&b.ca_key).map_err(|e| {
            bundle_err(
                "ca-key.pem",
                format!("{e} (a PKCS#8 key is needed: openssl pkcs8 -topk8 -nocrypt)"),
            )
        })?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != ca_x.tbs_certificate.subject_pki.raw {
            return Err(bundle_err("ca-key.pem", "does not match the public key of ca-cert.pem"));
        }
        if chain[0].der != ca.der {
            return Err(bundle_err("cert-chain.pem", "must start with ca-cert.pem"));
        }
        // Each certificate in the chain must be signed by the next one.
        for pair in chain.windows(2) {
            let (child, parent) = (x509(&pair[0].der), x509(&pair[1].der));
            if !is_ca(&parent) {
                return Err(bundle_err(
                    "cert-chain.pem",
                    format!("{} is not a CA", parent.subject()),
                ));
            }
            child.verify_signature(Some(parent.public_key())).map_err(|_| {
                bundle_err(
                    "cert-chain.pem",
                    format!("{} is not signed by {}", child.subject(), parent.subject()),
                )
            })?;
        }
        // The chain ends at one of the roots, or at a certificate one of them signed.
        let last = chain.last().expect("non-empty");
        let last_x = x509(&last.der);
        let root = roots
            .iter()
            .find(|r| {
                let r_x = x509(&r.der);
                r.der == last.der || last_x.verify_signature(Some(r_x.public_key())).is_ok()
            })
            .ok_or_else(|| bundle_err("root-cert.pem", "no root certificate anchors cert-chain.pem"))?;
        let root_x = x509(&root.der);
        if !is_ca(&root_x) || root_x.verify_signature(None).is_err() {
            return Err(bundle_err(
                "root-cert.pem",
                "the anchoring root is not a self-signed CA",
            ));
        }

        let mut full = chain.clone();
        if last.der != root.der {
            full.push(root.clone());
        }
        let signing_not_after = full.iter().map(|c| c.not_after).min().expect("non-empty");
        let issuer = Issuer::from_ca_cert_der(&ca.der.clone().into(), key)
            .map_err(|e| bundle_err("ca-cert.pem", e.to_string()))?;
        Ok(Self {
            issuer,
            chain: full,
            root_pem: roots.iter().map(|r| r.pem.clone()).collect(),
            signing_not_after,
            trust_domain: td.clone(),
        })
    }

    /// The trust bundle to publish: every root in `root-cert.pem`.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// When the signing certificate (or anything above it) expires.
    pub fn signing_not_after(&self) -> SystemTime {
        self.signing_not_after
    }

    /// The trust domain certificates are issued in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Signs an X.509-SVID for `req`, valid for `ttl` but never past the
    /// signing certificate. Returns the PEM chain, leaf first, root last,
    /// with the leaf's serial (hex) and expiry.
    pub fn sign(&self, req: &SigningRequest, ttl: Duration) -> Result<Issued, AuthorityError> {
        let now = SystemTime::now();
        if self.signing_not_after <= now {
            return Err(AuthorityError::Expired(self.signing_not_after));
        }
        let not_after = (now + ttl).min(self.signing_not_after);
        let mut p = CertificateParams::default();
        // An empty subject makes the SAN extension critical, as X.509-SVIDs want.
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(req.id.as_str().try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = match req.key_kind {
            KeyKind::Rsa { .. } => vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment],
            _ => vec![KeyUsagePurpose::DigitalSignature],
        };
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = odt(now - CLOCK_SKEW);
        p.not_after = odt(not_after);
        let serial = random_serial()?;
        let serial_hex = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(req, &self.issuer)?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain.iter().map(|c| c.pem.clone()));
        Ok(Issued {
            chain,
            serial_hex,
            not_after,
        })
    }

    /// A serving certificate for the CA itself, for `dns` names and `ips`,
    /// chained to the mesh root. Returns (chain PEMs, PKCS#8 key PEM).
    pub fn serving_cert(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<String>, String, SystemTime), AuthorityError> {
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.signing_not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mizzen-ca");
        p.distinguished_name = dn;
        for d in dns {
            p.subject_alt_names.push(SanType::DnsName(d.as_str().try_into()?));
        }
        p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.subject_alt_names
            .push(SanType::URI(self.trust_domain.id().as_str().try_into()?));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = odt(now - CLOCK_SKEW);
        p.not_after = odt(not_after);
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().map(|c| c.pem.clone()));
        Ok((chain, key.serialize_pem(), not_after))
    }
}

/// An issued certificate chain.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificates, leaf first, root last.
    pub chain: Vec<String>,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

#[cfg(test)]
mod tests;
