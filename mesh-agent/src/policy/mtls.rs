//! PeerAuthentication: the effective mTLS mode of a workload port, with Istio's precedence
//! (workload selector > namespace-wide > mesh-wide; UNSET inherits; `portLevelMtls` overrides the
//! workload policy's mode for one port).
use std::collections::BTreeMap;
use std::fmt;

use super::model::{PolicySet, Scope, Warning};
use crate::model::policy::{MtlsModeSetting, PeerAuthentication};
use crate::model::Workload;

const KIND: &str = "PeerAuthentication";

/// Whether plaintext is accepted. DISABLE reads as PERMISSIVE, as Istio ambient treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plaintext is rejected.
    Strict,
    /// Plaintext is accepted, subject to AuthorizationPolicy.
    Permissive,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
        })
    }
}

/// A PeerAuthentication ready to apply. `None` modes are UNSET: inherited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsPolicy {
    pub namespace: String,
    pub name: String,
    /// Never a root-namespace selector: Istio ignores those for PeerAuthentication.
    pub scope: Scope,
    pub mode: Option<MtlsMode>,
    /// Only on selector policies.
    pub port_modes: BTreeMap<u16, Option<MtlsMode>>,
}

impl MtlsPolicy {
    /// The policy, or `None` when Istio would ignore it; warnings explain any reinterpretation.
    pub(crate) fn from_document(
        doc: &PeerAuthentication,
        root_namespace: &str,
    ) -> (Option<MtlsPolicy>, Vec<Warning>) {
        let key = doc.metadata.key();
        let mut warnings = Vec::new();
        let scope = Scope::resolve(&doc.metadata.namespace, &doc.spec.selector, root_namespace);
        if let Scope::Selector {
            namespace: None, ..
        } = scope
        {
            let message = "a selector in the root namespace is not supported for \
                           PeerAuthentication (Istio ignores such policies); ignored";
            return (None, vec![Warning::new(KIND, &key, message)]);
        }
        let mut mode_of = |setting: MtlsModeSetting, what: &str| {
            if setting == MtlsModeSetting::Disable {
                let message = format!(
                    "{what} DISABLE is not supported in ambient mode; treated as PERMISSIVE"
                );
                warnings.push(Warning::new(KIND, &key, message));
            }
            mode(setting)
        };
        let mode = mode_of(doc.spec.mtls.mode, "mtls.mode");
        let port_modes = doc
            .spec
            .port_level_mtls
            .iter()
            .map(|(port, mtls)| {
                let what = format!("portLevelMtls[{}].mode", port.0);
                (port.0, mode_of(mtls.mode, &what))
            })
            .collect();
        let policy = MtlsPolicy {
            namespace: doc.metadata.namespace.clone(),
            name: doc.metadata.name.clone(),
            scope,
            mode,
            port_modes,
        };
        (Some(policy), warnings)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn mode(setting: MtlsModeSetting) -> Option<MtlsMode> {
    match setting {
        MtlsModeSetting::Unset => None,
        MtlsModeSetting::Strict => Some(MtlsMode::Strict),
        MtlsModeSetting::Permissive | MtlsModeSetting::Disable => Some(MtlsMode::Permissive),
    }
}

/// The effective mode and the PeerAuthentication that set it (`None`: the PERMISSIVE default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    pub policy: Option<String>,
}

impl PolicySet {
    /// The mTLS mode for connections to `port` of `dst`.
    pub fn mtls_mode(&self, dst: &Workload, port: u16) -> MtlsMode {
        self.effective_mtls(dst, port).mode
    }

    /// [`PolicySet::mtls_mode`] with the deciding policy, for explanations.
    pub fn effective_mtls(&self, dst: &Workload, port: u16) -> EffectiveMtls {
        let first = |level: fn(&Scope) -> bool| {
            self.peer_authentications
                .iter()
                .find(|p| level(&p.scope) && p.scope.selects(dst))
        };
        let mesh = first(|s| matches!(s, Scope::Mesh));
        let namespace = first(|s| matches!(s, Scope::Namespace(_)));
        let workload = first(|s| matches!(s, Scope::Selector { .. }));
        let mut effective = EffectiveMtls {
            mode: MtlsMode::Permissive,
            policy: None,
        };
        let mut apply = |policy: &MtlsPolicy, mode: Option<MtlsMode>| {
            if let Some(mode) = mode {
                effective = EffectiveMtls {
                    mode,
                    policy: Some(policy.key()),
                };
            }
        };
        for policy in [mesh, namespace, workload].into_iter().flatten() {
            apply(policy, policy.mode);
        }
        if let Some(policy) = workload {
            apply(policy, policy.port_modes.get(&port).copied().flatten());
        }
        effective
    }
}

/// Istio applies one policy per level, the oldest; we have no timestamps, so the first in
/// document order wins and the others are reported.
pub(crate) fn conflict_warnings(policies: &[MtlsPolicy]) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for (i, later) in policies.iter().enumerate() {
        let Some(earlier) = policies[..i]
            .iter()
            .find(|p| may_overlap(&p.scope, &later.scope))
        else {
            continue;
        };
        let message = match later.scope {
            Scope::Selector { .. } => format!(
                "may select the same workloads as {}, which comes first and wins where both apply",
                earlier.key()
            ),
            _ => format!(
                "ignored: {} has the same scope and comes first (Istio keeps the oldest)",
                earlier.key()
            ),
        };
        warnings.push(Warning::new(KIND, &later.key(), message));
    }
    warnings
}

/// Whether two policies at the same level can both apply to one workload.
fn may_overlap(a: &Scope, b: &Scope) -> bool {
    match (a, b) {
        (Scope::Mesh, Scope::Mesh) => true,
        (Scope::Namespace(x), Scope::Namespace(y)) => x == y,
        (
            Scope::Selector {
                namespace: ns_a,
                labels: a,
            },
            Scope::Selector {
                namespace: ns_b,
                labels: b,
            },
        ) => ns_a == ns_b && a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v)),
        _ => false,
    }
}
