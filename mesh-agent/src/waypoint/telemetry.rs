//! What the waypoint reports about each HTTP request: Istio's request metrics with
//! `reporter="waypoint"` (Istio 1.24 standard metrics), one access-log line (`access_log`) and
//! the W3C trace context it passes on (`trace`).
//!
//! A [`RequestRecord`] is started when a request arrives, told the upstream once one is picked,
//! and given the response; it is finished when the response body has been sent to the end (or
//! failed, or the client went away), so the duration and the byte counts are the whole
//! request's. The source labels are worked out once per downstream stream ([`Downstream`]) and
//! the destination labels once per upstream connection ([`UpstreamInfo`]), so a request
//! allocates nothing for its labels.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::access_log::{self, Entry};
use super::trace::{Span, TraceId};
use crate::identity::Identity;
use crate::model::Workload;
use crate::proxy::{workload_app, ProxyError, Routed, CLUSTER_NAME};
use crate::state::{Service, State};
use crate::telemetry::{
    DestinationLabels, Hashed, Metrics, Outcome, RequestLabels, RequestMetrics, RetryLabels,
    SourceLabels,
};

/// The `reporter` label of what a waypoint counts.
pub const REPORTER: &str = "waypoint";

const UNKNOWN: &str = "unknown";

/// Envoy's response flags (`%RESPONSE_FLAGS%`, Envoy 1.32) that the waypoint sets. A request
/// an AuthorizationPolicy denies (403 `RBAC: access denied`) has none: Envoy's RBAC filter
/// answers with a local reply and sets no flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    None,
    /// `NR`: no route for the request (404).
    NoRoute,
    /// `UF`: the upstream connection could not be made (503).
    UpstreamConnectionFailure,
    /// `UH`: no healthy upstream, e.g. a service without endpoints (503).
    NoHealthyUpstream,
    /// `UO`: upstream overflow, e.g. the connection pool is full (503).
    UpstreamOverflow,
    /// `UT`: the upstream did not answer in time (504).
    UpstreamRequestTimeout,
    /// `UC`: the upstream connection ended before the response did (503 when no response).
    UpstreamConnectionTermination,
    /// `DC`: the client went away before the response was sent.
    DownstreamConnectionTermination,
    /// `DI`: the request was delayed by fault injection (and then went on).
    DelayInjected,
    /// `FI`: fault injection answered the request with an error.
    FaultInjected,
    /// `RL`: a local rate limit refused the request (429).
    RateLimited,
    /// `URX`: the route's retries were used up, or its retry budget was, and the last try's
    /// answer is passed on.
    UpstreamRetryLimitExceeded,
}

impl ResponseFlag {
    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
        }
    }

    /// The flag of a request whose upstream connection failed with `error`.
    pub fn for_connect(error: &ProxyError) -> ResponseFlag {
        match error.reason() {
            "no_healthy_upstream" => ResponseFlag::NoHealthyUpstream,
            "hbone_pool_full" => ResponseFlag::UpstreamOverflow,
            _ => ResponseFlag::UpstreamConnectionFailure,
        }
    }
}

fn label<'a>(w: &'a Workload, keys: [&str; 2]) -> Option<&'a String> {
    keys.iter().find_map(|k| w.labels.get(*k))
}

fn or_unknown<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| UNKNOWN.to_string(), f)
}

/// `version` (else `app.kubernetes.io/version`), as Istio's `*_version` labels.
fn version(w: &Workload) -> String {
    or_unknown(
        label(w, ["version", "app.kubernetes.io/version"]),
        Clone::clone,
    )
}

/// The source labels of the client at `peer` with identity `peer_id`.
pub fn source_labels(state: &State, peer: SocketAddr, peer_id: &Identity) -> SourceLabels {
    let src = state
        .workload_by_ip(peer.ip().to_canonical())
        .map(Arc::as_ref);
    SourceLabels {
        reporter: REPORTER,
        source_workload: or_unknown(src, |w| w.name.clone()),
        source_workload_namespace: or_unknown(src, |w| w.namespace.clone()),
        source_principal: peer_id.to_string(),
        source_app: or_unknown(src, workload_app),
        source_version: or_unknown(src, version),
        source_cluster: or_unknown(src, |_| CLUSTER_NAME.to_string()),
    }
}

/// The destination labels of `workload` (with `identity`) serving `service`.
pub fn destination_labels(
    workload: Option<&Workload>,
    identity: Option<&Identity>,
    service: Option<&Service>,
) -> DestinationLabels {
    DestinationLabels {
        destination_workload: or_unknown(workload, |w| w.name.clone()),
        destination_workload_namespace: or_unknown(workload, |w| w.namespace.clone()),
        destination_principal: or_unknown(identity, Identity::to_string),
        destination_app: or_unknown(workload, workload_app),
        destination_version: or_unknown(workload, version),
        destination_service: or_unknown(service, Service::hostname),
        destination_service_name: or_unknown(service, |s| s.spec.name.clone()),
        destination_service_namespace: or_unknown(service, |s| s.spec.namespace.clone()),
        destination_cluster: or_unknown(workload, |_| CLUSTER_NAME.to_string()),
    }
}

/// One downstream stream (a client's HBONE CONNECT to the waypoint): who the client is, and
/// what the stream was for before an upstream is picked.
pub struct Downstream {
    peer: SocketAddr,
    source: Arc<Hashed<SourceLabels>>,
    /// The service (or workload) the CONNECT named, with no upstream workload yet: the
    /// destination of requests answered by the waypoint itself.
    target: Arc<Hashed<DestinationLabels>>,
}

impl Downstream {
    pub fn new(
        state: &State,
        peer: SocketAddr,
        peer_id: &Identity,
        target: SocketAddr,
    ) -> Downstream {
        let ip = target.ip().to_canonical();
        let service = state.service_by_vip(ip).map(Arc::as_ref);
        let workload = match service {
            Some(_) => None,
            None => state.workload_by_ip(ip).map(Arc::as_ref),
        };
        Downstream {
            peer,
            source: Arc::new(Hashed::new(source_labels(state, peer, peer_id))),
            target: Arc::new(Hashed::new(destination_labels(workload, None, service))),
        }
    }
}

/// An upstream connection: the endpoint, its identity and its destination labels.
pub struct UpstreamInfo {
    pub host: SocketAddr,
    pub principal: Option<String>,
    labels: Arc<Hashed<DestinationLabels>>,
}

impl UpstreamInfo {
    pub fn new(routed: &Routed) -> UpstreamInfo {
        let route = &routed.route;
        UpstreamInfo {
            host: route.target,
            principal: routed.dst_identity.as_ref().map(Identity::to_string),
            labels: Arc::new(Hashed::new(destination_labels(
                route.workload.as_deref(),
                routed.dst_identity.as_ref(),
                route.service.as_deref(),
            ))),
        }
    }

    /// An upstream known only by its address (for tests of the pool).
    #[cfg(test)]
    pub fn at(host: SocketAddr) -> UpstreamInfo {
        UpstreamInfo {
            host,
            principal: None,
            labels: Arc::new(Hashed::new(destination_labels(None, None, None))),
        }
    }
}

/// Where requests are reported: the metrics registry and the access log.
pub struct Telemetry {
    metrics: RequestMetrics,
    access_log: access_log::Format,
}

impl Telemetry {
    pub fn new(metrics: &Metrics, access_log: access_log::Format) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: metrics.requests.clone(),
            access_log,
        })
    }

    /// The gauges of the upstream pool.
    pub fn upstream_gauges(&self) -> super::upstream::Gauges {
        super::upstream::Gauges {
            connections: self.metrics.upstream_connections.clone(),
            requests: self.metrics.upstream_requests.clone(),
        }
    }

    /// Counts a retry of a request to `target` after a try that ended for `reason`.
    pub fn retried(&self, state: &State, target: SocketAddr, reason: &'static str) {
        self.metrics
            .retries
            .get_or_create(&retry_labels(state, target, reason))
            .inc();
    }

    /// Counts a retry not made, for `reason`.
    pub fn retry_skipped(&self, state: &State, target: SocketAddr, reason: &'static str) {
        self.metrics
            .retries_skipped
            .get_or_create(&retry_labels(state, target, reason))
            .inc();
    }

    /// Starts the record of `req`, which arrived on `downstream`, with the waypoint's span of
    /// its trace (set on the request when it is forwarded: [`RequestRecord::inject_trace`]).
    pub fn start<B>(
        self: &Arc<Self>,
        downstream: &Arc<Downstream>,
        req: &Request<B>,
    ) -> RequestRecord {
        let span = Span::for_request(req.headers());
        let grpc = req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        RequestRecord {
            state: Some(Record {
                telemetry: self.clone(),
                downstream: downstream.clone(),
                upstream: None,
                started: Instant::now(),
                start_time: SystemTime::now(),
                method: req.method().clone(),
                uri: req.uri().clone(),
                host: req.headers().get(HOST).cloned(),
                version: req.version(),
                grpc,
                span,
                route: None,
                status: 0,
                flag: ResponseFlag::None,
                grpc_status: None,
                received: None,
                sent: 0,
            }),
        }
    }
}

fn retry_labels(state: &State, target: SocketAddr, reason: &'static str) -> RetryLabels {
    RetryLabels {
        destination_service: state
            .service_by_vip(target.ip())
            .map_or_else(|| UNKNOWN.to_string(), |s| s.hostname()),
        reason,
    }
}

/// Bytes of a request body, counted as the upstream reads them.
#[derive(Default)]
struct Received {
    bytes: AtomicU64,
    /// The client's body ended in an error (it went away mid-request).
    failed: AtomicBool,
}

struct Record {
    telemetry: Arc<Telemetry>,
    downstream: Arc<Downstream>,
    upstream: Option<Arc<UpstreamInfo>>,
    started: Instant,
    start_time: SystemTime,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    version: Version,
    grpc: bool,
    span: Span,
    route: Option<Arc<str>>,
    status: u16,
    flag: ResponseFlag,
    grpc_status: Option<u32>,
    received: Option<Arc<Received>>,
    sent: u64,
}

/// The `grpc-status` of a response's headers (a trailers-only answer) or trailers.
pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Record {
    fn finish(self) {
        let Record {
            telemetry,
            downstream,
            upstream,
            started,
            start_time,
            method,
            uri,
            host,
            version,
            grpc,
            span,
            route,
            status,
            mut flag,
            grpc_status,
            received,
            sent,
        } = self;
        let duration_ms = started.elapsed().as_millis() as u64;
        let (bytes_received, client_failed) = received.map_or((0, false), |r| {
            (
                r.bytes.load(Ordering::Relaxed),
                r.failed.load(Ordering::Relaxed),
            )
        });
        // The upstream saw its request end early because the client's did.
        if client_failed && flag == ResponseFlag::UpstreamConnectionTermination {
            flag = ResponseFlag::DownstreamConnectionTermination;
        }
        let labels = RequestLabels {
            source: downstream.source.clone(),
            destination: upstream
                .as_ref()
                .map_or_else(|| downstream.target.clone(), |u| u.labels.clone()),
            outcome: Outcome {
                request_protocol: if grpc { "grpc" } else { "http" },
                response_code: status,
                grpc_response_status: grpc_status.filter(|_| grpc),
                response_flags: flag.short(),
                connection_security_policy: "mutual_tls",
            },
        };
        telemetry
            .metrics
            .record(&labels, duration_ms as f64, bytes_received, sent);
        if telemetry.access_log == access_log::Format::Off {
            return;
        }
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        Entry {
            start: start_time,
            method: method.as_str(),
            authority,
            path: uri.path_and_query().map_or("/", |p| p.as_str()),
            protocol: version,
            status,
            flags: flag.short(),
            duration_ms,
            bytes_received,
            bytes_sent: sent,
            upstream_host: upstream.as_ref().map(|u| u.host),
            downstream_remote: downstream.peer,
            trace_id: span.trace_id(),
            downstream_principal: &downstream.source.source_principal,
            upstream_principal: upstream.as_ref().and_then(|u| u.principal.as_deref()),
            route_name: route.as_deref(),
        }
        .write(telemetry.access_log);
    }
}

/// The record of one request. Finished by the response body it is handed to
/// ([`respond`](Self::respond)); dropped before that, the client went away first (`DC`, code 0).
pub struct RequestRecord {
    state: Option<Record>,
}

/// The waypoint's response body type.
pub type ResponseBody = BoxBody<Bytes, hyper::Error>;

impl RequestRecord {
    /// The trace id of the request (the client's, or the one the waypoint started).
    pub fn trace_id(&self) -> Option<TraceId> {
        self.state.as_ref().map(|s| s.span.trace_id())
    }

    /// Sets the waypoint's span on `headers`, the request's on its way upstream.
    pub fn inject_trace(&self, headers: &mut http::HeaderMap) {
        if let Some(s) = &self.state {
            s.span.inject(headers);
        }
    }

    /// The upstream connection the request goes to.
    pub fn upstream(&mut self, upstream: &Arc<UpstreamInfo>) {
        if let Some(s) = &mut self.state {
            s.upstream = Some(upstream.clone());
        }
    }

    /// The name of the route that matched (the access log's `route_name`).
    pub fn route(&mut self, name: impl Into<Arc<str>>) {
        if let Some(s) = &mut self.state {
            s.route = Some(name.into());
        }
    }

    /// `body` (the request's, on its way upstream), counted.
    pub fn count_request<B>(&mut self, body: B) -> CountedRequest<B> {
        let received = Arc::new(Received::default());
        if let Some(s) = &mut self.state {
            s.received = Some(received.clone());
        }
        CountedRequest {
            inner: body,
            received,
        }
    }

    /// The response to send the client, with `flag`; the record finishes when its body has
    /// been sent.
    pub fn respond<B>(mut self, response: Response<B>, flag: ResponseFlag) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        if let Some(s) = &mut self.state {
            s.status = response.status().as_u16();
            s.flag = flag;
            // A trailers-only gRPC answer carries its status in the headers.
            s.grpc_status = grpc_status(response.headers());
        }
        response.map(|inner| {
            CountedResponse {
                inner,
                record: self,
            }
            .boxed()
        })
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if let Some(mut s) = self.state.take() {
            if s.status == 0 {
                // No response was handed over: the client went away while it was being made.
                s.flag = ResponseFlag::DownstreamConnectionTermination;
            }
            s.finish();
        }
    }
}

/// A request body whose bytes are counted into its record.
pub struct CountedRequest<B> {
    inner: B,
    received: Arc<Received>,
}

impl<B> Body for CountedRequest<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(_))) => self.received.failed.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts what it sends and finishes its record at its end.
struct CountedResponse<B: Body + Unpin> {
    inner: B,
    record: RequestRecord,
}

impl<B: Body + Unpin> CountedResponse<B> {
    fn finish(&mut self, flag: Option<ResponseFlag>) {
        if let Some(mut s) = self.record.state.take() {
            if let Some(flag) = flag {
                s.flag = flag;
            }
            s.finish();
        }
    }
}

impl<B> Body for CountedResponse<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(s) = &mut self.record.state {
                    if let Some(data) = frame.data_ref() {
                        s.sent += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        s.grpc_status = grpc_status(trailers).or(s.grpc_status);
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.finish(Some(ResponseFlag::UpstreamConnectionTermination))
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body + Unpin> Drop for CountedResponse<B> {
    fn drop(&mut self) {
        // Dropped before its end was read: the client went away mid-response.
        let flag =
            (!self.inner.is_end_stream()).then_some(ResponseFlag::DownstreamConnectionTermination);
        self.finish(flag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::hbone::HboneError;
    use crate::proxy::resolve::ResolveError;
    use http_body_util::Full;
    use std::path::Path;

    const MESH: &str = r#"
namespaces: [{ name: shop, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: client, namespace: shop, serviceAccount: client, node: n1, ips: [10.0.0.1], labels: { app: web, version: v2 } }
  - { name: server, namespace: shop, serviceAccount: server, node: n1, ips: [10.0.0.2], labels: { app.kubernetes.io/name: api, app.kubernetes.io/version: "1.4" } }
services:
  - { name: api, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80, targetPort: 8080 }], endpoints: [server] }
"#;

    fn state() -> State {
        let config = crate::config::parse(Path::new("t.yaml"), MESH).unwrap();
        State::from_mesh(&config, "n1")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    #[test]
    fn response_flags_are_envoys_short_codes() {
        let short: Vec<_> = [
            ResponseFlag::None,
            ResponseFlag::NoRoute,
            ResponseFlag::UpstreamConnectionFailure,
            ResponseFlag::NoHealthyUpstream,
            ResponseFlag::UpstreamOverflow,
            ResponseFlag::UpstreamRequestTimeout,
            ResponseFlag::UpstreamConnectionTermination,
            ResponseFlag::DownstreamConnectionTermination,
        ]
        .into_iter()
        .map(ResponseFlag::short)
        .collect();
        assert_eq!(short, ["-", "NR", "UF", "UH", "UO", "UT", "UC", "DC"]);
        let no_endpoints = ProxyError::Route(ResolveError::NoEndpoints {
            service: "shop/api".into(),
            family: "IPv4",
        });
        assert_eq!(
            ResponseFlag::for_connect(&no_endpoints),
            ResponseFlag::NoHealthyUpstream
        );
        let full = ProxyError::Hbone {
            peer: addr("10.0.0.2:15008"),
            error: HboneError::PoolFull(3),
        };
        assert_eq!(
            ResponseFlag::for_connect(&full),
            ResponseFlag::UpstreamOverflow
        );
        let refused = ProxyError::UpstreamConnect {
            dst: addr("10.0.0.2:8080"),
            error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            ResponseFlag::for_connect(&refused),
            ResponseFlag::UpstreamConnectionFailure
        );
    }

    #[test]
    fn labels_name_both_ends_as_istio_does() {
        let state = state();
        let client = id("client");
        assert_eq!(
            source_labels(&state, addr("10.0.0.1:40000"), &client),
            SourceLabels {
                reporter: "waypoint",
                source_workload: "client".into(),
                source_workload_namespace: "shop".into(),
                source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
                source_app: "web".into(),
                source_version: "v2".into(),
                source_cluster: "Kubernetes".into(),
            }
        );
        // A client the state does not know: only its certificate names it.
        let stranger = source_labels(&state, addr("10.9.9.9:40000"), &client);
        assert_eq!(
            (
                stranger.source_workload.as_str(),
                stranger.source_app.as_str(),
                stranger.source_cluster.as_str(),
                stranger.source_principal.as_str()
            ),
            (
                "unknown",
                "unknown",
                "unknown",
                "spiffe://cluster.local/ns/shop/sa/client"
            )
        );
        let server = state.workload_by_ip("10.0.0.2".parse().unwrap()).cloned();
        let service = state.service_by_vip("10.96.0.1".parse().unwrap()).cloned();
        assert_eq!(
            destination_labels(server.as_deref(), Some(&id("server")), service.as_deref()),
            DestinationLabels {
                destination_workload: "server".into(),
                destination_workload_namespace: "shop".into(),
                destination_principal: "spiffe://cluster.local/ns/shop/sa/server".into(),
                destination_app: "api".into(),
                destination_version: "1.4".into(),
                destination_service: "api.shop.svc.cluster.local".into(),
                destination_service_name: "api".into(),
                destination_service_namespace: "shop".into(),
                destination_cluster: "Kubernetes".into(),
            }
        );
        // Before an upstream is picked, a service target names the service alone; a workload
        // target names the workload.
        let d = Downstream::new(
            &state,
            addr("10.0.0.1:40000"),
            &client,
            addr("10.96.0.1:80"),
        );
        assert_eq!(
            **d.target,
            destination_labels(None, None, service.as_deref())
        );
        let d = Downstream::new(
            &state,
            addr("10.0.0.1:40000"),
            &client,
            addr("10.0.0.2:8080"),
        );
        assert_eq!(
            **d.target,
            destination_labels(server.as_deref(), None, None)
        );
    }

    fn full(text: &'static str) -> http_body_util::combinators::BoxBody<Bytes, hyper::Error> {
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed()
    }

    /// A telemetry (metrics only) and a stream from `client` for the service `api`.
    fn stream() -> (Metrics, Arc<Telemetry>, Arc<Downstream>) {
        let metrics = Metrics::new();
        let telemetry = Telemetry::new(&metrics, access_log::Format::Off);
        let state = state();
        let downstream = Downstream::new(
            &state,
            addr("10.0.0.1:40000"),
            &id("client"),
            addr("10.96.0.1:80"),
        );
        (metrics, telemetry, Arc::new(downstream))
    }

    const SOURCE: &str = "reporter=\"waypoint\",source_workload=\"client\",\
        source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",\
        source_app=\"web\",source_version=\"v2\",source_cluster=\"Kubernetes\"";
    const SERVICE_ONLY: &str = "destination_workload=\"unknown\",\
        destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",\
        destination_app=\"unknown\",destination_version=\"unknown\",\
        destination_service=\"api.shop.svc.cluster.local\",destination_service_name=\"api\",\
        destination_service_namespace=\"shop\",destination_cluster=\"unknown\"";

    #[tokio::test]
    async fn a_grpc_request_is_counted_when_its_response_ends() {
        let (metrics, telemetry, downstream) = stream();
        let req = Request::post("http://api/Echo")
            .header(CONTENT_TYPE, "application/grpc")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap();
        let mut record = telemetry.start(&downstream, &req);
        assert_eq!(
            record.trace_id().unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let sent = record.count_request(full("hello")).collect().await.unwrap();
        assert_eq!(sent.to_bytes(), "hello");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = full("abc")
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed();
        let response = record.respond(Response::new(body), ResponseFlag::None);
        let text = metrics.encode();
        assert!(
            !text.contains("istio_requests_total{"),
            "not before the end\n{text}"
        );
        let got = response.into_body().collect().await.unwrap();
        assert_eq!(got.to_bytes(), "abc");
        let text = metrics.encode();
        let labels = format!(
            "{{{SOURCE},{SERVICE_ONLY},request_protocol=\"grpc\",response_code=\"200\",\
             grpc_response_status=\"0\",response_flags=\"-\",\
             connection_security_policy=\"mutual_tls\"}}"
        );
        for series in [
            format!("istio_requests_total{labels} 1\n"),
            format!("istio_request_bytes_sum{labels} 5.0\n"),
            format!("istio_response_bytes_sum{labels} 3.0\n"),
            format!("istio_request_duration_milliseconds_count{labels} 1\n"),
        ] {
            assert!(text.contains(&series), "{series}\n{text}");
        }
    }

    #[tokio::test]
    async fn a_client_that_goes_away_is_dc() {
        let (metrics, telemetry, downstream) = stream();
        // Before any response: code 0.
        let req = Request::get("http://api/").body(()).unwrap();
        drop(telemetry.start(&downstream, &req));
        // During the response body: the status sent.
        let record = telemetry.start(&downstream, &req);
        let response = record.respond(Response::new(full("abc")), ResponseFlag::None);
        drop(response);
        // A local reply read to its end keeps its flag and status.
        let record = telemetry.start(&downstream, &req);
        let mut denied = Response::new(full("RBAC: access denied"));
        *denied.status_mut() = http::StatusCode::FORBIDDEN;
        let response = record.respond(denied, ResponseFlag::None);
        response.into_body().collect().await.unwrap();
        let text = metrics.encode();
        for (code, flags) in [("0", "DC"), ("200", "DC"), ("403", "-")] {
            let series = format!(
                "istio_requests_total{{{SOURCE},{SERVICE_ONLY},request_protocol=\"http\",\
                 response_code=\"{code}\",grpc_response_status=\"\",response_flags=\"{flags}\",\
                 connection_security_policy=\"mutual_tls\"}} 1\n"
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
    }
}
