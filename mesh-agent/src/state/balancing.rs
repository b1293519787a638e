//! How the node agent balances a Service's connections at L4, per Service port: the simple policy
//! of the DestinationRule in force for the Service (`trafficPolicy.loadBalancer`, port-level
//! settings first), else the Service's own setting.
//!
//! A connection carries no HTTP header, cookie or query parameter: of `consistentHash` only
//! `useSourceIp` means something at L4; the other keys are a waypoint's to apply, and say so in a
//! warning when the Service has none.
use crate::model::destination_rule::{DestinationRule, HashKey, LoadBalancerSettings, SimpleLb};
use crate::model::{LoadBalancing, Service};

/// The balancing of each of `service`'s ports, and what of `rule` the node agent cannot apply
/// (`applies`: false when a waypoint takes the Service's traffic, so nothing is said).
pub fn per_port(
    service: &Service,
    rule: Option<&DestinationRule>,
    applies: bool,
) -> (Vec<(u16, LoadBalancing)>, Vec<String>) {
    let mut warnings = Vec::new();
    let ports = service
        .ports
        .iter()
        .map(|p| {
            let settings = rule.and_then(|r| r.effective_policy(None, Some(p.port)).load_balancer);
            let lb = match settings {
                None | Some(LoadBalancerSettings::Simple(SimpleLb::Unspecified)) => None,
                Some(LoadBalancerSettings::Simple(SimpleLb::RoundRobin)) => {
                    Some(LoadBalancing::RoundRobin)
                }
                Some(LoadBalancerSettings::Simple(SimpleLb::Random)) => Some(LoadBalancing::Random),
                Some(LoadBalancerSettings::Simple(SimpleLb::LeastRequest)) => {
                    Some(LoadBalancing::LeastRequest)
                }
                Some(LoadBalancerSettings::ConsistentHash(hash)) => match hash.hash_key {
                    HashKey::UseSourceIp => Some(LoadBalancing::SourceIpHash),
                    other if applies => {
                        warnings.push(format!(
                            "consistentHash on {} for port {} of Service {} needs a waypoint: the \
                             node agent balances its connections {} (add istio.io/use-waypoint)",
                            key_name(&other),
                            p.port,
                            service.key(),
                            service.load_balancing.describe(),
                        ));
                        None
                    }
                    _ => None,
                },
            };
            (p.port, lb.unwrap_or(service.load_balancing))
        })
        .collect();
    (ports, warnings)
}

fn key_name(key: &HashKey) -> &'static str {
    match key {
        HashKey::HttpHeaderName(_) => "httpHeaderName",
        HashKey::HttpCookie(_) => "httpCookie",
        HashKey::HttpQueryParameterName(_) => "httpQueryParameterName",
        HashKey::UseSourceIp => "useSourceIp",
    }
}
