//! Reading documents: what is accepted, and errors that name what is wrong.
use super::{ap, pa, policy_set};
use crate::model::policy::{parse_documents, Cidr, PolicyDocument, Port, StringMatch};
use crate::model::policy::{Action, ConditionTest, MtlsModeSetting, PeerAuthentication, Values};

fn error_of(yaml: &str) -> String {
    match parse_documents(yaml) {
        Ok(docs) => panic!("accepted: {docs:?}\n---\n{yaml}"),
        Err(e) => e,
    }
}

fn assert_error(yaml: &str, expected: &[&str]) {
    let error = error_of(yaml);
    for part in expected {
        assert!(error.contains(part), "error {error:?} lacks {part:?}");
    }
}

fn only_document(yaml: &str) -> PolicyDocument {
    let mut docs = parse_documents(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn peer_authentication(yaml: &str) -> PeerAuthentication {
    match only_document(yaml) {
        PolicyDocument::PeerAuthentication(d) => d,
        other => panic!("not a PeerAuthentication: {other:?}"),
    }
}

#[test]
fn full_documents_in_block_style() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
  labels: {team: a}
  annotations: {note: b}
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
        notNamespaces: ["prod-*"]
        ipBlocks: ["10.0.0.0/8", "fd00::/64", "192.168.1.1"]
    to:
    - operation:
        ports: ["8080", 9090]
    when:
    - key: destination.port
      notValues: ["22"]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
spec:
  mtls:
    mode: STRICT
"#;
    let docs = parse_documents(yaml).unwrap();
    assert_eq!(docs.len(), 2);
    let PolicyDocument::AuthorizationPolicy(policy) = &docs[0] else {
        panic!("{:?}", docs[0]);
    };
    assert_eq!(policy.metadata.key(), "foo/httpbin");
    assert_eq!(policy.spec.action, Action::Deny);
    let rule = &policy.spec.rules[0];
    let source = &rule.from[0].source;
    assert_eq!(
        source.not_namespaces,
        [StringMatch::Prefix("prod-".to_string())]
    );
    assert_eq!(source.ip_blocks[2], Cidr::parse("192.168.1.1/32").unwrap());
    assert_eq!(rule.to[0].operation.ports, [Port(8080), Port(9090)]);
    assert_eq!(
        rule.when[0].test,
        ConditionTest::DestinationPort(Values {
            values: vec![],
            not_values: vec![Port(22)]
        })
    );
    assert_eq!(docs[1].metadata().key(), "default/default");
    assert_eq!(docs[1].kind(), "PeerAuthentication");
}

#[test]
fn defaults() {
    let policy = only_document(&ap("foo", "x", "{}"));
    let PolicyDocument::AuthorizationPolicy(policy) = policy else {
        panic!()
    };
    assert_eq!(policy.spec.action, Action::Allow);
    assert!(policy.spec.rules.is_empty());
    let no_spec =
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n";
    let pa = peer_authentication(no_spec);
    assert_eq!(pa.spec.mtls.mode, MtlsModeSetting::Unset);
    assert_eq!(pa.metadata.namespace, "default");
}

#[test]
fn multi_document_yaml_skips_empty_documents() {
    let yaml = format!(
        "---\n{}---\n---\n{}",
        ap("foo", "a", "{}"),
        ap("foo", "b", "{}")
    );
    let names: Vec<String> = parse_documents(&yaml)
        .unwrap()
        .iter()
        .map(|d| d.metadata().key())
        .collect();
    assert_eq!(names, ["foo/a", "foo/b"]);
    assert!(parse_documents("").unwrap().is_empty());
}

#[test]
fn errors_name_the_document_and_line() {
    let yaml = ap("foo", "a", "{}") + &ap("foo", "b", "{action: AUDIT}");
    assert_error(&yaml, &["document 2", "spec.action", "AUDIT", "line"]);
}

#[test]
fn ports_as_strings_or_numbers() {
    let yaml = pa(
        "foo",
        "x",
        "{selector: {matchLabels: {a: b}}, portLevelMtls: {'8080': {mode: STRICT}, 9090: {mode: PERMISSIVE}}}",
    );
    let ports: Vec<Port> = peer_authentication(&yaml)
        .spec
        .port_level_mtls
        .into_keys()
        .collect();
    assert_eq!(ports, [Port(8080), Port(9090)]);
}

#[test]
fn invalid_values_are_named() {
    let op = |operation: &str| {
        ap(
            "foo",
            "x",
            &format!("{{rules: [{{to: [{{operation: {operation}}}]}}]}}"),
        )
    };
    let src = |source: &str| {
        ap(
            "foo",
            "x",
            &format!("{{rules: [{{from: [{{source: {source}}}]}}]}}"),
        )
    };
    let when = |condition: &str| ap("foo", "x", &format!("{{rules: [{{when: [{condition}]}}]}}"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            op("{ports: [http]}"),
            vec!["ports[0]", "invalid port \"http\""],
        ),
        (op("{notPorts: ['70000']}"), vec!["notPorts[0]", "70000"]),
        (op("{ports: [0]}"), vec!["ports[0]", "invalid port 0"]),
        (op("{ports: [-1]}"), vec!["ports[0]", "-1"]),
        (
            src("{ipBlocks: [10.0.0.0/33]}"),
            vec!["ipBlocks[0]", "10.0.0.0/33"],
        ),
        (
            src("{notIpBlocks: [not-an-ip]}"),
            vec!["notIpBlocks[0]", "not-an-ip"],
        ),
        (src("{principals: ['a*b']}"), vec!["principals[0]", "a*b"]),
        (src("{namespaces: ['']}"), vec!["namespaces[0]", "empty"]),
        (src("{}"), vec!["source", "must not be empty"]),
        (op("{}"), vec!["operation", "must not be empty"]),
        (when("{key: source.ip}"), vec!["source.ip", "values"]),
        (
            when("{key: destination.port, values: [ssh]}"),
            vec!["destination.port", "ssh"],
        ),
        (
            when("{key: source.ip, notValues: [nope]}"),
            vec!["source.ip", "nope"],
        ),
        (
            when("{key: custom.thing, values: [x]}"),
            vec!["custom.thing"],
        ),
        (
            ap("foo", "x", "{action: CUSTOM}"),
            vec!["CUSTOM", "not supported"],
        ),
        (
            ap("foo", "x", "{action: AUDIT}"),
            vec!["AUDIT", "not supported"],
        ),
        (
            ap("foo", "x", "{action: allow}"),
            vec!["unknown action \"allow\""],
        ),
        (
            pa("foo", "x", "{mtls: {mode: strict}}"),
            vec!["mode", "strict"],
        ),
        (
            pa("foo", "x", "{portLevelMtls: {8080: {mode: STRICT}}}"),
            vec!["portLevelMtls", "selector"],
        ),
        (
            pa(
                "foo",
                "x",
                "{selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
            ),
            vec!["portLevelMtls", "http"],
        ),
    ];
    for (yaml, expected) in cases {
        assert_error(&yaml, &expected);
    }
}

#[test]
fn unknown_fields_are_named() {
    let header = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{header}metadata: {{name: x}}\nstatus: {{}}\n"),
            "status",
        ),
        (format!("{header}metadata: {{name: x, uid: '1'}}\n"), "uid"),
        (ap("foo", "x", "{provider: {name: ext}}"), "provider"),
        (
            ap("foo", "x", "{selector: {matchExpressions: []}}"),
            "matchExpressions",
        ),
        (ap("foo", "x", "{rules: [{froms: []}]}"), "froms"),
        (
            ap("foo", "x", "{rules: [{from: [{sources: {}}]}]}"),
            "sources",
        ),
        (
            ap(
                "foo",
                "x",
                "{rules: [{from: [{source: {principal: [a]}}]}]}",
            ),
            "principal",
        ),
        (
            ap(
                "foo",
                "x",
                "{rules: [{from: [{source: {serviceAccounts: [a]}}]}]}",
            ),
            "serviceAccounts",
        ),
        (
            ap("foo", "x", "{rules: [{to: [{operation: {port: ['1']}}]}]}"),
            "port",
        ),
        (
            ap(
                "foo",
                "x",
                "{rules: [{when: [{key: source.ip, value: [x]}]}]}",
            ),
            "value",
        ),
        (
            pa("foo", "x", "{mtls: {mode: STRICT, strict: true}}"),
            "strict",
        ),
        (
            pa(
                "foo",
                "x",
                "{selector: {matchLabels: {a: b}}, portLevelMtls: {1: {mod: STRICT}}}",
            ),
            "mod",
        ),
        (
            pa(
                "foo",
                "x",
                "{selector: {matchLabels: {a: b}}, mtlsMode: STRICT}",
            ),
            "mtlsMode",
        ),
    ];
    for (yaml, field) in cases {
        assert_error(&yaml, &["unknown field", &format!("`{field}`")]);
    }
}

#[test]
fn unknown_kinds_and_versions_are_named() {
    let document =
        |api: &str, kind: &str| format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\n");
    assert_error(
        &document("security.istio.io/v1", "RequestAuthentication"),
        &["unsupported kind \"RequestAuthentication\""],
    );
    assert_error(
        &document("security.istio.io/v2", "AuthorizationPolicy"),
        &["unsupported apiVersion \"security.istio.io/v2\""],
    );
    assert_error(
        &document("networking.istio.io/v1", "PeerAuthentication"),
        &["networking.istio.io/v1"],
    );
    assert_error(
        "kind: PeerAuthentication\nmetadata: {name: x}\n",
        &["apiVersion"],
    );
    assert_error(
        "apiVersion: security.istio.io/v1\nmetadata: {name: x}\n",
        &["kind"],
    );
    assert_error(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n",
        &["metadata"],
    );
}

#[test]
fn spec_before_kind() {
    let good = "spec: {action: DENY}\nmetadata: {name: x}\nkind: AuthorizationPolicy\n\
                apiVersion: security.istio.io/v1\n";
    let PolicyDocument::AuthorizationPolicy(policy) = only_document(good) else {
        panic!()
    };
    assert_eq!(policy.spec.action, Action::Deny);
    let bad = "spec: {rules: [{to: [{operation: {portz: ['1']}}]}]}\nkind: AuthorizationPolicy\n\
               metadata: {name: x}\napiVersion: security.istio.io/v1\n";
    assert_error(bad, &["spec", "`portz`"]);
}

#[test]
fn embedded_in_a_config_struct() {
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[allow(dead_code)]
        policies: Vec<PolicyDocument>,
    }
    let yaml = "policies:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  \
                metadata: {name: a}\n- apiVersion: security.istio.io/v1\n  kind: \
                AuthorizationPolicy\n  metadata: {name: b}\n  spec:\n    rules:\n    - to:\n      \
                - operation: {ports: [web]}\n";
    let error = serde_yaml_ng::from_str::<Config>(yaml)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("policies[1].spec.rules[0].to[0].operation.ports[0]: invalid port"),
        "{error}"
    );
    assert!(error.contains("line 11"), "{error}");
}

#[test]
fn l7_fields_are_detected() {
    let cases: Vec<(&str, &str)> = vec![
        ("{to: [{operation: {methods: [GET]}}]}", "methods"),
        ("{to: [{operation: {notMethods: [POST]}}]}", "notMethods"),
        ("{to: [{operation: {paths: [/a]}}]}", "paths"),
        ("{to: [{operation: {notPaths: [/b]}}]}", "notPaths"),
        ("{to: [{operation: {hosts: [a.com]}}]}", "hosts"),
        ("{to: [{operation: {notHosts: [b.com]}}]}", "notHosts"),
        (
            "{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}",
            "remoteIpBlocks",
        ),
        (
            "{from: [{source: {notRemoteIpBlocks: [1.2.3.4]}}]}",
            "notRemoteIpBlocks",
        ),
        (
            "{when: [{key: 'request.headers[x-user]', values: [a]}]}",
            "request.headers[x-user]",
        ),
        ("{when: [{key: remote.ip, values: [1.2.3.4]}]}", "remote.ip"),
        (
            "{when: [{key: connection.sni, values: [a.com]}]}",
            "connection.sni",
        ),
    ];
    for (rule, field) in cases {
        let (set, warnings) = policy_set(&ap("foo", "x", &format!("{{rules: [{rule}]}}")));
        let policy = &set.authorization_policies()[0];
        assert_eq!(policy.l7_fields, [field], "{rule}");
        assert_eq!(warnings.len(), 1, "{rule}");
        let warning = warnings[0].to_string();
        assert!(
            warning.starts_with("AuthorizationPolicy foo/x: uses L7 fields")
                && warning.contains(field),
            "{warning}"
        );
    }
}

#[test]
fn l7_fields_are_listed_once_in_order() {
    let rules = "[{to: [{operation: {methods: [GET], paths: [/a]}}]}, \
                 {to: [{operation: {methods: [PUT], ports: ['1']}}]}]";
    let (set, _) = policy_set(&ap("foo", "x", &format!("{{rules: {rules}}}")));
    assert_eq!(
        set.authorization_policies()[0].l7_fields,
        ["methods", "paths"]
    );
}

#[test]
fn l4_policies_have_no_warning() {
    let rule = "{from: [{source: {principals: [a], ipBlocks: [10.0.0.0/8]}}], \
                to: [{operation: {ports: ['80']}}], when: [{key: source.namespace, values: [a]}]}";
    let (set, warnings) = policy_set(&ap("foo", "x", &format!("{{rules: [{rule}]}}")));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!set.authorization_policies()[0].is_l7());
}

#[test]
fn other_warnings() {
    let (_, warnings) = policy_set(&ap("foo", "x", "{action: DENY}"));
    assert_eq!(
        warnings[0].to_string(),
        "AuthorizationPolicy foo/x: a DENY policy without rules never denies anything"
    );
    let (_, warnings) = policy_set(&(ap("foo", "x", "{}") + &ap("foo", "x", "{rules: [{}]}")));
    assert_eq!(
        warnings[0].to_string(),
        "AuthorizationPolicy foo/x: defined more than once; every copy is in force"
    );
}

#[test]
fn principals_are_normalised() {
    let rule = "{from: [{source: {principals: ['spiffe://td/ns/a/sa/b', 'spiffe://td/*'], \
                notPrincipals: ['*/sa/c']}}]}";
    let (set, _) = policy_set(&ap("foo", "x", &format!("{{rules: [{rule}]}}")));
    let source = &set.authorization_policies()[0].rules[0].from[0].source;
    assert_eq!(
        source.principals,
        [
            StringMatch::Exact("td/ns/a/sa/b".to_string()),
            StringMatch::Prefix("td/".to_string())
        ]
    );
    assert_eq!(
        source.not_principals,
        [StringMatch::Suffix("/sa/c".to_string())]
    );
}

#[test]
fn string_patterns() {
    let cases = [
        ("*", "x", true),
        ("*", "", false),
        ("abc", "abc", true),
        ("abc", "abcd", false),
        ("ab*", "abcd", true),
        ("ab*", "xab", false),
        ("*cd", "abcd", true),
        ("*cd", "cdx", false),
    ];
    for (pattern, value, expected) in cases {
        let parsed = StringMatch::parse(pattern).unwrap();
        assert_eq!(parsed.matches(value), expected, "{pattern} vs {value}");
        assert_eq!(parsed.to_string(), pattern);
    }
    assert!(StringMatch::parse("a*b").is_err());
    assert!(StringMatch::parse("**").is_err());
}

#[test]
fn cidr_blocks() {
    let cases = [
        ("10.0.0.0/8", "10.255.1.1", true),
        ("10.0.0.0/8", "11.0.0.1", false),
        ("10.1.2.3", "10.1.2.3", true),
        ("10.1.2.3", "10.1.2.4", false),
        ("0.0.0.0/0", "1.2.3.4", true),
        ("10.1.2.3/8", "10.9.9.9", true),
        ("fd00::/64", "fd00::1", true),
        ("fd00::/64", "fd00:0:0:1::1", false),
        ("::/0", "2001:db8::1", true),
        ("::/0", "1.2.3.4", false),
        ("10.0.0.0/8", "::ffff:10.0.0.1", true),
        ("::ffff:10.0.0.0/104", "10.0.0.1", true),
    ];
    for (block, address, expected) in cases {
        let cidr = Cidr::parse(block).unwrap();
        assert_eq!(
            cidr.contains(address.parse().unwrap()),
            expected,
            "{block} vs {address}"
        );
    }
    for bad in [
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0/8",
        "10.0.0.0/",
        "/8",
        "x",
    ] {
        assert!(Cidr::parse(bad).is_err(), "{bad}");
    }
}
