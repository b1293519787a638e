//! Where the CA comes from: files given by the operator, or a root generated on first start and
//! kept in the state directory.
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::pem::{parse_pem_certs, read_file, read_pem_certs};
use super::signer::{floor_secs, hex, random_serial, SigningKey, CLOCK_SKEW};
use super::timestamp::rfc3339;
use super::{spiffe, CertificateAuthority, IdentityError, TrustBundle};

/// File names of a generated root inside [`CaOptions::state_dir`].
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where the mesh CA comes from.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// `--ca-cert`: PEM of the signing CA certificate, optionally followed by its chain up to the
    /// root (the layout of Istio's `cacerts` `cert-chain.pem`). Given together with `ca_key`.
    pub ca_cert: Option<PathBuf>,
    /// `--ca-key`: PKCS#8 PEM private key of `ca_cert`.
    pub ca_key: Option<PathBuf>,
    /// Where a generated root is kept (`ca-cert.pem`, `ca-key.pem`).
    pub state_dir: PathBuf,
    /// The trust domain this CA signs identities for.
    pub trust_domain: String,
    /// PEM bundle of further trusted roots (root rotation: trust old and new while both sign).
    pub extra_roots: Option<PathBuf>,
}

impl CertificateAuthority {
    /// Loads `--ca-cert`/`--ca-key` when given (both or neither; a key that does not belong to the
    /// certificate is an error naming both files). Otherwise loads `<state_dir>/ca-cert.pem` and
    /// `ca-key.pem` if present, else generates an ECDSA P-256 root (CN "mesh root CA", 10 years,
    /// CA:true, keyCertSign) and persists it there: the key with mode 0600, the directory created
    /// with mode 0700. Roots from `extra_roots` are added to the trust bundle.
    pub fn load_or_generate(opts: &CaOptions) -> Result<CertificateAuthority, IdentityError> {
        spiffe::check_trust_domain(&opts.trust_domain).map_err(|reason| {
            IdentityError::InvalidTrustDomain {
                trust_domain: opts.trust_domain.clone(),
                reason,
            }
        })?;
        let mut extra = match &opts.extra_roots {
            Some(path) => read_pem_certs(path)?,
            None => Vec::new(),
        };
        // A mounted Istio `cacerts` Secret: its root-cert.pem, next to the chain, is trusted too
        // (as when the Secret is read through the API), so an intermediate whose chain file
        // stops below the root loads.
        if let Some(cert) = &opts.ca_cert {
            let root = cert.with_file_name(super::ca_secret::ROOT_CERT_KEY);
            if root != *cert && root.exists() {
                extra.extend(super::ca_secret::roots_not_in_chain(
                    &read_file(&root)?,
                    &read_file(cert)?,
                    &root,
                )?);
            }
        }
        let (cert_path, key_path) = match (&opts.ca_cert, &opts.ca_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (Some(cert), None) => {
                return Err(IdentityError::CaFilesIncomplete {
                    given: "--ca-cert",
                    path: cert.clone(),
                })
            }
            (None, Some(key)) => {
                return Err(IdentityError::CaFilesIncomplete {
                    given: "--ca-key",
                    path: key.clone(),
                })
            }
            (None, None) => {
                let dir = &opts.state_dir;
                let cert = dir.join(CA_CERT_FILE);
                let key = dir.join(CA_KEY_FILE);
                match (cert.exists(), key.exists()) {
                    (true, true) => {}
                    (false, false) => generate_root(dir, &opts.trust_domain)?,
                    (true, false) => {
                        return Err(IdentityError::CaStateIncomplete {
                            dir: dir.clone(),
                            present: CA_CERT_FILE,
                            missing: CA_KEY_FILE,
                        })
                    }
                    (false, true) => {
                        return Err(IdentityError::CaStateIncomplete {
                            dir: dir.clone(),
                            present: CA_KEY_FILE,
                            missing: CA_CERT_FILE,
                        })
                    }
                }
                (cert, key)
            }
        };
        let ca =
            CertificateAuthority::from_files(&cert_path, &key_path, &opts.trust_domain, extra)?;
        info!(
            cert = %cert_path.display(),
            trust_domain = %ca.trust_domain(),
            roots = ca.bundle.roots().len(),
            not_after = %rfc3339(ca.key.not_after),
            "mesh CA loaded"
        );
        Ok(ca)
    }

    fn from_files(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &str,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<CertificateAuthority, IdentityError> {
        let cert_pem = read_file(cert_path)?;
        let key_pem = read_file(key_path)?;
        warn_if_key_file_is_open(key_path);
        CertificateAuthority::from_pem(
            &cert_pem,
            cert_path,
            &key_pem,
            key_path,
            trust_domain,
            extra_roots,
        )
    }

    /// A CA from PEM held in memory (a Kubernetes Secret, say). `cert_source` and `key_source`
    /// name where the PEM came from in error messages. The certificate PEM may carry the chain
    /// up to the root after the signing certificate.
    pub fn from_pem(
        cert_pem: &[u8],
        cert_source: &Path,
        key_pem: &[u8],
        key_source: &Path,
        trust_domain: &str,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<CertificateAuthority, IdentityError> {
        let (cert_path, key_path) = (cert_source, key_source);
        spiffe::check_trust_domain(trust_domain).map_err(|reason| {
            IdentityError::InvalidTrustDomain {
                trust_domain: trust_domain.to_string(),
                reason,
            }
        })?;
        let certs = parse_pem_certs(cert_pem).map_err(|reason| IdentityError::Pem {
            path: cert_path.to_path_buf(),
            reason,
        })?;
        let key = parse_ca_key(key_pem, key_path)?;

        let not_ca = |reason: String| IdentityError::NotCa {
            path: cert_path.to_path_buf(),
            reason,
        };
        let signing = certs[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&signing)
            .map_err(|e| not_ca(format!("the first certificate cannot be parsed: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IdentityError::CaKeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        match parsed.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(not_ca("its basicConstraints do not say CA:true".into())),
            Err(e) => return Err(not_ca(format!("bad basicConstraints: {e}"))),
        }
        if let Ok(Some(ku)) = parsed.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(not_ca("its keyUsage does not allow keyCertSign".into()));
            }
        }
        let not_after =
            UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        if not_after <= SystemTime::now() {
            return Err(not_ca(format!("it expired at {}", rfc3339(not_after))));
        }

        let mut own_roots = Vec::new();
        let mut chain = Vec::new();
        for der in &certs {
            let (_, c) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| not_ca(format!("a chain certificate cannot be parsed: {e}")))?;
            if c.subject().as_raw() == c.issuer().as_raw() {
                own_roots.push(der.clone());
            } else {
                chain.push(der.clone());
            }
        }
        if own_roots.is_empty() && extra_roots.is_empty() {
            return Err(not_ca(
                "it is not self-signed and no root was found: append its chain up to the root to \
                 the file, or give the root as an extra root"
                    .into(),
            ));
        }
        let mut roots = own_roots.clone();
        roots.extend(extra_roots);
        let bundle = TrustBundle::new(roots, &cert_path.display().to_string())?;
        let issuer = Issuer::from_ca_cert_der(&signing, key)
            .map_err(|e| not_ca(format!("cannot sign with it: {e}")))?;
        Ok(CertificateAuthority {
            key: Arc::new(SigningKey {
                trust_domain: trust_domain.to_string(),
                issuer,
                chain,
                not_after,
            }),
            own_roots,
            bundle,
            cert_path: cert_path.to_path_buf(),
        })
    }
}

/// Generates a root and writes it into `dir` (created with mode 0700).
fn generate_root(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Write {
            path: dir.to_path_buf(),
            error: source,
        })?;
    let root = generate_root_pem(trust_domain)?;
    // Key first: a crash in between leaves a key without a certificate, which the next start
    // reports instead of silently replacing the root.
    write_atomically(&dir.join(CA_KEY_FILE), root.key_pem.as_bytes(), 0o600)?;
    write_atomically(&dir.join(CA_CERT_FILE), root.cert_pem.as_bytes(), 0o644)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    info!(dir = %dir.display(), trust_domain, "generated a new mesh root CA");
    Ok(())
}

/// A freshly generated self-signed root, as PEM.
pub struct GeneratedRoot {
    pub cert_pem: String,
    /// PKCS#8.
    pub key_pem: String,
}

/// Generates an ECDSA P-256 root (CN "mesh root CA", 10 years, CA:true, keyCertSign) in memory.
pub fn generate_root_pem(trust_domain: &str) -> Result<GeneratedRoot, IdentityError> {
    let gen_err = |e: rcgen::Error| IdentityError::Generate(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // Tells generated roots apart (logs, `inspect`, and peers report "unknown issuer" rather
    // than "bad signature" for a root they do not hold).
    dn.push(
        DnType::OrganizationalUnitName,
        format!("root-{}", hex(&rand::random::<[u8; 4]>())),
    );
    dn.push(DnType::CommonName, "mesh root CA");
    params.distinguished_name = dn;
    params.not_before = OffsetDateTime::from(floor_secs(now - CLOCK_SKEW));
    params.not_after = OffsetDateTime::from(floor_secs(now + ROOT_LIFETIME));
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok(GeneratedRoot {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let werr = |source| IdentityError::Write {
        path: path.to_path_buf(),
        error: source,
    };
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr)?;
    // The umask may have cleared bits of `mode`; it never adds any, but be exact.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    drop(f);
    fs::rename(&tmp, path).map_err(werr)
}

fn warn_if_key_file_is_open(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the CA key is readable by other users; restrict it with chmod 600"
            );
        }
    }
}

/// Reads the extra trusted roots (`--extra-roots`), if given.
pub fn read_extra_roots(
    path: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    path.map_or(Ok(Vec::new()), read_pem_certs)
}

fn parse_ca_key(bytes: &[u8], path: &Path) -> Result<KeyPair, IdentityError> {
    let key_err = |reason: String| IdentityError::CaKey {
        path: path.to_path_buf(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(bytes)
        .map_err(|e| key_err(format!("no PEM private key found ({e})")))?;
    if !matches!(key, PrivateKeyDer::Pkcs8(_)) {
        return Err(key_err(format!(
            "it is not a PKCS#8 key (\"BEGIN PRIVATE KEY\"); convert it with \
             `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pkcs8`",
            path.display()
        )));
    }
    KeyPair::try_from(&key).map_err(|e| {
        key_err(format!(
            "unsupported key ({e}); ECDSA P-256/P-384, Ed25519 and RSA are supported"
        ))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::testutil::temp_dir;
    use crate::identity::{Identity, Signer as _};

    pub(crate) fn opts(dir: &Path) -> CaOptions {
        CaOptions {
            ca_cert: None,
            ca_key: None,
            state_dir: dir.join("state"),
            trust_domain: "cluster.local".into(),
            extra_roots: None,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn generates_persists_and_reloads_the_same_root() {
        let tmp = temp_dir("ca-gen");
        let o = opts(tmp.path());
        let ca = CertificateAuthority::load_or_generate(&o).unwrap();
        assert_eq!(mode(&o.state_dir), 0o700);
        assert_eq!(mode(&o.state_dir.join(CA_KEY_FILE)), 0o600);
        assert!(o.state_dir.join(CA_CERT_FILE).exists());
        assert!(!o.state_dir.join("ca-key.pem.tmp").exists());

        let root = ca.trust_bundle().roots()[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
        assert!(parsed.is_ca());
        assert!(parsed.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(
            parsed
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "mesh root CA"
        );
        let years = (parsed.validity().not_after.timestamp()
            - parsed.validity().not_before.timestamp()) as f64
            / (365.0 * 86400.0);
        assert!((9.9..10.1).contains(&years), "{years}");

        let again = CertificateAuthority::load_or_generate(&o).unwrap();
        assert_eq!(again.root_pem(), ca.root_pem());
        assert_eq!(again.trust_bundle().roots(), ca.trust_bundle().roots());
        assert_eq!(
            fs::read_to_string(o.state_dir.join(CA_CERT_FILE)).unwrap(),
            ca.root_pem()
        );
        // A certificate of the reloaded CA chains to the first CA's root.
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let cert = again.sign(&id, Duration::from_secs(60)).await.unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.cert_chain[0]).unwrap();
        leaf.verify_signature(Some(parsed.public_key())).unwrap();
    }

    #[test]
    fn half_present_state_is_reported_not_replaced() {
        let tmp = temp_dir("ca-half");
        let o = opts(tmp.path());
        CertificateAuthority::load_or_generate(&o).unwrap();
        fs::remove_file(o.state_dir.join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(
            matches!(err, IdentityError::CaStateIncomplete { missing, .. } if missing == CA_KEY_FILE),
            "{err}"
        );
    }

    #[tokio::test]
    async fn explicit_ca_files_load_and_must_match() {
        let tmp = temp_dir("ca-explicit");
        // Two generated roots serve as "operator-provided" files.
        let a = CertificateAuthority::load_or_generate(&opts(&tmp.path().join("a"))).unwrap();
        let b_opts = opts(&tmp.path().join("b"));
        CertificateAuthority::load_or_generate(&b_opts).unwrap();
        let a_dir = tmp.path().join("a/state");
        let b_dir = b_opts.state_dir;

        let mut o = opts(&tmp.path().join("unused"));
        o.ca_cert = Some(a_dir.join(CA_CERT_FILE));
        o.ca_key = Some(a_dir.join(CA_KEY_FILE));
        let loaded = CertificateAuthority::load_or_generate(&o).unwrap();
        assert_eq!(loaded.root_pem(), a.root_pem());
        assert!(
            !o.state_dir.exists(),
            "explicit files must not touch the state dir"
        );

        o.ca_key = Some(b_dir.join(CA_KEY_FILE));
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IdentityError::CaKeyMismatch { .. }), "{msg}");
        assert!(
            msg.contains(&a_dir.join(CA_CERT_FILE).display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&b_dir.join(CA_KEY_FILE).display().to_string()),
            "{msg}"
        );

        o.ca_key = None;
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(err.to_string().contains("must be given together"), "{err}");

        o.ca_key = Some(tmp.path().join("missing.pem"));
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(matches!(err, IdentityError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        // A leaf certificate is not a CA.
        let leaf = a
            .sign(
                &Identity::new("cluster.local", "x", "y"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let leaf_cert = tmp.path().join("leaf.pem");
        let leaf_key = tmp.path().join("leaf-key.pem");
        fs::write(&leaf_cert, leaf.chain_pem()).unwrap();
        let key_pem = {
            let kp = KeyPair::try_from(&leaf.key).unwrap();
            kp.serialize_pem()
        };
        fs::write(&leaf_key, key_pem).unwrap();
        o.ca_cert = Some(leaf_cert);
        o.ca_key = Some(leaf_key);
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(err.to_string().contains("CA:true"), "{err}");
    }

    /// An intermediate CA certificate signed by `root`, and its key.
    fn intermediate(root: &CertificateAuthority) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.use_authority_key_identifier_extension = true;
        (params.signed_by(&key, &root.key.issuer).unwrap(), key)
    }

    #[test]
    fn intermediate_with_a_mounted_cacerts_root_file() {
        // Istio's cacerts layout: cert-chain.pem holds only the intermediate, root-cert.pem the
        // root, side by side (a mounted Secret).
        let tmp = temp_dir("ca-cacerts");
        let root = CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap();
        let (inter, key) = intermediate(&root);
        let dir = tmp.path().join("cacerts");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cert-chain.pem"), inter.pem()).unwrap();
        fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
        let mut o = opts(tmp.path());
        o.ca_cert = Some(dir.join("cert-chain.pem"));
        o.ca_key = Some(dir.join("ca-key.pem"));
        let e = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(e.to_string().contains("no root was found"), "{e}");
        fs::write(dir.join("root-cert.pem"), root.root_pem()).unwrap();
        let ca = CertificateAuthority::load_or_generate(&o).unwrap();
        assert_eq!(ca.trust_bundle().roots().len(), 1);
        assert_eq!(ca.trust_bundle().to_pem(), root.root_pem());
    }

    #[tokio::test]
    async fn intermediate_ca_with_chain_file() {
        let tmp = temp_dir("ca-inter");
        let root = CertificateAuthority::load_or_generate(&opts(tmp.path())).unwrap();
        // An intermediate signed by the root, written as "intermediate, root".
        let (inter, key) = intermediate(&root);
        let cert_file = tmp.path().join("chain.pem");
        let key_file = tmp.path().join("inter-key.pem");
        fs::write(&cert_file, format!("{}{}", inter.pem(), root.root_pem())).unwrap();
        fs::write(&key_file, key.serialize_pem()).unwrap();
        let mut o = opts(tmp.path());
        o.ca_cert = Some(cert_file);
        o.ca_key = Some(key_file);
        let ca = CertificateAuthority::load_or_generate(&o).unwrap();
        assert_eq!(ca.root_pem(), root.root_pem());
        let cert = ca
            .sign(
                &Identity::new("cluster.local", "a", "b"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(cert.cert_chain.len(), 2, "leaf and intermediate");
        assert_eq!(cert.cert_chain[1], *inter.der());
    }

    #[test]
    fn extra_roots_are_trusted() {
        let tmp = temp_dir("ca-extra");
        let other = CertificateAuthority::load_or_generate(&opts(&tmp.path().join("old"))).unwrap();
        let bundle_file = tmp.path().join("extra.pem");
        fs::write(&bundle_file, other.root_pem()).unwrap();
        let mut o = opts(tmp.path());
        o.extra_roots = Some(bundle_file.clone());
        let ca = CertificateAuthority::load_or_generate(&o).unwrap();
        let bundle = ca.trust_bundle();
        assert_eq!(bundle.roots().len(), 2);
        assert!(bundle.roots().contains(&other.trust_bundle().roots()[0]));
        assert_eq!(bundle.root_store().len(), 2);
        // The bundle round-trips through PEM.
        let again = TrustBundle::from_pem(&bundle.to_pem(), "test").unwrap();
        assert_eq!(again.roots(), bundle.roots());

        fs::write(&bundle_file, "not pem").unwrap();
        let err = CertificateAuthority::load_or_generate(&o).unwrap_err();
        assert!(
            err.to_string().contains("no PEM CERTIFICATE block"),
            "{err}"
        );
        assert!(err.to_string().contains("extra.pem"), "{err}");
    }
}
