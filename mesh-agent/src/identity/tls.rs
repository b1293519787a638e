//! rustls pieces of HBONE's mutual TLS: certificate resolvers that read the [`CertManager`] on
//! every handshake, and verifiers that check SPIFFE identities after the chain.
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::warn;

use super::{peer_identity, CertManager, Identity, IdentityError, TrustBundle};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// A TLS 1.3-only server config: ALPN h2, no session resumption or tickets, a client certificate
/// chaining to `bundle` with a SPIFFE URI SAN in `trust_domain` required.
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    bundle: &TrustBundle,
    trust_domain: &str,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Arc<ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        provider.clone(),
        bundle.root_store(),
        trust_domain,
    ));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A TLS 1.3-only client config: ALPN h2, no SNI, no resumption; the server must chain to
/// `bundle` and present exactly one of `expected` as its URI SAN.
pub(crate) fn client_config(
    provider: Arc<CryptoProvider>,
    bundle: &TrustBundle,
    expected: &[Identity],
    resolver: Arc<dyn ResolvesClientCert>,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeServerVerifier {
        provider: provider.clone(),
        roots: bundle.root_store(),
        expected: expected.to_vec(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Turns an identity check failure into a rustls certificate error that carries our message (the
/// peer receives a `certificate_unknown` alert).
fn reject(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(
        e.to_string(),
    )))))
}

/// rustls prints certificate errors with `{:?}`: make that the operator-facing message.
struct Rejected(String);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

/// Presents the manager's current certificate for one identity.
#[derive(Debug)]
pub(crate) struct ManagedCert {
    pub(crate) manager: Arc<CertManager>,
    pub(crate) identity: Identity,
}

impl ManagedCert {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.manager.current_key(&self.identity);
        if key.is_none() {
            warn!(
                identity = %self.identity,
                "no certificate for this identity (not acquired, or released); failing the handshake"
            );
        }
        key
    }
}

impl ResolvesServerCert for ManagedCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for ManagedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: the client chain must verify against the bundle (webpki, clientAuth usage), and
/// its SPIFFE identity must be in our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    fn new(provider: Arc<CryptoProvider>, roots: Arc<RootCertStore>, trust_domain: &str) -> Self {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            // Our clients present their one certificate whatever the hints say.
            .clear_root_hint_subjects()
            .build()
            .expect("a trust bundle is never empty");
        SpiffeClientVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_identity(Some(std::slice::from_ref(end_entity))).map_err(reject)?;
        if peer.trust_domain != self.trust_domain {
            return Err(reject(IdentityError::ForeignTrustDomain {
                peer: peer.to_string(),
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server chain must verify against the bundle (webpki, serverAuth usage; no
/// name check, HBONE sends no SNI), and its URI SAN must be one of the expected identities.
struct SpiffeServerVerifier {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("roots", &self.roots.len())
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let peer = peer_identity(Some(std::slice::from_ref(end_entity))).map_err(reject)?;
        if !self.expected.contains(&peer) {
            return Err(reject(IdentityError::UnexpectedPeer {
                peer: peer.to_string(),
                expected: self.expected.iter().map(|e| e.to_string()).collect(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks that a freshly signed chain verifies against the bundle, so a signer that uses the
/// wrong CA is caught before its certificate is served.
pub(crate) fn check_chain(
    provider: &CryptoProvider,
    bundle: &TrustBundle,
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let leaf = chain.first().ok_or("the chain is empty")?;
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.root_store(),
        &chain[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("it does not verify against the trust bundle: {e}"))
}
