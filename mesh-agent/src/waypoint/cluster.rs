//! Clusters: where a DestinationRule applies, the waypoint chooses the endpoint of each request
//! itself (Envoy's upstream cluster: one Service port, or one subset of it). This module turns
//! the rule's effective traffic policy into the balancer's and the pool's settings
//! ([`ClusterPolicy`]), lists a cluster's endpoints (a subset's labels select them) and reads a
//! request's consistent-hash key. A backend without a DestinationRule is reached through its
//! Service address and the node's balancing, as before.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::request;

use super::balance::{self, HashTable, LbPolicy, OutlierPolicy};
use super::upstream::Limits;
use crate::model::destination_rule::{
    DestinationRule, EffectivePolicy, HashAlgorithm, HashKey, LoadBalancerSettings, SimpleLb,
    Subset, RING_MAX_SIZE, UNLIMITED,
};
use crate::model::Workload;
use crate::state::{Service, State};

/// A cluster's settings, from its effective DestinationRule policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPolicy {
    pub lb: LbPolicy,
    /// What a consistent hash reads from the request.
    pub hash_key: Option<HashKey>,
    pub outlier: Option<OutlierPolicy>,
    pub limits: Limits,
    /// `connectionPool.http.maxRetries`: retries in flight to the cluster at once.
    pub max_retries: Option<u32>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout: Duration,
}

/// `None` for the unlimited value.
fn limit(n: u32) -> Option<u32> {
    (n != UNLIMITED).then_some(n)
}

impl ClusterPolicy {
    /// The settings of `policy` (Istio's defaults where it sets nothing: `LEAST_REQUEST`, no
    /// limits, no outlier detection).
    pub fn new(policy: &EffectivePolicy) -> ClusterPolicy {
        let (lb, hash_key) = match &policy.load_balancer {
            None
            | Some(LoadBalancerSettings::Simple(SimpleLb::Unspecified))
            | Some(LoadBalancerSettings::Simple(SimpleLb::LeastRequest)) => {
                (LbPolicy::LeastRequest, None)
            }
            Some(LoadBalancerSettings::Simple(SimpleLb::RoundRobin)) => {
                (LbPolicy::RoundRobin, None)
            }
            Some(LoadBalancerSettings::Simple(SimpleLb::Random)) => (LbPolicy::Random, None),
            Some(LoadBalancerSettings::ConsistentHash(hash)) => {
                let table = match hash.algorithm() {
                    HashAlgorithm::RingHash { minimum_ring_size } => HashTable::Ring {
                        // Validation bounds it; a ring is built per endpoint set.
                        min_size: minimum_ring_size.min(RING_MAX_SIZE) as u32,
                    },
                    HashAlgorithm::Maglev { table_size } => HashTable::Maglev {
                        size: table_size.min(u64::from(u32::MAX)) as u32,
                    },
                };
                (LbPolicy::Hash(table), Some(hash.hash_key.clone()))
            }
        };
        let tcp = policy.connection_pool.as_ref().and_then(|p| p.tcp.as_ref());
        let http = policy
            .connection_pool
            .as_ref()
            .and_then(|p| p.http.as_ref());
        let limits = Limits {
            max_connections: tcp.and_then(|t| limit(t.max_connections())),
            max_pending: http.and_then(|h| limit(h.http1_max_pending_requests())),
            max_requests: http.and_then(|h| limit(h.http2_max_requests())),
            max_requests_per_connection: http.and_then(|h| h.max_requests_per_connection()),
            idle_timeout: http.map(|h| h.idle_timeout()),
        };
        let outlier = policy.outlier_detection.as_ref().map(|o| OutlierPolicy {
            consecutive_5xx: Some(o.consecutive_5xx_errors).filter(|n| *n > 0),
            consecutive_gateway: Some(o.consecutive_gateway_errors).filter(|n| *n > 0),
            interval: o.interval,
            base_ejection: o.base_ejection_time,
            max_ejection_percent: o.max_ejection_percent,
            min_health_percent: o.min_health_percent,
        });
        ClusterPolicy {
            lb,
            hash_key,
            outlier,
            limits,
            max_retries: http.and_then(|h| limit(h.max_retries())),
            connect_timeout: tcp.map_or(
                crate::model::destination_rule::DEFAULT_CONNECT_TIMEOUT,
                |t| t.connect_timeout(),
            ),
        }
    }
}

/// Where a request goes when a DestinationRule applies to its backend.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `namespace/name`, `#subset` when there is one, `:port`: the balancer state's key.
    pub name: String,
    pub service: Arc<Service>,
    /// The subset, whose labels select its endpoints; `None`: the whole Service.
    pub subset: Option<Subset>,
    /// The Service port the request is sent to.
    pub port: u16,
    pub policy: ClusterPolicy,
}

impl Cluster {
    /// The cluster for `subset` (or the whole Service) of the Service behind `target` (its VIP
    /// and port), when a DestinationRule applies; `Err`: the subset is not defined (Envoy's
    /// answer: no healthy upstream).
    pub fn of(
        state: &State,
        target: SocketAddr,
        subset: Option<&str>,
    ) -> Result<Option<Cluster>, String> {
        let Some(service) = state.service_by_vip(target.ip()) else {
            return Ok(None);
        };
        let rule: Option<DestinationRule> = state.destination_rule_for(&service.key());
        let Some(rule) = rule else {
            return match subset {
                None => Ok(None),
                Some(s) => Err(format!(
                    "subset {s:?} of {}: no DestinationRule defines it",
                    service.key()
                )),
            };
        };
        let defined = match subset {
            None => None,
            Some(s) => match rule.subset(s) {
                Some(defined) => Some(defined.clone()),
                None => {
                    return Err(format!(
                        "subset {s:?} of {}: DestinationRule {} does not define it",
                        service.key(),
                        rule.key()
                    ))
                }
            },
        };
        let policy = ClusterPolicy::new(&rule.effective_policy(subset, Some(target.port())));
        let mut name = service.key();
        if let Some(s) = subset {
            name.push('#');
            name.push_str(s);
        }
        name.push_str(&format!(":{}", target.port()));
        Ok(Some(Cluster {
            name,
            service: service.clone(),
            subset: defined,
            port: target.port(),
            policy,
        }))
    }

    /// The cluster's endpoints with an address of the family `v4` says, in a stable order: the
    /// workload and its address (endpoint IP and target port).
    pub fn endpoints(&self, v4: bool) -> Vec<(Arc<Workload>, SocketAddr)> {
        let Some(target_port) = self.service.target_port(self.port) else {
            return Vec::new();
        };
        let mut out: Vec<(Arc<Workload>, SocketAddr)> = self
            .service
            .endpoints
            .iter()
            .filter(|w| self.subset.as_ref().is_none_or(|s| s.selects(&w.labels)))
            .filter_map(|w| Some((w.clone(), SocketAddr::new(w.address(v4)?, target_port))))
            .collect();
        out.sort_by_key(|(_, a)| *a);
        out
    }
}

/// A cluster resolved for one state snapshot: its settings, its endpoints of one address family
/// and its balancing state (which outlives snapshots).
#[derive(Debug)]
pub struct Resolved {
    pub cluster: Cluster,
    pub endpoints: Vec<(Arc<Workload>, SocketAddr)>,
    pub addrs: Vec<SocketAddr>,
    pub balancer: Arc<balance::Cluster>,
}

/// What resolving a (target, subset) gives: a cluster, none (no DestinationRule applies), or
/// why not (an undefined subset).
pub type Resolution = Result<Option<Arc<Resolved>>, String>;

/// Resolutions of one snapshot, by target, then subset.
type BySubset = HashMap<SocketAddr, Vec<(Option<String>, Resolution)>>;

/// Targets whose resolution is kept per snapshot; past it, resolution is not cached.
const MAX_CACHED: usize = 4096;
/// Clusters whose balancing state is kept before unused ones are pruned.
const MAX_BALANCERS: usize = 4096;

/// Clusters resolved once per state snapshot (a DestinationRule merge per request would cost
/// more than the balancing itself), and the clusters' balancing state.
#[derive(Default)]
pub struct Clusters {
    /// The snapshot the entries were resolved in (kept, so its address is not reused).
    current: Mutex<(Arc<State>, BySubset)>,
    balancers: Mutex<HashMap<String, Arc<balance::Cluster>>>,
}

impl Clusters {
    /// The cluster of `subset` of the Service behind `target` under `state`; `latest` is the
    /// proxy's current snapshot (only it replaces the cache, as for routes).
    pub fn resolve(
        &self,
        state: &Arc<State>,
        latest: impl FnOnce() -> Arc<State>,
        target: SocketAddr,
        subset: Option<&str>,
    ) -> Resolution {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&current.0, state) {
            if let Some(found) = current
                .1
                .get(&target)
                .and_then(|v| v.iter().find(|(s, _)| s.as_deref() == subset))
            {
                return found.1.clone();
            }
        } else if Arc::ptr_eq(state, &latest()) {
            *current = (state.clone(), HashMap::new());
        } else {
            drop(current);
            return self.resolve_uncached(state, target, subset);
        }
        let resolved = self.resolve_uncached(state, target, subset);
        if current.1.len() < MAX_CACHED {
            current
                .1
                .entry(target)
                .or_default()
                .push((subset.map(str::to_string), resolved.clone()));
        }
        resolved
    }

    fn resolve_uncached(
        &self,
        state: &State,
        target: SocketAddr,
        subset: Option<&str>,
    ) -> Resolution {
        let Some(cluster) = Cluster::of(state, target, subset)? else {
            return Ok(None);
        };
        let endpoints = cluster.endpoints(target.is_ipv4());
        let addrs = endpoints.iter().map(|(_, a)| *a).collect();
        let balancer = {
            let mut balancers = self.balancers.lock().unwrap_or_else(|e| e.into_inner());
            // Per address family too: each has its own endpoint addresses.
            let family = if target.is_ipv4() { "/v4" } else { "/v6" };
            let name = format!("{}{family}", cluster.name);
            if balancers.len() >= MAX_BALANCERS && !balancers.contains_key(&name) {
                balancers.retain(|_, b| Arc::strong_count(b) > 1);
            }
            balancers.entry(name).or_default().clone()
        };
        Ok(Some(Arc::new(Resolved {
            cluster,
            endpoints,
            addrs,
            balancer,
        })))
    }
}

/// The consistent-hash key of a request: the header's value, the cookie's, the query
/// parameter's or the client's address; `None` when the request has none of it (it is then
/// balanced at random, as Envoy does).
pub fn hash_key(key: &HashKey, parts: &request::Parts, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::HttpHeaderName(name) => {
            let value = parts.headers.get(name.as_str())?;
            Some(balance::hash(value.as_bytes()))
        }
        HashKey::HttpCookie(cookie) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == cookie.name)
            .map(|(_, value)| unquoted(value))
            // An empty value is no cookie (Envoy's reading): one is generated if it can be.
            .filter(|value| !value.is_empty())
            .map(|value| balance::hash(value.as_bytes())),
        HashKey::UseSourceIp => Some(balance::hash(client.to_string().as_bytes())),
        HashKey::HttpQueryParameterName(name) => {
            let query = parts.uri.query()?;
            query
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| balance::hash(v.as_bytes()))
        }
    }
}

/// A cookie value without its double quotes, if it has them (RFC 6265's `cookie-value`).
fn unquoted(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// The session cookie a waypoint hands out, as Envoy does for `httpCookie` with a `ttl`, to a
/// request that lacks it: a value of its own (the same for every request of one client
/// connection: a hash of its address and the target's), the request's hash key made from it
/// as if the client had sent it, and the `Set-Cookie` header (`name="value"`, `Max-Age` in
/// whole seconds unless under one second, `Path` if set, `HttpOnly`). `None` for another key,
/// a cookie without a ttl (no cookie is generated: the request is balanced at random) or a name
/// or path that cannot be a header.
pub fn generated_cookie(
    key: &HashKey,
    client: SocketAddr,
    target: SocketAddr,
) -> Option<(u64, http::HeaderValue)> {
    let HashKey::HttpCookie(cookie) = key else {
        return None;
    };
    let ttl = cookie.ttl?;
    let value = format!(
        "{:016x}",
        balance::hash(format!("{client}|{target}").as_bytes())
    );
    let mut text = format!("{}=\"{value}\"", cookie.name);
    // Whole seconds, as Envoy: under one second is a session cookie.
    if ttl.as_secs() > 0 {
        text += &format!("; Max-Age={}", ttl.as_secs());
    }
    if let Some(path) = &cookie.path {
        text += &format!("; Path={path}");
    }
    text += "; HttpOnly";
    let header = http::HeaderValue::from_str(&text).ok()?;
    Some((balance::hash(value.as_bytes()), header))
}

#[cfg(test)]
mod tests;
