//! Istio's merge rules: the policy in force for one subset and port, and one rule made of several
//! DestinationRules for the same host.
use std::cmp::Ordering;

use super::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings,
    OutlierDetection, TrafficPolicy,
};

/// The settings in force for requests to one subset (or none) on one Service port. `None`: the
/// setting's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EffectivePolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

impl EffectivePolicy {
    /// A policy's own settings for `port`: its `portLevelSettings` entry for the port replaces
    /// all four (what it leaves out is not inherited), else its top-level ones. The flag says
    /// whether a port-level entry was used.
    fn of(policy: &TrafficPolicy, port: Option<u16>) -> (EffectivePolicy, bool) {
        if let Some(p) = port.and_then(|port| policy.port_level(port)) {
            let own = EffectivePolicy {
                load_balancer: p.load_balancer.clone(),
                connection_pool: p.connection_pool.clone(),
                outlier_detection: p.outlier_detection.clone(),
                tls: p.tls,
            };
            return (own, true);
        }
        let own = EffectivePolicy {
            load_balancer: policy.load_balancer.clone(),
            connection_pool: policy.connection_pool.clone(),
            outlier_detection: policy.outlier_detection.clone(),
            tls: policy.tls,
        };
        (own, false)
    }
}

impl DestinationRule {
    /// The traffic policy for requests to `subset` (`None`: the whole Service, or a subset this
    /// rule does not define) on Service port `port` (`None`: no port-level settings apply), by
    /// Istio's rules:
    ///
    /// 1. the rule's top-level policy, or its `portLevelSettings` entry for the port instead
    ///    (which replaces all four settings, inheriting nothing);
    /// 2. then the subset's policy: each setting it sets replaces the rule's; a subset
    ///    `portLevelSettings` entry for the port replaces all four, set or not.
    pub fn effective_policy(&self, subset: Option<&str>, port: Option<u16>) -> EffectivePolicy {
        let (mut merged, _) = self
            .spec
            .traffic_policy
            .as_ref()
            .map(|p| EffectivePolicy::of(p, port))
            .unwrap_or_default();
        let subset_policy = subset
            .and_then(|name| self.subset(name))
            .and_then(|s| s.traffic_policy.as_ref());
        let Some(subset_policy) = subset_policy else {
            return merged;
        };
        let (own, port_level) = EffectivePolicy::of(subset_policy, port);
        if port_level {
            return own;
        }
        if own.load_balancer.is_some() {
            merged.load_balancer = own.load_balancer;
        }
        if own.connection_pool.is_some() {
            merged.connection_pool = own.connection_pool;
        }
        if own.outlier_detection.is_some() {
            merged.outlier_detection = own.outlier_detection;
        }
        if own.tls.is_some() {
            merged.tls = own.tls;
        }
        merged
    }
}

/// Istio's order of configuration: the oldest `creationTimestamp` first (an object without one,
/// from a file, after those with one), then `namespace/name`.
fn oldest_first(a: &DestinationRule, b: &DestinationRule) -> Ordering {
    let created = |r: &DestinationRule| {
        (
            r.metadata.creation_timestamp.is_none(),
            r.metadata.creation_timestamp.clone(),
        )
    };
    created(a)
        .cmp(&created(b))
        .then_with(|| a.key().cmp(&b.key()))
}

/// One rule from several for the same host, as Istio merges DestinationRules without a workload
/// selector: the oldest is the base; each later one adds the subsets whose names the merged rule
/// lacks (a duplicate name is dropped) and gives its top-level traffic policy only if the merged
/// rule has none yet. `None` for no rules.
pub fn merge_for_host<'a>(
    rules: impl IntoIterator<Item = &'a DestinationRule>,
) -> Option<DestinationRule> {
    let mut rules: Vec<&DestinationRule> = rules.into_iter().collect();
    rules.sort_by(|a, b| oldest_first(a, b));
    let mut rules = rules.into_iter();
    let mut merged = rules.next()?.clone();
    for rule in rules {
        for subset in &rule.spec.subsets {
            if merged.subset(&subset.name).is_none() {
                merged.spec.subsets.push(subset.clone());
            }
        }
        if merged.spec.traffic_policy.is_none() {
            merged.spec.traffic_policy = rule.spec.traffic_policy.clone();
        }
    }
    Some(merged)
}
