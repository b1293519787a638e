//! The waypoint's choice of an endpoint for each request (a DestinationRule's `loadBalancer`
//! and `outlierDetection`, per cluster: a Service port, or one subset of it): round robin,
//! random, least request (the less busy of two drawn at random, Envoy's default for it) and
//! consistent hashing (a ring or a Maglev table over the endpoints, keyed by a header, a cookie,
//! a query parameter or the client's address). Endpoints that fail in a row are ejected for a
//! while ([`OutlierPolicy`]). Decisions are pure over the clock and the draws the caller passes.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest ejection unless the base is longer (Envoy's `max_ejection_time` default).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How a cluster picks among its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    /// Of two endpoints drawn at random, the one with fewer requests in flight.
    LeastRequest,
    /// The endpoint a request's key hashes to, stable while the endpoints stay the same.
    Hash(HashTable),
}

/// The consistent-hash structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    /// A ring with at least this many points (Envoy's default 1024).
    Ring { min_size: u32 },
    /// A Maglev lookup table of this (prime) size (Envoy's default 65537).
    Maglev { size: u32 },
}

/// Outlier detection: consecutive failures eject an endpoint for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 5xx answers (and connection failures) in a row that eject; `None`: not counted.
    pub consecutive_5xx: Option<u32>,
    /// 502, 503 and 504 (and connection failures) in a row that eject.
    pub consecutive_gateway: Option<u32>,
    /// How often ejections are reconsidered: an ejection lasts whole intervals.
    pub interval: Duration,
    /// An endpoint's n-th ejection lasts n times this.
    pub base_ejection: Duration,
    /// At most this share of the endpoints is ejected at once (at least one).
    pub max_ejection_percent: u32,
    /// Below this share of endpoints healthy, ejections are ignored (all are used).
    pub min_health_percent: u32,
}

/// What became of a request, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Success,
    /// 500, 501, 505..599: a 5xx that is not a gateway error.
    ServerError,
    /// 502, 503, 504, or no connection / no response.
    GatewayError,
}

impl Served {
    /// The result of a response with `status` (`None`: none came).
    pub fn of(status: Option<u16>) -> Served {
        match status {
            None | Some(502..=504) => Served::GatewayError,
            Some(500..=599) => Served::ServerError,
            Some(_) => Served::Success,
        }
    }
}

/// One endpoint's state in a cluster.
#[derive(Debug, Default)]
struct Endpoint {
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// A cluster's balancing state, kept across config snapshots.
#[derive(Debug, Default)]
pub struct Cluster {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: usize,
    /// The endpoint set last picked from.
    known: Vec<SocketAddr>,
    endpoints: HashMap<SocketAddr, Endpoint>,
    /// The hash table of the last endpoint set it was built for.
    table: Option<(Vec<SocketAddr>, HashTable, Vec<u32>)>,
}

/// A request counted in flight to an endpoint until its result is reported (or it is dropped,
/// which reports nothing).
pub struct InFlight {
    cluster: Arc<Cluster>,
    endpoint: SocketAddr,
}

impl InFlight {
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Reports how the request ended, for outlier detection under `policy`.
    pub fn finish(self, result: Served, policy: Option<&OutlierPolicy>, now: Instant) {
        let mut inner = self.cluster.lock();
        let total = inner.endpoints.len();
        let ejected = inner.ejected(now);
        let Some(e) = inner.endpoints.get_mut(&self.endpoint) else {
            return;
        };
        match result {
            Served::Success => {
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
            }
            Served::ServerError => {
                e.consecutive_5xx += 1;
                e.consecutive_gateway = 0;
            }
            Served::GatewayError => {
                e.consecutive_5xx += 1;
                e.consecutive_gateway += 1;
            }
        }
        let Some(policy) = policy else {
            return;
        };
        let tripped = policy
            .consecutive_5xx
            .is_some_and(|n| n > 0 && e.consecutive_5xx >= n)
            || policy
                .consecutive_gateway
                .is_some_and(|n| n > 0 && e.consecutive_gateway >= n);
        let already = e.ejected_until.is_some_and(|t| t > now);
        let room = ejected < (total * policy.max_ejection_percent as usize / 100).max(1);
        if tripped && !already && room {
            let interval = policy.interval.max(Duration::from_millis(1));
            // Envoy's backoff decays: each interval an endpoint spends back in takes one off
            // the multiplier of its next ejection.
            if let Some(back) = e.ejected_until.filter(|t| *t <= now) {
                let healthy = now.duration_since(back).as_nanos() / interval.as_nanos();
                e.ejections = e
                    .ejections
                    .saturating_sub(u32::try_from(healthy).unwrap_or(u32::MAX));
            }
            e.ejections = e.ejections.saturating_add(1);
            // Envoy's cap: the longer of 300 s and the base.
            let cap = policy.base_ejection.max(MAX_EJECTION);
            let length = policy.base_ejection.saturating_mul(e.ejections).min(cap);
            // Ejections end on an interval boundary, as Envoy checks them once per interval.
            let intervals = length.as_nanos().div_ceil(interval.as_nanos());
            let rounded = interval
                .saturating_mul(u32::try_from(intervals).unwrap_or(u32::MAX))
                .min(cap.saturating_add(interval));
            e.ejected_until = Some(now + rounded);
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            tracing::warn!(endpoint = %self.endpoint, ejection = e.ejections, duration = ?rounded, "endpoint ejected by outlier detection");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.cluster.lock().endpoints.get_mut(&self.endpoint) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

impl Inner {
    fn ejected(&self, now: Instant) -> usize {
        self.endpoints
            .values()
            .filter(|e| e.ejected_until.is_some_and(|t| t > now))
            .count()
    }
}

impl Cluster {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks one of `endpoints` (non-empty, in a stable order) under `policy`, leaving out
    /// ejected ones unless fewer than `min_health_percent` would remain; `key` is the request's
    /// hash key (for [`LbPolicy::Hash`]; `None`: a random endpoint), `random` a uniform draw.
    pub fn pick(
        self: &Arc<Self>,
        endpoints: &[SocketAddr],
        policy: &LbPolicy,
        outlier: Option<&OutlierPolicy>,
        key: Option<u64>,
        random: u64,
        now: Instant,
    ) -> Option<InFlight> {
        self.pick_avoiding(endpoints, policy, outlier, key, random, now, None)
    }

    /// [`pick`](Self::pick) for a retry: not `previous` (the endpoint the last try went to)
    /// while another one is usable, as Istio's retries do (Envoy's `previous_hosts`): the
    /// endpoint after it in the usable order takes its place. Not under a consistent hash:
    /// Istio keeps a session's retries on its endpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_avoiding(
        self: &Arc<Self>,
        endpoints: &[SocketAddr],
        policy: &LbPolicy,
        outlier: Option<&OutlierPolicy>,
        key: Option<u64>,
        random: u64,
        now: Instant,
        previous: Option<SocketAddr>,
    ) -> Option<InFlight> {
        if endpoints.is_empty() {
            return None;
        }
        let mut inner = self.lock();
        // When the endpoints changed: forget those that left (an ejection that ended with no
        // traffic is kept counted: a flapping endpoint is ejected longer each time).
        if inner.known != endpoints {
            inner.endpoints.retain(|a, _| endpoints.contains(a));
            for a in endpoints {
                inner.endpoints.entry(*a).or_default();
            }
            inner.known = endpoints.to_vec();
        }
        let healthy: Vec<SocketAddr>;
        let usable: &[SocketAddr] = if inner.ejected(now) == 0 {
            endpoints
        } else {
            healthy = endpoints
                .iter()
                .copied()
                .filter(|a| inner.endpoints[a].ejected_until.is_none_or(|t| t <= now))
                .collect();
            let min_health = outlier.map_or(0, |o| o.min_health_percent as usize);
            if healthy.is_empty() || healthy.len() * 100 < endpoints.len() * min_health {
                endpoints
            } else {
                &healthy
            }
        };
        let index = match policy {
            LbPolicy::RoundRobin => {
                let i = inner.next % usable.len();
                inner.next = inner.next.wrapping_add(1);
                i
            }
            LbPolicy::Random => (random % usable.len() as u64) as usize,
            LbPolicy::LeastRequest => {
                let n = usable.len() as u64;
                let a = (random % n) as usize;
                let b = ((random >> 32) % n) as usize;
                let active = |i: usize| inner.endpoints[&usable[i]].active;
                if active(b) < active(a) {
                    b
                } else {
                    a
                }
            }
            LbPolicy::Hash(table) => match key {
                None => (random % usable.len() as u64) as usize,
                Some(key) => inner.hashed(usable, *table, key),
            },
        };
        let index = match previous {
            Some(_) if matches!(policy, LbPolicy::Hash(_)) => index,
            Some(p) if usable.len() > 1 && usable[index] == p => (index + 1) % usable.len(),
            _ => index,
        };
        let endpoint = usable[index];
        inner
            .endpoints
            .get_mut(&endpoint)
            .expect("added above")
            .active += 1;
        Some(InFlight {
            cluster: self.clone(),
            endpoint,
        })
    }

    /// Whether `endpoint` is ejected now (for tests and inspection).
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        self.lock()
            .endpoints
            .get(&endpoint)
            .and_then(|e| e.ejected_until)
            .is_some_and(|t| t > now)
    }
}

impl Inner {
    /// The index in `endpoints` that `key` maps to, building the table if the set changed.
    fn hashed(&mut self, endpoints: &[SocketAddr], table: HashTable, key: u64) -> usize {
        let fresh = matches!(&self.table, Some((set, t, _)) if set == endpoints && *t == table);
        if !fresh {
            let built = match table {
                HashTable::Ring { min_size } => ring(endpoints, min_size),
                HashTable::Maglev { size } => maglev(endpoints, size),
            };
            self.table = Some((endpoints.to_vec(), table, built));
        }
        let (_, _, built) = self.table.as_ref().expect("built above");
        match table {
            HashTable::Ring { .. } => ring_lookup(built, key),
            HashTable::Maglev { .. } => built[(key % built.len() as u64) as usize] as usize,
        }
    }
}

/// 64-bit FNV-1a, then a finalizer (splitmix64) so that close inputs land far apart.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn point(endpoint: SocketAddr, i: u32) -> u64 {
    hash(format!("{endpoint}_{i}").as_bytes())
}

/// A ring as sorted (hash, endpoint index) pairs, flattened: even slots hold hash halves.
/// Stored as `u32`s: [hi, lo, index] per point.
fn ring(endpoints: &[SocketAddr], min_size: u32) -> Vec<u32> {
    let per = min_size.max(1).div_ceil(endpoints.len() as u32).max(1);
    let mut points: Vec<(u64, u32)> = Vec::with_capacity((per as usize) * endpoints.len());
    for (index, e) in endpoints.iter().enumerate() {
        for i in 0..per {
            points.push((point(*e, i), index as u32));
        }
    }
    points.sort_unstable();
    points
        .into_iter()
        .flat_map(|(h, index)| [(h >> 32) as u32, h as u32, index])
        .collect()
}

fn ring_lookup(flat: &[u32], key: u64) -> usize {
    let n = flat.len() / 3;
    let at = |i: usize| (u64::from(flat[3 * i]) << 32) | u64::from(flat[3 * i + 1]);
    // The first point at or after the key, wrapping around.
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if at(mid) < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    flat[3 * (lo % n) + 2] as usize
}

/// A Maglev table (Eisenbud et al., 2016): each endpoint fills the slots of its own
/// permutation in turn until every slot has an endpoint.
fn maglev(endpoints: &[SocketAddr], size: u32) -> Vec<u32> {
    // A prime size makes every permutation visit every slot.
    let m = next_prime(u64::from(size.max(2)));
    let n = endpoints.len();
    let perms: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let name = e.to_string();
            let offset = hash(name.as_bytes()) % m;
            let skip = mix(hash(name.as_bytes()) ^ 0x5bd1_e995) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

/// The least prime at or above `n` (`n` is a table size: small enough for trial division).
fn next_prime(n: u64) -> u64 {
    let is_prime = |k: u64| {
        k >= 2
            && (2..)
                .take_while(|d| d * d <= k)
                .all(|d| !k.is_multiple_of(d))
    };
    (n..).find(|&k| is_prime(k)).expect("primes are unbounded")
}

#[cfg(test)]
mod tests;
