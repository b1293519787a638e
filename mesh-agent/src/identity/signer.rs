//! Signing workload certificates: the [`Signer`] interface and the local [`CertificateAuthority`].
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::pem::encode_cert;
use super::timestamp::rfc3339;
use super::{Identity, IdentityError, TrustBundle};

/// Workload certificates start this much before "now", for peers whose clocks lag.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A signed workload certificate and its private key.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then any intermediates; without the root.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number in lower-case hex, without separators.
    pub serial: String,
}

impl WorkloadCert {
    /// Whether `at` lies within the certificate's validity.
    pub fn is_valid_at(&self, at: SystemTime) -> bool {
        self.not_before <= at && at < self.not_after
    }

    /// PEM of the chain (leaf first), for operators and `inspect certs`.
    pub fn chain_pem(&self) -> String {
        self.cert_chain.iter().map(|c| encode_cert(c)).collect()
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .field("chain_len", &self.cert_chain.len())
            .field("key", &"[elided]")
            .finish()
    }
}

/// What signs workload certificates: the local CA now, a remote CA service later; tests inject
/// failures. `sign` may block (a remote CA); the manager calls it off the async workers.
pub trait Signer: Send + Sync + 'static {
    fn sign(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, IdentityError>;
}

/// The mesh CA: signs workload certificates with a root (or intermediate) loaded from files or
/// generated on first start.
pub struct CertificateAuthority {
    pub(super) trust_domain: String,
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: the signing certificate and intermediates, unless
    /// self-signed.
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) own_roots: Vec<CertificateDer<'static>>,
    pub(super) bundle: TrustBundle,
    pub(super) not_after: SystemTime,
    pub(super) cert_path: PathBuf,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("cert", &self.cert_path)
            .field("not_after", &rfc3339(self.not_after))
            .field("bundle", &self.bundle)
            .finish()
    }
}

impl CertificateAuthority {
    /// PEM of this CA's own root(s) (empty when the root came only from `extra_roots`).
    pub fn root_pem(&self) -> String {
        self.own_roots.iter().map(|c| encode_cert(c)).collect()
    }

    /// The CA's own root(s) and the extra roots.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a certificate for `id` with an explicit validity (tests of expiry, tools).
    pub fn sign_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        if id.trust_domain != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                identity: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        self.issue(id, not_before, not_after)
    }

    /// Signs without the trust domain check.
    pub(crate) fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let fail = |reason: String| IdentityError::Sign {
            identity: id.to_string(),
            reason,
        };
        // X.509 times have one-second resolution: round outwards so the lifetime is honoured.
        let not_before = floor_secs(not_before);
        let not_after = ceil_secs(not_after.min(self.not_after));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(format!("key generation: {e}")))?;
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| fail(format!("URI SAN: {e}")))?;
        let serial = random_serial();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;

        let mut cert_chain = vec![cert.der().clone()];
        cert_chain.extend(self.chain.iter().cloned());
        Ok(WorkloadCert {
            identity: id.clone(),
            cert_chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            serial: hex(&serial),
        })
    }
}

impl Signer for CertificateAuthority {
    /// A fresh ECDSA P-256 key per certificate; the SPIFFE URI as the only SAN; valid from 60 s
    /// ago (clock skew) for `lifetime` (never past the CA's own expiry); random 128-bit serial;
    /// keyUsage digitalSignature + keyEncipherment, extKeyUsage serverAuth + clientAuth.
    fn sign(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        self.sign_with_validity(id, now - CLOCK_SKEW, now + lifetime)
    }
}

/// 16 random bytes, positive and without a leading zero byte, so the DER integer is exactly these
/// bytes and the hex form is stable.
pub(super) fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn floor_secs(t: SystemTime) -> SystemTime {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_secs(d.as_secs())
}

fn ceil_secs(t: SystemTime) -> SystemTime {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::tests::opts;
    use crate::identity::testutil::TempDir;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn signed_certificate_has_one_uri_san_the_lifetime_and_random_serials() {
        let tmp = TempDir::new("ca-sign");
        let ca = CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let lifetime = Duration::from_secs(3600);
        let before = SystemTime::now();
        let c1 = ca.sign(&id, lifetime).unwrap();
        let c2 = ca.sign(&id, lifetime).unwrap();
        assert_ne!(c1.serial, c2.serial);
        assert_eq!(c1.serial.len(), 32);
        assert!(c1
            .serial
            .chars()
            .all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(c1.cert_chain.len(), 1, "the root is not part of the chain");
        assert_eq!(c1.identity, id);

        let (_, x) = x509_parser::parse_x509_certificate(&c1.cert_chain[0]).unwrap();
        let sans = &x
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans.len(), 1, "{sans:?}");
        assert_eq!(
            sans[0],
            GeneralName::URI("spiffe://cluster.local/ns/default/sa/sleep")
        );
        assert_eq!(hex(x.raw_serial()), c1.serial);
        assert!(!x.is_ca());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());

        let nb = x.validity().not_before.timestamp();
        let na = x.validity().not_after.timestamp();
        let now = before.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(
            (now - 62..=now - 59).contains(&nb),
            "not_before {nb} vs now {now}"
        );
        assert!(
            (now + 3599..=now + 3602).contains(&na),
            "not_after {na} vs now {now}"
        );
        assert_eq!(c1.not_after, UNIX_EPOCH + Duration::from_secs(na as u64));
        assert_eq!(c1.not_before, UNIX_EPOCH + Duration::from_secs(nb as u64));
        assert!(c1.is_valid_at(SystemTime::now()));
        assert_eq!(
            crate::identity::peer_identity(Some(&c1.cert_chain)).unwrap(),
            id
        );

        let foreign = Identity::new("other.local", "default", "sleep");
        let err = ca.sign(&foreign, lifetime).unwrap_err();
        assert!(
            matches!(err, IdentityError::WrongTrustDomain { .. }),
            "{err}"
        );
    }
}
