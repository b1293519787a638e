use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::IdentityError;

const SCHEME: &str = "spiffe://";

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// Builds an identity from its parts without checking them (use [`Identity::parse`] for
    /// untrusted input).
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Identity {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. The trust domain
    /// must be lower case (letters, digits, `.`, `-`, `_`); namespace and service account may use
    /// letters, digits, `.`, `-` and `_`. Ports, user info, queries and fragments are rejected.
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let bad = |reason: &str| IdentityError::InvalidIdentity {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it does not start with spiffe://"))?;
        if rest.contains('?') || rest.contains('#') {
            return Err(bad("a query or fragment is not allowed"));
        }
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(trust_domain).map_err(|r| bad(&r))?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(bad("the path must be /ns/<namespace>/sa/<service account>"));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(bad("the path must be /ns/<namespace>/sa/<service account>"));
        }
        check_segment("namespace", namespace).map_err(|r| bad(&r))?;
        check_segment("service account", service_account).map_err(|r| bad(&r))?;
        Ok(Identity::new(trust_domain, namespace, service_account))
    }

    /// The identity as Istio's `AuthorizationPolicy` principals compare it: without `spiffe://`,
    /// e.g. `cluster.local/ns/default/sa/sleep`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Identity, IdentityError> {
        Identity::parse(s)
    }
}

pub(crate) fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.contains(':') {
        return Err("the trust domain must not carry a port".into());
    }
    if td.contains('@') {
        return Err("the trust domain must not carry user info".into());
    }
    if td.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("the trust domain {td:?} must be lower case"));
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "the trust domain {td:?} contains {c:?}; only a-z, 0-9, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

fn check_segment(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if value == "." || value == ".." {
        return Err(format!("the {what} must not be {value:?}"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "the {what} {value:?} contains {c:?}; only letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

/// All URI SANs of a DER certificate.
pub(crate) fn uri_sans(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadPeerCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadPeerCertificate(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE identity in the leaf (first) certificate a peer presented, as rustls reports it
/// with `peer_certificates()`. The error says what is wrong: no certificate, no URI SAN, a URI
/// that is not a SPIFFE identity, or several URI SANs.
///
/// This does not verify the chain: call it on a connection whose handshake verified it.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    let mut uris = uri_sans(leaf)?;
    match uris.len() {
        0 => Err(IdentityError::NoUriSan),
        1 => {
            let uri = uris.pop().expect("one URI SAN");
            Identity::parse(&uri).map_err(|e| match e {
                IdentityError::InvalidIdentity { uri, reason } => {
                    IdentityError::NotSpiffe { uri, reason }
                }
                other => other,
            })
        }
        _ => Err(IdentityError::SeveralUriSans { uris }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_principal_round_trip() {
        let uri = "spiffe://cluster.local/ns/default/sa/sleep";
        let id = Identity::parse(uri).unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "sleep"));
        assert_eq!(id.to_string(), uri);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
        let id2: Identity = "spiffe://td_1.example-x/ns/kube-system/sa/my.sa_1"
            .parse()
            .unwrap();
        assert_eq!(id2.namespace, "kube-system");
        assert_eq!(id2.service_account, "my.sa_1");
    }

    #[test]
    fn bad_uris_are_rejected_with_a_reason() {
        let cases = [
            ("cluster.local/ns/a/sa/b", "does not start with spiffe://"),
            (
                "https://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "must be lower case"),
            (
                "spiffe://cluster.local:443/ns/a/sa/b",
                "must not carry a port",
            ),
            ("spiffe://u@cluster.local/ns/a/sa/b", "user info"),
            (
                "spiffe://cluster.local",
                "/ns/<namespace>/sa/<service account>",
            ),
            (
                "spiffe://cluster.local/",
                "/ns/<namespace>/sa/<service account>",
            ),
            (
                "spiffe://cluster.local/ns/a",
                "/ns/<namespace>/sa/<service account>",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/c",
                "/ns/<namespace>/sa/<service account>",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/",
                "/ns/<namespace>/sa/<service account>",
            ),
            (
                "spiffe://cluster.local/ns/a/xx/b",
                "/ns/<namespace>/sa/<service account>",
            ),
            ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "service account is empty",
            ),
            ("spiffe://cluster.local/ns/../sa/b", "must not be \"..\""),
            ("spiffe://cluster.local/ns/a b/sa/b", "contains ' '"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query or fragment"),
            ("spiffe://cluster.local/ns/a/sa/b#f", "query or fragment"),
            ("spiffe://clu$ter/ns/a/sa/b", "contains '$'"),
        ];
        for (uri, want) in cases {
            let err = Identity::parse(uri).expect_err(uri).to_string();
            assert!(err.contains(want), "{uri}: {err:?} should mention {want:?}");
            assert!(err.contains(uri), "{uri}: {err:?} should quote the input");
        }
    }

    #[test]
    fn peer_identity_without_certificate() {
        let err = peer_identity(None).unwrap_err();
        assert!(matches!(err, IdentityError::NoPeerCertificate), "{err}");
        let err = peer_identity(Some(&[])).unwrap_err();
        assert!(matches!(err, IdentityError::NoPeerCertificate), "{err}");
        let err = peer_identity(Some(&[CertificateDer::from(vec![1u8, 2, 3])])).unwrap_err();
        assert!(matches!(err, IdentityError::BadPeerCertificate(_)), "{err}");
    }

    fn self_signed_with_sans(sans: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn peer_identity_names_what_is_wrong() {
        let dns = self_signed_with_sans(vec![rcgen::SanType::DnsName(
            "example.com".try_into().unwrap(),
        )]);
        let err = peer_identity(Some(&[dns])).unwrap_err();
        assert!(matches!(err, IdentityError::NoUriSan), "{err}");

        let none = self_signed_with_sans(vec![]);
        let err = peer_identity(Some(&[none])).unwrap_err();
        assert!(matches!(err, IdentityError::NoUriSan), "{err}");

        let https = self_signed_with_sans(vec![uri("https://example.com/x")]);
        let err = peer_identity(Some(&[https])).unwrap_err();
        assert!(matches!(err, IdentityError::NotSpiffe { .. }), "{err}");
        assert!(err.to_string().contains("https://example.com/x"), "{err}");

        let two = self_signed_with_sans(vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/a/sa/c"),
        ]);
        let err = peer_identity(Some(&[two])).unwrap_err();
        assert!(matches!(err, IdentityError::SeveralUriSans { .. }), "{err}");
        assert!(err.to_string().contains("2 URI SANs"), "{err}");

        let good = self_signed_with_sans(vec![
            rcgen::SanType::DnsName("x.example".try_into().unwrap()),
            uri("spiffe://cluster.local/ns/a/sa/b"),
        ]);
        assert_eq!(
            peer_identity(Some(&[good])).unwrap(),
            Identity::new("cluster.local", "a", "b")
        );
    }
}
