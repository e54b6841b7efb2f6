use std::time::{Duration, SystemTime};

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use super::*;

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("weft-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create");
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000)
}

fn id() -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", Some("web"))
}

/// Verifies a leaf chain (PEM: leaf, then intermediates) against `roots` the way rustls
/// will (rustls-webpki), for TLS clients and servers at `at`.
fn webpki_verifies(chain_pem: &str, roots: &[Root], at: SystemTime) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let blocks: Vec<CertificateDer<'static>> = Pem::iter_from_buffer(chain_pem.as_bytes())
        .map(|b| CertificateDer::from(b.expect("pem").contents))
        .collect();
    let root_ders: Vec<CertificateDer<'static>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.der.clone()))
        .collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).expect("anchor"))
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&blocks[0]).map_err(|e| e.to_string())?;
    let time =
        UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).expect("epoch"));
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &blocks[1..],
            time,
            usage,
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn first_der(pem_text: &str) -> Vec<u8> {
    Pem::iter_from_buffer(pem_text.as_bytes())
        .next()
        .expect("a block")
        .expect("PEM")
        .contents
}

/// A leaf names exactly its SPIFFE ID, is ECDSA P-256 for TLS clients and servers, not a CA,
/// valid from a little before issue for the TTL, and verifies against the root.
#[test]
fn a_leaf_carries_only_its_spiffe_id_and_chains_to_the_root() {
    let d = Dir::new("leaf");
    Ca::init(&d.0, now()).expect("init");
    let ca = Ca::load(&d.0).expect("load");
    let leaf = ca
        .issue(&id(), Duration::from_secs(86_400), now())
        .expect("issue");
    assert_eq!(id().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    let der = first_der(&leaf.chain_pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("x509");
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .expect("ext")
        .expect("SAN")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["URI:spiffe://cluster.local/ns/shop/sa/web"]);
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().expect("ext").expect("EKU").value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok()),
        Some(x509_parser::oid_registry::OID_EC_P256)
    );
    let begins = now() - CLOCK_SKEW;
    let ends = now() + Duration::from_secs(86_400);
    assert_eq!(leaf.not_before, begins);
    assert_eq!(leaf.not_after, ends);
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("epoch")
            .as_secs()
    };
    assert_eq!(cert.validity().not_before.timestamp(), unix(begins) as i64);
    assert_eq!(cert.validity().not_after.timestamp(), unix(ends) as i64);
    let (_, root) = X509Certificate::from_der(&ca.roots()[0].der).expect("root");
    cert.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
    assert_eq!(
        leaf.chain_pem.matches("BEGIN CERTIFICATE").count(),
        1,
        "the root is not sent"
    );
    assert_eq!(leaf.serial, hex(cert.raw_serial()));
    webpki_verifies(&leaf.chain_pem, ca.roots(), now()).expect("as rustls verifies");
    let expired = webpki_verifies(&leaf.chain_pem, ca.roots(), ends + Duration::from_secs(1));
    assert_eq!(
        expired.expect_err("expired").split(' ').next(),
        Some("CertExpired")
    );
}

/// Two leaves never share a serial.
#[test]
fn every_leaf_has_its_own_serial() {
    let d = Dir::new("serial");
    Ca::init(&d.0, now()).expect("init");
    let ca = Ca::load(&d.0).expect("load");
    let a = ca.issue(&id(), Duration::from_secs(60), now()).expect("a");
    let b = ca.issue(&id(), Duration::from_secs(60), now()).expect("b");
    assert_ne!(a.serial, b.serial);
    assert_eq!(a.serial.len(), 32);
}

/// `weft ca init` never replaces a CA, and keeps its key private.
#[test]
fn init_refuses_to_replace_and_writes_the_key_0600() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = Dir::new("init");
    let [crt, key] = Ca::init(&d.0, now()).expect("init");
    let mode = fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = fs::read(&crt).expect("crt");
    let e = Ca::init(&d.0, now()).expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: exists: weft ca init never replaces a CA",
            crt.display()
        )
    );
    assert_eq!(fs::read(&crt).expect("crt"), before);
}

/// A key that is not the certificate's is refused, naming the file.
#[test]
fn a_key_of_another_ca_is_refused() {
    let (a, b) = (Dir::new("pair-a"), Dir::new("pair-b"));
    Ca::init(&a.0, now()).expect("a");
    Ca::init(&b.0, now()).expect("b");
    fs::copy(b.0.join(CA_KEY), a.0.join("other.key")).expect("copy");
    fs::rename(a.0.join("other.key"), a.0.join(CA_KEY)).expect("swap");
    let e = Ca::load(&a.0).expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: is not the key of {}",
            a.0.join(CA_KEY).display(),
            a.0.join(CA_CERT).display()
        )
    );
    let empty = Dir::new("empty");
    assert_eq!(
        Ca::load(&empty.0).expect_err("none").metric_label(),
        "no_ca"
    );
}

/// cert-manager's layout: an intermediate signs (tls.crt, tls.key), ca.crt holds two roots
/// (a rotation); leaves carry the intermediate and verify through it.
#[test]
fn a_cert_manager_secret_with_an_intermediate_and_two_roots() {
    let (root_dir, other, secret) = (Dir::new("cm-root"), Dir::new("cm-other"), Dir::new("cm"));
    Ca::init(&root_dir.0, now()).expect("root");
    Ca::init(&other.0, now()).expect("other root");
    let root_pem = fs::read_to_string(root_dir.0.join(CA_CERT)).expect("pem");
    let root_key =
        KeyPair::from_pem(&fs::read_to_string(root_dir.0.join(CA_KEY)).expect("key")).expect("key");
    let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).expect("issuer");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params
        .distinguished_name
        .push(DnType::CommonName, "node intermediate");
    let intermediate = params.signed_by(&key, &issuer).expect("sign");
    fs::write(secret.0.join(TLS_CERT), intermediate.pem()).expect("tls.crt");
    fs::write(secret.0.join(TLS_KEY), key.serialize_pem()).expect("tls.key");
    let other_pem = fs::read_to_string(other.0.join(CA_CERT)).expect("pem");
    fs::write(secret.0.join(CA_CERT), format!("{root_pem}{other_pem}")).expect("ca.crt");
    let ca = Ca::load(&secret.0).expect("load");
    assert_eq!(ca.roots().len(), 2);
    assert!(
        ca.roots()[0]
            .subject
            .starts_with("O=weft, CN=weft mesh root "),
        "{}",
        ca.roots()[0].subject
    );
    assert_ne!(
        ca.roots()[0].subject,
        ca.roots()[1].subject,
        "roots never share a name"
    );
    let leaf = ca
        .issue(&id(), Duration::from_secs(60), now())
        .expect("issue");
    let blocks: Vec<Vec<u8>> = Pem::iter_from_buffer(leaf.chain_pem.as_bytes())
        .map(|b| b.expect("pem").contents)
        .collect();
    assert_eq!(blocks.len(), 2, "leaf and intermediate");
    let (_, leaf_cert) = X509Certificate::from_der(&blocks[0]).expect("leaf");
    let (_, mid) = X509Certificate::from_der(&blocks[1]).expect("intermediate");
    let (_, root) = X509Certificate::from_der(&ca.roots()[0].der).expect("root");
    leaf_cert
        .verify_signature(Some(mid.public_key()))
        .expect("leaf by the intermediate");
    mid.verify_signature(Some(root.public_key()))
        .expect("intermediate by the root");
    webpki_verifies(&leaf.chain_pem, ca.roots(), now()).expect("as rustls verifies");
    let only_other = &ca.roots()[1..];
    assert!(
        webpki_verifies(&leaf.chain_pem, only_other, now()).is_err(),
        "another root"
    );
}
