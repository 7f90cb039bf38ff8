use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::csr;

const DAY: Duration = Duration::from_secs(86_400);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("td")
}

fn request(id: &str) -> SigningRequest {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
    csr::check(&pem, &id.parse().expect("id")).expect("valid csr")
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).expect("pem").contents().to_vec()
}

#[test]
fn issues_x509_svids() {
    let bundle = Authority::generate(&td(), 3650 * DAY).expect("generate");
    let ca = Authority::from_bundle(&bundle, &td()).expect("own bundle loads");
    let id = "spiffe://cluster.local/ns/demo/sa/web";
    let issued = ca.sign(&request(id), DAY).expect("sign");
    assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(issued.chain[2], bundle.root_cert);

    let leaf_der = der(&issued.chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("leaf parses");
    let san = leaf.subject_alternative_name().expect("san ok").expect("has san");
    assert!(san.critical, "SAN is critical with an empty subject");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(id)]);
    let bc = leaf.basic_constraints().expect("bc").expect("present");
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().expect("ku").expect("present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf.extended_key_usage().expect("eku").expect("present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(
        lifetime as u64,
        (DAY + CLOCK_SKEW).as_secs(),
        "valid from now-skew for the TTL"
    );
    assert_eq!(issued.serial_hex.len(), 32);

    // Signed by the intermediate.
    let inter_der = der(&issued.chain[1]);
    let (_, inter) = X509Certificate::from_der(&inter_der).expect("intermediate");
    leaf.verify_signature(Some(inter.public_key()))
        .expect("leaf signed by intermediate");

    // Two issuances never share a serial.
    let again = ca.sign(&request(id), DAY).expect("sign");
    assert_ne!(again.serial_hex, issued.serial_hex);
}

#[test]
fn leaf_never_outlives_its_issuer() {
    let bundle = Authority::generate(&td(), 2 * DAY).expect("generate");
    let ca = Authority::from_bundle(&bundle, &td()).expect("load");
    let issued = ca
        .sign(&request("spiffe://cluster.local/ns/a/sa/b"), 30 * DAY)
        .expect("sign");
    assert!(issued.not_after <= ca.signing_not_after());
    assert!(issued.not_after < SystemTime::now() + 3 * DAY);
}

#[test]
fn refuses_inconsistent_bundles() {
    let a = Authority::generate(&td(), 10 * DAY).expect("a");
    let b = Authority::generate(&td(), 10 * DAY).expect("b");
    let ca_a = Authority::from_bundle(&a, &td()).expect("a loads");
    let leaf = ca_a
        .sign(&request("spiffe://cluster.local/ns/a/sa/b"), DAY)
        .expect("leaf");
    let cases: Vec<(&str, Bundle, &str)> = vec![
        (
            "key of another CA",
            Bundle {
                ca_key: b.ca_key.clone(),
                ..a.clone()
            },
            "ca-key.pem",
        ),
        (
            "garbage key",
            Bundle {
                ca_key: "nope".into(),
                ..a.clone()
            },
            "ca-key.pem",
        ),
        (
            "chain of another CA",
            Bundle {
                cert_chain: b.cert_chain.clone(),
                ..a.clone()
            },
            "cert-chain.pem",
        ),
        (
            "root of another CA",
            Bundle {
                root_cert: b.root_cert.clone(),
                ..a.clone()
            },
            "root-cert.pem",
        ),
        (
            "leaf as signing cert",
            Bundle {
                ca_cert: leaf.chain[0].clone(),
                ..a.clone()
            },
            "ca-cert.pem",
        ),
        (
            "empty chain",
            Bundle {
                cert_chain: String::new(),
                ..a.clone()
            },
            "cert-chain.pem",
        ),
        (
            "garbage root",
            Bundle {
                root_cert: "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n".into(),
                ..a.clone()
            },
            "root-cert.pem",
        ),
    ];
    for (name, bundle, file) in cases {
        match Authority::from_bundle(&bundle, &td()) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(e.to_string().starts_with(file), "{name}: {e}"),
        }
    }
    // A chain without the root is completed with it.
    let short = Bundle {
        cert_chain: a.ca_cert.clone(),
        ..a.clone()
    };
    let ca = Authority::from_bundle(&short, &td()).expect("chain without root loads");
    let issued = ca
        .sign(&request("spiffe://cluster.local/ns/a/sa/b"), DAY)
        .expect("sign");
    assert_eq!(issued.chain.last(), Some(&a.root_cert));
}
