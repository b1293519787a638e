//! The proxy's steps on their own (tower services with a recording next step), and an inbound
//! HBONE listener served with no pod behind it: in the agent's own network namespace, with no
//! datapath, as a waypoint serves.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, ServiceExt};

use super::authorize::{Authorize, Inbound};
use super::hbone::{Baggage, ConnectRequest, H2Settings, HboneError, HbonePool, PoolKey};
use super::live::ConnFacts;
use super::resolve::{Balancer, Resolve, Routed, Target};
use super::*;
use crate::identity::{CaOptions, CertificateAuthority};
use crate::telemetry::DenialLabels;

const MESH: &str = r#"
namespaces: [{ name: default, labels: { istio.io/dataplane-mode: ambient } }]
workloads:
  - { name: server, serviceAccount: server, node: n1, ips: [127.0.0.1], labels: { app: server } }
  - { name: client, serviceAccount: client, node: n2, ips: [10.0.0.9], labels: { app: client } }
services:
  - name: web
    vips: [10.96.0.1]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server]
"#;

const DENY_CLIENT: &str = r#"
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: deny-client, namespace: default }
    spec:
      selector: { matchLabels: { app: server } }
      action: DENY
      rules: [{ from: [{ source: { principals: [cluster.local/ns/default/sa/client] } }] }]
"#;

fn state(extra: &str) -> Arc<State> {
    let config = crate::config::parse(Path::new("test.yaml"), &format!("{MESH}{extra}")).unwrap();
    Arc::new(State::from_mesh(&config, "n1"))
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

fn local(state: &State, name: &str) -> Arc<Local> {
    let workload = state.workloads[&format!("default/{name}")].clone();
    Arc::new(Local {
        identity: id(&workload.service_account),
        workload,
        netns: None,
        conns: Arc::default(),
    })
}

#[tokio::test]
async fn resolve_hands_the_next_step_the_endpoint_its_identity_and_labels() {
    let (_tx, rx) = watch::channel(state(""));
    let reached = Arc::new(AtomicUsize::new(0));
    let next = {
        let reached = reached.clone();
        service_fn(move |routed: Routed| {
            reached.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Failure>(routed) }
        })
    };
    let resolve = Resolve::new(
        rx.clone(),
        Arc::new(Balancer::default()),
        "cluster.local",
        Arc::new(Metrics::new()),
        next,
    );
    let client = local(&rx.borrow(), "client");
    let target = Target {
        local: client.clone(),
        orig: "10.96.0.1:80".parse().unwrap(),
        peer: "127.0.0.1:40000".parse().unwrap(),
    };
    let routed = resolve.clone().oneshot(target).await.unwrap();
    assert_eq!(routed.route.target, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(routed.dst_identity, Some(id("server")));
    assert_eq!(
        routed.client_addr,
        "10.0.0.9:40000".parse().unwrap(),
        "the source is the workload's address with the application's port"
    );
    assert_eq!(routed.labels.source_workload, "client");
    assert_eq!(routed.labels.destination_workload, "server");
    assert_eq!(
        routed.labels.destination_service,
        "web.default.svc.cluster.local"
    );
    assert_eq!(routed.labels.connection_security_policy, "mutual_tls");
    assert_eq!(reached.load(Ordering::SeqCst), 1);

    // A port the service does not have: a failure counted under the source's labels, and the
    // next step never runs.
    let target = Target {
        local: client,
        orig: "10.96.0.1:81".parse().unwrap(),
        peer: "127.0.0.1:40001".parse().unwrap(),
    };
    let failure = match resolve.oneshot(target).await {
        Err(failure) => failure,
        Ok(_) => panic!("port 81 resolved"),
    };
    assert_eq!(failure.error.reason(), "unknown_service_port");
    let labels = failure.labels.expect("counted");
    assert_eq!(labels.source_workload, "client");
    assert_eq!(labels.destination_service, "web.default.svc.cluster.local");
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}

/// Service `pair` over `server` and `client`, and `web` over `server` alone.
const PAIR: &str = "  - name: pair
    vips: [10.96.0.2]
    ports: [{ port: 80, targetPort: 8080 }]
    endpoints: [server, client]
";

/// A next step that fails every attempt to workload `server` with `error`, counts the attempts
/// per workload and passes the others on.
fn failing_server(
    error: fn() -> ProxyError,
) -> (
    impl tower::Service<Routed, Response = Routed, Error = Failure, Future = impl Send> + Clone,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let next = service_fn(move |routed: Routed| {
        let name = routed.route.workload.as_ref().map(|w| w.name.clone());
        seen.lock().unwrap().push(name.clone().unwrap_or_default());
        async move {
            match name.as_deref() {
                Some("server") => Err(Failure::counted(error(), routed.labels.clone())),
                _ => Ok(routed),
            }
        }
    });
    (next, attempts)
}

fn refused() -> ProxyError {
    ProxyError::Hbone {
        peer: "127.0.0.1:15008".parse().unwrap(),
        error: HboneError::Dial(Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ))),
    }
}

#[tokio::test]
async fn a_failed_endpoint_is_retried_once_on_another_and_ejected() {
    let (_tx, rx) = watch::channel(state(PAIR));
    let (next, attempts) = failing_server(refused);
    let metrics = Arc::new(Metrics::new());
    let resolve = Resolve::new(
        rx.clone(),
        Arc::new(Balancer::default()),
        "cluster.local",
        metrics.clone(),
        next,
    );
    let client = local(&rx.borrow(), "client");
    let target = |orig: &str| Target {
        local: client.clone(),
        orig: orig.parse().unwrap(),
        peer: "127.0.0.1:40000".parse().unwrap(),
    };
    // Four connections to the VIP: all served by `client`; `server` is tried once, then out.
    for _ in 0..4 {
        let routed = resolve
            .clone()
            .oneshot(target("10.96.0.2:80"))
            .await
            .unwrap();
        assert_eq!(routed.labels.destination_workload, "client");
        assert_eq!(routed.route.workload.unwrap().name, "client");
    }
    let seen = std::mem::take(&mut *attempts.lock().unwrap());
    assert_eq!(
        seen.iter().filter(|n| *n == "server").count(),
        1,
        "server tried once: {seen:?}"
    );
    assert_eq!(seen.len(), 5, "{seen:?}");
    let text = metrics.encode();
    let ejections = text
        .lines()
        .find(|l| l.starts_with("mesh_endpoint_ejections_total{"))
        .unwrap_or_default();
    assert_eq!(
        ejections,
        r#"mesh_endpoint_ejections_total{service="default/pair",endpoint="default/server"} 1"#
    );
    // The failed attempt is counted as a failure to `server`, under its own labels.
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{"))
        .collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(
        failed[0].contains(r#"destination_workload="server""#)
            && failed[0].contains(r#"reason="hbone_connect""#)
            && failed[0].ends_with(" 1"),
        "{failed:?}"
    );
    assert_eq!(resolve.balancer().ejected()[0].endpoint, "default/server");

    // A service with one endpoint and a pod's own address: no retry, the failure is the answer.
    for orig in ["10.96.0.1:80", "127.0.0.1:8080"] {
        let failure = match resolve.clone().oneshot(target(orig)).await {
            Err(failure) => failure,
            Ok(_) => panic!("{orig} reached a failing server"),
        };
        assert_eq!(failure.error.reason(), "hbone_connect");
    }
    assert_eq!(*attempts.lock().unwrap(), ["server", "server"]);
}

#[tokio::test]
async fn a_denial_is_no_endpoint_failure_and_is_not_retried() {
    let (_tx, rx) = watch::channel(state(PAIR));
    let denied = || ProxyError::Hbone {
        peer: "127.0.0.1:15008".parse().unwrap(),
        error: HboneError::Status(http::StatusCode::UNAUTHORIZED),
    };
    let (next, attempts) = failing_server(denied);
    let resolve = Resolve::new(
        rx.clone(),
        Arc::new(Balancer::default()),
        "cluster.local",
        Arc::new(Metrics::new()),
        next,
    );
    let client = local(&rx.borrow(), "client");
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let target = Target {
            local: client.clone(),
            orig: "10.96.0.2:80".parse().unwrap(),
            peer: "127.0.0.1:40000".parse().unwrap(),
        };
        outcomes.push(resolve.clone().oneshot(target).await.is_ok());
    }
    // Round robin goes on over both: the denied ones fail, once each.
    assert_eq!(outcomes, [false, true, false, true]);
    assert_eq!(attempts.lock().unwrap().len(), 4);
    assert!(resolve.balancer().ejected().is_empty());
    assert_eq!(resolve.balancer().watched_endpoints(), 0);
}

#[test]
fn endpoint_failures_are_what_says_the_endpoint_is_bad() {
    let peer: SocketAddr = "10.0.0.1:15008".parse().unwrap();
    let io = |kind| std::io::Error::new(kind, "x");
    let hbone = |error| ProxyError::Hbone { peer, error };
    let status = |code: u16| {
        hbone(HboneError::Status(
            http::StatusCode::from_u16(code).unwrap(),
        ))
    };
    for e in [
        refused(),
        hbone(HboneError::Dial(Arc::new(io(std::io::ErrorKind::TimedOut)))),
        hbone(HboneError::Dial(Arc::new(io(
            std::io::ErrorKind::HostUnreachable,
        )))),
        hbone(HboneError::Dial(Arc::new(io(
            std::io::ErrorKind::InvalidData,
        )))),
        status(503),
        status(504),
        ProxyError::HboneTimeout {
            peer,
            after: Duration::from_secs(10),
        },
        ProxyError::UpstreamConnect {
            dst: peer,
            error: io(std::io::ErrorKind::ConnectionRefused),
        },
    ] {
        assert!(e.is_endpoint_failure(), "{e}");
    }
    for e in [
        status(401),
        status(403),
        status(400),
        hbone(HboneError::PoolFull(3)),
        hbone(HboneError::Dial(Arc::new(io(
            std::io::ErrorKind::PermissionDenied,
        )))),
        ProxyError::UpstreamConnect {
            dst: peer,
            error: std::io::Error::from_raw_os_error(libc::EMFILE),
        },
        ProxyError::PolicyDenied("no ALLOW policy matched".into()),
    ] {
        assert!(!e.is_endpoint_failure(), "{e}");
    }
}

/// What the connect step sends, for a connection to a service VIP and to a pod: the exact
/// `forwarded` and `baggage` values ztunnel sends.
#[tokio::test]
async fn the_connect_names_the_source_and_the_dialed_service_as_ztunnel_does() {
    let (_tx, rx) = watch::channel(state(""));
    let next = service_fn(|routed: Routed| async move { Ok::<_, Failure>(routed) });
    let resolve = Resolve::new(
        rx.clone(),
        Arc::new(Balancer::default()),
        "cluster.local",
        Arc::new(Metrics::new()),
        next,
    );
    let client = local(&rx.borrow(), "client");
    let mut headers = Vec::new();
    for orig in ["10.96.0.1:80", "127.0.0.1:8080"] {
        let target = Target {
            local: client.clone(),
            orig: orig.parse().unwrap(),
            peer: "127.0.0.1:40000".parse().unwrap(),
        };
        let routed = resolve.clone().oneshot(target).await.unwrap();
        let request = super::connect::connect_request(&routed);
        let http = request.to_http(&super::hbone::new_traceparent()).unwrap();
        assert_eq!(http.uri().to_string(), "127.0.0.1:8080");
        headers.push(http.headers().clone());
    }
    let baggage = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=client,\
                   service.name=client,service.version=latest";
    assert_eq!(
        headers[0]["forwarded"],
        "for=\"10.0.0.9:40000\";host=web.default.svc.cluster.local"
    );
    assert_eq!(headers[0]["baggage"], baggage);
    assert_eq!(headers[1]["forwarded"], "for=\"10.0.0.9:40000\"");
    assert_eq!(headers[1]["baggage"], baggage);
}

/// Destination labels: the source as the state knows it, else the workload, namespace and app
/// its baggage names (as ztunnel reports an unknown source); the service when one is given.
#[test]
fn destination_labels_take_the_sources_baggage_only_for_an_unknown_source() {
    let state = state(&SERVICES.replace("APP_PORT", "80"));
    let server = local(&state, "server");
    let baggage = Baggage::parse([
        "k8s.cluster.name=c2,k8s.namespace.name=far,k8s.deployment.name=api,service.name=api,\
         service.version=v3",
    ]);
    // A source the state does not know, with the certificate of `api`.
    let unknown_source = |baggage: &Baggage| {
        super::inbound::destination_labels(
            &state,
            &server,
            "10.7.7.7:1234".parse().unwrap(),
            Some(&id("api")),
            None,
            Some(baggage),
        )
    };
    let labels = unknown_source(&baggage);
    assert_eq!(labels.source_app, "api");
    assert_eq!(labels.source_workload, "api", "k8s.deployment.name");
    assert_eq!(
        labels.source_workload_namespace, "default",
        "the certificate's namespace, not the baggage's"
    );
    assert_eq!(
        labels.source_principal,
        "spiffe://cluster.local/ns/default/sa/api"
    );
    assert_eq!(labels.destination_service, "unknown");
    assert_eq!(labels.destination_workload, "server");
    // Values that are not Kubernetes names do not become label values.
    let junk = Baggage::parse(["k8s.deployment.name=EVIL,service.name=a%20b"]);
    let labels = unknown_source(&junk);
    assert_eq!(labels.source_workload, "unknown");
    assert_eq!(labels.source_app, "unknown");
    let labels = super::inbound::destination_labels(
        &state,
        &server,
        "10.0.0.9:1234".parse().unwrap(),
        Some(&id("client")),
        Some(&state.services["default/app"]),
        Some(&baggage),
    );
    assert_eq!(labels.source_app, "client", "the state's view wins");
    assert_eq!(labels.source_workload, "client");
    assert_eq!(labels.source_workload_namespace, "default");
    assert_eq!(labels.destination_service, "app.default.svc.cluster.local");
    assert_eq!(labels.destination_service_name, "app");
    assert_eq!(labels.destination_service_namespace, "default");
}

fn inbound_from(server: &Arc<Local>, src: Option<Identity>) -> Inbound {
    Inbound {
        local: server.clone(),
        facts: ConnFacts {
            workload: server.workload.key(),
            dst_ip: "127.0.0.1".parse().unwrap(),
            dst_port: 8080,
            src_ip: "10.0.0.9".parse().unwrap(),
            src,
        },
        peer: "10.0.0.9:40000".parse().unwrap(),
    }
}

#[tokio::test]
async fn authorize_stops_a_denied_connection_before_the_next_step_and_counts_it() {
    let (_tx, rx) = watch::channel(state(DENY_CLIENT));
    let metrics = Arc::new(Metrics::new());
    let reached = Arc::new(AtomicUsize::new(0));
    let next = {
        let reached = reached.clone();
        service_fn(move |_: Inbound| {
            reached.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, ProxyError>(()) }
        })
    };
    let authorize = Authorize::new(rx.clone(), metrics.clone(), next);
    let server = local(&rx.borrow(), "server");

    let denied = authorize
        .clone()
        .oneshot(inbound_from(&server, Some(id("client"))))
        .await
        .unwrap_err();
    assert_eq!(denied.reason(), "policy_denied");
    assert_eq!(denied.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    let denials = metrics
        .policy_denials
        .get_or_create(&DenialLabels {
            destination_workload: "server".into(),
            destination_workload_namespace: "default".into(),
            reason: "denied_by_policy",
            policy: "AuthorizationPolicy default/deny-client rules[0]".into(),
        })
        .get();
    assert_eq!(denials, 1);

    authorize
        .oneshot(inbound_from(&server, Some(id("other"))))
        .await
        .unwrap();
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}

struct Harness {
    proxy: Arc<Proxy>,
    listener: SocketAddr,
    app: SocketAddr,
    pool: HbonePool,
    _ca_dir: tempfile::TempDir,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// An echo application and an inbound HBONE listener for `server` on loopback, in this
/// process's own network namespace: no pod, no datapath. `APP_PORT` in `extra` stands for the
/// application's port.
async fn serve_without_a_pod(extra: &str) -> Harness {
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = app_listener.local_addr().unwrap();
    let state = state(&extra.replace("APP_PORT", &app.port().to_string()));
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: None,
        ca_key: None,
        state_dir: ca_dir.path().join("ca"),
        trust_domain: "cluster.local".into(),
        extra_roots: None,
    })
    .unwrap();
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        "cluster.local".into(),
        Duration::from_secs(3600),
    );
    for sa in ["server", "client"] {
        certs.acquire(&id(sa)).await.unwrap();
    }
    let (_tx, rx) = watch::channel(state.clone());
    let options = ProxyOptions {
        connect_timeout: Duration::from_secs(2),
        ..ProxyOptions::default()
    };
    let proxy = Arc::new(Proxy::new(
        &options,
        rx,
        None,
        Arc::new(Metrics::new()),
        certs,
    ));

    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = app_listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(serve_inbound(
        listener,
        local(&state, "server"),
        proxy.clone(),
    ));
    Harness {
        proxy,
        listener: addr,
        app,
        pool: HbonePool::new(H2Settings::default()),
        _ca_dir: ca_dir,
        _tasks: vec![echo, served],
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self._tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl Harness {
    /// A CONNECT to `authority` as `client`.
    async fn connect(&self, authority: SocketAddr) -> Result<super::hbone::H2Stream, HboneError> {
        self.connect_for(authority, None).await
    }

    /// A CONNECT to `authority` as `client`, naming `host` as the service dialed.
    async fn connect_for(
        &self,
        authority: SocketAddr,
        host: Option<&str>,
    ) -> Result<super::hbone::H2Stream, HboneError> {
        let listener = self.listener;
        let tls = self
            .proxy
            .certs
            .client_config(&id("client"), &[id("server")]);
        let key = PoolKey {
            src: id("client").to_string(),
            src_ip: "127.0.0.1".parse().unwrap(),
            dst: id("server").to_string(),
            dst_addr: listener,
        };
        let req = ConnectRequest {
            authority,
            forwarded_for: "127.0.0.1:40000".parse().unwrap(),
            forwarded_host: host.map(str::to_string),
            baggage: None,
            traceparent: None,
        };
        let dial = move || async move {
            let tcp = TcpStream::connect(listener).await?;
            let name = rustls_pki_types::ServerName::IpAddress(listener.ip().into());
            tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
        };
        self.pool.connect(key, req, dial).await
    }

    /// A CONNECT to any `authority` as `client`, from a raw HTTP/2 client on a connection of its
    /// own: the response, and the stream to send on.
    async fn raw_connect(
        &self,
        authority: &str,
    ) -> (http::Response<h2::RecvStream>, h2::SendStream<bytes::Bytes>) {
        let tls = self
            .proxy
            .certs
            .client_config(&id("client"), &[id("server")]);
        let tcp = TcpStream::connect(self.listener).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(self.listener.ip().into());
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header("forwarded", "for=\"127.0.0.1:40000\"")
            .body(())
            .unwrap();
        let mut send = send.ready().await.unwrap();
        let (response, stream) = send.send_request(request, false).unwrap();
        (response.await.unwrap(), stream)
    }

    /// The `istio_tcp_connections_opened_total` lines reported by the destination.
    fn opened_at_destination(&self) -> Vec<String> {
        self.proxy
            .metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
            })
            .map(str::to_string)
            .collect()
    }

    /// How many connections the destination counted as opened for `service`.
    fn opened_with(&self, service: &str) -> usize {
        self.opened_at_destination()
            .iter()
            .filter(|l| l.contains(&format!("destination_service=\"{service}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize)
            .sum()
    }

    /// How many connections failed at the destination with `reason`.
    fn failed_with(&self, reason: &str) -> usize {
        self.proxy
            .metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_failed_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize)
            .sum()
    }
}

/// Echoes `data` through a raw tunnel.
async fn raw_echo(
    response: &mut http::Response<h2::RecvStream>,
    send: &mut h2::SendStream<bytes::Bytes>,
    data: &'static [u8],
) -> Vec<u8> {
    send.send_data(bytes::Bytes::from_static(data), false)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = response.body_mut().data().await.unwrap().unwrap();
        let _ = response
            .body_mut()
            .flow_control()
            .release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

/// Services of the `serve_without_a_pod` tests: `app` is the listener's workload's, `elsewhere`
/// is another workload's.
const SERVICES: &str = "
  - name: app
    vips: [10.96.0.2]
    ports: [{ port: 80, targetPort: APP_PORT }]
    endpoints: [server]
  - name: elsewhere
    vips: [10.96.0.3]
    ports: [{ port: 80, targetPort: APP_PORT }]
    endpoints: [client]
";

/// The 200's `baggage`: the listener's workload as ztunnel describes a pod.
const SERVER_BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
                              k8s.pod.name=server,service.name=server,service.version=latest";

#[tokio::test]
async fn a_connect_to_a_service_host_name_reaches_the_local_endpoint() {
    let h = serve_without_a_pod(SERVICES).await;
    let (mut response, mut send) = h.raw_connect("app.default.svc.cluster.local:80").await;
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()["baggage"], SERVER_BAGGAGE);
    assert_eq!(
        raw_echo(&mut response, &mut send, b"via the service name").await,
        b"via the service name"
    );
    let opened = h.opened_at_destination();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(
        opened[0].contains("destination_service=\"app.default.svc.cluster.local\"")
            && opened[0].contains("destination_service_name=\"app\"")
            && opened[0].contains("destination_service_namespace=\"default\""),
        "{}",
        opened[0]
    );

    // A service this pod is not behind, no such service, no such port: 400, each counted.
    for (authority, reason) in [
        (
            "elsewhere.default.svc.cluster.local:80",
            "wrong_destination",
        ),
        ("nope.default.svc.cluster.local:80", "unknown_service"),
        ("app.default.svc.cluster.local:81", "unknown_service_port"),
    ] {
        let (response, _send) = h.raw_connect(authority).await;
        assert_eq!(
            response.status(),
            http::StatusCode::BAD_REQUEST,
            "{authority}"
        );
        assert!(response.headers().get("baggage").is_none(), "{authority}");
        assert_eq!(h.failed_with(reason), 1, "{authority}");
    }
}

#[tokio::test]
async fn the_destination_names_the_service_only_when_the_forwarded_host_is_its_own() {
    let h = serve_without_a_pod(SERVICES).await;
    let app = "app.default.svc.cluster.local";
    // Believed: a service with this pod as an endpoint. Ignored: another workload's service, an
    // unknown host, none at all.
    for (host, named, unknown) in [
        (Some(app), 1, 0),
        (Some("elsewhere.default.svc.cluster.local"), 1, 1),
        (Some("kube-dns.kube-system.svc.cluster.local"), 1, 2),
        (Some("APP.default.svc.cluster.local"), 2, 2),
        (None, 2, 3),
    ] {
        let mut tunnel = h.connect_for(h.app, host).await.unwrap();
        assert_eq!(
            tunnel.peer_baggage().map(Baggage::header_value).as_deref(),
            Some(SERVER_BAGGAGE)
        );
        // Echoed: the relay (and its accounting) has started.
        tunnel.write_all(b"x").await.unwrap();
        tunnel.read_exact(&mut [0u8; 1]).await.unwrap();
        assert_eq!(
            (h.opened_with(app), h.opened_with("unknown")),
            (named, unknown),
            "{host:?}: {:?}",
            h.opened_at_destination()
        );
    }
    let named = h
        .opened_at_destination()
        .into_iter()
        .find(|l| l.contains(app))
        .unwrap();
    assert!(
        named.contains("destination_service_name=\"app\"")
            && named.contains("destination_service_namespace=\"default\""),
        "{named}"
    );
}

#[tokio::test]
async fn an_inbound_hbone_listener_serves_with_no_pod_namespace() {
    let h = serve_without_a_pod("").await;
    let mut tunnel = h.connect(h.app).await.unwrap();
    tunnel.write_all(b"hello through the stack").await.unwrap();
    let mut back = [0u8; 23];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello through the stack");
    assert_eq!(h.proxy.live_connections(), 1, "tracked for revocation");
    drop(tunnel);

    let opened = |m: &Metrics| {
        let text = m.encode();
        text.lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains(
                        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
                    )
                    && l.contains("destination_workload=\"server\"")
            })
            .count()
    };
    assert_eq!(opened(&h.proxy.metrics), 1);
}

#[tokio::test]
async fn a_denied_connect_is_answered_401_and_the_listener_keeps_serving() {
    let h = serve_without_a_pod(DENY_CLIENT).await;
    let status = |result: Result<super::hbone::H2Stream, HboneError>| match result {
        Err(e) => e.status(),
        Ok(_) => panic!("the CONNECT was accepted"),
    };
    assert_eq!(
        status(h.connect(h.app).await),
        Some(http::StatusCode::UNAUTHORIZED)
    );
    // For an address that is not the listener's workload: 400, on the same connection.
    let elsewhere = "10.0.0.9:8080".parse().unwrap();
    assert_eq!(
        status(h.connect(elsewhere).await),
        Some(http::StatusCode::BAD_REQUEST)
    );
    assert_eq!(h.pool.connections(), 1, "the listener kept the connection");
    assert_eq!(h.proxy.live_connections(), 0);
    let failed = h.proxy.metrics.encode();
    for reason in ["policy_denied", "wrong_destination"] {
        assert!(
            failed
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_failed_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
                    && l.ends_with(" 1")),
            "{reason} counted once:\n{failed}"
        );
    }
}

/// Every connection task and step future, built (not run) and checked against its budget; the
/// sizes are printed with `MESH_PRINT_FUTURE_SIZES=1`.
#[tokio::test]
async fn connection_futures_stay_within_their_budgets() {
    let h = serve_without_a_pod("").await;
    let server = local(&h.proxy.state.borrow(), "server");
    let client = local(&h.proxy.state.borrow(), "client");
    let socket = || async {
        let s = TcpStream::connect(h.listener).await.unwrap();
        let peer = s.local_addr().unwrap();
        (s, peer)
    };
    let (s, peer) = socket().await;
    let outbound = super::outbound::handle(s, peer, client.clone(), h.proxy.clone());
    super::budget::assert_future_size("outbound", &outbound);
    let (s, peer) = socket().await;
    let plaintext = super::plaintext::handle(s, peer, server.clone(), h.proxy.clone());
    super::budget::assert_future_size("inbound plaintext", &plaintext);
    let (s, peer) = socket().await;
    let tls = tokio_rustls::TlsAcceptor::from(h.proxy.certs.server_config(&server.identity));
    let inbound = super::inbound::connection(
        s,
        peer,
        tls,
        server.clone(),
        h.proxy.clone(),
        ("inbound stream", super::inbound::handle_stream),
    );
    super::budget::assert_future_size("inbound HBONE", &inbound);
    // The steps check their own futures as they box them.
    let next = service_fn(|routed: Routed| async move { Ok::<_, Failure>(routed) });
    let resolve = Resolve::new(
        h.proxy.state.clone(),
        Arc::new(Balancer::default()),
        "cluster.local",
        Arc::new(Metrics::new()),
        next,
    );
    let target = Target {
        local: client,
        orig: "10.96.0.1:80".parse().unwrap(),
        peer,
    };
    let routed = resolve.oneshot(target).await.unwrap();
    let mut connect = super::connect::Connect::new(
        h.proxy.certs.clone(),
        HbonePool::new(H2Settings::default()),
        Duration::from_secs(1),
        h.proxy.metrics.clone(),
    );
    drop(tower::Service::call(&mut connect, routed));
    let mut app = super::authorize::ConnectApp::new(Duration::from_secs(1));
    drop(tower::Service::call(
        &mut app,
        inbound_from(&server, Some(id("client"))),
    ));
}
