//! The trust bundle: the roots a peer's certificate chain must end in.
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use super::pem::{encode_cert, parse_pem_certs, read_pem_certs};
use super::IdentityError;

/// The roots a peer's chain must end in. Never empty.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<Vec<CertificateDer<'static>>>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// A bundle of these roots (duplicates dropped). `source_name` appears in errors.
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        source_name: &str,
    ) -> Result<TrustBundle, IdentityError> {
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        for root in roots {
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        if unique.is_empty() {
            return Err(IdentityError::EmptyTrustBundle);
        }
        let mut store = RootCertStore::empty();
        for (i, root) in unique.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| IdentityError::BadRoot {
                    source_name: source_name.to_string(),
                    index: i + 1,
                    reason: e.to_string(),
                })?;
        }
        Ok(TrustBundle {
            roots: Arc::new(unique),
            store: Arc::new(store),
        })
    }

    /// Every `CERTIFICATE` block of a PEM text.
    pub fn from_pem(pem: &str, source_name: &str) -> Result<TrustBundle, IdentityError> {
        let roots = parse_pem_certs(pem.as_bytes()).map_err(|reason| IdentityError::Pem {
            path: PathBuf::from(source_name),
            reason,
        })?;
        TrustBundle::new(roots, source_name)
    }

    /// Every `CERTIFICATE` block of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<TrustBundle, IdentityError> {
        let roots = read_pem_certs(path)?;
        TrustBundle::new(roots, &path.display().to_string())
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// This bundle and `other`'s roots.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut roots = self.roots.to_vec();
        roots.extend(other.roots.iter().cloned());
        TrustBundle::new(roots, "merged bundle").expect("roots were already validated")
    }

    /// All roots as one PEM text.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| encode_cert(c)).collect()
    }

    pub(crate) fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subjects: Vec<String> = self
            .roots
            .iter()
            .map(|der| match x509_parser::parse_x509_certificate(der) {
                Ok((_, c)) => c.subject().to_string(),
                Err(_) => "<unparsable>".to_string(),
            })
            .collect();
        f.debug_struct("TrustBundle")
            .field("roots", &subjects)
            .finish()
    }
}
