//! The mesh CA kept in a Kubernetes Secret, in Istio's `cacerts` layout (`ca-cert.pem`,
//! `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`), so a CA already made for Istio plugs in.
//!
//! Normally the Secret is mounted into the DaemonSet and read as files (`--ca-cert`, `--ca-key`).
//! On a first install nobody may have created it yet: with `--create-ca-secret` the agent reads it
//! through the API, and if it does not exist generates a root and creates it. Agents on every node
//! start at once; the API server's create is atomic, so exactly one root wins and the losers (409
//! Conflict) read the winner's.
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use rustls_pki_types::CertificateDer;

use super::{generate_root_pem, CertificateAuthority, IdentityError};

/// Secret keys, as Istio's `cacerts`.
pub const CA_CERT_KEY: &str = "ca-cert.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";

/// Attempts before giving up on an unreachable API server (the pod then restarts, with back-off).
const ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("--create-ca-secret {0:?}: expected NAMESPACE/NAME, for example mesh-system/mesh-ca")]
    BadName(String),
    #[error("the agent may not {verb} Secret {namespace}/{name} (403 Forbidden): grant it in deploy/agent/rbac.yaml (Role mesh-agent-ca in {namespace})")]
    Forbidden {
        verb: &'static str,
        namespace: String,
        name: String,
    },
    #[error("cannot {verb} Secret {namespace}/{name} through the API server: {error}")]
    Api {
        verb: &'static str,
        namespace: String,
        name: String,
        error: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} has no {key:?} entry; a mesh CA Secret holds {CA_KEY_KEY} and {CERT_CHAIN_KEY} (or {CA_CERT_KEY}), as Istio's cacerts")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: {error}")]
    Invalid {
        namespace: String,
        name: String,
        error: Box<IdentityError>,
    },
    #[error("Secret {namespace}/{name} does not exist: the node agents create it (--create-ca-secret), or install the mesh CA there in Istio's cacerts layout; a waypoint never creates a CA")]
    NotFound { namespace: String, name: String },
    #[error(transparent)]
    Generate(Box<IdentityError>),
}

/// Splits `NAMESPACE/NAME`.
pub fn parse_secret_name(text: &str) -> Result<(String, String), CaSecretError> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(CaSecretError::BadName(text.to_string())),
    }
}

/// Reads the CA from Secret `namespace/name`, creating it with a generated root when absent.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<CertificateAuthority, CaSecretError> {
    get(client, namespace, name, trust_domain, extra_roots, true).await
}

/// Reads the CA from Secret `namespace/name`, never creating it (a waypoint: the node agents'
/// CA or none). A missing Secret is waited for a little, as the agents may be creating it.
pub async fn load(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<CertificateAuthority, CaSecretError> {
    get(client, namespace, name, trust_domain, extra_roots, false).await
}

async fn get(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    extra_roots: Vec<CertificateDer<'static>>,
    create: bool,
) -> Result<CertificateAuthority, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_err = |verb: &'static str, source: kube::Error| match &source {
        kube::Error::Api(status) if status.code == 403 => CaSecretError::Forbidden {
            verb,
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        _ => CaSecretError::Api {
            verb,
            namespace: namespace.to_string(),
            name: name.to_string(),
            error: Box::new(source),
        },
    };
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match api.get_opt(name).await {
            Ok(Some(secret)) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "mesh CA read from the Secret");
                return from_secret(&secret, namespace, name, trust_domain, extra_roots);
            }
            Ok(None) if !create => CaSecretError::NotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
            Ok(None) => {
                let secret = new_secret(namespace, name, trust_domain)?;
                match api.create(&PostParams::default(), &secret).await {
                    Ok(created) => {
                        tracing::info!(secret = %format!("{namespace}/{name}"), "generated a mesh root CA and stored it in a new Secret");
                        return from_secret(&created, namespace, name, trust_domain, extra_roots);
                    }
                    // Another node's agent created it first: read theirs on the next pass.
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::info!(secret = %format!("{namespace}/{name}"), "another agent created the CA Secret first; using theirs");
                        continue;
                    }
                    Err(e) => api_err("create", e),
                }
            }
            Err(e) => api_err("get", e),
        };
        let transient = matches!(
            err,
            CaSecretError::Api { .. } | CaSecretError::NotFound { .. }
        );
        if !transient || attempt >= ATTEMPTS {
            return Err(err);
        }
        tracing::warn!(error = %err, retry_in = ?delay, "cannot get the mesh CA yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

fn new_secret(namespace: &str, name: &str, trust_domain: &str) -> Result<Secret, CaSecretError> {
    let root = generate_root_pem(trust_domain).map_err(|e| CaSecretError::Generate(Box::new(e)))?;
    let entry = |k: &str, v: &str| (k.to_string(), ByteString(v.as_bytes().to_vec()));
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "mesh-agent".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(
            [
                entry(CA_CERT_KEY, &root.cert_pem),
                entry(CA_KEY_KEY, &root.key_pem),
                entry(ROOT_CERT_KEY, &root.cert_pem),
                entry(CERT_CHAIN_KEY, &root.cert_pem),
            ]
            .into(),
        ),
        ..Secret::default()
    })
}

/// The CA a Secret holds: `cert-chain.pem` (signing certificate, then its chain) or else
/// `ca-cert.pem`, with `ca-key.pem`; `root-cert.pem`, when given, is trusted too.
pub fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    mut extra_roots: Vec<CertificateDer<'static>>,
) -> Result<CertificateAuthority, CaSecretError> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &'static str| data.get(key).map(|b| b.0.as_slice());
    let missing = |key| CaSecretError::MissingKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
        key,
    };
    let (cert_key, cert) = match (get(CERT_CHAIN_KEY), get(CA_CERT_KEY)) {
        (Some(chain), _) => (CERT_CHAIN_KEY, chain),
        (None, Some(cert)) => (CA_CERT_KEY, cert),
        (None, None) => return Err(missing(CERT_CHAIN_KEY)),
    };
    let key = get(CA_KEY_KEY).ok_or_else(|| missing(CA_KEY_KEY))?;
    let invalid = |source| CaSecretError::Invalid {
        namespace: namespace.to_string(),
        name: name.to_string(),
        error: Box::new(source),
    };
    if let Some(root) = get(ROOT_CERT_KEY) {
        extra_roots
            .extend(roots_not_in_chain(root, cert, Path::new(ROOT_CERT_KEY)).map_err(invalid)?);
    }
    CertificateAuthority::from_pem(
        cert,
        &PathBuf::from(cert_key),
        key,
        &PathBuf::from(CA_KEY_KEY),
        trust_domain,
        extra_roots,
    )
    .map_err(invalid)
}

/// The certificates of `root_pem` (a `root-cert.pem`, named `source` in errors) that the chain
/// `chain_pem` does not already hold: the usual `root-cert.pem` repeats the chain's last
/// certificate, which is trusted once.
pub fn roots_not_in_chain(
    root_pem: &[u8],
    chain_pem: &[u8],
    source: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls_pki_types::pem::PemObject as _;
    let roots = CertificateDer::pem_slice_iter(root_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            path: source.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .filter_map(Result::ok)
        .collect();
    Ok(roots.into_iter().filter(|r| !chain.contains(r)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_namespace_slash_name() {
        assert_eq!(
            parse_secret_name("mesh-system/mesh-ca").unwrap(),
            ("mesh-system".to_string(), "mesh-ca".to_string())
        );
        for bad in ["mesh-ca", "/x", "x/", "a/b/c", ""] {
            let e = parse_secret_name(bad).unwrap_err().to_string();
            assert!(e.contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_generated_secret_reads_back_as_a_ca() {
        let secret = new_secret("mesh-system", "mesh-ca", "cluster.local").unwrap();
        let ca = from_secret(&secret, "mesh-system", "mesh-ca", "cluster.local", vec![]).unwrap();
        assert_eq!(ca.trust_domain(), "cluster.local");
        assert_eq!(
            ca.trust_bundle().roots().len(),
            1,
            "root-cert.pem repeats the root"
        );
    }

    #[test]
    fn a_secret_without_the_key_names_what_is_missing() {
        let mut secret = new_secret("ns", "ca", "cluster.local").unwrap();
        secret.data.as_mut().unwrap().remove(CA_KEY_KEY);
        let e = from_secret(&secret, "ns", "ca", "cluster.local", vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Secret ns/ca has no \"ca-key.pem\""), "{e}");
    }

    #[test]
    fn a_key_from_another_root_is_rejected_naming_the_secret() {
        let mut secret = new_secret("ns", "ca", "cluster.local").unwrap();
        let other = generate_root_pem("cluster.local").unwrap();
        secret
            .data
            .as_mut()
            .unwrap()
            .insert(CA_KEY_KEY.into(), ByteString(other.key_pem.into_bytes()));
        let e = from_secret(&secret, "ns", "ca", "cluster.local", vec![])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Secret ns/ca") && e.contains("does not belong"),
            "{e}"
        );
    }
}
