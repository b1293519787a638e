use std::path::PathBuf;

/// What went wrong with an identity, the CA, a certificate or a peer's certificate. The messages
/// are meant for operators: they name the file, the identity or the field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("invalid SPIFFE identity {uri:?}: {reason} (expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
    InvalidIdentity { uri: String, reason: String },

    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        trust_domain: String,
        reason: String,
    },

    #[error("--ca-cert and --ca-key must be given together, but only {given} ({path}) was given")]
    CaFilesIncomplete { given: &'static str, path: PathBuf },

    #[error("the CA state directory {dir} holds {present} but not {missing}; restore the missing file, or remove {present} to generate a new root (workloads that trust the old root will then reject the new certificates)")]
    CaStateIncomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },

    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },

    #[error("CA key {key} does not belong to CA certificate {cert}: their public keys differ")]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },

    #[error("{path} cannot be used as the mesh CA: {reason}")]
    NotCa { path: PathBuf, reason: String },

    #[error("CA key {path} cannot be used: {reason}")]
    CaKey { path: PathBuf, reason: String },

    #[error("generating the mesh root CA failed: {0}")]
    Generate(String),

    #[error("the CA for trust domain {trust_domain:?} refuses to sign {identity}: it belongs to another trust domain")]
    WrongTrustDomain {
        identity: String,
        trust_domain: String,
    },

    #[error("signing a certificate for {identity} failed: {reason}")]
    Sign { identity: String, reason: String },

    #[error("the trust bundle is empty: at least one root certificate is needed")]
    EmptyTrustBundle,

    #[error("trust bundle {source_name}: root certificate #{index} is not usable as a trust anchor: {reason}")]
    BadRoot {
        source_name: String,
        index: usize,
        reason: String,
    },

    #[error("the peer presented no certificate")]
    NoPeerCertificate,

    #[error("the peer certificate cannot be parsed: {0}")]
    BadPeerCertificate(String),

    #[error("the peer certificate has no URI SAN, so it carries no SPIFFE identity")]
    NoUriSan,

    #[error("the peer certificate's URI SAN {uri:?} is not a SPIFFE identity: {reason}")]
    NotSpiffe { uri: String, reason: String },

    #[error("the peer certificate has {} URI SANs ({}); a SPIFFE certificate has exactly one", .uris.len(), .uris.join(", "))]
    SeveralUriSans { uris: Vec<String> },

    #[error("peer identity {peer} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain { peer: String, trust_domain: String },

    #[error("server identity {peer} is not the expected {}", expected_list(.expected))]
    UnexpectedPeer { peer: String, expected: Vec<String> },

    #[error(
        "certificates can only be managed inside a tokio runtime (renewal runs as a tokio task)"
    )]
    NoRuntime,
}

fn expected_list(expected: &[String]) -> String {
    match expected {
        [] => "(no identity is expected)".to_string(),
        [one] => one.clone(),
        many => format!("one of {}", many.join(", ")),
    }
}
