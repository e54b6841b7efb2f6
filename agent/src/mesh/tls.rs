//! Mutual TLS between nodes: TLS 1.3 only, each side presenting the certificate of a workload
//! identity, each side verifying the other's chain to the trust bundle and its SPIFFE ID.
//!
//! rustls's own verifiers check DNS names or IP addresses; a workload certificate has neither,
//! only a `spiffe://` URI, so the verifiers here check the chain with webpki (as rustls does)
//! and then the URI. The client side also requires the server to be the identity it meant to
//! reach (the destination pod's).
use std::{collections::BTreeMap, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
};

use crate::identity::{SpiffeId, ca::Leaf};

/// Why a peer's certificate is not accepted, beyond what webpki says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the certificate has no spiffe:// URI")]
    NoSpiffeId,
    #[error("the certificate is {got}, not {want}")]
    WrongIdentity { got: String, want: String },
}

/// Why a handshake failed, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's chain does not lead to the trust bundle.
    UnknownCa,
    Expired,
    NotYetValid,
    /// No SPIFFE URI in the peer's certificate.
    NoSpiffeId,
    /// The server is not the identity the client meant to reach.
    WrongIdentity,
    /// The client sent no certificate.
    NoCertificate,
    /// Any other defect of the peer's certificate.
    BadCertificate,
    /// The peer refused this side's certificate (an alert).
    PeerRefused,
    /// Anything else: protocol versions, I/O, timeouts.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [Self; 9] = [
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::NoSpiffeId,
        Self::WrongIdentity,
        Self::NoCertificate,
        Self::BadCertificate,
        Self::PeerRefused,
        Self::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NoSpiffeId => "no_spiffe_id",
            Self::WrongIdentity => "wrong_identity",
            Self::NoCertificate => "no_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::PeerRefused => "peer_refused",
            Self::Other => "other",
        }
    }

    /// The reason of a failed handshake, from the error the TLS stream returned.
    pub fn of(e: &std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Self::Other;
        };
        match tls {
            rustls::Error::InvalidCertificate(c) => Self::of_certificate(c),
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::AlertReceived(_) => Self::PeerRefused,
            _ => Self::Other,
        }
    }

    fn of_certificate(c: &CertificateError) -> Self {
        match c {
            CertificateError::UnknownIssuer => Self::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<PeerError>() {
                Some(PeerError::NoSpiffeId) => Self::NoSpiffeId,
                Some(PeerError::WrongIdentity { .. }) => Self::WrongIdentity,
                None => Self::BadCertificate,
            },
            _ => Self::BadCertificate,
        }
    }
}

crate::metrics::label_value!(HandshakeFailure);

/// What a leaf could not be turned into.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate of {id}: {message}")]
    Leaf { id: String, message: String },
    #[error("root certificate {index} of the trust bundle: {message}")]
    Root { index: usize, message: String },
}

/// The trust bundle and the held certificates, as TLS configurations are made of them. A new
/// one is built whenever either changes; connections keep the one they started with.
#[derive(Debug)]
pub struct Credentials {
    roots: Arc<[TrustAnchor<'static>]>,
    leaves: BTreeMap<SpiffeId, (Arc<CertifiedKey>, String)>,
    provider: Arc<CryptoProvider>,
    /// One server configuration per identity, made once.
    servers: BTreeMap<SpiffeId, Arc<rustls::ServerConfig>>,
}

impl Credentials {
    /// From the trust bundle (DER) and the held leaves.
    pub fn new<'a>(
        roots: impl IntoIterator<Item = &'a [u8]>,
        leaves: impl IntoIterator<Item = &'a Leaf>,
    ) -> Result<Self, Error> {
        let provider = Arc::new(provider());
        let roots: Arc<[TrustAnchor<'static>]> = roots
            .into_iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der))
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::Root {
                        index,
                        message: format!("{e:?}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        let mut leaves_by_id = BTreeMap::new();
        for leaf in leaves {
            let key = Arc::new(certified(leaf, &provider)?);
            leaves_by_id.insert(leaf.id.clone(), (key, leaf.serial.clone()));
        }
        let mut creds = Self {
            roots,
            leaves: leaves_by_id,
            provider,
            servers: BTreeMap::new(),
        };
        creds.servers = creds
            .leaves
            .keys()
            .filter_map(|id| Some((id.clone(), creds.make_server(id)?)))
            .collect();
        Ok(creds)
    }

    /// Identities with a certificate.
    pub fn identities(&self) -> impl Iterator<Item = &SpiffeId> {
        self.leaves.keys()
    }

    /// The serial of `id`'s certificate.
    pub fn serial(&self, id: &SpiffeId) -> Option<&str> {
        self.leaves.get(id).map(|(_, serial)| serial.as_str())
    }

    /// How a server of `id` accepts tunnels: presents `id`'s certificate, requires a client
    /// certificate of any identity chaining to the bundle.
    pub fn server(&self, id: &SpiffeId) -> Option<Arc<rustls::ServerConfig>> {
        self.servers.get(id).cloned()
    }

    fn make_server(&self, id: &SpiffeId) -> Option<Arc<rustls::ServerConfig>> {
        let (key, _) = self.leaves.get(id)?;
        let verifier = Arc::new(PeerVerifier::new(self, None));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::clone(
                key,
            ))));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: every tunnel proves its identity afresh, and tunnels are long-lived.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Some(Arc::new(config))
    }

    /// How a client of `id` opens a tunnel to a server that must be `peer`.
    pub fn client(&self, id: &SpiffeId, peer: &SpiffeId) -> Option<Arc<rustls::ClientConfig>> {
        let (key, _) = self.leaves.get(id)?;
        let verifier = Arc::new(PeerVerifier::new(self, Some(peer.clone())));
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::clone(
                key,
            ))));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Some(Arc::new(config))
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first (the client's order decides): the same AEAD
/// construction as AES-256-GCM with 10 rounds instead of 14, so bulk tunnels spend less
/// CPU per byte; peers that prefer AES-256-GCM or ChaCha20 still get it.
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// A leaf's chain and key as rustls signs with them.
fn certified(leaf: &Leaf, provider: &CryptoProvider) -> Result<CertifiedKey, Error> {
    let bad = |message: String| Error::Leaf {
        id: leaf.id.to_string(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("chain: {e:?}")))?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .map_err(|e| bad(format!("key: {e:?}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| bad(e.to_string()))
}

/// The SPIFFE ID of a certificate: its `spiffe://` URI subject alternative name (exactly one).
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerError::NoSpiffeId)?;
    let san = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or(PeerError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(PeerError::NoSpiffeId);
    };
    SpiffeId::parse(uri).ok_or(PeerError::NoSpiffeId)
}

/// Verifies a peer: the chain to the bundle, the key usage, and the SPIFFE ID.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<[TrustAnchor<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
    /// The identity a client requires of the server.
    expect: Option<SpiffeId>,
}

impl PeerVerifier {
    fn new(creds: &Credentials, expect: Option<SpiffeId>) -> Self {
        Self {
            roots: Arc::clone(&creds.roots),
            algorithms: creds.provider.signature_verification_algorithms,
            expect,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| {
            let issuer = x509_parser::parse_x509_certificate(end_entity.as_ref())
                .map(|(_, c)| c.issuer().to_string())
                .unwrap_or_default();
            tracing::debug!(target: "weft::mesh", %issuer, error = ?e, anchors = self.roots.len(), "peer certificate refused");
            pki_error(e)
        })?;
        let id = spiffe_id(end_entity).map_err(peer_error)?;
        match &self.expect {
            Some(want) if *want != id => Err(peer_error(PeerError::WrongIdentity {
                got: id.to_string(),
                want: want.to_string(),
            })),
            _ => Ok(id),
        }
    }
}

fn peer_error(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// webpki's verdict as rustls reports it.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let c = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        // A chain signed by a CA of the same name as one of the bundle (two weft CAs) does
        // not lead to the bundle either.
        E::UnknownIssuer | E::InvalidSignatureForPublicKey => CertificateError::UnknownIssuer,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
