//! Whether one rule of an AuthorizationPolicy matches a connection, with Istio's logic: inside a
//! rule `from`, `to` and every `when` must match; entries of `from` (and of `to`) are OR-ed;
//! within a source the fields are AND-ed and the values of one field OR-ed; `not*` negates.
//!
//! Identity fields (`principals`, `namespaces`, `source.principal`, `source.namespace`) compare
//! against the peer identity. A plaintext connection has none: no pattern matches it, so a
//! positive field fails and a `not*` field succeeds, exactly as in ztunnel (Istio's
//! `notPrincipals: ["*"]` idiom to reject plaintext and ambient's own STRICT mode rely on this).
//!
//! HTTP-only fields are read when the request carries HTTP attributes (a waypoint's view):
//! `methods` (case-sensitive), `paths` (without the query), `hosts` (case-insensitive, with or
//! without the port), `request.headers[...]`. `remoteIpBlocks` and `remote.ip` are the source IP
//! (no X-Forwarded-For is trusted). JWT fields (`requestPrincipals`, `request.auth.*`) are
//! refused when a document is read.
//!
//! A stream without HTTP attributes (an opaque TCP stream at a waypoint) follows Istio's rule for
//! TCP traffic (Istio 1.24, the RBAC network filter): an ALLOW rule that uses any HTTP-only field
//! matches nothing; in a DENY rule the HTTP-only fields are ignored and the rest of the rule
//! applies (so `to: [{operation: {methods: [DELETE]}}]` denies every TCP stream). A node agent
//! never gets this far with such a rule: it refuses a policy with L7 fields as a whole
//! (`Reason::L7PolicyWithoutWaypoint`).
//!
//! Fail closed: what cannot be evaluated here (a `when` key such as `connection.sni`, a path
//! template, a malformed address) is [`Match::Unknown`], carried through the rule with
//! three-valued logic. A rule left undecided by it does not match if it is an ALLOW rule and
//! matches if it is a DENY rule, so an unsupported field never allows a request nor spares it a
//! denial.
use std::ops::Not;

use super::evaluate::Connection as Request;
use super::l7::{self, HttpAttributes};
use crate::model::policy::{Action, Cidr, Port, StringMatch};
use crate::model::policy::{Condition, ConditionTest, Operation, Rule, Source, Values};

pub(crate) fn rule_matches(rule: &Rule, action: Action, req: &Request) -> bool {
    if req.http.is_none() && action == Action::Allow && uses_http_only_fields(rule) {
        return false;
    }
    let matched = any_or_empty(&rule.from, |f| source_matches(&f.source, req))
        .and(any_or_empty(&rule.to, |t| {
            operation_matches(&t.operation, req)
        }))
        .and(all(&rule.when, |c| condition_matches(c, req)));
    match matched {
        Match::Yes => true,
        Match::No => false,
        Match::Unknown => action == Action::Deny,
    }
}

/// The outcome of a check: three-valued (Kleene) logic, so that [`Match::Unknown`] decides a
/// rule only when the known checks leave it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Match {
    Yes,
    No,
    /// Not evaluable here.
    Unknown,
}

impl Match {
    fn and(self, other: Match) -> Match {
        match (self, other) {
            (Match::No, _) | (_, Match::No) => Match::No,
            (Match::Yes, Match::Yes) => Match::Yes,
            _ => Match::Unknown,
        }
    }

    fn or(self, other: Match) -> Match {
        match (self, other) {
            (Match::Yes, _) | (_, Match::Yes) => Match::Yes,
            (Match::No, Match::No) => Match::No,
            _ => Match::Unknown,
        }
    }
}

impl Not for Match {
    type Output = Match;

    fn not(self) -> Match {
        match self {
            Match::Yes => Match::No,
            Match::No => Match::Yes,
            Match::Unknown => Match::Unknown,
        }
    }
}

impl From<bool> for Match {
    fn from(matched: bool) -> Match {
        if matched {
            Match::Yes
        } else {
            Match::No
        }
    }
}

impl From<Option<bool>> for Match {
    /// `None`: not evaluable.
    fn from(matched: Option<bool>) -> Match {
        matched.map_or(Match::Unknown, Match::from)
    }
}

/// Whether any item matches (`No` for an empty list).
fn any<T>(list: &[T], predicate: impl Fn(&T) -> Match) -> Match {
    let mut result = Match::No;
    for item in list {
        result = result.or(predicate(item));
        if result == Match::Yes {
            break;
        }
    }
    result
}

/// Whether every item matches (`Yes` for an empty list).
fn all<T>(list: &[T], predicate: impl Fn(&T) -> Match) -> Match {
    let mut result = Match::Yes;
    for item in list {
        result = result.and(predicate(item));
        if result == Match::No {
            break;
        }
    }
    result
}

/// An absent list constrains nothing.
fn any_or_empty<T>(list: &[T], predicate: impl Fn(&T) -> Match) -> Match {
    if list.is_empty() {
        Match::Yes
    } else {
        any(list, predicate)
    }
}

fn source_matches(source: &Source, req: &Request) -> Match {
    matches_field(&source.principals, &source.not_principals, |p| {
        principal_matches(p, req).into()
    })
    .and(matches_field(
        &source.namespaces,
        &source.not_namespaces,
        |n| namespace_matches(n, req).into(),
    ))
    .and(matches_field(
        &source.ip_blocks,
        &source.not_ip_blocks,
        |b| b.contains(req.src_ip).into(),
    ))
    .and(matches_field(
        &source.remote_ip_blocks,
        &source.not_remote_ip_blocks,
        |b| remote_ip_matches(b, req),
    ))
}

fn operation_matches(operation: &Operation, req: &Request) -> Match {
    matches_field(&operation.ports, &operation.not_ports, |p| {
        port_matches(p, req).into()
    })
    .and(http_field(
        &operation.methods,
        &operation.not_methods,
        req,
        |m, http| l7::string_matches(m, http.method.as_bytes(), false).into(),
    ))
    .and(http_field(
        &operation.paths,
        &operation.not_paths,
        req,
        |p, http| l7::path_matches(p, http).into(),
    ))
    .and(http_field(
        &operation.hosts,
        &operation.not_hosts,
        req,
        |h, http| l7::host_matches(h, http).into(),
    ))
}

/// Whether a rule uses a field that only HTTP has (Istio's list for TCP traffic: `methods`,
/// `paths`, `hosts`, their `not*` forms, and `when` keys on the request).
pub(super) fn uses_http_only_fields(rule: &Rule) -> bool {
    rule.to.iter().any(|t| {
        let o = &t.operation;
        [
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
            &o.hosts,
            &o.not_hosts,
        ]
        .iter()
        .any(|l| !l.is_empty())
    }) || rule.when.iter().any(|c| is_http_only_key(&c.key))
}

fn is_http_only_key(key: &str) -> bool {
    key.starts_with("request.") || key.starts_with("experimental.envoy.filters.")
}

fn condition_matches(condition: &Condition, req: &Request) -> Match {
    match &condition.test {
        ConditionTest::SourceIp(v) => values_match(v, |b: &Cidr| b.contains(req.src_ip).into()),
        ConditionTest::DestinationIp(v) => {
            values_match(v, |b: &Cidr| b.contains(req.dst_ip).into())
        }
        ConditionTest::DestinationPort(v) => values_match(v, |p| port_matches(p, req).into()),
        ConditionTest::SourcePrincipal(v) => values_match(v, |p| principal_matches(p, req).into()),
        ConditionTest::SourceNamespace(v) => values_match(v, |n| namespace_matches(n, req).into()),
        ConditionTest::L7(v) if condition.key == "remote.ip" => {
            values_match(v, |b| remote_ip_matches(b, req))
        }
        ConditionTest::L7(v) if is_http_only_key(&condition.key) => match req.http {
            Some(http) => l7_condition(&condition.key, v, http),
            // Istio ignores it in a DENY rule on TCP (an ALLOW rule never gets here).
            None => Match::Yes,
        },
        // `connection.sni` and the like: not evaluable here.
        ConditionTest::L7(_) => Match::Unknown,
    }
}

/// An HTTP `when` condition. Keys not listed here (`experimental.envoy.filters.*`, other
/// `request.*` keys) are not supported and fail closed: `Unknown`, never a match for an ALLOW
/// rule (so a positive test fails) and never a way out of a DENY rule.
fn l7_condition(key: &str, values: &Values<String>, http: &HttpAttributes) -> Match {
    if let Some(name) = l7::header_key(key) {
        let header = http.header(name);
        return values_match(values, |pattern| {
            header
                .as_deref()
                .is_some_and(|value| l7::string_matches(pattern, value, false))
                .into()
        });
    }
    Match::Unknown
}

/// An HTTP-only field and its `not` form, on the request's HTTP attributes. Without them (a TCP
/// stream) Istio ignores the field in a DENY rule: it constrains nothing (an ALLOW rule using it
/// never gets here, see [`rule_matches`]).
fn http_field<T>(
    positive: &[T],
    negative: &[T],
    req: &Request,
    predicate: impl Fn(&T, &HttpAttributes) -> Match,
) -> Match {
    match req.http {
        Some(http) => matches_field(positive, negative, |v| predicate(v, http)),
        None => Match::Yes,
    }
}

/// The remote IP is the source IP: no X-Forwarded-For or PROXY header is trusted (Istio's
/// default). A block that does not parse is `Unknown`.
fn remote_ip_matches(block: &str, req: &Request) -> Match {
    Cidr::parse(block)
        .ok()
        .map(|b| b.contains(req.src_ip))
        .into()
}

fn values_match<T>(values: &Values<T>, predicate: impl Fn(&T) -> Match) -> Match {
    matches_field(&values.values, &values.not_values, predicate)
}

fn principal_matches(pattern: &StringMatch, req: &Request) -> bool {
    req.src.is_some_and(|id| pattern.matches(&id.principal()))
}

fn namespace_matches(pattern: &StringMatch, req: &Request) -> bool {
    req.src.is_some_and(|id| pattern.matches(&id.namespace))
}

fn port_matches(port: &Port, req: &Request) -> bool {
    port.0 == req.dst_port
}

/// Istio's rule for a field and its `not` form: the value must match one of `positive` (when
/// given) and none of `negative`.
fn matches_field<T>(positive: &[T], negative: &[T], predicate: impl Fn(&T) -> Match) -> Match {
    any_or_empty(positive, &predicate).and(!any(negative, &predicate))
}
