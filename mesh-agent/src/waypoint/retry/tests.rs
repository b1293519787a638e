use super::*;

fn response(code: u16) -> Outcome {
    Outcome::Response {
        status: StatusCode::from_u16(code).unwrap(),
        grpc_status: None,
    }
}

fn route_policy(codes: &[u16]) -> RetryPolicy {
    RetryPolicy::for_http_route(codes, None, None, Some(Duration::from_secs(1)))
}

#[test]
fn an_http_route_retry_reads_as_istio_maps_it() {
    let p = RetryPolicy::for_http_route(&[503], Some(4), Some(Duration::from_millis(100)), None);
    assert_eq!(p.retries, 4);
    assert_eq!(p.backoff, Duration::from_millis(100));
    assert_eq!(p.max_backoff, Duration::from_secs(1));
    assert_eq!(p.per_try_timeout, None);
    let defaults = RetryPolicy::for_http_route(&[], None, None, Some(Duration::ZERO));
    assert_eq!(defaults.retries, DEFAULT_RETRIES);
    assert_eq!(defaults.backoff, DEFAULT_BACKOFF);
    assert_eq!(defaults.per_try_timeout, None, "zero disables a timeout");
    let on = &p.on;
    assert!(on.matches(response(503)));
    assert!(!on.matches(response(500)), "only the codes listed");
    assert!(!on.matches(response(200)));
    for outcome in [
        Outcome::ConnectFailure,
        Outcome::RefusedStream,
        Outcome::Reset,
        Outcome::TryTimeout,
    ] {
        assert!(on.matches(outcome), "{outcome:?}");
    }
    let grpc = |g| Outcome::Response {
        status: StatusCode::OK,
        grpc_status: Some(g),
    };
    assert!(on.matches(grpc(14)), "unavailable");
    assert!(on.matches(grpc(1)), "cancelled");
    assert!(!on.matches(grpc(13)), "internal is not retried by default");
}

#[test]
fn envoy_retry_on_words_select_their_outcomes() {
    let server_error = RetryOn {
        server_error: true,
        ..RetryOn::default()
    };
    assert!(server_error.matches(response(500)) && server_error.matches(response(599)));
    assert!(!server_error.matches(response(409)));
    assert!(server_error.matches(Outcome::ConnectFailure) && server_error.matches(Outcome::Reset));
    assert!(server_error.matches(Outcome::TryTimeout));
    let gateway = RetryOn {
        gateway_error: true,
        ..RetryOn::default()
    };
    assert!(gateway.matches(response(502)) && gateway.matches(response(504)));
    assert!(!gateway.matches(response(500)));
    assert!(gateway.matches(Outcome::TryTimeout));
    assert!(!gateway.matches(Outcome::Reset));
    let connect = RetryOn {
        connect_failure: true,
        ..RetryOn::default()
    };
    assert!(connect.matches(Outcome::ConnectFailure));
    assert!(!connect.matches(Outcome::Reset) && !connect.matches(Outcome::RefusedStream));
    let before = RetryOn {
        reset_before_request: true,
        ..RetryOn::default()
    };
    assert!(before.matches(Outcome::RefusedStream) && !before.matches(Outcome::Reset));
    let conflict = RetryOn {
        retriable_4xx: true,
        ..RetryOn::default()
    };
    assert!(conflict.matches(response(409)) && !conflict.matches(response(404)));
    assert!(!RetryOn::default().matches(response(503)));
}

#[test]
fn only_requests_that_cannot_have_been_processed_are_retried_for_any_method() {
    let p = route_policy(&[503]);
    assert!(p.should_retry(&Method::GET, response(503), 0));
    assert!(p.should_retry(&Method::PUT, Outcome::Reset, 1));
    assert!(!p.should_retry(&Method::POST, response(503), 0));
    assert!(!p.should_retry(&Method::POST, Outcome::Reset, 0));
    assert!(!p.should_retry(&Method::PATCH, Outcome::TryTimeout, 0));
    assert!(p.should_retry(&Method::POST, Outcome::ConnectFailure, 0));
    assert!(p.should_retry(&Method::POST, Outcome::RefusedStream, 0));
}

#[test]
fn retries_stop_at_the_configured_count() {
    let p = RetryPolicy::for_http_route(&[503], Some(3), None, None);
    assert!(p.should_retry(&Method::GET, response(503), 2));
    assert!(!p.should_retry(&Method::GET, response(503), 3));
    let none = RetryPolicy::for_http_route(&[503], Some(0), None, None);
    assert!(!none.should_retry(&Method::GET, Outcome::ConnectFailure, 0));
}

#[test]
fn backoff_doubles_from_the_base_with_jitter_up_to_the_cap() {
    let p = RetryPolicy::for_http_route(&[], None, Some(Duration::from_millis(100)), None);
    assert_eq!(p.backoff(1, 0), Duration::from_millis(100));
    assert_eq!(p.backoff(2, 0), Duration::from_millis(200));
    assert_eq!(p.backoff(3, 0), Duration::from_millis(400));
    assert_eq!(
        p.backoff(5, 0),
        Duration::from_secs(1),
        "capped at 10 × base"
    );
    assert_eq!(p.backoff(40, 0), Duration::from_secs(1), "no overflow");
    let most = p.backoff(1, u32::MAX);
    assert!(
        most > Duration::from_millis(149) && most <= Duration::from_millis(150),
        "{most:?}"
    );
    for random in [1, 1 << 20, u32::MAX / 3] {
        assert!(p.backoff(1, random) >= p.backoff, "never below the base");
    }
}

#[test]
fn the_budget_allows_a_floor_then_a_share_of_requests_in_flight() {
    let budgets = Budgets::default();
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let requests: Vec<InFlight> = (0..10).map(|_| budgets.request(target)).collect();
    // 20 % of 10 is 2, below the floor of 3.
    let held: Vec<RetryGuard> = (0..3).map(|_| requests[0].retry(None).unwrap()).collect();
    assert!(
        requests[1].retry(None).is_none(),
        "a fourth retry in flight"
    );
    drop(held);
    assert!(
        requests[1].retry(None).is_some(),
        "retries ended give room back"
    );
    let more: Vec<InFlight> = (0..40).map(|_| budgets.request(target)).collect();
    // 50 requests in flight: 10 retries.
    let held: Vec<RetryGuard> = (0..10).map(|_| more[0].retry(None).unwrap()).collect();
    assert!(more[1].retry(None).is_none());
    assert!(
        more[2].retry(Some(20)).is_none(),
        "maxRetries does not lift the budget"
    );
    // Another destination has its own budget, capped here by maxRetries.
    let capped = budgets.request("10.0.0.3:80".parse().unwrap());
    let one = capped.retry(Some(1)).unwrap();
    assert!(capped.retry(Some(1)).is_none());
    drop(one);
    let other = budgets.request("10.0.0.2:80".parse().unwrap());
    assert!(other.retry(None).is_some());
    drop((held, more, requests, other));
}

#[test]
fn idle_destinations_are_pruned_when_many_are_tracked() {
    let budgets = Budgets::default();
    for i in 0..MAX_TRACKED as u32 {
        let addr = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80));
        drop(budgets.request(addr));
    }
    assert_eq!(budgets.tracked(), MAX_TRACKED);
    let busy = budgets.request("10.255.0.1:80".parse().unwrap());
    assert_eq!(budgets.tracked(), 1, "idle ones went, the new one stays");
    drop(busy);
}
