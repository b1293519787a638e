//! PeerAuthentication precedence: selector > namespace > mesh, UNSET inherits, port overrides.
use super::{pa, policy_set, workload};
use crate::model::Workload;
use crate::policy::{MtlsMode, PolicySet, Warning};

use MtlsMode::{Permissive, Strict};

fn httpbin() -> Workload {
    workload("foo", "httpbin", &[("app", "httpbin")])
}

const WORKLOAD_SELECTOR: &str = "selector: {matchLabels: {app: httpbin}}";

/// A selector policy for httpbin with the given extra spec fields.
fn for_httpbin(name: &str, fields: &str) -> String {
    pa("foo", name, &format!("{{{WORKLOAD_SELECTOR}, {fields}}}"))
}

fn mode_of(yaml: &str, port: u16) -> (MtlsMode, Option<String>) {
    let (set, _) = policy_set(yaml);
    let effective = set.effective_mtls(&httpbin(), port);
    assert_eq!(set.mtls_mode(&httpbin(), port), effective.mode);
    (effective.mode, effective.policy)
}

#[test]
fn precedence_table() {
    let mesh_strict = pa("istio-system", "mesh", "{mtls: {mode: STRICT}}");
    let mesh_permissive = pa("istio-system", "mesh", "{mtls: {mode: PERMISSIVE}}");
    let ns_strict = pa("foo", "ns", "{mtls: {mode: STRICT}}");
    let ns_permissive = pa("foo", "ns", "{mtls: {mode: PERMISSIVE}}");
    let ns_unset = pa("foo", "ns", "{mtls: {mode: UNSET}}");
    let cases: Vec<(&str, String, u16, MtlsMode, Option<&str>)> = vec![
        ("no policy: PERMISSIVE", String::new(), 80, Permissive, None),
        (
            "mesh STRICT",
            mesh_strict.clone(),
            80,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "namespace beats mesh",
            mesh_strict.clone() + &ns_permissive,
            80,
            Permissive,
            Some("foo/ns"),
        ),
        (
            "namespace UNSET inherits mesh",
            mesh_strict.clone() + &ns_unset,
            80,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "workload beats namespace",
            ns_permissive.clone() + &for_httpbin("wl", "mtls: {mode: STRICT}"),
            80,
            Strict,
            Some("foo/wl"),
        ),
        (
            "workload UNSET inherits namespace",
            ns_strict.clone() + &for_httpbin("wl", "mtls: {}"),
            80,
            Strict,
            Some("foo/ns"),
        ),
        (
            "port level beats workload",
            for_httpbin(
                "wl",
                "mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: PERMISSIVE}}",
            ),
            8080,
            Permissive,
            Some("foo/wl"),
        ),
        (
            "port level applies to its port only",
            for_httpbin(
                "wl",
                "mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}",
            ),
            8081,
            Strict,
            Some("foo/wl"),
        ),
        (
            "port level UNSET inherits the workload",
            mesh_permissive.clone()
                + &for_httpbin(
                    "wl",
                    "mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: UNSET}}",
                ),
            8080,
            Strict,
            Some("foo/wl"),
        ),
        (
            "port level under UNSET workload, STRICT namespace",
            ns_strict.clone() + &for_httpbin("wl", "portLevelMtls: {8080: {mode: PERMISSIVE}}"),
            8080,
            Permissive,
            Some("foo/wl"),
        ),
        (
            "port level STRICT under PERMISSIVE namespace",
            ns_permissive.clone() + &for_httpbin("wl", "portLevelMtls: {9000: {mode: STRICT}}"),
            9000,
            Strict,
            Some("foo/wl"),
        ),
        (
            "other namespace ignored",
            pa("bar", "ns", "{mtls: {mode: STRICT}}"),
            80,
            Permissive,
            None,
        ),
        (
            "selector of another workload ignored",
            pa(
                "foo",
                "other",
                "{selector: {matchLabels: {app: other}}, mtls: {mode: STRICT}}",
            ),
            80,
            Permissive,
            None,
        ),
        (
            "root-namespace selector ignored",
            pa(
                "istio-system",
                "sel",
                "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}",
            ),
            80,
            Permissive,
            None,
        ),
        (
            "first mesh policy wins",
            mesh_permissive.clone() + &pa("istio-system", "mesh-2", "{mtls: {mode: STRICT}}"),
            80,
            Permissive,
            Some("istio-system/mesh"),
        ),
        (
            "first namespace policy wins",
            ns_strict.clone() + &pa("foo", "ns-2", "{mtls: {mode: PERMISSIVE}}"),
            80,
            Strict,
            Some("foo/ns"),
        ),
        (
            "first selector policy wins",
            for_httpbin("wl-1", "mtls: {mode: PERMISSIVE}")
                + &for_httpbin("wl-2", "mtls: {mode: STRICT}"),
            80,
            Permissive,
            Some("foo/wl-1"),
        ),
        (
            "DISABLE reads as PERMISSIVE",
            mesh_strict.clone() + &for_httpbin("wl", "mtls: {mode: DISABLE}"),
            80,
            Permissive,
            Some("foo/wl"),
        ),
    ];
    for (name, yaml, port, mode, policy) in cases {
        let expected = (mode, policy.map(str::to_string));
        assert_eq!(mode_of(&yaml, port), expected, "{name}");
    }
}

fn warnings(yaml: &str) -> Vec<String> {
    let (_, warnings) = policy_set(yaml);
    warnings.iter().map(Warning::to_string).collect()
}

#[test]
fn disable_is_reported() {
    let yaml = for_httpbin(
        "wl",
        "mtls: {mode: DISABLE}, portLevelMtls: {8080: {mode: DISABLE}}",
    );
    assert_eq!(
        warnings(&yaml),
        [
            "PeerAuthentication foo/wl: mtls.mode DISABLE is not supported in ambient mode; \
             treated as PERMISSIVE",
            "PeerAuthentication foo/wl: portLevelMtls[8080].mode DISABLE is not supported in \
             ambient mode; treated as PERMISSIVE",
        ]
    );
}

#[test]
fn conflicts_are_reported() {
    let mesh = pa("istio-system", "a", "{mtls: {mode: STRICT}}")
        + &pa("istio-system", "b", "{mtls: {mode: PERMISSIVE}}");
    assert_eq!(
        warnings(&mesh),
        [
            "PeerAuthentication istio-system/b: ignored: istio-system/a has the same scope and \
          comes first (Istio keeps the oldest)"
        ]
    );
    let selectors = for_httpbin("a", "mtls: {mode: STRICT}")
        + &pa(
            "foo",
            "b",
            "{selector: {matchLabels: {version: v1}}, mtls: {mode: PERMISSIVE}}",
        )
        + &pa(
            "foo",
            "c",
            "{selector: {matchLabels: {app: other, version: v2}}, mtls: {}}",
        );
    assert_eq!(
        warnings(&selectors),
        [
            "PeerAuthentication foo/b: may select the same workloads as foo/a, which comes first \
          and wins where both apply"
        ]
    );
    let separate = pa("foo", "a", "{mtls: {mode: STRICT}}") + &pa("bar", "b", "{mtls: {}}");
    assert!(warnings(&separate).is_empty());
}

#[test]
fn root_namespace_selector_is_reported() {
    let yaml = pa(
        "istio-system",
        "sel",
        "{selector: {matchLabels: {app: x}}, mtls: {mode: STRICT}}",
    );
    let (set, warnings) = policy_set(&yaml);
    assert!(set.peer_authentications().is_empty());
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].message.contains("root namespace"),
        "{}",
        warnings[0]
    );
}

#[test]
fn custom_root_namespace() {
    let documents =
        crate::model::policy::parse_documents(&pa("mesh-root", "mesh", "{mtls: {mode: STRICT}}"))
            .unwrap();
    let (set, _) = PolicySet::new(&documents, "mesh-root");
    assert_eq!(set.mtls_mode(&httpbin(), 80), Strict);
    let (set, _) = PolicySet::new(&documents, "istio-system");
    assert_eq!(set.mtls_mode(&httpbin(), 80), Permissive);
}
