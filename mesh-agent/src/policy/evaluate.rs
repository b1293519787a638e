//! The decision for one inbound connection (or, with HTTP attributes, one request), in Istio's
//! order, with the reason an operator reads.
use std::fmt;
use std::net::IpAddr;

use super::l7::HttpAttributes;
use super::model::{AuthzPolicy, PolicySet};
use super::mtls::MtlsMode;
use super::rules::rule_matches;
use crate::identity::Identity;
use crate::model::policy::Action;
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
    pub(super) fn allow(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            reason,
        }
    }

    pub(super) fn deny(reason: Reason) -> Decision {
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
/// 0-based index in `rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    DeniedBy {
        policy: String,
        rule: usize,
    },
    AllowedBy {
        policy: String,
        rule: usize,
    },
    NoAllowPolicyMatched,
    /// No ALLOW policy applies to the workload.
    NoPolicies,
    /// Plaintext to a STRICT port.
    StrictMtls,
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
            Reason::NoAllowPolicyMatched => "no_allow_policy_matched",
            Reason::NoPolicies => "no_allow_policies",
            Reason::StrictMtls => "strict_mtls",
            Reason::L7PolicyWithoutWaypoint { .. } => "l7_policy_without_waypoint",
            Reason::WaypointOnly { .. } => "waypoint_bypass",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DeniedBy { policy, rule } => {
                write!(f, "denied by AuthorizationPolicy {policy} rule {rule}")
            }
            Reason::AllowedBy { policy, rule } => {
                write!(f, "allowed by AuthorizationPolicy {policy} rule {rule}")
            }
            Reason::NoAllowPolicyMatched => f.write_str("no ALLOW policy matched"),
            Reason::NoPolicies => f.write_str("no ALLOW policy applies to the workload"),
            Reason::StrictMtls => f.write_str("STRICT mTLS: plaintext rejected"),
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
        let with_action = |action: Action| policies.iter().filter(move |p| p.action == action);
        if let Some((policy, rule)) = first_match(with_action(Action::Deny), req) {
            return Decision::deny(Reason::DeniedBy { policy, rule });
        }
        if with_action(Action::Allow).next().is_none() {
            return Decision::allow(Reason::NoPolicies);
        }
        match first_match(with_action(Action::Allow), req) {
            Some((policy, rule)) => Decision::allow(Reason::AllowedBy { policy, rule }),
            None => Decision::deny(Reason::NoAllowPolicyMatched),
        }
    }
}

/// The first policy, and its first rule, that matches.
fn first_match<'p>(
    policies: impl Iterator<Item = &'p &'p AuthzPolicy>,
    req: &Request,
) -> Option<(String, usize)> {
    policies.into_iter().find_map(|policy| {
        policy
            .rules
            .iter()
            .position(|rule| rule_matches(rule, policy.action, req))
            .map(|rule| (policy.key(), rule))
    })
}
