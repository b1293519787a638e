//! The decision for one inbound connection (or, with HTTP attributes, one request), in Istio's
//! order, with the reason an operator reads.
use std::fmt;
use std::net::IpAddr;

use super::l7::HttpAttributes;
use super::model::{AuthzPolicy, PolicySet};
use super::mtls::MtlsMode;
use super::rules::rule_matches;
use crate::identity::Identity;
use crate::model::policy::{Action, TargetKind};
use crate::model::Workload;

/// An inbound connection as the destination side sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub dst: &'a Workload,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_ip: IpAddr,
    /// The peer identity; `None` for plaintext.
    pub src: Option<&'a Identity>,
    /// The HTTP request on the connection, when the evaluator sees one (a waypoint): L7 fields
    /// are then evaluated. `None` at L4, where a policy with L7 fields denies everything.
    pub http: Option<&'a HttpAttributes>,
}

impl<'a> Request<'a> {
    /// What its rules are matched against.
    pub fn connection(&self) -> Connection<'a> {
        Connection {
            dst_ip: self.dst_ip,
            dst_port: self.dst_port,
            src_ip: self.src_ip,
            src: self.src,
            http: self.http,
        }
    }
}

/// What a rule is matched against: one connection (or, with `http`, one request on it), without
/// the destination workload a [`Request`] names for selection.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    pub src_ip: IpAddr,
    /// The peer identity; `None` for plaintext.
    pub src: Option<&'a Identity>,
    /// The HTTP request, when the evaluator sees one; `None` for a TCP stream.
    pub http: Option<&'a HttpAttributes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    pub fn allow(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            reason,
        }
    }

    pub fn deny(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            reason,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.verdict, self.reason)
    }
}

/// Why a connection is allowed or denied. Policies are named `namespace/name`; rules by their
/// 0-based index in `rules`, written as the field path `rules[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    DeniedBy {
        policy: String,
        rule: usize,
        /// For a policy with targetRefs: the target it applied through and the waypoint.
        bound: Option<Binding>,
    },
    AllowedBy {
        policy: String,
        rule: usize,
        bound: Option<Binding>,
    },
    NoAllowPolicyMatched,
    /// ALLOW policies bound to the waypoint or the service apply, and none matched.
    NoBoundAllowPolicyMatched {
        waypoint: String,
    },
    /// No ALLOW policy is bound to the waypoint or the service.
    NoBoundPolicies {
        waypoint: String,
    },
    /// No ALLOW policy applies to the workload.
    NoPolicies,
    /// Plaintext to a STRICT port.
    StrictMtls,
    /// A waypoint pod whose Gateway is not (or no longer) in the config: it decides nothing.
    UnknownWaypoint {
        pod: String,
    },
    /// The first policy selecting the workload that needs a waypoint, and its L7 fields.
    L7PolicyWithoutWaypoint {
        policy: String,
        fields: Vec<String>,
    },
    /// No bypass: the port is a target port of a Service marked `mesh.dev/waypoint-only` and
    /// the peer is not its waypoint (`missing`: why the waypoint admits nobody).
    WaypointOnly {
        service: String,
        waypoint: String,
        missing: Option<&'static str>,
    },
}

impl Reason {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Reason::DeniedBy { .. } => "denied_by_policy",
            Reason::AllowedBy { .. } => "allowed_by_policy",
            Reason::NoAllowPolicyMatched | Reason::NoBoundAllowPolicyMatched { .. } => {
                "no_allow_policy_matched"
            }
            Reason::NoPolicies | Reason::NoBoundPolicies { .. } => "no_allow_policies",
            Reason::StrictMtls => "strict_mtls",
            Reason::L7PolicyWithoutWaypoint { .. } => "l7_policy_without_waypoint",
            Reason::WaypointOnly { .. } => "waypoint_bypass",
            Reason::UnknownWaypoint { .. } => "unknown_waypoint",
        }
    }
}

impl Reason {
    /// The deciding policy and rule, `AuthorizationPolicy ns/name rules[i]`, if one decided.
    pub fn deciding_rule(&self) -> Option<String> {
        match self {
            Reason::DeniedBy { policy, rule, .. } | Reason::AllowedBy { policy, rule, .. } => {
                Some(format!("AuthorizationPolicy {policy} rules[{rule}]"))
            }
            _ => None,
        }
    }
}

/// How a policy with targetRefs applied at a waypoint: through which of its targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// `Gateway` or `Service`.
    pub kind: TargetKind,
    /// The target, `namespace/name`.
    pub target: String,
    /// The waypoint, `namespace/name`.
    pub waypoint: String,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "targetRefs {} {}, at waypoint {}",
            self.kind, self.target, self.waypoint
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DeniedBy {
                policy,
                rule,
                bound,
            } => {
                write!(f, "denied by AuthorizationPolicy {policy} rules[{rule}]")?;
                bound.iter().try_for_each(|b| write!(f, " ({b})"))
            }
            Reason::AllowedBy {
                policy,
                rule,
                bound,
            } => {
                write!(f, "allowed by AuthorizationPolicy {policy} rules[{rule}]")?;
                bound.iter().try_for_each(|b| write!(f, " ({b})"))
            }
            Reason::NoAllowPolicyMatched => f.write_str("no ALLOW policy matched"),
            Reason::NoBoundAllowPolicyMatched { waypoint } => write!(
                f,
                "no ALLOW policy with targetRefs matched at waypoint {waypoint}"
            ),
            Reason::NoBoundPolicies { waypoint } => write!(
                f,
                "no ALLOW policy with targetRefs applies at waypoint {waypoint}"
            ),
            Reason::NoPolicies => f.write_str("no ALLOW policy applies to the workload"),
            Reason::StrictMtls => f.write_str("STRICT mTLS: plaintext rejected"),
            Reason::UnknownWaypoint { pod } => write!(
                f,
                "{pod} is not a pod of any waypoint Gateway in the config: it decides nothing"
            ),
            Reason::L7PolicyWithoutWaypoint { policy, fields } => write!(
                f,
                "AuthorizationPolicy {policy} uses L7 fields ({}) and no waypoint serves this \
                 workload",
                fields.join(", ")
            ),
            Reason::WaypointOnly {
                service,
                waypoint,
                missing,
            } => {
                write!(f, "service {service} accepts only its waypoint {waypoint}")?;
                if let Some(why) = missing {
                    write!(f, ", which {why}")?;
                }
                f.write_str(" (no-bypass)")
            }
        }
    }
}

impl PolicySet {
    /// Decides one connection: (1) plaintext to a STRICT port is denied; (2) without HTTP
    /// attributes, a policy with L7 fields selecting the workload denies everything, as it cannot
    /// be enforced; (3) a matching DENY policy denies; (4) with no ALLOW policy for the workload,
    /// allow; (5) a matching ALLOW policy allows; (6) otherwise deny. With HTTP attributes, (3)
    /// and (5) read the L7 fields too.
    pub fn evaluate(&self, req: &Request) -> Decision {
        if req.src.is_none() && self.mtls_mode(req.dst, req.dst_port) == MtlsMode::Strict {
            return Decision::deny(Reason::StrictMtls);
        }
        let policies: Vec<&AuthzPolicy> = self.policies_selecting(req.dst).collect();
        if req.http.is_none() {
            if let Some(l7) = policies.iter().find(|p| p.is_l7()) {
                return Decision::deny(Reason::L7PolicyWithoutWaypoint {
                    policy: l7.key(),
                    fields: l7.l7_fields.clone(),
                });
            }
        }
        decide(&policies, &req.connection(), None).unwrap_or(Decision::allow(Reason::NoPolicies))
    }

    /// Decides one request (or, without HTTP attributes, one TCP stream) at a waypoint against
    /// the policies bound to it by targetRefs, Istio's ambient semantics (Istio 1.24): those
    /// targeting the waypoint's `Gateway` and those targeting the `Service` the client addressed
    /// (`None` for traffic to a workload address), all in the policy's own namespace. Istio's
    /// order: a matching DENY denies; with no ALLOW policy bound, allow; a matching ALLOW allows;
    /// otherwise deny. The destination workloads' own policies are a separate decision
    /// ([`PolicySet::evaluate`]); the waypoint needs both to allow.
    pub fn evaluate_bound(&self, at: &WaypointBinding, conn: &Connection) -> Decision {
        let bound: Vec<(&AuthzPolicy, Binding)> = self
            .authorization_policies
            .iter()
            .filter_map(|p| at.binding(p).map(|b| (p, b)))
            .collect();
        let policies: Vec<&AuthzPolicy> = bound.iter().map(|(p, _)| *p).collect();
        let binding_of = |key: &str| {
            bound
                .iter()
                .find(|(p, _)| p.key() == key)
                .map(|(_, b)| b.clone())
        };
        let binding_of: BindingOf = &binding_of;
        let decision = decide(&policies, conn, Some(binding_of)).unwrap_or_else(|| {
            Decision::allow(Reason::NoBoundPolicies {
                waypoint: at.waypoint(),
            })
        });
        decision.map_no_match(|| Reason::NoBoundAllowPolicyMatched {
            waypoint: at.waypoint(),
        })
    }
}

/// Where a waypoint decides: the `Gateway` it runs as and the `Service` addressed, each as
/// (namespace, name).
#[derive(Debug, Clone, Copy)]
pub struct WaypointBinding<'a> {
    pub gateway: (&'a str, &'a str),
    pub service: Option<(&'a str, &'a str)>,
}

impl WaypointBinding<'_> {
    fn waypoint(&self) -> String {
        // Built for every request a waypoint decides (its reason names the waypoint), so
        // without `format!`'s machinery.
        let (namespace, name) = self.gateway;
        let mut key = String::with_capacity(namespace.len() + 1 + name.len());
        key.push_str(namespace);
        key.push('/');
        key.push_str(name);
        key
    }

    /// How `policy` binds here, if it does (its Gateway target first).
    fn binding(&self, policy: &AuthzPolicy) -> Option<Binding> {
        let targets = [
            Some((TargetKind::Gateway, self.gateway)),
            self.service.map(|s| (TargetKind::Service, s)),
        ];
        targets
            .into_iter()
            .flatten()
            .find_map(|(kind, (ns, name))| {
                policy.binds_to(kind, ns, name).then(|| Binding {
                    kind,
                    target: format!("{ns}/{name}"),
                    waypoint: self.waypoint(),
                })
            })
    }
}

impl Decision {
    /// The same decision with `NoAllowPolicyMatched` replaced by `reason()`.
    fn map_no_match(self, reason: impl FnOnce() -> Reason) -> Decision {
        match self.reason {
            Reason::NoAllowPolicyMatched => Decision::deny(reason()),
            _ => self,
        }
    }
}

/// How the policy of a key applied, for a bound policy.
type BindingOf<'a> = &'a dyn Fn(&str) -> Option<Binding>;

/// Istio's order over `policies`: a matching DENY denies; `None` when no ALLOW policy applies
/// (the caller says why it allows); a matching ALLOW allows; otherwise deny. `bound` names how
/// a policy (by key) applied, for the reason.
fn decide(
    policies: &[&AuthzPolicy],
    conn: &Connection,
    bound: Option<BindingOf>,
) -> Option<Decision> {
    let with_action = |action: Action| policies.iter().filter(move |p| p.action == action);
    let binding = |policy: &str| bound.and_then(|b| b(policy));
    if let Some((policy, rule)) = first_match(with_action(Action::Deny), conn) {
        let bound = binding(&policy);
        return Some(Decision::deny(Reason::DeniedBy {
            policy,
            rule,
            bound,
        }));
    }
    with_action(Action::Allow).next()?;
    Some(match first_match(with_action(Action::Allow), conn) {
        Some((policy, rule)) => {
            let bound = binding(&policy);
            Decision::allow(Reason::AllowedBy {
                policy,
                rule,
                bound,
            })
        }
        None => Decision::deny(Reason::NoAllowPolicyMatched),
    })
}

/// The first policy, and its first rule, that matches.
fn first_match<'p>(
    policies: impl Iterator<Item = &'p &'p AuthzPolicy>,
    conn: &Connection,
) -> Option<(String, usize)> {
    policies.into_iter().find_map(|policy| {
        policy
            .rules
            .iter()
            .position(|rule| rule_matches(rule, policy.action, conn))
            .map(|rule| (policy.key(), rule))
    })
}
