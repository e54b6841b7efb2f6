//! The mesh CA as the agent holds it: a signing certificate and key, and the roots peers may
//! chain to (several during a CA rotation).
//!
//! Two layouts of a directory are read: weft's own (`ca.crt`, `ca.key`; `weft ca init` makes
//! one), and a Kubernetes TLS Secret in cert-manager's CA format mounted as files (`tls.crt`
//! and `tls.key` sign, `ca.crt` holds the roots).
use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use x509_parser::{pem::Pem, prelude::X509Certificate};

use super::{Error, SpiffeId};

/// weft's layout: the signing certificate (first) and any other roots, and its key.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// cert-manager's layout adds the signing pair as `tls.crt` and `tls.key`.
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// A root made by `weft ca init` is valid this long (10 years).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start this long before they are issued: clocks of nodes differ a little.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A certificate of the trust bundle.
#[derive(Debug, Clone)]
pub struct Root {
    pub der: Vec<u8>,
    /// The subject, as text.
    pub subject: String,
    pub not_after: SystemTime,
}

/// The signing certificate and key, and the trust bundle.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// SHA-256 of the signing certificate: leaves of another signer are renewed.
    fingerprint: [u8; 32],
    /// PEM of the signing certificate, sent after every leaf unless it is itself a root.
    chain_pem: String,
    roots: Vec<Root>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate for one identity, with its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub id: SpiffeId,
    /// The leaf, then the signing certificate when that is not a root (PEM).
    pub chain_pem: String,
    pub key_pem: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// A little before it was issued (clocks of nodes differ).
    pub not_before: SystemTime,
    /// When it was issued.
    pub issued: SystemTime,
    pub not_after: SystemTime,
    /// [`Ca::fingerprint`] of the CA that signed it.
    pub signer: [u8; 32],
}

impl Ca {
    /// Writes a new self-signed root (ECDSA P-256) as `ca.crt` and `ca.key` (mode 0600) in
    /// `dir` (made, mode 0700, when missing), refusing to replace either file. Returns the
    /// files written.
    pub fn init(dir: &Path, now: SystemTime) -> Result<[PathBuf; 2], Error> {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::Invalid {
                    path: dir.to_owned(),
                    message: format!("cannot create: {e}"),
                })?;
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        let serial = serial(&key);
        // Two roots never share a name (a verifier looks issuers up by name).
        let tag = hex(&serial.as_ref()[..4]);
        dn.push(DnType::CommonName, format!("weft mesh root {tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key).map_err(Error::Sign)?;
        let (crt, key_file) = (dir.join(CA_CERT), dir.join(CA_KEY));
        for path in [&crt, &key_file] {
            if path.exists() {
                return Err(Error::Invalid {
                    path: path.clone(),
                    message: "exists: weft ca init never replaces a CA".into(),
                });
            }
        }
        write_new(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&crt, cert.pem().as_bytes(), 0o644)?;
        Ok([crt, key_file])
    }

    /// Reads the CA of `dir`, in either layout.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let (cert_file, key_file) = if dir.join(TLS_CERT).exists() {
            (dir.join(TLS_CERT), dir.join(TLS_KEY))
        } else if dir.join(CA_KEY).exists() {
            (dir.join(CA_CERT), dir.join(CA_KEY))
        } else {
            return Err(Error::NoCa {
                dir: dir.to_owned(),
            });
        };
        let signing = certificates(&cert_file)?;
        let Some(signing) = signing.into_iter().next() else {
            return Err(invalid(&cert_file, "holds no certificate"));
        };
        let key_text = read(&key_file)?;
        let key = KeyPair::from_pem(&key_text)
            .map_err(|e| invalid(&key_file, &format!("not a private key in PEM: {e}")))?;
        check_pair(&signing, &key, &cert_file, &key_file)?;
        let roots_file = dir.join(CA_CERT);
        let roots = certificates(&roots_file)?
            .iter()
            .map(|der| root(der, &roots_file))
            .collect::<Result<Vec<_>, _>>()?;
        if roots.is_empty() {
            return Err(invalid(&roots_file, "holds no certificate"));
        }
        let signing_pem = pem_block(&signing);
        let issuer = Issuer::from_ca_cert_pem(&signing_pem, key)
            .map_err(|e| invalid(&cert_file, &format!("not a CA certificate: {e}")))?;
        let is_root = roots.iter().any(|r| r.der == signing);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &signing).as_ref());
        Ok(Self {
            issuer,
            fingerprint,
            chain_pem: if is_root { String::new() } else { signing_pem },
            roots,
        })
    }

    /// The trust bundle.
    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// The same signing certificate and trust bundle (a re-read of an unchanged CA).
    pub fn same_as(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
            && self.roots.len() == other.roots.len()
            && self
                .roots
                .iter()
                .zip(&other.roots)
                .all(|(a, b)| a.der == b.der)
    }

    /// SHA-256 of the signing certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// A leaf for `id` valid from a little before `now` for `ttl`: ECDSA P-256, the SPIFFE ID
    /// its only subject alternative name, for TLS clients and servers, not a CA.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Leaf, Error> {
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(Error::Sign)?;
        self.issue_with_names(id, vec![SanType::URI(uri)], ttl, now)
    }

    /// A leaf with other subject alternative names than `id`'s URI (tests of peers that
    /// present no SPIFFE ID).
    pub fn issue_with_names(
        &self,
        id: &SpiffeId,
        names: Vec<SanType>,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Leaf, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = (now - CLOCK_SKEW, now + ttl);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = serial(&key);
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        let cert = params.signed_by(&key, &self.issuer).map_err(Error::Sign)?;
        Ok(Leaf {
            id: id.clone(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            serial: serial_hex,
            not_before: whole_seconds(not_before),
            issued: now,
            not_after: whole_seconds(not_after),
            signer: self.fingerprint,
        })
    }
}

/// A certificate's validity is in whole seconds.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// 16 bytes from the key's public half (random, so unique), positive as DER wants it.
fn serial(key: &KeyPair) -> SerialNumber {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn invalid(path: &Path, message: &str) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with `mode`; fails if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)
}

/// Every `CERTIFICATE` block of a PEM file, as DER.
fn certificates(path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let text = read(path)?;
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(text.as_bytes()) {
        let block = block.map_err(|e| invalid(path, &format!("bad PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

fn parse<'a>(der: &'a [u8], path: &Path) -> Result<X509Certificate<'a>, Error> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| invalid(path, &format!("not an X.509 certificate: {e}")))
}

fn root(der: &[u8], path: &Path) -> Result<Root, Error> {
    let cert = parse(der, path)?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    Ok(Root {
        der: der.to_vec(),
        subject: cert.subject().to_string(),
        not_after,
    })
}

/// The key must be the certificate's: otherwise every leaf would fail to verify.
fn check_pair(cert: &[u8], key: &KeyPair, cert_file: &Path, key_file: &Path) -> Result<(), Error> {
    let parsed = parse(cert, cert_file)?;
    if !parsed.is_ca() {
        return Err(invalid(
            cert_file,
            "is not a CA certificate (basicConstraints CA:FALSE)",
        ));
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            key_file,
            &format!("is not the key of {}", cert_file.display()),
        ));
    }
    Ok(())
}

fn pem_block(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

#[cfg(test)]
mod tests;
