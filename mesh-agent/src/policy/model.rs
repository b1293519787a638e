//! The validated policy model: every document resolved to its scope, principals normalised, L7
//! use detected, and what an operator should know reported as warnings.
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::mtls::MtlsPolicy;
use crate::model::policy::StringMatch;
use crate::model::policy::{
    selector_labels, Action, AuthorizationPolicy, ConditionTest, PolicyDocument, Rule, Selector,
    TargetKind, TargetRef,
};
use crate::model::Workload;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Root namespace, no selector: every workload.
    Mesh,
    /// No selector: every workload of the namespace.
    Namespace(String),
    /// Workloads whose labels contain `labels`: in `namespace`, or in every namespace when
    /// `None` (an AuthorizationPolicy in the root namespace).
    Selector {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
}

impl Scope {
    /// The scope of a policy of `namespace` with `selector`, as Istio resolves it.
    pub fn resolve(namespace: &str, selector: &Option<Selector>, root_namespace: &str) -> Scope {
        let in_root = namespace == root_namespace;
        match selector_labels(selector) {
            None if in_root => Scope::Mesh,
            None => Scope::Namespace(namespace.to_string()),
            Some(labels) => Scope::Selector {
                namespace: (!in_root).then(|| namespace.to_string()),
                labels: labels.clone(),
            },
        }
    }

    pub fn selects(&self, workload: &Workload) -> bool {
        match self {
            Scope::Mesh => true,
            Scope::Namespace(ns) => workload.namespace == *ns,
            Scope::Selector { namespace, labels } => {
                namespace
                    .as_ref()
                    .is_none_or(|ns| workload.namespace == *ns)
                    && labels
                        .iter()
                        .all(|(k, v)| workload.labels.get(k).is_some_and(|w| w == v))
            }
        }
    }
}

/// Something about the policies an operator should know; the policies still load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `Kind namespace/name`.
    pub policy: String,
    pub message: String,
}

impl Warning {
    pub(crate) fn new(kind: &str, key: &str, message: impl Into<String>) -> Warning {
        Warning {
            policy: format!("{kind} {key}"),
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.policy, self.message)
    }
}

/// An AuthorizationPolicy ready to evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzPolicy {
    pub namespace: String,
    pub name: String,
    /// Which workloads it selects; unused when `targets` is not empty.
    pub scope: Scope,
    /// Its `targetRefs` (objects of `namespace`): non-empty means it binds to a waypoint Gateway
    /// or a Service, only a waypoint enforces it, and it selects no workload.
    pub targets: Vec<TargetRef>,
    pub action: Action,
    /// Principals (also in `when`) without `spiffe://`.
    pub rules: Vec<Rule>,
    /// The L7 fields and `when` keys it uses, as written; non-empty means only a waypoint can
    /// enforce it.
    pub l7_fields: Vec<String>,
}

impl AuthzPolicy {
    fn from_document(doc: &AuthorizationPolicy, root_namespace: &str) -> AuthzPolicy {
        let rules: Vec<Rule> = doc.spec.rules.iter().cloned().map(normalise_rule).collect();
        AuthzPolicy {
            namespace: doc.metadata.namespace.clone(),
            name: doc.metadata.name.clone(),
            scope: Scope::resolve(&doc.metadata.namespace, &doc.spec.selector, root_namespace),
            targets: doc.spec.target_refs.clone(),
            action: doc.spec.action,
            l7_fields: l7_fields(&rules),
            rules,
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn is_l7(&self) -> bool {
        !self.l7_fields.is_empty()
    }

    /// Whether the node agents enforce it on `workload` (never for a policy with targetRefs).
    pub fn selects(&self, workload: &Workload) -> bool {
        self.targets.is_empty() && self.scope.selects(workload)
    }

    /// Whether it binds to the object of `kind` named `namespace/name`.
    pub fn binds_to(&self, kind: TargetKind, namespace: &str, name: &str) -> bool {
        self.namespace == namespace
            && self
                .targets
                .iter()
                .any(|t| t.kind == kind && t.name == name)
    }
}

const SPIFFE_SCHEME: &str = "spiffe://";

/// Principals are compared without `spiffe://`; policies may be written either way.
fn normalise_rule(mut rule: Rule) -> Rule {
    let strip = |list: &mut Vec<StringMatch>| {
        *list = std::mem::take(list)
            .into_iter()
            .map(|m| m.without_prefix(SPIFFE_SCHEME))
            .collect();
    };
    for from in &mut rule.from {
        strip(&mut from.source.principals);
        strip(&mut from.source.not_principals);
    }
    for condition in &mut rule.when {
        if let ConditionTest::SourcePrincipal(values) = &mut condition.test {
            strip(&mut values.values);
            strip(&mut values.not_values);
        }
    }
    rule
}

/// Every L7 field name and L7 `when` key the rules use, in order of appearance, once each.
fn l7_fields(rules: &[Rule]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut fields = Vec::new();
    let mut add = |field: &str| {
        if seen.insert(field.to_string()) {
            fields.push(field.to_string());
        }
    };
    for rule in rules {
        rule.from
            .iter()
            .flat_map(|f| f.source.l7_fields())
            .for_each(&mut add);
        rule.to
            .iter()
            .flat_map(|t| t.operation.l7_fields())
            .for_each(&mut add);
        rule.when
            .iter()
            .filter(|c| matches!(c.test, ConditionTest::L7(_)))
            .for_each(|c| add(&c.key));
    }
    fields
}

/// Every policy the agent enforces, immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    pub(crate) root_namespace: String,
    /// In document order: among equals, the first wins.
    pub(crate) peer_authentications: Vec<MtlsPolicy>,
    /// In document order, which is also the order of evaluation.
    pub(crate) authorization_policies: Vec<AuthzPolicy>,
}

impl Default for PolicySet {
    fn default() -> PolicySet {
        PolicySet::new(&[], crate::model::DEFAULT_ROOT_NAMESPACE).0
    }
}

impl PolicySet {
    /// Builds the model; the warnings say what is treated differently from what was written.
    pub fn new(documents: &[PolicyDocument], root_namespace: &str) -> (PolicySet, Vec<Warning>) {
        let mut set = PolicySet {
            root_namespace: root_namespace.to_string(),
            peer_authentications: Vec::new(),
            authorization_policies: Vec::new(),
        };
        let mut warnings = duplicate_warnings(documents);
        for document in documents {
            match document {
                PolicyDocument::PeerAuthentication(doc) => {
                    let (policy, mut w) = MtlsPolicy::from_document(doc, root_namespace);
                    warnings.append(&mut w);
                    set.peer_authentications.extend(policy);
                }
                PolicyDocument::AuthorizationPolicy(doc) => {
                    let policy = AuthzPolicy::from_document(doc, root_namespace);
                    warnings.extend(authorization_warning(&policy));
                    set.authorization_policies.push(policy);
                }
            }
        }
        warnings.extend(super::mtls::conflict_warnings(&set.peer_authentications));
        (set, warnings)
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    pub fn authorization_policies(&self) -> &[AuthzPolicy] {
        &self.authorization_policies
    }

    pub fn peer_authentications(&self) -> &[MtlsPolicy] {
        &self.peer_authentications
    }

    /// The AuthorizationPolicies that apply to `workload`, in evaluation order.
    pub fn policies_selecting<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthzPolicy> + 'a {
        self.authorization_policies
            .iter()
            .filter(move |p| p.selects(workload))
    }

    /// Whether the AuthorizationPolicy `namespace/name` applies to `workload`.
    pub fn selects(&self, policy_key: &str, workload: &Workload) -> bool {
        self.authorization_policies
            .iter()
            .any(|p| p.key() == policy_key && p.selects(workload))
    }
}

fn authorization_warning(policy: &AuthzPolicy) -> Option<Warning> {
    let warn = |message: String| Some(Warning::new("AuthorizationPolicy", &policy.key(), message));
    if policy.is_l7() && policy.targets.is_empty() {
        warn(format!(
            "uses L7 fields ({}) that cannot be enforced at L4; without a waypoint, all traffic \
             to the workloads it selects is denied",
            policy.l7_fields.join(", ")
        ))
    } else if policy.action == Action::Deny && policy.rules.is_empty() {
        warn("a DENY policy without rules never denies anything".to_string())
    } else {
        None
    }
}

/// Kubernetes keeps one object per kind and `namespace/name`; here both copies stay in force.
fn duplicate_warnings(documents: &[PolicyDocument]) -> Vec<Warning> {
    let mut seen = HashSet::new();
    documents
        .iter()
        .filter(|d| !seen.insert((d.kind(), d.metadata().key())))
        .map(|d| {
            Warning::new(
                d.kind(),
                &d.metadata().key(),
                "defined more than once; every copy is in force",
            )
        })
        .collect()
}
