use super::*;

fn endpoints(n: u8) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

fn outlier() -> OutlierPolicy {
    OutlierPolicy {
        consecutive_5xx: None,
        consecutive_gateway: Some(3),
        interval: Duration::from_secs(1),
        base_ejection: Duration::from_secs(30),
        max_ejection_percent: 50,
        min_health_percent: 0,
    }
}

#[test]
fn round_robin_and_random_cover_the_endpoints() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(3);
    let now = Instant::now();
    let picked: Vec<SocketAddr> = (0..6)
        .map(|_| {
            c.pick(&eps, &LbPolicy::RoundRobin, None, None, 0, now)
                .unwrap()
                .endpoint()
        })
        .collect();
    assert_eq!(picked[..3], eps[..]);
    assert_eq!(picked[3..], eps[..]);
    let random = c.pick(&eps, &LbPolicy::Random, None, None, 5, now).unwrap();
    assert_eq!(random.endpoint(), eps[2]);
    assert!(c.pick(&[], &LbPolicy::Random, None, None, 5, now).is_none());
}

#[test]
fn least_request_takes_the_less_busy_of_two() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(2);
    let now = Instant::now();
    // Draws 0 and 1: endpoints 0 and 1; both idle: the first.
    let busy = c
        .pick(&eps, &LbPolicy::LeastRequest, None, None, 1 << 32, now)
        .unwrap();
    assert_eq!(busy.endpoint(), eps[0]);
    // Endpoint 0 has a request in flight: endpoint 1 wins, whichever is drawn first.
    for random in [1 << 32, 1] {
        let next = c
            .pick(&eps, &LbPolicy::LeastRequest, None, None, random, now)
            .unwrap();
        assert_eq!(next.endpoint(), eps[1], "draw {random:x}");
    }
    drop(busy);
}

#[test]
fn a_hash_key_stays_on_one_endpoint_and_keys_spread() {
    for table in [
        HashTable::Ring { min_size: 1024 },
        HashTable::Maglev { size: 65537 },
    ] {
        let c = Arc::new(Cluster::default());
        let eps = endpoints(4);
        let now = Instant::now();
        let policy = LbPolicy::Hash(table);
        let pick = |key: u64| {
            c.pick(&eps, &policy, None, Some(key), 0, now)
                .unwrap()
                .endpoint()
        };
        let first = pick(hash(b"user-42"));
        for _ in 0..20 {
            assert_eq!(pick(hash(b"user-42")), first, "{table:?}");
        }
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for i in 0..4000 {
            *counts
                .entry(pick(hash(format!("user-{i}").as_bytes())))
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 4, "{table:?}: {counts:?}");
        for (e, n) in &counts {
            assert!((600..=1400).contains(n), "{table:?}: {e} got {n}");
        }
        // Removing one endpoint moves only (about) its own keys.
        let fewer = &eps[..3];
        let moved = (0..2000)
            .filter(|i| {
                let key = hash(format!("user-{i}").as_bytes());
                let before = pick(key);
                let after = c
                    .pick(fewer, &policy, None, Some(key), 0, now)
                    .unwrap()
                    .endpoint();
                before != eps[3] && before != after
            })
            .count();
        // A quarter of the keys belonged to the endpoint that left; of the rest, a ring moves
        // some more (each remaining endpoint gets more points), a Maglev table a few.
        let most = match table {
            HashTable::Ring { .. } => 400,
            HashTable::Maglev { .. } => 200,
        };
        assert!(moved < most, "{table:?}: {moved} of 2000 keys moved");
    }
}

#[test]
fn the_maglev_table_fills_for_any_size() {
    let t = maglev(&endpoints(3), 100);
    assert_eq!(t.len(), 101, "rounded up to a prime");
    assert!(t.iter().all(|&i| i < 3));
    assert_eq!(next_prime(65537), 65537);
}

/// Picks from all `eps` (round robin) until `target` comes up, and reports `status` for it.
fn report(
    c: &Arc<Cluster>,
    eps: &[SocketAddr],
    target: usize,
    status: Option<u16>,
    policy: &OutlierPolicy,
    now: Instant,
) {
    for _ in 0..eps.len() {
        let p = c
            .pick(eps, &LbPolicy::RoundRobin, Some(policy), None, 0, now)
            .unwrap();
        if p.endpoint() == eps[target] {
            p.finish(Served::of(status), Some(policy), now);
            return;
        }
    }
    panic!("{} never picked", eps[target]);
}

#[test]
fn consecutive_gateway_errors_eject_an_endpoint_until_its_time_is_up() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(2);
    let policy = outlier();
    let t0 = Instant::now();
    report(&c, &eps, 0, Some(503), &policy, t0);
    report(&c, &eps, 0, Some(503), &policy, t0);
    assert!(!c.is_ejected(eps[0], t0));
    // A success in between starts the count again.
    report(&c, &eps, 0, Some(200), &policy, t0);
    for _ in 0..3 {
        report(&c, &eps, 0, Some(503), &policy, t0);
    }
    assert!(c.is_ejected(eps[0], t0));
    // While ejected, every pick goes to the other endpoint.
    for _ in 0..4 {
        let p = c
            .pick(&eps, &LbPolicy::RoundRobin, Some(&policy), None, 0, t0)
            .unwrap();
        assert_eq!(p.endpoint(), eps[1]);
    }
    // Back after the base ejection time; the second ejection lasts twice as long.
    let t1 = t0 + Duration::from_secs(30);
    assert!(!c.is_ejected(eps[0], t1));
    for _ in 0..3 {
        report(&c, &eps, 0, None, &policy, t1);
    }
    assert!(c.is_ejected(eps[0], t1 + Duration::from_secs(59)));
    assert!(!c.is_ejected(eps[0], t1 + Duration::from_secs(60)));
}

#[test]
fn ejections_are_capped_and_too_few_healthy_endpoints_use_them_all() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(2);
    let policy = outlier();
    let now = Instant::now();
    for _ in 0..3 {
        report(&c, &eps, 0, Some(502), &policy, now);
    }
    assert!(c.is_ejected(eps[0], now));
    // The other fails as often, but 50 % of two allows one ejection at a time. (With one
    // ejected, every pick goes to it: no need to search.)
    for _ in 0..3 {
        let p = c
            .pick(&eps, &LbPolicy::RoundRobin, Some(&policy), None, 0, now)
            .unwrap();
        assert_eq!(p.endpoint(), eps[1]);
        p.finish(Served::of(Some(502)), Some(&policy), now);
    }
    assert!(
        !c.is_ejected(eps[1], now),
        "50 % of two: one ejection at most"
    );
    // minHealthPercent 60: one healthy of two is too few, so both are used.
    let strict = OutlierPolicy {
        min_health_percent: 60,
        ..policy
    };
    let seen: std::collections::HashSet<SocketAddr> = (0..4)
        .map(|_| {
            c.pick(&eps, &LbPolicy::RoundRobin, Some(&strict), None, 0, now)
                .unwrap()
                .endpoint()
        })
        .collect();
    assert_eq!(seen.len(), 2);
    // 5xx counting: 500 counts for consecutive5xxErrors, not for gateway errors.
    assert_eq!(Served::of(Some(500)), Served::ServerError);
    assert_eq!(Served::of(Some(504)), Served::GatewayError);
    assert_eq!(Served::of(Some(404)), Served::Success);
}

#[test]
fn a_retry_leaves_out_the_previous_endpoint_while_another_is_usable() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(3);
    let now = Instant::now();
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LeastRequest,
    ] {
        for random in 0..20u64 {
            let first = c
                .pick(&eps, &policy, None, Some(random), random, now)
                .unwrap()
                .endpoint();
            let again = c
                .pick_avoiding(&eps, &policy, None, Some(random), random, now, Some(first))
                .unwrap()
                .endpoint();
            assert_ne!(first, again, "{policy:?}");
        }
    }
    // A consistent hash keeps the session's endpoint, retries included (as Istio does).
    let hash = LbPolicy::Hash(HashTable::Maglev { size: 65537 });
    for key in 0..20u64 {
        let first = c
            .pick(&eps, &hash, None, Some(key), 0, now)
            .unwrap()
            .endpoint();
        let again = c
            .pick_avoiding(&eps, &hash, None, Some(key), 0, now, Some(first))
            .unwrap()
            .endpoint();
        assert_eq!(first, again);
    }
    // The only endpoint is tried again.
    let one = &eps[..1];
    let again = c
        .pick_avoiding(one, &LbPolicy::RoundRobin, None, None, 0, now, Some(eps[0]))
        .unwrap();
    assert_eq!(again.endpoint(), eps[0]);
}

#[test]
fn the_ejection_multiplier_drops_by_one_per_interval_spent_back_in() {
    let c = Arc::new(Cluster::default());
    let eps = endpoints(2);
    let policy = outlier(); // interval 1 s, base 30 s, 3 gateway errors
    let eject = |at: Instant| {
        for _ in 0..3 {
            report(&c, &eps, 0, Some(503), &policy, at);
        }
        assert!(c.is_ejected(eps[0], at));
    };
    let t0 = Instant::now();
    eject(t0); // 30 s
    let t1 = t0 + Duration::from_secs(30);
    eject(t1); // right back: 60 s
    assert!(c.is_ejected(eps[0], t1 + Duration::from_secs(59)));
    // Back at t1 + 60 s; 1.5 intervals in take one off: the third ejection lasts 60 s, not 90.
    let t2 = t1 + Duration::from_millis(61_500);
    eject(t2);
    assert!(c.is_ejected(eps[0], t2 + Duration::from_millis(59_000)));
    assert!(!c.is_ejected(eps[0], t2 + Duration::from_secs(61)));
    // Long healthy: back to the base.
    let t3 = t2 + Duration::from_secs(3600);
    eject(t3);
    assert!(!c.is_ejected(eps[0], t3 + Duration::from_secs(31)));
}
