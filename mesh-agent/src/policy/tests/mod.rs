//! Unit tests of the policy module: parsing, mTLS precedence, the evaluation table and the L7
//! table (requests with HTTP attributes).
mod bound;
mod evaluate;
mod l7;
mod mtls;
mod parse;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use super::{PolicySet, Warning};
use crate::model::policy::parse_documents;
use crate::model::Workload;

/// A workload of `namespace` with `labels`, at 10.2.0.10.
fn workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: "default".to_string(),
        node: "node-a".to_string(),
        ips: vec![ip("10.2.0.10")],
        netns: Some(PathBuf::from("/var/run/netns/test")),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        enrolled: true,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Parses and builds with the default root namespace; panics on a parse error.
fn policy_set(yaml: &str) -> (PolicySet, Vec<Warning>) {
    let documents = parse_documents(yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"));
    PolicySet::new(&documents, crate::model::DEFAULT_ROOT_NAMESPACE)
}

/// An AuthorizationPolicy document; `spec` in YAML flow style.
fn ap(namespace: &str, name: &str, spec: &str) -> String {
    document("AuthorizationPolicy", namespace, name, spec)
}

/// A PeerAuthentication document; `spec` in YAML flow style.
fn pa(namespace: &str, name: &str, spec: &str) -> String {
    document("PeerAuthentication", namespace, name, spec)
}

fn document(kind: &str, namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
    )
}
