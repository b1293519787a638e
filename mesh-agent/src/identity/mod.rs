//! Workload identities, the mesh CA, workload certificates with background renewal, and the
//! rustls configurations HBONE uses (ARCHITECTURE.md,
//! "Identity and HBONE").
//!
//! * [`Identity`]: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! * [`CertificateAuthority`]: a root loaded from files or generated and persisted on first start;
//!   it implements [`Signer`] and issues short-lived ECDSA P-256 workload certificates.
//! * [`CertManager`]: one current certificate per identity, renewed at half-life in a tokio task;
//!   a failed renewal keeps the still-valid certificate and retries with backoff.
//! * [`CertManager::server_config`] / [`CertManager::client_config`]: TLS 1.3, ALPN `h2`, no SNI, no
//!   resumption, mutual authentication with SPIFFE URI SANs; the certificate is resolved on every
//!   handshake, so renewal never needs a new config and never touches live connections.
//!
//! Every TLS object here uses the ring provider explicitly, never the process-wide default.

mod bundle;
pub mod ca_secret;
mod error;
mod manager;
mod pem;
mod signer;
mod spiffe;
mod store;
#[cfg(test)]
mod tests;
mod timestamp;
mod tls;

pub use bundle::TrustBundle;
pub use error::IdentityError;
pub use manager::CertManager;
pub use signer::{CertificateAuthority, SignFuture, Signer, WorkloadCert};
pub use spiffe::{peer_identity, Identity};
pub use store::{
    generate_root_pem, read_extra_roots, CaOptions, GeneratedRoot, CA_CERT_FILE, CA_KEY_FILE,
};
pub use tls::ALPN_H2;

/// The crypto provider every TLS object of the mesh uses: ring. Measured with the
/// `tls_throughput` example against aws-lc-rs (TLS 1.3, 1 GiB transfers, 2-core AMD EPYC with
/// VAES/AVX-512): equal within noise for AES-128-GCM, AES-256-GCM and ChaCha20 over loopback TCP
/// and in memory, while aws-lc-rs would add a C library build (about two more minutes of clean
/// release build here) and 3 MB of binary. Revisit for FIPS or post-quantum key exchange.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A fresh directory under the system temp dir, removed (with its contents) when dropped.
    pub fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("mesh-identity-{tag}-"))
            .tempdir()
            .expect("create temp dir")
    }
}
