//! Checking a certificate signing request against the caller's identity.
//!
//! [`check`] is a pure function: PEM in, the authenticated SPIFFE ID in, and
//! either a [`SigningRequest`] (the public key to certify and the identity
//! to put in it) or a [`Reject`] naming the reason. The certificate's
//! identity always comes from the authenticated caller; the CSR's claims are
//! only compared against it, never copied (Consul CVE-2022-40716).

use mizzen_api::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// Largest PEM CSR accepted. An RSA-8192 CSR is under 3 KiB.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits (bounds signature-check cost).
pub const MAX_RSA_BITS: usize = 8192;

/// The kind of key a certificate is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa { bits: usize },
    Ed25519,
}

impl KeyKind {
    /// The algorithm rcgen writes in the certificate's SubjectPublicKeyInfo.
    pub fn rcgen_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// A CSR that passed every check: what to certify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningRequest {
    /// The identity to certify (from the authenticated caller).
    pub id: SpiffeId,
    /// The subject public key bits (the BIT STRING of the SPKI).
    pub public_key: Vec<u8>,
    pub key_kind: KeyKind,
}

impl rcgen::PublicKeyData for SigningRequest {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_kind.rcgen_algorithm()
    }
}

/// Why a CSR was refused. The `label` of each is its metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("CSR is larger than {MAX_CSR_PEM_LEN} bytes")]
    TooLarge,
    #[error("CSR is not PEM with a single CERTIFICATE REQUEST block: {0}")]
    BadPem(String),
    #[error("CSR is not valid DER PKCS#10: {0}")]
    BadDer(String),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("unsupported key {0}: use ECDSA P-256/P-384, RSA 2048-8192 bits or Ed25519")]
    UnsupportedKey(String),
    #[error("CSR asks for a CA certificate")]
    CaRequested,
    #[error("CSR has no URI SAN; it must name exactly {expected}")]
    MissingSan { expected: SpiffeId },
    #[error("CSR asks for SAN {found}, but the caller is {expected}")]
    WrongIdentity { expected: SpiffeId, found: String },
    #[error("CSR asks for SANs other than exactly one URI SAN: {0}")]
    ExtraSans(String),
}

impl Reject {
    /// A short stable name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::BadPem(_) => "bad_pem",
            Reject::BadDer(_) => "bad_der",
            Reject::BadSignature => "bad_signature",
            Reject::UnsupportedKey(_) => "unsupported_key",
            Reject::CaRequested => "ca_requested",
            Reject::MissingSan { .. } => "missing_san",
            Reject::WrongIdentity { .. } => "wrong_identity",
            Reject::ExtraSans(_) => "extra_sans",
        }
    }
}

/// Checks `csr_pem` for the authenticated identity `id`.
pub fn check(csr_pem: &str, id: &SpiffeId) -> Result<SigningRequest, Reject> {
    if csr_pem.len() > MAX_CSR_PEM_LEN {
        return Err(Reject::TooLarge);
    }
    let der = decode_pem(csr_pem)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|e| Reject::BadDer(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Reject::BadDer(format!("{} trailing bytes", rest.len())));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key_kind = classify_key(spki)?;
    csr.verify_signature().map_err(|_| Reject::BadSignature)?;

    let mut uris = Vec::new();
    let mut others = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                            other => others.push(other.to_string()),
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(Reject::CaRequested),
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(Reject::CaRequested);
                }
                ParsedExtension::ParseError { error } => {
                    return Err(Reject::BadDer(format!("requested extension: {error}")));
                }
                _ => {}
            }
        }
    }
    if !others.is_empty() {
        return Err(Reject::ExtraSans(others.join(", ")));
    }
    match uris.as_slice() {
        [] => Err(Reject::MissingSan { expected: id.clone() }),
        // Byte equality with the canonical ID: no normalisation, no fix-ups.
        [uri] if uri == id.as_str() => Ok(SigningRequest {
            id: id.clone(),
            public_key: spki.subject_public_key.data.to_vec(),
            key_kind,
        }),
        [uri] => Err(Reject::WrongIdentity {
            expected: id.clone(),
            found: uri.clone(),
        }),
        many => Err(Reject::ExtraSans(many.join(", "))),
    }
}

fn decode_pem(pem: &str) -> Result<Vec<u8>, Reject> {
    let (rest, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| Reject::BadPem(e.to_string()))?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(Reject::BadPem(format!("found a {:?} block", block.label)));
    }
    if rest.iter().any(|b| !b.is_ascii_whitespace()) {
        return Err(Reject::BadPem("more than one PEM block".into()));
    }
    Ok(block.contents)
}

fn classify_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, Reject> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| Oid::try_from(p.clone()).ok())
            .ok_or_else(|| Reject::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            Ok(KeyKind::EcdsaP256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(KeyKind::EcdsaP384)
        } else {
            Err(Reject::UnsupportedKey(format!("EC curve {curve}")))
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => return Err(Reject::UnsupportedKey("malformed RSA key".into())),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(Reject::UnsupportedKey(format!("RSA {bits} bits")));
        }
        Ok(KeyKind::Rsa { bits })
    } else if *alg == OID_SIG_ED25519 {
        Ok(KeyKind::Ed25519)
    } else {
        Err(Reject::UnsupportedKey(format!("algorithm {alg}")))
    }
}

fn rsa_bits(modulus: &[u8]) -> usize {
    let m = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    m.len() * 8 - m[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests;
