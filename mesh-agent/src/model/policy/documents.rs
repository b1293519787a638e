//! Policy documents exactly as a user would `kubectl apply` them: `security.istio.io/v1` (or
//! `v1beta1`) `PeerAuthentication` and `AuthorizationPolicy`.
//!
//! Reading is strict: an unknown field, kind or apiVersion, an unsupported action or a malformed
//! value is an error that names it (serde adds the field path and the line). Values are parsed
//! into their typed form here, so a document that reads is valid.
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::values::{deserialize_parsed, Cidr, Port, StringMatch};

/// The API versions accepted for both kinds.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// One YAML document.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyDocument {
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl PolicyDocument {
    pub fn metadata(&self) -> &Metadata {
        match self {
            PolicyDocument::PeerAuthentication(d) => &d.metadata,
            PolicyDocument::AuthorizationPolicy(d) => &d.metadata,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PolicyDocument::PeerAuthentication(_) => "PeerAuthentication",
            PolicyDocument::AuthorizationPolicy(_) => "AuthorizationPolicy",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthentication {
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Tolerated, unused.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Tolerated, unused.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// The labels of a selector, `None` when absent or empty (Istio treats both as "no selector").
pub fn selector_labels(selector: &Option<Selector>) -> Option<&BTreeMap<String, String>> {
    selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|l| !l.is_empty())
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawPeerAuthenticationSpec")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<Selector>,
    pub mtls: Mtls,
    pub port_level_mtls: BTreeMap<Port, Mtls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeerAuthenticationSpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Mtls,
    #[serde(default)]
    port_level_mtls: BTreeMap<Port, Mtls>,
}

impl TryFrom<RawPeerAuthenticationSpec> for PeerAuthenticationSpec {
    type Error = String;

    fn try_from(raw: RawPeerAuthenticationSpec) -> Result<Self, String> {
        if !raw.port_level_mtls.is_empty() && selector_labels(&raw.selector).is_none() {
            return Err("`portLevelMtls` requires a `selector` with `matchLabels` \
                        (Istio rejects it on mesh-wide and namespace-wide policies)"
                .to_string());
        }
        Ok(PeerAuthenticationSpec {
            selector: raw.selector,
            mtls: raw.mtls,
            port_level_mtls: raw.port_level_mtls,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsModeSetting,
}

/// `mtls.mode` as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsModeSetting {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawAuthorizationPolicySpec")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<Selector>,
    /// `targetRefs`, or the deprecated singular `targetRef`: non-empty means the policy binds to
    /// these objects and only a waypoint enforces it (see [`TargetRef`]).
    pub target_refs: Vec<TargetRef>,
    pub action: Action,
    /// Absent or empty: an ALLOW policy matches nothing (deny-all), a DENY policy never denies.
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAuthorizationPolicySpec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_ref: Option<TargetRef>,
    #[serde(default)]
    target_refs: Vec<TargetRef>,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    rules: Vec<Rule>,
}

impl TryFrom<RawAuthorizationPolicySpec> for AuthorizationPolicySpec {
    type Error = String;

    /// Istio's validation (1.24): at most one of `selector`, `targetRef` and `targetRefs`.
    fn try_from(raw: RawAuthorizationPolicySpec) -> Result<Self, String> {
        let refs = !raw.target_refs.is_empty();
        match (raw.selector.is_some(), raw.target_ref.is_some(), refs) {
            (true, true, _) | (true, _, true) => {
                return Err(
                    "`selector` and `targetRef(s)` cannot both be set: a policy either \
                            selects workloads (enforced by their node agents) or binds to a \
                            waypoint Gateway or a Service (enforced by the waypoint)"
                        .to_string(),
                )
            }
            (_, true, true) => {
                return Err(
                    "`targetRef` and `targetRefs` cannot both be set (`targetRef` is \
                            deprecated: list it in `targetRefs`)"
                        .to_string(),
                )
            }
            _ => {}
        }
        Ok(AuthorizationPolicySpec {
            selector: raw.selector,
            target_refs: raw.target_ref.into_iter().chain(raw.target_refs).collect(),
            action: raw.action,
            rules: raw.rules,
        })
    }
}

/// What a `targetRefs` entry (Istio's `PolicyTargetReference`) names, in the policy's own
/// namespace: a waypoint `Gateway` (`gateway.networking.k8s.io`: all traffic through that
/// waypoint) or a `Service` (core group `""`: requests to that service through its waypoint).
/// Istio also accepts `GatewayClass` and `ServiceEntry`, which this mesh does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRef {
    pub kind: TargetKind,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Gateway,
    Service,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Gateway => "Gateway",
            TargetKind::Service => "Service",
        })
    }
}

/// The Gateway API group of a waypoint `Gateway`.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A targetRef's fields as written.
#[derive(Default)]
struct RawTargetRef {
    group: String,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
}

const TARGET_REF_FIELDS: &[&str] = &["group", "kind", "name", "namespace"];

impl<'de> Deserialize<'de> for TargetRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TargetRefVisitor)
    }
}

/// Reads and checks a targetRef inside its own map, so that an error carries its path
/// (`spec.targetRefs[1]`) and line.
struct TargetRefVisitor;

impl<'de> Visitor<'de> for TargetRefVisitor {
    type Value = TargetRef;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a targetRef with group, kind and name")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TargetRef, A::Error> {
        let mut raw = RawTargetRef::default();
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "group" => raw.group = map.next_value()?,
                "kind" => raw.kind = Some(map.next_value()?),
                "name" => raw.name = Some(map.next_value()?),
                "namespace" => raw.namespace = map.next_value()?,
                other => return Err(de::Error::unknown_field(other, TARGET_REF_FIELDS)),
            }
        }
        TargetRef::read(raw).map_err(de::Error::custom)
    }
}

impl TargetRef {
    fn read(raw: RawTargetRef) -> Result<Self, String> {
        let kind = raw.kind.ok_or("missing field `kind`")?;
        let name = raw.name.ok_or("missing field `name`")?;
        if name.is_empty() {
            return Err("`name` must not be empty".to_string());
        }
        if let Some(ns) = raw.namespace.filter(|ns| !ns.is_empty()) {
            return Err(format!(
                "`namespace` must not be set (found {ns:?}): a targetRef names an object in the \
                 policy's own namespace (Istio does not support cross-namespace references)"
            ));
        }
        let kind = match (raw.group.as_str(), kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => TargetKind::Gateway,
            ("" | "core", "Service") => TargetKind::Service,
            (group, kind) => {
                let shown = if group.is_empty() {
                    format!("kind {kind:?} in the core group (\"\")")
                } else {
                    format!("kind {kind:?} of group {group:?}")
                };
                return Err(format!(
                    "unsupported target {shown}: expected `kind: Gateway` with `group: \
                     {GATEWAY_GROUP}` (a waypoint) or `kind: Service` with `group: \"\"`"
                ));
            }
        };
        Ok(TargetRef { kind, name })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl Action {
    fn parse(action: &str) -> Result<Action, String> {
        match action {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "CUSTOM" => Err(
                "action CUSTOM (external authorization) is not supported: only \
                             ALLOW and DENY are"
                    .to_string(),
            ),
            "AUDIT" => Err(format!(
                "action {action} is not supported: only ALLOW and DENY are"
            )),
            _ => Err(format!("unknown action {action:?}: expected ALLOW or DENY")),
        }
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, "ALLOW or DENY", Action::parse)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// `{}` matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSource")]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    /// Evaluated by a waypoint (the source IP); kept as written. A node agent refuses them.
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<StringMatch>,
    #[serde(default)]
    not_principals: Vec<StringMatch>,
    #[serde(default)]
    namespaces: Vec<StringMatch>,
    #[serde(default)]
    not_namespaces: Vec<StringMatch>,
    #[serde(default)]
    ip_blocks: Vec<Cidr>,
    #[serde(default)]
    not_ip_blocks: Vec<Cidr>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

/// Why `requestPrincipals`, `notRequestPrincipals` and `request.auth.*` are refused.
const NO_JWT: &str = "needs JWT authentication (a RequestAuthentication), which this mesh does \
                      not support";

impl TryFrom<RawSource> for Source {
    type Error = String;

    fn try_from(raw: RawSource) -> Result<Self, String> {
        for (field, list) in [
            ("requestPrincipals", &raw.request_principals),
            ("notRequestPrincipals", &raw.not_request_principals),
        ] {
            if !list.is_empty() {
                return Err(format!("`{field}` {NO_JWT}"));
            }
        }
        let source = Source {
            principals: raw.principals,
            not_principals: raw.not_principals,
            namespaces: raw.namespaces,
            not_namespaces: raw.not_namespaces,
            ip_blocks: raw.ip_blocks,
            not_ip_blocks: raw.not_ip_blocks,
            remote_ip_blocks: raw.remote_ip_blocks,
            not_remote_ip_blocks: raw.not_remote_ip_blocks,
        };
        if source == Source::default() {
            return Err("`source` must not be empty (omit `from` to match any source)".to_string());
        }
        Ok(source)
    }
}

impl Source {
    /// The L7 fields this source sets, by their YAML names.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        [
            ("remoteIpBlocks", self.remote_ip_blocks.is_empty()),
            ("notRemoteIpBlocks", self.not_remote_ip_blocks.is_empty()),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(name, _)| name)
        .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawOperation")]
pub struct Operation {
    pub ports: Vec<Port>,
    pub not_ports: Vec<Port>,
    /// L7 fields, kept as written: evaluated only for a request with HTTP attributes.
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    #[serde(default)]
    ports: Vec<Port>,
    #[serde(default)]
    not_ports: Vec<Port>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

impl TryFrom<RawOperation> for Operation {
    type Error = String;

    fn try_from(raw: RawOperation) -> Result<Self, String> {
        let operation = Operation {
            ports: raw.ports,
            not_ports: raw.not_ports,
            hosts: raw.hosts,
            not_hosts: raw.not_hosts,
            methods: raw.methods,
            not_methods: raw.not_methods,
            paths: raw.paths,
            not_paths: raw.not_paths,
        };
        if operation == Operation::default() {
            return Err("`operation` must not be empty (omit `to` to match any port)".to_string());
        }
        Ok(operation)
    }
}

impl Operation {
    /// The L7 fields this operation sets, by their YAML names.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        [
            ("hosts", self.hosts.is_empty()),
            ("notHosts", self.not_hosts.is_empty()),
            ("methods", self.methods.is_empty()),
            ("notMethods", self.not_methods.is_empty()),
            ("paths", self.paths.is_empty()),
            ("notPaths", self.not_paths.is_empty()),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(name, _)| name)
        .collect()
    }
}

/// A `when` condition: `key` with `values` (any must match) and `notValues` (none may match).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawCondition")]
pub struct Condition {
    pub key: String,
    pub test: ConditionTest,
}

/// The condition's values, typed by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionTest {
    SourceIp(Values<Cidr>),
    SourceNamespace(Values<StringMatch>),
    SourcePrincipal(Values<StringMatch>),
    DestinationIp(Values<Cidr>),
    DestinationPort(Values<Port>),
    /// A request attribute (`request.*`) or another key only a waypoint can evaluate; the values
    /// as written (`crate::policy` reads them by the key).
    L7(Values<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// `when` keys ztunnel evaluates at L4.
pub const L4_CONDITION_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Keys Istio accepts that need a proxy seeing the request (or TLS SNI): a waypoint.
fn is_l7_condition_key(key: &str) -> bool {
    ["request.", "experimental.envoy.filters."]
        .iter()
        .any(|p| key.starts_with(p))
        || matches!(key, "remote.ip" | "connection.sni")
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;

    fn try_from(raw: RawCondition) -> Result<Self, String> {
        if raw.values.is_empty() && raw.not_values.is_empty() {
            return Err(format!(
                "`when` key {:?} needs `values` or `notValues`",
                raw.key
            ));
        }
        if raw.key.starts_with("request.auth.") {
            return Err(format!("`when` key {:?} {NO_JWT}", raw.key));
        }
        let test = match raw.key.as_str() {
            "source.ip" => ConditionTest::SourceIp(typed(&raw, Cidr::parse)?),
            "source.namespace" => ConditionTest::SourceNamespace(typed(&raw, StringMatch::parse)?),
            "source.principal" => ConditionTest::SourcePrincipal(typed(&raw, StringMatch::parse)?),
            "destination.ip" => ConditionTest::DestinationIp(typed(&raw, Cidr::parse)?),
            "destination.port" => ConditionTest::DestinationPort(typed(&raw, Port::parse)?),
            key if is_l7_condition_key(key) => ConditionTest::L7(Values {
                values: raw.values.clone(),
                not_values: raw.not_values.clone(),
            }),
            key => {
                return Err(format!(
                    "unknown `when` key {key:?}: expected one of {}, or an L7 key such as \
                     request.headers[...]",
                    L4_CONDITION_KEYS.join(", ")
                ))
            }
        };
        Ok(Condition { key: raw.key, test })
    }
}

fn typed<T>(
    raw: &RawCondition,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Values<T>, String> {
    let all = |list: &[String]| list.iter().map(|v| parse(v)).collect::<Result<Vec<_>, _>>();
    let context = |e: String| format!("`when` key {:?}: {e}", raw.key);
    Ok(Values {
        values: all(&raw.values).map_err(context)?,
        not_values: all(&raw.not_values).map_err(context)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Documents

const DOCUMENT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    fn parse(kind: &str) -> Result<Kind, String> {
        match kind {
            "PeerAuthentication" => Ok(Kind::PeerAuthentication),
            "AuthorizationPolicy" => Ok(Kind::AuthorizationPolicy),
            other => Err(format!(
                "unsupported kind {other:?}: expected PeerAuthentication or AuthorizationPolicy"
            )),
        }
    }
}

fn check_api_version(api_version: &str) -> Result<(), String> {
    if API_VERSIONS.contains(&api_version) {
        Ok(())
    } else {
        Err(format!(
            "unsupported apiVersion {api_version:?}: expected {}",
            API_VERSIONS.join(" or ")
        ))
    }
}

/// A spec read before or after the kind is known.
enum Spec {
    PeerAuthentication(PeerAuthenticationSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    /// `spec` came before `kind`: parsed once the kind is known (errors then lack a line).
    Pending(serde_yaml_ng::Value),
}

impl<'de> Deserialize<'de> for PolicyDocument {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = PolicyDocument;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a policy document with apiVersion, kind, metadata and spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PolicyDocument, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<Kind> = None;
        let mut metadata: Option<Metadata> = None;
        let mut spec: Option<Spec> = None;
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "apiVersion" => {
                    let value: String = map.next_value()?;
                    check_api_version(&value).map_err(de::Error::custom)?;
                    api_version = Some(value);
                }
                "kind" => {
                    let value: String = map.next_value()?;
                    kind = Some(Kind::parse(&value).map_err(de::Error::custom)?);
                }
                "metadata" => metadata = Some(map.next_value()?),
                "spec" => {
                    spec = Some(match kind {
                        Some(Kind::PeerAuthentication) => {
                            Spec::PeerAuthentication(map.next_value()?)
                        }
                        Some(Kind::AuthorizationPolicy) => {
                            Spec::AuthorizationPolicy(map.next_value()?)
                        }
                        None => Spec::Pending(map.next_value()?),
                    })
                }
                other => return Err(de::Error::unknown_field(other, DOCUMENT_FIELDS)),
            }
        }
        let api_version = api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?;
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;
        build_document(api_version, kind, metadata, spec).map_err(de::Error::custom)
    }
}

fn build_document(
    api_version: String,
    kind: Kind,
    metadata: Metadata,
    spec: Option<Spec>,
) -> Result<PolicyDocument, String> {
    let spec = match spec {
        Some(Spec::Pending(value)) => Some(parse_pending_spec(kind, value)?),
        other => other,
    };
    Ok(match (kind, spec) {
        (Kind::PeerAuthentication, spec) => {
            let spec = match spec {
                Some(Spec::PeerAuthentication(s)) => s,
                _ => PeerAuthenticationSpec::default(),
            };
            PolicyDocument::PeerAuthentication(PeerAuthentication {
                api_version,
                metadata,
                spec,
            })
        }
        (Kind::AuthorizationPolicy, spec) => {
            let spec = match spec {
                Some(Spec::AuthorizationPolicy(s)) => s,
                _ => AuthorizationPolicySpec::default(),
            };
            PolicyDocument::AuthorizationPolicy(AuthorizationPolicy {
                api_version,
                metadata,
                spec,
            })
        }
    })
}

fn parse_pending_spec(kind: Kind, value: serde_yaml_ng::Value) -> Result<Spec, String> {
    let in_spec = |e: serde_yaml_ng::Error| format!("spec: {e}");
    Ok(match kind {
        Kind::PeerAuthentication => {
            Spec::PeerAuthentication(serde_yaml_ng::from_value(value).map_err(in_spec)?)
        }
        Kind::AuthorizationPolicy => {
            Spec::AuthorizationPolicy(serde_yaml_ng::from_value(value).map_err(in_spec)?)
        }
    })
}

/// Parses multi-document YAML (`---` separated); empty documents are skipped. Errors name the
/// document (1-based), the field path and the line.
pub fn parse_documents(yaml: &str) -> Result<Vec<PolicyDocument>, String> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let parsed = Option::<PolicyDocument>::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        documents.extend(parsed);
    }
    Ok(documents)
}
