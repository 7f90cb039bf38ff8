use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

use super::*;

const ID: &str = "spiffe://cluster.local/ns/demo/sa/web";

fn id() -> SpiffeId {
    ID.parse().expect("valid id")
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>, ca: bool) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = sans;
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params.serialize_request(key).expect("csr").pem().expect("pem")
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

/// An RSA key made by openssl (ring cannot generate RSA keys).
fn rsa(bits: u32) -> KeyPair {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
        .arg(format!("rsa_keygen_bits:{bits}"))
        .output()
        .expect("openssl is needed for RSA test keys: apt-get install openssl");
    assert!(out.status.success(), "openssl genpkey failed");
    KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("rsa key")
}

/// A CSR for `ID` made by openssl, for keys rcgen and ring will not make.
fn openssl_csr(newkey: &str) -> String {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "openssl req -new -newkey {newkey} -nodes -keyout /dev/null -subj /CN=x -addext subjectAltName=URI:{ID}"
        ))
        .output()
        .expect("openssl is needed: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn accepts_supported_keys_with_the_callers_id() {
    let cases = [
        (
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"),
            KeyKind::EcdsaP256,
        ),
        (
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key"),
            KeyKind::EcdsaP384,
        ),
        (
            KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key"),
            KeyKind::Ed25519,
        ),
        (rsa(2048), KeyKind::Rsa { bits: 2048 }),
    ];
    for (key, kind) in cases {
        let pem = csr_with(&key, vec![uri(ID)], false);
        let req = check(&pem, &id()).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(req.key_kind, kind);
        assert_eq!(req.id, id());
        assert_eq!(
            req.public_key,
            key.public_key_raw(),
            "{kind:?}: the CSR's own key is certified"
        );
    }
}

#[test]
fn refuses_with_a_reason() {
    let key = p256();
    let other = "spiffe://cluster.local/ns/demo/sa/admin";
    let cases: Vec<(&str, String, &str)> = vec![
        ("no SAN", csr_with(&key, vec![], false), "missing_san"),
        (
            "another identity",
            csr_with(&key, vec![uri(other)], false),
            "wrong_identity",
        ),
        (
            "trailing slash",
            csr_with(&key, vec![uri(&format!("{ID}/"))], false),
            "wrong_identity",
        ),
        (
            "upper-case trust domain",
            csr_with(&key, vec![uri("spiffe://Cluster.local/ns/demo/sa/web")], false),
            "wrong_identity",
        ),
        (
            "percent-encoded",
            csr_with(&key, vec![uri("spiffe://cluster.local/ns/demo/sa/w%65b")], false),
            "wrong_identity",
        ),
        (
            "two URI SANs",
            csr_with(&key, vec![uri(ID), uri(other)], false),
            "extra_sans",
        ),
        (
            "same URI twice",
            csr_with(&key, vec![uri(ID), uri(ID)], false),
            "extra_sans",
        ),
        (
            "URI and DNS",
            csr_with(
                &key,
                vec![uri(ID), SanType::DnsName("web.demo.svc".try_into().expect("dns"))],
                false,
            ),
            "extra_sans",
        ),
        (
            "DNS only",
            csr_with(&key, vec![SanType::DnsName("web".try_into().expect("dns"))], false),
            "extra_sans",
        ),
        (
            "IP SAN",
            csr_with(&key, vec![uri(ID), SanType::IpAddress([10, 0, 0, 1].into())], false),
            "extra_sans",
        ),
        ("CA", csr_with(&key, vec![uri(ID)], true), "ca_requested"),
        ("small RSA", openssl_csr("rsa:1024"), "unsupported_key"),
        (
            "EC P-521",
            openssl_csr("ec:<(openssl ecparam -name secp521r1)"),
            "unsupported_key",
        ),
        ("garbage", "hello".into(), "bad_pem"),
        ("empty", String::new(), "bad_pem"),
        (
            "a certificate",
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n".into(),
            "bad_pem",
        ),
        (
            "bad DER",
            "-----BEGIN CERTIFICATE REQUEST-----\nMAMCAQA=\n-----END CERTIFICATE REQUEST-----\n".into(),
            "bad_der",
        ),
        (
            "two blocks",
            format!("{0}{0}", csr_with(&key, vec![uri(ID)], false)),
            "bad_pem",
        ),
        ("too large", "A".repeat(MAX_CSR_PEM_LEN + 1), "too_large"),
    ];
    for (name, pem, want) in cases {
        match check(&pem, &id()) {
            Ok(_) => panic!("{name}: was accepted"),
            Err(e) => assert_eq!(e.label(), want, "{name}: {e}"),
        }
    }
}

#[test]
fn refuses_a_tampered_signature() {
    let pem_text = csr_with(&p256(), vec![uri(ID)], false);
    let mut block = pem::parse(&pem_text).expect("pem");
    let mut der = block.contents().to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    block = pem::Pem::new("CERTIFICATE REQUEST", der);
    let err = check(&pem::encode(&block), &id()).expect_err("tampered CSR must be refused");
    assert!(matches!(err, Reject::BadSignature | Reject::BadDer(_)), "{err}");

    // Changing the requested SAN after signing breaks the signature too.
    let good = csr_with(&p256(), vec![uri("spiffe://cluster.local/ns/demo/sa/wex")], false);
    let mut der = pem::parse(&good).expect("pem").contents().to_vec();
    let pos = der.windows(3).position(|w| w == b"wex").expect("SAN bytes");
    der[pos + 2] = b'b';
    let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    assert_eq!(check(&forged, &id()), Err(Reject::BadSignature));
}
