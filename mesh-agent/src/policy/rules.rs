//! Whether one rule of an AuthorizationPolicy matches a connection, with Istio's logic: inside a
//! rule `from`, `to` and every `when` must match; entries of `from` (and of `to`) are OR-ed;
//! within a source the fields are AND-ed and the values of one field OR-ed; `not*` negates.
//!
//! Identity fields (`principals`, `namespaces`, `source.principal`, `source.namespace`) compare
//! against the peer identity. A plaintext connection has none: no pattern matches it, so a
//! positive field fails and a `not*` field succeeds, exactly as in ztunnel (Istio's
//! `notPrincipals: ["*"]` idiom to reject plaintext and ambient's own STRICT mode rely on this).
use super::evaluate::Request;
use crate::model::policy::{Cidr, Port, StringMatch};
use crate::model::policy::{Condition, ConditionTest, Operation, Rule, Source, Values};

pub(crate) fn rule_matches(rule: &Rule, req: &Request) -> bool {
    any_or_empty(&rule.from, |f| source_matches(&f.source, req))
        && any_or_empty(&rule.to, |t| operation_matches(&t.operation, req))
        && rule.when.iter().all(|c| condition_matches(c, req))
}

/// An absent list constrains nothing.
fn any_or_empty<T>(list: &[T], predicate: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(predicate)
}

fn source_matches(source: &Source, req: &Request) -> bool {
    matches_field(&source.principals, &source.not_principals, |p| {
        principal_matches(p, req)
    }) && matches_field(&source.namespaces, &source.not_namespaces, |n| {
        namespace_matches(n, req)
    }) && matches_field(&source.ip_blocks, &source.not_ip_blocks, |b| {
        b.contains(req.src_ip)
    })
}

fn operation_matches(operation: &Operation, req: &Request) -> bool {
    matches_field(&operation.ports, &operation.not_ports, |p| {
        port_matches(p, req)
    })
}

fn condition_matches(condition: &Condition, req: &Request) -> bool {
    match &condition.test {
        ConditionTest::SourceIp(v) => values_match(v, |b: &Cidr| b.contains(req.src_ip)),
        ConditionTest::DestinationIp(v) => values_match(v, |b: &Cidr| b.contains(req.dst_ip)),
        ConditionTest::DestinationPort(v) => values_match(v, |p| port_matches(p, req)),
        ConditionTest::SourcePrincipal(v) => values_match(v, |p| principal_matches(p, req)),
        ConditionTest::SourceNamespace(v) => values_match(v, |n| namespace_matches(n, req)),
        // Never evaluated: a policy with L7 conditions is refused before its rules are read.
        ConditionTest::L7(_) => false,
    }
}

fn values_match<T>(values: &Values<T>, predicate: impl Fn(&T) -> bool) -> bool {
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
pub(super) fn matches_field<T>(
    positive: &[T],
    negative: &[T],
    predicate: impl Fn(&T) -> bool,
) -> bool {
    (positive.is_empty() || positive.iter().any(&predicate)) && !negative.iter().any(&predicate)
}
