use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use tokio::task::AbortHandle;
use tracing::{error, info, warn};

use super::timestamp::rfc3339;
use super::tls::{self, ManagedCert};
use super::{Identity, IdentityError, Signer, TrustBundle, WorkloadCert};

/// First retry delay after a failed renewal; doubles per failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(150);
/// Retries are pulled in to half the remaining validity, but never closer together than this.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// The current certificate per identity, renewed at half-life in the background.
///
/// Each acquired identity has one tokio task that sleeps until half of the current certificate's
/// remaining life (counted from when it arrived) has passed, asks the [`Signer`] for a new one and
/// swaps it in. A failed renewal keeps the still-valid certificate and retries with exponential
/// backoff (1 s doubling to 150 s, pulled in so that attempts continue until shortly before expiry).
/// The TLS configs resolve the current certificate per handshake, so renewal affects only new
/// handshakes; established connections are never touched.
pub struct CertManager {
    signer: Arc<dyn Signer>,
    bundle: TrustBundle,
    trust_domain: String,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_identity: HashMap<Identity, Entry>,
    next_generation: u64,
}

struct Entry {
    refs: usize,
    /// Distinguishes this entry from an earlier one of the same identity whose task was aborted.
    generation: u64,
    current: Current,
    task: AbortHandle,
}

#[derive(Clone)]
struct Current {
    cert: Arc<WorkloadCert>,
    key: Arc<CertifiedKey>,
    /// When we received it: renewal is at half of the life left at that moment, so a signer's
    /// backdated `not_before` does not pull renewal forward.
    received: SystemTime,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .lock()
            .by_identity
            .keys()
            .map(|id| id.to_string())
            .collect();
        f.debug_struct("CertManager")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .field("identities", &ids)
            .finish()
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        let entries = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        for entry in entries.by_identity.values() {
            entry.task.abort();
        }
    }
}

impl CertManager {
    /// `lifetime` is asked of the signer for every certificate (24 h in production).
    pub fn new(
        signer: Arc<dyn Signer>,
        bundle: TrustBundle,
        trust_domain: String,
        lifetime: Duration,
    ) -> Arc<CertManager> {
        Arc::new(CertManager {
            signer,
            bundle,
            trust_domain,
            lifetime,
            provider: super::crypto_provider(),
            entries: Mutex::new(Entries::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The map stays consistent across a panic in another holder: every update is one insert,
        // remove or field store.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues a certificate for `id` if it has none, and keeps it renewed at half-life in a tokio
    /// task until [`release`](Self::release) has been called as many times as `acquire` (several
    /// pods share a service account). Must be called inside a tokio runtime. The first issuance is
    /// awaited from the signer (the local CA signs on the blocking pool, not on the caller's
    /// thread); its failure is returned and nothing is kept.
    ///
    /// Concurrent calls for an identity that has no certificate yet may each ask the signer;
    /// the first certificate back is kept and shared, the others are dropped, so the identity
    /// still ends up with one entry, one reference per call, and one renewal task.
    pub async fn acquire(self: &Arc<Self>, id: &Identity) -> Result<(), IdentityError> {
        if self.share(id) {
            return Ok(());
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| IdentityError::NoRuntime)?;
        let signed = self.signer.sign(id, self.lifetime).await;
        let current = self.accept(id, signed)?;

        // No await from here on: the check and the insert are one critical section.
        let mut entries = self.lock();
        if let Some(entry) = entries.by_identity.get_mut(id) {
            // Another caller issued one meanwhile; share it and drop ours.
            entry.refs += 1;
            return Ok(());
        }
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let task = runtime
            .spawn(renew(
                Arc::downgrade(self),
                id.clone(),
                generation,
                current.clone(),
            ))
            .abort_handle();
        entries.by_identity.insert(
            id.clone(),
            Entry {
                refs: 1,
                generation,
                current,
                task,
            },
        );
        Ok(())
    }

    /// Takes one more reference to `id`'s entry, if it has one.
    fn share(&self, id: &Identity) -> bool {
        match self.lock().by_identity.get_mut(id) {
            Some(entry) => {
                entry.refs += 1;
                true
            }
            None => false,
        }
    }

    /// Drops one reference taken by [`acquire`](Self::acquire); the last one stops renewal and
    /// forgets the certificate (live connections keep working; new handshakes for `id` fail).
    pub fn release(&self, id: &Identity) {
        let mut entries = self.lock();
        let Some(entry) = entries.by_identity.get_mut(id) else {
            warn!(identity = %id, "release of an identity that holds no certificate");
            return;
        };
        entry.refs -= 1;
        if entry.refs == 0 {
            let entry = entries
                .by_identity
                .remove(id)
                .expect("entry was just found");
            entry.task.abort();
            info!(identity = %id, "certificate released; renewal stopped");
        }
    }

    /// The current certificate of `id`, if it is acquired.
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.lock()
            .by_identity
            .get(id)
            .map(|e| e.current.cert.clone())
    }

    /// All current certificates, sorted by identity (for `inspect certs`).
    pub fn certificates(&self) -> Vec<Arc<WorkloadCert>> {
        let mut certs: Vec<_> = self
            .lock()
            .by_identity
            .values()
            .map(|e| e.current.cert.clone())
            .collect();
        certs.sort_by(|a, b| a.identity.cmp(&b.identity));
        certs
    }

    pub(crate) fn current_key(&self, id: &Identity) -> Option<Arc<CertifiedKey>> {
        self.lock()
            .by_identity
            .get(id)
            .map(|e| e.current.key.clone())
    }

    /// TLS 1.3 only, ALPN "h2", no session resumption or tickets. Presents `id`'s current
    /// certificate on every handshake, so renewal needs no new config. Requires a client
    /// certificate chaining to the trust bundle with a SPIFFE URI SAN in the same trust domain;
    /// read it afterwards with [`super::peer_identity`].
    pub fn server_config(self: &Arc<Self>, id: &Identity) -> Arc<rustls::ServerConfig> {
        tls::server_config(
            self.provider.clone(),
            &self.bundle,
            &self.trust_domain,
            Arc::new(ManagedCert {
                manager: self.clone(),
                identity: id.clone(),
            }),
        )
    }

    /// TLS 1.3 only, ALPN "h2", no SNI (connect with any dummy name, e.g. the destination IP),
    /// no resumption. Presents `src`'s current certificate and accepts the server only if its
    /// chain verifies against the trust bundle and its URI SAN equals one of `expected`.
    pub fn client_config(
        self: &Arc<Self>,
        src: &Identity,
        expected: &[Identity],
    ) -> Arc<rustls::ClientConfig> {
        tls::client_config(
            self.provider.clone(),
            &self.bundle,
            expected,
            Arc::new(ManagedCert {
                manager: self.clone(),
                identity: src.clone(),
            }),
        )
    }

    /// Checks what the signer returned and prepares it for rustls.
    fn accept(
        &self,
        id: &Identity,
        signed: Result<WorkloadCert, IdentityError>,
    ) -> Result<Current, IdentityError> {
        let cert = signed?;
        let fail = |reason: String| IdentityError::Sign {
            identity: id.to_string(),
            reason,
        };
        if cert.identity != *id {
            return Err(fail(format!(
                "the signer returned a certificate for {}",
                cert.identity
            )));
        }
        let now = SystemTime::now();
        if cert.not_after <= now {
            return Err(fail(format!(
                "the signer returned a certificate that expired at {}",
                rfc3339(cert.not_after)
            )));
        }
        tls::check_chain(&self.provider, &self.bundle, &cert.cert_chain).map_err(fail)?;
        let key = CertifiedKey::from_der(
            cert.cert_chain.clone(),
            cert.key.clone_key(),
            &self.provider,
        )
        .map_err(|e| fail(format!("unusable key: {e}")))?;
        info!(
            identity = %id,
            serial = %cert.serial,
            not_after = %rfc3339(cert.not_after),
            "issued workload certificate"
        );
        Ok(Current {
            cert: Arc::new(cert),
            key: Arc::new(key),
            received: now,
        })
    }

    /// Swaps in a renewed certificate; false when the entry was released (or replaced) meanwhile.
    fn install(&self, id: &Identity, generation: u64, current: Current) -> bool {
        match self.lock().by_identity.get_mut(id) {
            Some(entry) if entry.generation == generation => {
                entry.current = current;
                true
            }
            _ => false,
        }
    }

    /// How many [`acquire`](Self::acquire)s hold `id`.
    #[cfg(test)]
    pub(crate) fn refs(&self, id: &Identity) -> Option<usize> {
        self.lock().by_identity.get(id).map(|e| e.refs)
    }

    /// How many entries, each with its own renewal task, were ever created.
    #[cfg(test)]
    pub(crate) fn entries_created(&self) -> u64 {
        self.lock().next_generation
    }

    #[cfg(test)]
    pub(crate) fn install_for_test(self: &Arc<Self>, cert: WorkloadCert) {
        let key = CertifiedKey::from_der(
            cert.cert_chain.clone(),
            cert.key.clone_key(),
            &self.provider,
        )
        .expect("usable key");
        let id = cert.identity.clone();
        let mut entries = self.lock();
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let task = tokio::spawn(async {}).abort_handle();
        entries.by_identity.insert(
            id,
            Entry {
                refs: 1,
                generation,
                current: Current {
                    cert: Arc::new(cert),
                    key: Arc::new(key),
                    received: SystemTime::now(),
                },
                task,
            },
        );
    }
}

/// When to renew: half of the life left when the certificate arrived.
fn renewal_time(current: &Current) -> SystemTime {
    let life = current
        .cert
        .not_after
        .duration_since(current.received)
        .unwrap_or_default();
    current.received + (life / 2).max(MIN_RETRY)
}

/// The next retry after a failure: exponential backoff, pulled in to half of the remaining
/// validity so that attempts continue until shortly before expiry.
fn retry_delay(backoff: Duration, now: SystemTime, not_after: SystemTime) -> Duration {
    match not_after.duration_since(now) {
        Ok(remaining) if !remaining.is_zero() => backoff.min((remaining / 2).max(MIN_RETRY)),
        _ => backoff,
    }
}

async fn sleep_until(at: SystemTime) {
    if let Ok(d) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

/// Logs, once per certificate, that it expired without renewal.
fn report_expiry(id: &Identity, current: &Current, last_error: Option<&IdentityError>) {
    let last_error = last_error.map_or_else(
        || "still waiting for the signer".to_string(),
        |e| e.to_string(),
    );
    error!(
        identity = %id,
        serial = %current.cert.serial,
        expired = %rfc3339(current.cert.not_after),
        error = %last_error,
        "workload certificate expired without renewal; new handshakes with it will fail"
    );
}

/// The renewal task of one identity. Holds the manager weakly: it ends when the manager is
/// dropped, when the entry is released (the task is aborted) or replaced. Whatever it is waiting
/// for (the renewal time, a retry, a slow signer), an expiry is reported when it happens.
async fn renew(manager: Weak<CertManager>, id: Identity, generation: u64, mut current: Current) {
    let mut backoff = INITIAL_BACKOFF;
    let mut next = renewal_time(&current);
    let mut expiry_reported = false;
    loop {
        tokio::select! {
            _ = sleep_until(next) => {}
            _ = sleep_until(current.cert.not_after), if !expiry_reported => {
                report_expiry(&id, &current, None);
                expiry_reported = true;
                continue;
            }
        }
        let Some(m) = manager.upgrade() else { return };
        let (signer, lifetime) = (m.signer.clone(), m.lifetime);
        drop(m);
        // A panicking signer fails this attempt, not the renewal task.
        let signing = AssertUnwindSafe(signer.sign(&id, lifetime)).catch_unwind();
        tokio::pin!(signing);
        let signed = loop {
            tokio::select! {
                joined = &mut signing => break joined.unwrap_or_else(|panic| {
                    Err(IdentityError::Sign {
                        identity: id.to_string(),
                        reason: format!("the signer panicked: {}", panic_message(&*panic)),
                    })
                }),
                _ = sleep_until(current.cert.not_after), if !expiry_reported => {
                    report_expiry(&id, &current, None);
                    expiry_reported = true;
                }
            }
        };
        let Some(m) = manager.upgrade() else { return };
        match m.accept(&id, signed) {
            Ok(renewed) => {
                if !m.install(&id, generation, renewed.clone()) {
                    return;
                }
                current = renewed;
                backoff = INITIAL_BACKOFF;
                expiry_reported = false;
                next = renewal_time(&current);
            }
            Err(e) => {
                let now = SystemTime::now();
                let delay = retry_delay(backoff, now, current.cert.not_after);
                if now < current.cert.not_after {
                    warn!(
                        identity = %id,
                        error = %e,
                        valid_until = %rfc3339(current.cert.not_after),
                        retry_in = ?delay,
                        "certificate renewal failed; keeping the still-valid certificate"
                    );
                } else if !expiry_reported {
                    report_expiry(&id, &current, Some(&e));
                    expiry_reported = true;
                } else {
                    warn!(
                        identity = %id,
                        error = %e,
                        retry_in = ?delay,
                        "certificate renewal failed again; the current certificate has expired"
                    );
                }
                next = now + delay;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_backs_off_and_respects_expiry() {
        let now = SystemTime::now();
        let far = now + Duration::from_secs(12 * 3600);
        let mut backoff = INITIAL_BACKOFF;
        let mut delays = vec![];
        for _ in 0..10 {
            delays.push(retry_delay(backoff, now, far).as_secs());
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]);
        // Close to expiry, retries are pulled in to half the remaining time.
        let soon = now + Duration::from_secs(10);
        assert_eq!(retry_delay(MAX_BACKOFF, now, soon), Duration::from_secs(5));
        assert_eq!(
            retry_delay(MAX_BACKOFF, now, now + Duration::from_millis(50)),
            MIN_RETRY
        );
        // After expiry, plain backoff.
        assert_eq!(
            retry_delay(MAX_BACKOFF, now, now - Duration::from_secs(1)),
            MAX_BACKOFF
        );
    }
}
