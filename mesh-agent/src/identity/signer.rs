//! Signing workload certificates: the [`Signer`] interface and the local [`CertificateAuthority`].
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
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

/// A certificate being signed, as [`Signer::sign`] returns it.
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>>;

/// What signs workload certificates: the local CA now, a remote CA service later; tests inject
/// failures.
///
/// The returned future is polled on the runtime's worker threads, so it must never block them:
/// a remote CA awaits its requests, and CPU-bound work (key generation and signing in the local
/// CA) runs on tokio's blocking pool.
pub trait Signer: Send + Sync + 'static {
    /// A certificate for `id`, valid for `lifetime` from now.
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a>;
}

/// The mesh CA: signs workload certificates with a root (or intermediate) loaded from files or
/// generated on first start.
pub struct CertificateAuthority {
    /// Shared with the blocking-pool threads that sign.
    pub(super) key: Arc<SigningKey>,
    pub(super) own_roots: Vec<CertificateDer<'static>>,
    pub(super) bundle: TrustBundle,
    pub(super) cert_path: PathBuf,
}

/// What signing a workload certificate needs of the CA.
pub(super) struct SigningKey {
    pub(super) trust_domain: String,
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: the signing certificate and intermediates, unless
    /// self-signed.
    pub(super) chain: Vec<CertificateDer<'static>>,
    /// The CA certificate's own expiry; no workload certificate outlives it.
    pub(super) not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.key.trust_domain)
            .field("cert", &self.cert_path)
            .field("not_after", &rfc3339(self.key.not_after))
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
        &self.key.trust_domain
    }

    /// Signs a certificate for `id` with an explicit validity (tests of expiry, tools).
    pub fn sign_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        self.check_trust_domain(id)?;
        self.issue(id, not_before, not_after)
    }

    /// Signs without the trust domain check.
    pub(crate) fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        self.key.issue(id, not_before, not_after)
    }

    fn check_trust_domain(&self, id: &Identity) -> Result<(), IdentityError> {
        if id.trust_domain != self.key.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                identity: id.to_string(),
                trust_domain: self.key.trust_domain.clone(),
            });
        }
        Ok(())
    }
}

impl SigningKey {
    /// Generates the leaf's key and signs its certificate: CPU-bound, a few milliseconds.
    fn issue(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        #[cfg(test)]
        tests::record_signing_thread(id);
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
    ///
    /// The signing runs on tokio's blocking pool, never on the polling thread, when there is a
    /// runtime; without one there is no worker thread to keep free, so it runs in place.
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            self.check_trust_domain(id)?;
            let key = self.key.clone();
            let owned_id = id.clone();
            let sign = move || {
                let now = SystemTime::now();
                key.issue(&owned_id, now - CLOCK_SKEW, now + lifetime)
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime.spawn_blocking(sign).await.unwrap_or_else(|e| {
                    Err(IdentityError::Sign {
                        identity: id.to_string(),
                        reason: format!("the signing thread failed: {e}"),
                    })
                }),
                Err(_) => sign(),
            }
        })
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
pub(crate) mod tests {
    use super::*;
    use crate::identity::store::tests::opts;
    use crate::identity::testutil::temp_dir;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::thread::ThreadId;
    use x509_parser::extensions::GeneralName;

    /// Where the local CA signed, by identity (tests that run in parallel sign their own
    /// identities): the thread and its name.
    static SIGNING_THREADS: Mutex<Vec<(String, ThreadId, Option<String>)>> = Mutex::new(Vec::new());

    pub(super) fn record_signing_thread(id: &Identity) {
        let thread = std::thread::current();
        SIGNING_THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((
                id.to_string(),
                thread.id(),
                thread.name().map(str::to_string),
            ));
    }

    /// The threads that signed for `id`, with their names.
    pub(crate) fn signing_threads(id: &Identity) -> Vec<(ThreadId, Option<String>)> {
        SIGNING_THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(signed, _, _)| *signed == id.to_string())
            .map(|(_, thread, name)| (*thread, name.clone()))
            .collect()
    }

    pub(crate) const RUNTIME_THREAD_NAME: &str = "mesh-test-rt";

    /// A runtime whose threads are all named [`RUNTIME_THREAD_NAME`], and the ids of its worker
    /// threads, learnt as they go idle: only workers run the park hook, the blocking pool's
    /// threads wait without it. A current-thread runtime's worker is the thread in `block_on`.
    pub(crate) struct RecordingRuntime {
        pub runtime: tokio::runtime::Runtime,
        workers: Arc<Mutex<HashSet<ThreadId>>>,
        expected_workers: usize,
    }

    impl RecordingRuntime {
        pub(crate) fn multi_thread(workers: usize) -> RecordingRuntime {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            RecordingRuntime::build(builder, workers)
        }

        pub(crate) fn current_thread() -> RecordingRuntime {
            RecordingRuntime::build(tokio::runtime::Builder::new_current_thread(), 1)
        }

        fn build(
            mut builder: tokio::runtime::Builder,
            expected_workers: usize,
        ) -> RecordingRuntime {
            let workers = Arc::new(Mutex::new(HashSet::new()));
            let seen = workers.clone();
            let runtime = builder
                .enable_all()
                .thread_name(RUNTIME_THREAD_NAME)
                .on_thread_park(move || {
                    seen.lock().unwrap().insert(std::thread::current().id());
                })
                .build()
                .unwrap();
            RecordingRuntime {
                runtime,
                workers,
                expected_workers,
            }
        }

        /// Every worker thread, once each has gone idle.
        pub(crate) fn workers(&self) -> HashSet<ThreadId> {
            let start = std::time::Instant::now();
            loop {
                let workers = self.workers.lock().unwrap().clone();
                if workers.len() >= self.expected_workers {
                    return workers;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "only {} of {} workers went idle",
                    workers.len(),
                    self.expected_workers
                );
                // Idle, so that the workers park.
                self.runtime.block_on(async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                });
            }
        }

        /// Asserts that everything signed for `id` was signed on this runtime's blocking pool: a
        /// thread of the runtime (by its name) that is not one of its workers.
        pub(crate) fn assert_signed_on_blocking_pool(&self, id: &Identity) {
            let workers = self.workers();
            let threads = signing_threads(id);
            assert!(!threads.is_empty(), "nothing was signed for {id}");
            for (thread, name) in threads {
                assert!(
                    !workers.contains(&thread),
                    "{id} was signed on a runtime worker ({thread:?}, {name:?})"
                );
                assert_eq!(
                    name.as_deref(),
                    Some(RUNTIME_THREAD_NAME),
                    "{id} was signed on {thread:?}, not a thread of the runtime"
                );
            }
        }
    }

    #[test]
    fn local_ca_signs_on_the_blocking_pool_not_on_a_worker() {
        let tmp = temp_dir("ca-blocking");
        let ca = Arc::new(CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap());
        for (flavor, rt) in [
            ("multi-thread", RecordingRuntime::multi_thread(2)),
            ("current-thread", RecordingRuntime::current_thread()),
        ] {
            let id = Identity::new("cluster.local", "blocking-pool", flavor);
            let signing = ca.clone();
            let signed_id = id.clone();
            let cert = rt.runtime.block_on(async move {
                // Polled by a worker: a task of the runtime, not the `block_on` future.
                tokio::spawn(async move {
                    signing
                        .sign(&signed_id, Duration::from_secs(60))
                        .await
                        .unwrap()
                })
                .await
                .unwrap()
            });
            assert_eq!(cert.identity, id);
            rt.assert_signed_on_blocking_pool(&id);
        }
    }

    #[test]
    fn local_ca_signs_in_place_without_a_runtime() {
        let tmp = temp_dir("ca-noruntime");
        let ca = CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap();
        let id = Identity::new("cluster.local", "no-runtime", "sa");
        let cert = futures::executor::block_on(ca.sign(&id, Duration::from_secs(60))).unwrap();
        assert_eq!(cert.identity, id);
        assert_eq!(
            signing_threads(&id),
            [(
                std::thread::current().id(),
                std::thread::current().name().map(str::to_string)
            )]
        );
    }

    #[tokio::test]
    async fn signed_certificate_has_one_uri_san_the_lifetime_and_random_serials() {
        let tmp = temp_dir("ca-sign");
        let ca = CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let lifetime = Duration::from_secs(3600);
        let before = SystemTime::now();
        let c1 = ca.sign(&id, lifetime).await.unwrap();
        let c2 = ca.sign(&id, lifetime).await.unwrap();
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
        let err = ca.sign(&foreign, lifetime).await.unwrap_err();
        assert!(
            matches!(err, IdentityError::WrongTrustDomain { .. }),
            "{err}"
        );
    }
}
