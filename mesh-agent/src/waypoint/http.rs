//! The waypoint's HTTP side: a stream the proxy detected as HTTP is served with hyper (HTTP/1.1
//! or HTTP/2, as the client spoke). Each request is authorized, routed by the `HTTPRoute`s that
//! apply (`routes`, `routing`) and forwarded over an upstream HTTP connection of the same
//! version from the pool (`upstream`), carried in an HBONE tunnel the waypoint opens with its
//! own identity. Each request is reported (`telemetry`): a record started when it arrives and
//! finished when its response has been sent.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{request, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;

use super::balance::{InFlight, Served};
use super::cluster::{generated_cookie, hash_key, Clusters, Resolved};
use super::fault::AbortWith;
use super::normalize::normalize_uri;
use super::primed::prime;
use super::rate_limit::Limiter;
use super::replay::Replayable;
use super::retry::{self, Budgets, Outcome, RetryPolicy};
use super::routes::RouteCache;
use super::routing::{BackendReference, Listener, RequestOutcome, RouteKind, RouteTable, Rule};
use super::telemetry::{grpc_status, Downstream, ResponseFlag, Telemetry, UpstreamInfo};
use super::upstream::{Body, Endpoint, Limits, Pool, UpstreamError, Via};
use crate::policy::HttpAttributes;
use crate::proxy::{authorize_client, denied, BoxFuture, Detected, HttpHandler, HttpStream, Proxy};
use crate::state::State;

/// Mirrored requests in flight at once; beyond that a mirror is skipped (and logged).
const MAX_MIRRORS_IN_FLIGHT: usize = 64;
/// The largest request body copied for a mirror; a larger one (or one of unknown length) is not
/// mirrored.
const MAX_MIRROR_BODY: u64 = 64 * 1024;

/// The waypoint's HTTP handler; cheap to share.
pub struct Http {
    proxy: Arc<Proxy>,
    routes: RouteCache,
    pool: Pool,
    mirrors: Arc<Semaphore>,
    budgets: Budgets,
    limiter: Limiter,
    /// DestinationRule clusters, resolved per snapshot, and their balancing state.
    clusters: Clusters,
    telemetry: Arc<Telemetry>,
}

/// Where a copy of a request goes.
struct Mirror {
    /// A Service VIP and port.
    target: SocketAddr,
    /// A VirtualService mirror's subset.
    subset: Option<String>,
}

/// Where a request goes, as routing decided.
struct Routed<'t> {
    /// The address to forward to: a backend Service's VIP and port, or the original target.
    target: SocketAddr,
    /// The route that matched, if routes apply.
    route: Option<&'t super::routing::Route>,
    rule: Option<&'t Rule>,
    backend: Option<&'t super::routing::Backend>,
    /// Where copies go.
    mirrors: Vec<Mirror>,
    /// The rule's retry policy.
    retry: Option<&'t RetryPolicy>,
    /// The backend's circuit-breaker limits.
    limits: Limits,
    /// Where a DestinationRule applies: the waypoint picks the endpoint.
    cluster: Option<Arc<Resolved>>,
    /// The request's consistent-hash key, when the cluster hashes.
    hash: Option<u64>,
}

impl Routed<'_> {
    /// The time to the response's head for all tries (`timeouts.request`; zero: none).
    fn request_timeout(&self) -> Option<Duration> {
        self.rule
            .and_then(|r| r.request_timeout)
            .filter(|d| !d.is_zero())
    }

    /// Without retries, the time to the response's head: the shorter of `timeouts.request`
    /// and `timeouts.backendRequest` (zero disables either).
    fn try_timeout(&self) -> Option<Duration> {
        let rule = self.rule?;
        [rule.request_timeout, rule.backend_request_timeout]
            .into_iter()
            .flatten()
            .filter(|d| !d.is_zero())
            .min()
    }
}

impl Http {
    /// The handler of the waypoint `waypoint` (`namespace/name`).
    pub fn new(proxy: Arc<Proxy>, waypoint: String, telemetry: Arc<Telemetry>) -> Arc<Http> {
        Arc::new(Http {
            proxy,
            routes: RouteCache::new(waypoint),
            pool: Pool::with_gauges(telemetry.upstream_gauges()),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            budgets: Budgets::default(),
            limiter: Limiter::default(),
            clusters: Clusters::default(),
            telemetry,
        })
    }

    async fn forward(&self, stream: &StreamInfo, req: Request<Incoming>) -> Response<Body> {
        let mut record = self.telemetry.start(&stream.downstream, &req);
        let state = self.proxy.state();
        let (mut parts, body) = req.into_parts();
        // Policy, routing and the backend see one path: Istio's normalized form.
        match normalize_uri(&parts.uri) {
            Some(uri) => parts.uri = uri,
            None => {
                let bad = text(StatusCode::BAD_REQUEST, "Bad Request");
                return record.respond(bad, ResponseFlag::None);
            }
        }
        // Hop-by-hop headers go first, so what is authorized is what is routed.
        strip_hop_by_hop(&mut parts.headers);
        let attributes = HttpAttributes {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            host: request_host(&parts).unwrap_or_default(),
            headers: parts.headers.clone(),
        };
        let client = (stream.peer.ip(), &*stream.peer_id);
        let verdict = authorize_client(
            &state,
            &stream.local.workload,
            stream.target,
            client,
            Some(&attributes),
        );
        if let Err(decision) = verdict {
            denied(
                &self.proxy,
                &stream.local,
                stream.target,
                client,
                &decision,
                "request",
            );
            return record.respond(forbidden(), ResponseFlag::None);
        }
        let routes = self.routes.get(&state, || self.proxy.state());
        let table = state
            .service_by_vip(stream.target.ip())
            .and_then(|svc| routes.for_service(svc, stream.target.port()));
        let routed = match table {
            None => Ok(Routed {
                target: stream.target,
                route: None,
                rule: None,
                backend: None,
                mirrors: Vec::new(),
                retry: None,
                limits: Limits::default(),
                cluster: None,
                hash: None,
            }),
            Some(table) => route(&state, table, &mut parts, stream.target),
        };
        let mut routed = match routed {
            Ok(routed) => routed,
            Err((response, flag)) => return record.respond(*response, flag),
        };
        // A route may send the request to another Service than the one addressed: its
        // workloads' policies are decided for the client too (their agents only see the
        // waypoint), and so are those of every mirror target.
        let allowed = |target: SocketAddr| {
            target == stream.target
                || authorize_client(
                    &state,
                    &stream.local.workload,
                    target,
                    client,
                    Some(&attributes),
                )
                .map_err(|decision| {
                    denied(
                        &self.proxy,
                        &stream.local,
                        target,
                        client,
                        &decision,
                        "request",
                    )
                })
                .is_ok()
        };
        if !allowed(routed.target) {
            return record.respond(forbidden(), ResponseFlag::None);
        }
        routed.mirrors.retain(|m| allowed(m.target));
        // Where a DestinationRule applies to the backend, its cluster: the waypoint picks the
        // endpoint, under the rule's balancing, limits and outlier detection.
        let subset = routed.backend.and_then(|b| b.reference.subset.as_deref());
        // A session-affinity cookie the waypoint generated for this request, for its answer.
        let mut set_cookie = None;
        match self
            .clusters
            .resolve(&state, || self.proxy.state(), routed.target, subset)
        {
            Ok(cluster) => {
                if let Some(c) = &cluster {
                    let policy = &c.cluster.policy;
                    routed.limits = policy.limits;
                    if let Some(key) = &policy.hash_key {
                        routed.hash = hash_key(key, &parts, stream.peer.ip());
                        if routed.hash.is_none() {
                            if let Some((hash, cookie)) =
                                generated_cookie(key, stream.peer, stream.target)
                            {
                                routed.hash = Some(hash);
                                set_cookie = Some(cookie);
                            }
                        }
                    }
                }
                routed.cluster = cluster;
            }
            Err(why) => {
                tracing::warn!(backend = %routed.target, "no endpoint to send to: {why}");
                let (none, flag) = no_healthy_upstream();
                return record.respond(none, flag);
            }
        }
        if let Some(route) = routed.route {
            record.route(route.key().clone());
            if let Some(limit) = route.rate_limit {
                let service = state
                    .service_by_vip(stream.target.ip())
                    .map_or_else(String::new, |s| s.key());
                let key = format!("{}|{service}", route.key());
                if !self.limiter.admit(&key, limit, std::time::Instant::now()) {
                    // Envoy's local rate limit answer.
                    let limited = text(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
                    return record.respond(limited, ResponseFlag::RateLimited);
                }
            }
        }
        let mut delayed = false;
        if let Some(fault) = routed.rule.and_then(|r| r.fault.as_ref()) {
            let injected = fault.draw(rand::random(), rand::random());
            if let Some(delay) = injected.delay {
                tokio::time::sleep(delay).await;
                delayed = true;
            }
            if let Some(abort) = injected.abort {
                return record.respond(aborted(abort), ResponseFlag::FaultInjected);
            }
        }
        // Policy and routing saw the client's trace headers; the upstream (and any mirror)
        // gets the waypoint's span.
        record.inject_trace(&mut parts.headers);
        let body = prime(record.count_request(body));
        let body = match self.mirror(stream, &routed, &parts, body).await {
            Ok(body) => body,
            Err(response) => {
                return record.respond(response, ResponseFlag::DownstreamConnectionTermination)
            }
        };
        let req = Request::from_parts(parts, body);
        let Answer {
            response,
            upstream,
            mut flag,
        } = self.send(stream, &routed, req).await;
        if delayed && flag == ResponseFlag::None {
            flag = ResponseFlag::DelayInjected;
        }
        if let Some(upstream) = &upstream {
            record.upstream(upstream);
        }
        let (mut head, body) = response.into_parts();
        if let Some(rule) = routed.rule {
            rule.filters.apply_response(&mut head);
        }
        if let Some(backend) = routed.backend {
            backend.filters.apply_response(&mut head);
        }
        // After the route's header changes, as Envoy adds it: a filter cannot drop it.
        if let (Some(cookie), Some(_)) = (set_cookie, &upstream) {
            head.headers.append(http::header::SET_COOKIE, cookie);
        }
        record.respond(Response::from_parts(head, body), flag)
    }

    /// Sends `req` to `routed.target` within the route's timeouts, retried as its policy says;
    /// `Err` is the answer to give instead, with its response flag.
    async fn send(&self, stream: &StreamInfo, routed: &Routed<'_>, req: Request<Body>) -> Answer {
        let Some(policy) = routed.retry else {
            let result = self
                .try_once(stream, routed, req, routed.try_timeout(), &mut None, None)
                .await;
            return Answer::of(result, false);
        };
        // Boxed: kept out of the size of every request's future (which is moved whole), the
        // retry path's state is paid for only by requests that have a retry policy.
        let attempts = Box::pin(self.send_with_retries(stream, routed, policy, req));
        match routed.request_timeout() {
            None => attempts.await,
            Some(limit) => tokio::time::timeout(limit, attempts)
                .await
                .unwrap_or_else(|_| Answer::failed(timed_out())),
        }
    }

    /// The tries of one request under `policy`: see `retry`.
    async fn send_with_retries(
        &self,
        stream: &StreamInfo,
        routed: &Routed<'_>,
        policy: &RetryPolicy,
        req: Request<Body>,
    ) -> Answer {
        let (parts, body) = req.into_parts();
        if body
            .size_hint()
            .exact()
            .is_none_or(|n| n > retry::MAX_REPLAY_BODY)
        {
            // Too large, or of unknown length: sent once, as it comes.
            self.retry_skipped(routed.target, "body");
            let req = Request::from_parts(parts, body);
            let result = self
                .try_once(stream, routed, req, policy.per_try_timeout, &mut None, None)
                .await;
            return Answer::of(result, false);
        }
        // The first try streams the body as the bare path does, keeping a copy for the next.
        let replay = Replayable::new(body, retry::MAX_REPLAY_BODY as usize);
        let mut next = replay.body();
        let in_flight = self.budgets.request(routed.target);
        let mut retried = 0;
        let mut _retry = None;
        let mut previous = None;
        loop {
            let body = next.take().expect("each try has its body").boxed();
            let req = Request::from_parts(parts.clone(), body);
            let result = self
                .try_once(
                    stream,
                    routed,
                    req,
                    policy.per_try_timeout,
                    &mut previous,
                    Some(&replay),
                )
                .await;
            if result.is_err() && replay.client_failed() {
                // The client's body broke off: its fault, answered as for a mirror (an answer
                // the upstream gave first is passed on).
                let failed = text(StatusCode::BAD_REQUEST, "request body failed");
                return Answer::failed((failed, ResponseFlag::DownstreamConnectionTermination));
            }
            let outcome = match &result {
                Ok((response, _)) => Outcome::Response {
                    status: response.status(),
                    // Looked up only when a condition reads it.
                    grpc_status: if policy.on.grpc.is_empty() {
                        None
                    } else {
                        grpc_status(response.headers())
                    },
                },
                Err(failed) => failed.outcome,
            };
            if !policy.on.matches(outcome) {
                return Answer::of(result, false);
            }
            if !policy.should_retry(&parts.method, outcome, retried) {
                // Retries were made and are used up: Envoy's `URX` on the answer passed on.
                let exhausted = retried > 0 && retried == policy.retries;
                return Answer::of(result, exhausted);
            }
            // The body again: not when the client's body failed (or ran past its length).
            next = replay.body();
            if next.is_none() {
                self.retry_skipped(routed.target, "body");
                return Answer::of(result, false);
            }
            let max_retries = routed
                .cluster
                .as_ref()
                .and_then(|c| c.cluster.policy.max_retries);
            // The previous retry is over: it no longer counts against the budget.
            _retry = None;
            let Some(guard) = in_flight.retry(max_retries) else {
                self.retry_skipped(routed.target, "budget");
                tracing::debug!(backend = %routed.target, "retry not made: the retry budget is spent");
                return Answer::of(result, true);
            };
            _retry = Some(guard);
            retried += 1;
            self.telemetry
                .retried(&self.proxy.state(), routed.target, outcome.reason());
            if let Ok((response, _)) = result {
                drain(response.into_body()).await;
            }
            tokio::time::sleep(policy.backoff(retried, rand::random())).await;
        }
    }

    /// One try at `routed.target` (or an endpoint of its cluster), within `limit`.
    ///
    /// `previous` is the endpoint the last try of the request went to, left out of the pick if
    /// the cluster has another; it is set to this try's.
    async fn try_once(
        &self,
        stream: &StreamInfo,
        routed: &Routed<'_>,
        req: Request<Body>,
        limit: Option<Duration>,
        previous: &mut Option<SocketAddr>,
        replay: Option<&Replayable>,
    ) -> Result<(Response<Body>, Arc<UpstreamInfo>), Failed> {
        let target = routed.target;
        let key = (target, stream.protocol);
        let picked = match &routed.cluster {
            None => None,
            Some(cluster) => match self.pick(cluster, routed, *previous) {
                Some(picked) => {
                    *previous = Some(picked.1);
                    Some(picked)
                }
                None => {
                    tracing::warn!(cluster = %cluster.cluster.name, "no endpoint to send to");
                    return Err(Failed {
                        outcome: Outcome::ConnectFailure,
                        answer: no_healthy_upstream(),
                    });
                }
            },
        };
        let endpoint = picked.as_ref().map(|(workload, addr, _)| Endpoint {
            workload,
            addr: *addr,
            connect_timeout: routed
                .cluster
                .as_ref()
                .map_or(Duration::MAX, |c| c.cluster.policy.connect_timeout),
        });
        let attempt = async {
            let sent = self
                .pool
                .send(
                    &self.proxy,
                    &stream.local,
                    stream.peer,
                    key,
                    req,
                    Via {
                        limits: &routed.limits,
                        endpoint,
                    },
                )
                .await;
            sent.map(|(mut response, upstream)| {
                strip_hop_by_hop(response.headers_mut());
                (response.map(|body| prime(body).boxed()), upstream)
            })
            .map_err(|e| {
                tracing::warn!(backend = %target, error = %e, "upstream request failed");
                // Envoy's answers, so clients and dashboards see the familiar ones.
                match e {
                    UpstreamError::Overflow(_) => Failed {
                        outcome: Outcome::Overflow,
                        answer: (
                            text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "upstream connect error or disconnect/reset before headers. \
                                 reset reason: overflow",
                            ),
                            ResponseFlag::UpstreamOverflow,
                        ),
                    },
                    UpstreamError::Connect(_, flag) => Failed {
                        outcome: Outcome::ConnectFailure,
                        answer: (
                            text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
                            flag,
                        ),
                    },
                    UpstreamError::Reset(_) | UpstreamError::Refused(_) => Failed {
                        outcome: match e {
                            UpstreamError::Refused(_) => Outcome::RefusedStream,
                            _ => Outcome::Reset,
                        },
                        answer: (
                            text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "upstream connect error or disconnect/reset before headers",
                            ),
                            ResponseFlag::UpstreamConnectionTermination,
                        ),
                    },
                }
            })
        };
        let result = match (limit, replay) {
            (None, _) => attempt.await,
            (Some(limit), None) => match tokio::time::timeout(limit, attempt).await {
                Ok(result) => result,
                Err(_) => Err(Failed {
                    outcome: Outcome::TryTimeout,
                    answer: timed_out(),
                }),
            },
            // As Envoy's per-try timeout: from when the client's body has come whole. Armed
            // from the start (the body usually comes with the head); on expiry, the rest of
            // the body is read (whether or not the upstream takes it) and the deadline moved
            // to its end if that is later. A body that fails ends the try at once.
            (Some(limit), Some(replay)) => {
                let expired = async {
                    tokio::time::sleep(limit).await;
                    replay.fill().await;
                    if let Some(at) = replay.received_at() {
                        tokio::time::sleep_until(at + limit).await;
                    }
                };
                tokio::select! {
                    result = attempt => result,
                    () = expired => Err(Failed {
                        outcome: Outcome::TryTimeout,
                        answer: timed_out(),
                    }),
                }
            }
        };
        // Outlier detection counts what the endpoint did (an overflow is the waypoint's own,
        // a failed client body the client's).
        let clients_fault = replay.is_some_and(Replayable::client_failed);
        if let (Some((_, _, in_flight)), Some(cluster), false) =
            (picked, &routed.cluster, clients_fault)
        {
            let served = match &result {
                Ok((response, _)) => Some(Served::of(Some(response.status().as_u16()))),
                Err(failed) if failed.outcome == Outcome::Overflow => None,
                Err(_) => Some(Served::of(None)),
            };
            if let Some(served) = served {
                let outlier = cluster.cluster.policy.outlier.as_ref();
                in_flight.finish(served, outlier, Instant::now());
            }
        }
        result
    }

    /// An endpoint of `cluster` for one try, counted in flight to it.
    fn pick(
        &self,
        resolved: &Resolved,
        routed: &Routed<'_>,
        previous: Option<SocketAddr>,
    ) -> Option<(Arc<crate::model::Workload>, SocketAddr, InFlight)> {
        let policy = &resolved.cluster.policy;
        let in_flight = resolved.balancer.pick_avoiding(
            &resolved.addrs,
            &policy.lb,
            policy.outlier.as_ref(),
            routed.hash,
            rand::random(),
            Instant::now(),
            previous,
        )?;
        let (workload, addr) = resolved
            .endpoints
            .iter()
            .find(|(_, a)| *a == in_flight.endpoint())?;
        Some((workload.clone(), *addr, in_flight))
    }

    /// Counts a retry `policy` called for that is not made.
    fn retry_skipped(&self, target: SocketAddr, reason: &'static str) {
        self.telemetry
            .retry_skipped(&self.proxy.state(), target, reason);
    }

    /// Sends copies of the request to `routed.mirrors` in the background (their answers are
    /// dropped) and returns the body for the request itself; `Err`: the client's body failed
    /// while it was read for the copies (the request is not forwarded truncated).
    async fn mirror<B>(
        &self,
        stream: &StreamInfo,
        routed: &Routed<'_>,
        parts: &request::Parts,
        body: B,
    ) -> Result<Body, Response<Body>>
    where
        B: HttpBody<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        if routed.mirrors.is_empty() {
            return Ok(body.boxed());
        }
        let hint = body.size_hint();
        let (main, copy) = if hint.exact() == Some(0) {
            (body.boxed(), Bytes::new())
        } else if hint.upper().is_some_and(|n| n <= MAX_MIRROR_BODY) {
            match body.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    (full(bytes.clone()), bytes)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "request body failed while read for a mirror");
                    return Err(text(StatusCode::BAD_REQUEST, "request body failed"));
                }
            }
        } else {
            tracing::debug!(
                waypoint = %stream.local.workload.key(),
                "request not mirrored: its body is larger than {MAX_MIRROR_BODY} bytes or of \
                 unknown length"
            );
            return Ok(body.boxed());
        };
        for &Mirror { target, ref subset } in &routed.mirrors {
            // A subset's copy goes to one of its endpoints.
            let state = self.proxy.state();
            let endpoint = match self.clusters.resolve(
                &state,
                || self.proxy.state(),
                target,
                subset.as_deref(),
            ) {
                Ok(Some(resolved)) => {
                    if resolved.endpoints.is_empty() {
                        tracing::debug!(%target, "request not mirrored: no endpoint");
                        continue;
                    }
                    let i = rand::random::<u32>() as usize % resolved.endpoints.len();
                    let timeout = resolved.cluster.policy.connect_timeout;
                    Some((resolved.endpoints[i].clone(), timeout))
                }
                Ok(None) => None,
                Err(why) => {
                    tracing::debug!(%target, "request not mirrored: {why}");
                    continue;
                }
            };
            let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
                tracing::warn!(%target, "request not mirrored: {MAX_MIRRORS_IN_FLIGHT} mirrors in flight");
                continue;
            };
            let mut head = parts.clone();
            shadow_host(&mut head);
            let req = Request::from_parts(head, full(copy.clone()));
            let (proxy, local, peer, protocol) = (
                self.proxy.clone(),
                stream.local.clone(),
                stream.peer,
                stream.protocol,
            );
            // The mirror has its own connection: a pooled one would be shared with the
            // handler, which lives on the waypoint's side of this task.
            tokio::spawn(async move {
                let _permit = permit;
                let pool = Pool::default();
                match pool
                    .send(
                        &proxy,
                        &local,
                        peer,
                        (target, protocol),
                        req,
                        Via {
                            limits: &Limits::default(),
                            endpoint: endpoint.as_ref().map(|((workload, addr), timeout)| {
                                Endpoint {
                                    workload,
                                    addr: *addr,
                                    connect_timeout: *timeout,
                                }
                            }),
                        },
                    )
                    .await
                {
                    Ok((response, _)) => {
                        let _ = response.into_body().collect().await;
                    }
                    Err(e) => tracing::debug!(%target, error = %e, "mirrored request failed"),
                }
            });
        }
        Ok(main)
    }
}

/// Applies a route table: selects the rule, runs its filters and picks a backend. `Err` is the
/// answer to send instead (404 no route, a redirect, 500 no usable backend).
fn route<'t>(
    state: &State,
    table: &'t RouteTable,
    parts: &mut request::Parts,
    original: SocketAddr,
) -> Result<Routed<'t>, (Box<Response<Body>>, ResponseFlag)> {
    let Some(selected) = table.select(parts) else {
        // Envoy answers a request no route matches with an empty 404.
        return Err((
            Box::new(status(StatusCode::NOT_FOUND)),
            ResponseFlag::NoRoute,
        ));
    };
    let listener = Listener {
        scheme: Scheme::HTTP,
        port: original.port(),
    };
    let rule = selected.rule;
    let route_key: &str = selected.route.key();
    // A redirect or a direct response is answered at once, by the waypoint.
    let redirect = |outcome| match outcome {
        RequestOutcome::Forward => Ok(()),
        RequestOutcome::Redirect(head) => Err((
            Box::new(Response::from_parts(head, empty())),
            ResponseFlag::None,
        )),
        RequestOutcome::Respond(head, body) => Err((
            Box::new(Response::from_parts(head, full(body))),
            ResponseFlag::None,
        )),
    };
    rule.filters
        .apply_request(parts, &listener)
        .map_err(|e| routing_failure(route_key, &e))
        .and_then(redirect)?;
    let random: u32 = rand::random();
    let backend = rule
        .pick_backend(random)
        .map_err(|e| routing_failure(route_key, &e))?;
    backend
        .filters
        .apply_request(parts, &listener)
        .map_err(|e| routing_failure(route_key, &e))
        .and_then(redirect)?;
    let target = backend_address(state, &backend.reference, selected.route, original).map_err(|why| {
        tracing::warn!(route = route_key, backend = %backend.reference.name, "backend unusable: {why}");
        let failed = text(StatusCode::INTERNAL_SERVER_ERROR, "no usable backend");
        (Box::new(failed), ResponseFlag::None)
    })?;
    // A draw of its own: mirroring must not correlate with the backend chosen.
    let random: u32 = rand::random();
    let mirrors = rule
        .filters
        .mirrors(random)
        .chain(backend.filters.mirrors(random))
        .filter_map(
            |m| match backend_address(state, m, selected.route, original) {
                Ok(address) => Some(Mirror {
                    target: address,
                    subset: m.subset.clone(),
                }),
                Err(why) => {
                    tracing::warn!(route = route_key, mirror = %m.name, "mirror unusable: {why}");
                    None
                }
            },
        )
        .collect();
    Ok(Routed {
        target,
        route: Some(selected.route),
        rule: Some(rule),
        backend: Some(backend),
        mirrors,
        retry: rule.retry.as_ref(),
        limits: Limits::default(),
        cluster: None,
        hash: None,
    })
}

fn routing_failure(
    route: &str,
    e: &super::routing::RoutingError,
) -> (Box<Response<Body>>, ResponseFlag) {
    tracing::warn!(route, reason = e.reason(), "request not routed: {e}");
    (
        Box::new(text(e.status(), "request not routed")),
        ResponseFlag::None,
    )
}

/// A backend reference as an address to dial: the Service's VIP of the original target's family
/// and the reference's port. Only Services of the route's own namespace resolve: Gateway API
/// wants a ReferenceGrant for another namespace, which this mesh does not implement.
fn backend_address(
    state: &State,
    reference: &BackendReference,
    route: &super::routing::Route,
    original: SocketAddr,
) -> Result<SocketAddr, String> {
    let route_namespace = route.namespace.as_str();
    if !reference.is_service() {
        return Err(format!(
            "kind {:?} of group {:?} is not supported: only Services",
            reference.kind, reference.group
        ));
    }
    // A VirtualService may name a Service of any namespace (Istio needs no grant).
    if reference.namespace != route_namespace && route.kind != RouteKind::VirtualService {
        return Err(format!(
            "Service {}/{} is in another namespace than the route (a ReferenceGrant would be \
             needed; not supported)",
            reference.namespace, reference.name
        ));
    }
    let key = format!("{}/{}", reference.namespace, reference.name);
    let service = state
        .services
        .get(&key)
        .ok_or_else(|| format!("Service {key} does not exist"))?;
    let port = reference
        .port
        .ok_or_else(|| format!("Service {key}: the reference has no port"))?;
    let vip = service
        .spec
        .vips
        .iter()
        .find(|vip| vip.is_ipv4() == original.ip().to_canonical().is_ipv4())
        .ok_or_else(|| format!("Service {key} has no address of the request's family"))?;
    Ok(SocketAddr::new(*vip, port))
}

/// Envoy's mark on a mirrored request: `-shadow` appended to the host (before the port).
fn shadow_host(parts: &mut request::Parts) {
    let Some(authority) = request_host(parts).and_then(|h| h.parse::<Authority>().ok()) else {
        return;
    };
    let shadow = match authority.port_u16() {
        Some(port) => format!("{}-shadow:{port}", authority.host()),
        None => format!("{}-shadow", authority.host()),
    };
    let (Ok(value), Ok(authority)) = (
        HeaderValue::try_from(shadow.as_str()),
        shadow.parse::<Authority>(),
    ) else {
        return;
    };
    if parts.uri.authority().is_some() {
        let mut uri = parts.uri.clone().into_parts();
        uri.authority = Some(authority);
        if let Ok(rebuilt) = http::Uri::from_parts(uri) {
            parts.uri = rebuilt;
        }
    }
    if parts.uri.authority().is_none() || parts.headers.contains_key(http::header::HOST) {
        parts.headers.insert(http::header::HOST, value);
    }
}

/// The request's host: the URI's authority (HTTP/2 `:authority`), else the `Host` header.
fn request_host(parts: &request::Parts) -> Option<String> {
    parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })
}

/// What a request needs of the stream it came on.
struct StreamInfo {
    local: Arc<crate::proxy::Local>,
    peer: SocketAddr,
    peer_id: Arc<crate::identity::Identity>,
    target: SocketAddr,
    protocol: Detected,
    /// The client, as the request metrics and the access log name it.
    downstream: Arc<Downstream>,
}

/// The hop-by-hop headers always removed (`te` is kept when it is `trailers`).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection` names and the fixed
/// ones; they describe one connection, not the message, and must not be forwarded.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Most messages have none (a name `Connection` lists needs a `Connection` header): one look
    // at each name instead of a lookup per hop-by-hop name.
    let hop_by_hop =
        |name: &http::HeaderName| name == http::header::TE || HOP_BY_HOP.contains(&name.as_str());
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC needs it end to end.
    let trailers_only = headers
        .get_all(http::header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(http::header::TE);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Istio's answer to a request its RBAC filter denies (Envoy sets no response flag).
/// A failed try: how it ended, and the answer the client gets if it is the last.
struct Failed {
    outcome: Outcome,
    answer: (Response<Body>, ResponseFlag),
}

/// What the client gets: a response, the upstream connection that gave it (none for the
/// waypoint's own answers) and the response flag.
struct Answer {
    response: Response<Body>,
    upstream: Option<Arc<UpstreamInfo>>,
    flag: ResponseFlag,
}

impl Answer {
    /// The last try's result as the client gets it. A response whose retries are `limited`
    /// (used up, or refused by the budget) is flagged `URX`; a failure keeps its own flag
    /// (`UF`, `UC`, `UT`), which says more.
    fn of(result: Result<(Response<Body>, Arc<UpstreamInfo>), Failed>, limited: bool) -> Answer {
        match result {
            Ok((response, upstream)) => Answer {
                response,
                upstream: Some(upstream),
                flag: if limited {
                    ResponseFlag::UpstreamRetryLimitExceeded
                } else {
                    ResponseFlag::None
                },
            },
            Err(failed) => Answer::failed(failed.answer),
        }
    }

    /// The waypoint's own answer.
    fn failed((response, flag): (Response<Body>, ResponseFlag)) -> Answer {
        Answer {
            response,
            upstream: None,
            flag,
        }
    }
}

/// Envoy's answer when a cluster has no endpoint to send to.
fn no_healthy_upstream() -> (Response<Body>, ResponseFlag) {
    (
        text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        ResponseFlag::NoHealthyUpstream,
    )
}

/// Envoy's answer when a timeout passes.
fn timed_out() -> (Response<Body>, ResponseFlag) {
    (
        text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        ResponseFlag::UpstreamRequestTimeout,
    )
}

/// Reads and drops the body of a response that is not passed on, so that its connection can
/// carry the next try; a large or slow one is dropped unread (its connection closes).
async fn drain(body: Body) {
    if body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= retry::MAX_REPLAY_BODY)
    {
        let _ = tokio::time::timeout(Duration::from_millis(100), body.collect()).await;
    }
}

/// Envoy's fault filter answer: the status with body `fault filter abort`, or a trailers-only
/// gRPC answer carrying the status.
fn aborted(with: AbortWith) -> Response<Body> {
    match with {
        AbortWith::Status(code) => text(code, "fault filter abort"),
        AbortWith::Grpc(code) => {
            let mut r = status(StatusCode::OK);
            let headers = r.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    }
}

fn forbidden() -> Response<Body> {
    text(StatusCode::FORBIDDEN, "RBAC: access denied")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// A response of `status` without a body.
fn status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

impl HttpHandler for Http {
    fn serve(self: Arc<Self>, stream: HttpStream) -> BoxFuture<()> {
        Box::pin(async move {
            let state = self.proxy.state();
            let downstream = Downstream::new(&state, stream.peer, &stream.peer_id, stream.target);
            drop(state);
            let info = Arc::new(StreamInfo {
                downstream: Arc::new(downstream),
                local: stream.local,
                peer: stream.peer,
                peer_id: stream.peer_id,
                target: stream.target,
                protocol: stream.protocol,
            });
            let io = TokioIo::new(stream.io);
            let (this, for_requests) = (self.clone(), info.clone());
            let service = hyper::service::service_fn(move |req| {
                let (this, info) = (this.clone(), for_requests.clone());
                async move { Ok::<_, Infallible>(this.forward(&info, req).await) }
            });
            let served = match info.protocol {
                Detected::Http2 => {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                }
                _ => {
                    // The timer makes hyper's header read timeout (30 s) apply: a client that
                    // never finishes its request head cannot hold the stream.
                    hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(io, service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(waypoint = %info.local.workload.key(), peer = %info.peer, error = %e, "HTTP stream ended with an error");
            }
        })
    }
}
