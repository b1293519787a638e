//! HBONE over real loopback sockets and real TLS 1.3 (rcgen test PKI: root, server leaf, client
//! leaf; ALPN h2; no SNI; no resumption).
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

use super::*;

// ---------------------------------------------------------------------------------------------
// Test PKI and TLS configs

struct Pki {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(make_pki)
}

fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root.distinguished_name
        .push(DnType::CommonName, "hbone test root");
    let root = CertifiedIssuer::self_signed(root, KeyPair::generate().unwrap()).unwrap();

    let leaf = |spiffe: &str, eku: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.try_into().unwrap()));
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &root).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone(), root.der().clone()], key)
    };
    let (server_chain, server_key) = leaf(
        "spiffe://cluster.local/ns/default/sa/server",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_chain, client_key) = leaf(
        "spiffe://cluster.local/ns/default/sa/client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::clone(root.der())).unwrap();
    let roots = Arc::new(roots);

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, server_key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();

    Pki {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// A dial function for the pool: TCP + TLS to `addr`, counting calls.
fn dialer(
    addr: SocketAddr,
    dials: Arc<AtomicUsize>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = io::Result<TlsStream<TcpStream>>> + Send>>
{
    move || {
        Box::pin(async move {
            dials.fetch_add(1, Ordering::SeqCst);
            tls_connect(addr).await
        })
    }
}

async fn tls_connect(addr: SocketAddr) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = TlsConnector::from(pki().client.clone())
        .connect(name, tcp)
        .await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    Ok(tls)
}

// ---------------------------------------------------------------------------------------------
// Test HBONE server

struct TestServer {
    addr: SocketAddr,
    /// HTTP/2 connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Per-connection tasks and drain triggers.
    conns: Arc<Mutex<Vec<ConnHandle>>>,
    /// How each connection ended, as `serve_connection_until` returned it.
    ended: Arc<Mutex<Vec<Result<(), HboneError>>>>,
    task: tokio::task::JoinHandle<()>,
}

struct ConnHandle {
    abort: tokio::task::AbortHandle,
    drain: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
        self.kill_connections();
    }
}

impl TestServer {
    /// Closes every connection's TLS stream without GOAWAY (the peer "disappears").
    fn kill_connections(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort.abort();
        }
    }

    /// Drains every current connection: GOAWAY, in-flight streams finish.
    fn drain_connections(&self) {
        for c in self.conns.lock().unwrap().iter_mut() {
            if let Some(drain) = c.drain.take() {
                let _ = drain.send(());
            }
        }
    }
}

async fn start_server<H, Fut>(settings: H2Settings, handler: H) -> TestServer
where
    H: Fn(InboundRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(Mutex::new(Vec::new()));
    let acceptor = TlsAcceptor::from(pki().server.clone());
    let task = tokio::spawn({
        let (accepted, conns, ended) = (accepted.clone(), conns.clone(), ended.clone());
        async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (acceptor, settings, handler) =
                    (acceptor.clone(), settings.clone(), handler.clone());
                let (accepted, ended) = (accepted.clone(), ended.clone());
                let (drain, drain_rx) = tokio::sync::oneshot::channel::<()>();
                let handle = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let drained = async move {
                        if drain_rx.await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    let result = serve_connection_until(tls, &settings, handler, drained).await;
                    ended.lock().unwrap().push(result);
                });
                conns.lock().unwrap().push(ConnHandle {
                    abort: handle.abort_handle(),
                    drain: Some(drain),
                });
            }
        }
    });
    TestServer {
        addr,
        accepted,
        conns,
        ended,
        task,
    }
}

/// Accepts and echoes everything back, half-closing after the client's EOF.
async fn echo(req: InboundRequest) {
    let Ok(stream) = req.accept() else { return };
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// What the inbound side of the agent does: connect to the CONNECT target and relay.
async fn relay_to_target(req: InboundRequest) {
    let target = match req.target().map(|t| t.addr()) {
        Ok(Some(t)) => t,
        _ => return req.reject(StatusCode::BAD_REQUEST),
    };
    let mut upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return req.reject(StatusCode::SERVICE_UNAVAILABLE),
    };
    let Ok(mut tunnel) = req.accept() else { return };
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut upstream, 64 * 1024, 64 * 1024)
            .await;
}

/// A plain TCP echo server that half-closes after the client's EOF.
async fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn key(src: &str, addr: SocketAddr) -> PoolKey {
    PoolKey {
        src: format!("spiffe://cluster.local/ns/default/sa/{src}"),
        src_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        dst: "spiffe://cluster.local/ns/default/sa/server".into(),
        dst_addr: addr,
    }
}

fn request(authority: SocketAddr) -> ConnectRequest {
    ConnectRequest {
        authority,
        forwarded_for: "10.1.2.3:45678".parse().unwrap(),
        forwarded_host: None,
        baggage: None,
        traceparent: None,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 13) as u8) ^ seed)
        .collect()
}

/// Writes `data` then half-closes, while reading everything the peer sends until EOF.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::with_capacity(data.len());
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    got
}

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && parts[3] == "01"
}

async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Pure helpers

/// The source's baggage as the agent builds it for a pod (`labels::workload_baggage`).
fn client_baggage() -> Baggage {
    Baggage {
        cluster: Some("Kubernetes".into()),
        namespace: Some("default".into()),
        workload_kind: Some("pod".into()),
        workload_name: Some("client-7d9f".into()),
        service_name: Some("client".into()),
        service_version: Some("v1".into()),
        ..Baggage::default()
    }
}

const CLIENT_BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
                              k8s.pod.name=client-7d9f,service.name=client,service.version=v1";

#[test]
fn request_headers_are_built_as_ztunnel_sends_them() {
    let req = ConnectRequest {
        authority: "[fd00::7]:8080".parse().unwrap(),
        forwarded_for: "[fd00::1]:40000".parse().unwrap(),
        forwarded_host: Some("web.default.svc.cluster.local".into()),
        baggage: Some(client_baggage().header_value()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    };
    let http = req.to_http(req.traceparent.as_deref().unwrap()).unwrap();
    assert_eq!(http.method(), http::Method::CONNECT);
    assert_eq!(http.uri().to_string(), "[fd00::7]:8080");
    assert_eq!(
        http.headers()["forwarded"],
        "for=\"[fd00::1]:40000\";host=web.default.svc.cluster.local"
    );
    assert_eq!(http.headers()["baggage"], CLIENT_BAGGAGE);
    assert_eq!(
        http.headers()["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );

    // Not service traffic: no host; no baggage given, none sent.
    let v4 = request("10.0.0.7:80".parse().unwrap());
    let http = v4.to_http(&new_traceparent()).unwrap();
    assert_eq!(http.uri().to_string(), "10.0.0.7:80");
    assert_eq!(http.headers()["forwarded"], "for=\"10.1.2.3:45678\"");
    assert!(http.headers().get("baggage").is_none());

    // A host that is not a token is quoted (escaped); one that cannot be a header is refused.
    let odd = ConnectRequest {
        forwarded_host: Some("a,b\"c".into()),
        ..v4.clone()
    };
    let http = odd.to_http(&new_traceparent()).unwrap();
    assert_eq!(
        http.headers()["forwarded"],
        "for=\"10.1.2.3:45678\";host=\"a,b\\\"c\""
    );
    assert_eq!(forwarded_host(http.headers()).as_deref(), Some("a,b\"c"));
    let bad = ConnectRequest {
        forwarded_host: Some("evil\r\nheader: x".into()),
        ..v4.clone()
    };
    assert!(matches!(
        bad.to_http(&new_traceparent()),
        Err(HboneError::InvalidHeader {
            name: "forwarded",
            ..
        })
    ));
    let bad = ConnectRequest {
        baggage: Some("evil\r\nheader: x".into()),
        ..v4
    };
    assert!(matches!(
        bad.to_http(&new_traceparent()),
        Err(HboneError::InvalidHeader {
            name: "baggage",
            ..
        })
    ));
}

#[test]
fn baggage_is_written_with_ztunnels_keys_in_its_order() {
    assert_eq!(client_baggage().header_value(), CLIENT_BAGGAGE);
    // Every key ztunnel writes, in its order; the kind goes into the key.
    let full = Baggage {
        cluster: Some("c1".into()),
        namespace: Some("ns".into()),
        workload_kind: Some("deployment".into()),
        workload_name: Some("web".into()),
        service_name: Some("web".into()),
        service_version: Some("latest".into()),
        region: Some("eu-west-1".into()),
        zone: Some("eu-west-1a".into()),
    };
    assert_eq!(
        full.header_value(),
        "k8s.cluster.name=c1,k8s.namespace.name=ns,k8s.deployment.name=web,service.name=web,\
         service.version=latest,cloud.region=eu-west-1,cloud.availability_zone=eu-west-1a"
    );
    // Absent and empty values are left out; a kind ztunnel does not know is written as pod.
    let sparse = Baggage {
        namespace: Some("ns".into()),
        workload_kind: Some("statefulset".into()),
        workload_name: Some("db-0".into()),
        service_name: Some(String::new()),
        ..Baggage::default()
    };
    assert_eq!(
        sparse.header_value(),
        "k8s.namespace.name=ns,k8s.pod.name=db-0"
    );
    assert_eq!(Baggage::default().header_value(), "");
    // What would break the list (or ztunnel's `=` split) is percent-encoded, and read back.
    let odd = Baggage {
        service_name: Some("a,b;c=d e%\"\\é".into()),
        ..Baggage::default()
    };
    assert_eq!(
        odd.header_value(),
        "service.name=a%2Cb%3Bc%3Dd%20e%25%22%5C%C3%A9"
    );
    assert_eq!(Baggage::parse([odd.header_value().as_str()]), odd);
    assert_eq!(Baggage::parse([full.header_value().as_str()]), full);
}

#[test]
fn baggage_parsing_reads_ztunnels_keys_and_ours() {
    // What ztunnel sends for a deployment's pod.
    let z = Baggage::parse([
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,\
         service.name=web,service.version=v2",
    ]);
    assert_eq!(z.cluster.as_deref(), Some("Kubernetes"));
    assert_eq!(z.namespace.as_deref(), Some("shop"));
    assert_eq!(z.workload_kind.as_deref(), Some("deployment"));
    assert_eq!(z.workload_name.as_deref(), Some("web"));
    assert_eq!(z.service_name.as_deref(), Some("web"));
    assert_eq!(z.service_version.as_deref(), Some("v2"));
    assert_eq!(Baggage::parse([CLIENT_BAGGAGE]), client_baggage());
    for kind in ["cronjob", "job", "pod"] {
        let b = Baggage::parse([format!("k8s.{kind}.name=x").as_str()]);
        assert_eq!(
            (b.workload_kind.as_deref(), b.workload_name.as_deref()),
            (Some(kind), Some("x"))
        );
    }
    // What this agent sent before.
    let old = Baggage::parse([
        "k8s.namespace.name=default,k8s.workload.name=client,k8s.workload.type=pod,\
         service.name=client,service.version=v1",
    ]);
    assert_eq!(
        old,
        Baggage {
            namespace: Some("default".into()),
            workload_kind: Some("pod".into()),
            workload_name: Some("client".into()),
            service_name: Some("client".into()),
            service_version: Some("v1".into()),
            ..Baggage::default()
        }
    );
    // Several headers, later values win; spaces, W3C properties and unknown keys are ignored.
    let multi = Baggage::parse([
        "k8s.namespace.name=a, service.name = web ;prop=1",
        "other=x,k8s.namespace.name=b",
    ]);
    assert_eq!(multi.namespace.as_deref(), Some("b"));
    assert_eq!(multi.service_name.as_deref(), Some("web"));
    // Malformed: members without `=`, empty values (absent, as for ztunnel), unknown kinds,
    // bad escapes (kept as sent), nothing at all.
    let bad = Baggage::parse([
        ",,service.name,k8s.namespace.name=,k8s.replicaset.name=rs,service.version=%zz,=x,\
         k8s.cluster.name=%4",
    ]);
    assert_eq!(
        bad,
        Baggage {
            service_version: Some("%zz".into()),
            cluster: Some("%4".into()),
            ..Baggage::default()
        }
    );
    assert_eq!(Baggage::parse([""]), Baggage::default());
    assert_eq!(Baggage::parse(["%+F=%+F"]), Baggage::default());
    assert_eq!(
        Baggage::parse(["service.name=%+F"]).service_name.as_deref(),
        Some("%+F")
    );
    let mut headers = http::HeaderMap::new();
    assert_eq!(Baggage::from_headers(&headers), None);
    headers.append("baggage", "k8s.pod.name=p".parse().unwrap());
    headers.append("baggage", "service.name=s".parse().unwrap());
    let b = Baggage::from_headers(&headers).unwrap();
    assert_eq!(
        (b.workload_name.as_deref(), b.service_name.as_deref()),
        (Some("p"), Some("s"))
    );
}

#[test]
fn traceparents_are_w3c_and_random() {
    let a = new_traceparent();
    let b = new_traceparent();
    assert!(is_traceparent(&a), "{a}");
    assert!(is_traceparent(&b), "{b}");
    assert_ne!(a, b);
}

#[test]
fn forwarded_for_parsing() {
    let p = |s| parse_forwarded_for(s);
    assert_eq!(
        p("for=\"10.1.2.3:45678\""),
        Some("10.1.2.3:45678".parse().unwrap())
    );
    assert_eq!(
        p("for=\"[fd00::1]:123\""),
        Some("[fd00::1]:123".parse().unwrap())
    );
    assert_eq!(
        p("For=10.0.0.1:5;host=svc.ns.svc.cluster.local"),
        Some("10.0.0.1:5".parse().unwrap())
    );
    assert_eq!(
        p("proto=https;for=\"[::1]\", for=10.0.0.2:1"),
        Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))
    );
    assert_eq!(
        p("for=10.0.0.9"),
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 0))
    );
    // Several elements: the first `for` that is an address (RFC 7239 allows `unknown` and
    // obfuscated identifiers).
    assert_eq!(
        p("for=unknown;host=a, for=_hidden, for=\"[fd00::2]:9\""),
        Some("[fd00::2]:9".parse().unwrap())
    );
    // `,` and `;` inside a quoted value are data, not separators.
    assert_eq!(
        p("by=\"x,for=10.9.9.9:1\";for=10.0.0.3:3"),
        Some("10.0.0.3:3".parse().unwrap())
    );
    assert_eq!(p("for=unknown"), None);
    assert_eq!(p("by=10.0.0.1:1"), None);
    assert_eq!(p("for=\"[fd00::1]:123"), None, "unterminated quote");
    assert_eq!(p("for=\"10.0.0.1:1\"junk"), None, "junk after the quote");
    assert_eq!(p("for=[fd00::1"), None);
    assert_eq!(p(""), None);
}

#[test]
fn forwarded_host_parsing() {
    let p = |s| parse_forwarded_host(s);
    let web = Some("web.default.svc.cluster.local".to_string());
    // As ztunnel sends it for service traffic, over IPv4 and IPv6.
    assert_eq!(
        p("for=\"10.0.0.1:40000\";host=web.default.svc.cluster.local"),
        web
    );
    assert_eq!(
        p("for=\"[fd00::1]:123\";host=web.default.svc.cluster.local"),
        web
    );
    // Quoted, escaped, any order, spaces around separators, any case of the name.
    assert_eq!(
        p("host=\"web.default.svc.cluster.local\";for=10.0.0.1"),
        web
    );
    assert_eq!(p("Host=\"a\\\"b\""), Some("a\"b".to_string()));
    assert_eq!(
        p("for=\"[fd00::1]:1\" ; HOST=web.default.svc.cluster.local ; proto=https"),
        web
    );
    // Several elements: the first host given.
    assert_eq!(
        p("for=10.0.0.1, for=10.0.0.2;host=web.default.svc.cluster.local, host=other"),
        web
    );
    // Nothing usable: absent, empty, inside another value, unterminated, with a space, a
    // pair without a value.
    assert_eq!(p("for=\"10.0.0.1:1\""), None);
    assert_eq!(p("for=10.0.0.1;host="), None);
    assert_eq!(p("for=10.0.0.1;host=\"\""), None);
    assert_eq!(p("by=\"x;host=evil\";for=10.0.0.1"), None);
    assert_eq!(p("for=10.0.0.1;host=\"web.default.svc.cluster.local"), None);
    assert_eq!(p("host=\"a b\""), None);
    assert_eq!(p("host;for=10.0.0.1"), None);
    // Headers: the first `forwarded` with a host, lower-cased.
    let mut headers = http::HeaderMap::new();
    headers.append("forwarded", "for=10.0.0.1:1".parse().unwrap());
    headers.append(
        "forwarded",
        "for=10.0.0.1:1;host=Web.Default.svc.cluster.local"
            .parse()
            .unwrap(),
    );
    assert_eq!(forwarded_host(&headers), web);
}

/// A request's parts, for `connect_target`.
fn parts(method: http::Method, uri: &str) -> http::request::Parts {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

#[test]
fn connect_targets_are_addresses_or_service_host_names() {
    let t = |uri| connect_target(&parts(http::Method::CONNECT, uri));
    assert_eq!(
        t("10.0.0.7:8080"),
        Ok(ConnectTarget::Addr("10.0.0.7:8080".parse().unwrap()))
    );
    assert_eq!(
        t("[fd00::7]:8080"),
        Ok(ConnectTarget::Addr("[fd00::7]:8080".parse().unwrap()))
    );
    // What ztunnel sends through an east-west gateway: the service's host name and port.
    let web = ConnectTarget::Host {
        host: "web.default.svc.cluster.local".into(),
        port: 80,
    };
    assert_eq!(t("web.default.svc.cluster.local:80"), Ok(web.clone()));
    assert_eq!(t("Web.Default.svc.cluster.local:80"), Ok(web.clone()));
    assert_eq!(web.port(), 80);
    assert_eq!(web.addr(), None);
    assert_eq!(web.to_string(), "web.default.svc.cluster.local:80");
    for bad in [
        "web.default.svc.cluster.local",
        "web.default.svc.cluster.local:0",
        "user@web.default.svc.cluster.local:80",
        "10.0.0.7",
        "[fd00::7]",
    ] {
        let err = t(bad).unwrap_err();
        assert!(err.contains("is not ip:port or host:port"), "{bad}: {err}");
    }
    let err = connect_target(&parts(http::Method::GET, "https://10.0.0.7/")).unwrap_err();
    assert_eq!(err, "method GET is not CONNECT");
}

#[test]
fn status_errors_explain_themselves() {
    let msg = HboneError::Status(StatusCode::SERVICE_UNAVAILABLE).to_string();
    assert_eq!(
        msg,
        "peer answered 503: upstream unreachable (the destination could not connect to the application)"
    );
    assert!(HboneError::Status(StatusCode::UNAUTHORIZED)
        .to_string()
        .contains("authorization policy"));
    assert_eq!(
        HboneError::Status(StatusCode::BAD_REQUEST).status(),
        Some(StatusCode::BAD_REQUEST)
    );
}

// ---------------------------------------------------------------------------------------------
// End to end

/// Headers arrive as specified; 8 MiB each way, byte-exact, through the server-side relay to a
/// TCP upstream (`copy_bidirectional_with_sizes` on the tunnel, half-close both ways).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_headers_and_8mib_echo_through_relay() {
    let upstream = tcp_echo_server().await;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let server = start_server(H2Settings::default(), move |req: InboundRequest| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send((
                req.method().clone(),
                req.uri().to_string(),
                req.headers().clone(),
                req.target(),
                req.forwarded_for(),
                req.forwarded_host(),
                req.baggage(),
            ));
            relay_to_target(req).await;
        }
    })
    .await;

    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let req = ConnectRequest {
        forwarded_host: Some("web.default.svc.cluster.local".into()),
        baggage: Some(client_baggage().header_value()),
        ..request(upstream)
    };
    let tunnel = pool
        .connect(
            key("client", server.addr),
            req,
            dialer(server.addr, dials.clone()),
        )
        .await
        .unwrap();

    let (method, authority, headers, target, forwarded_for, host, baggage) =
        seen_rx.recv().await.unwrap();
    assert_eq!(method, http::Method::CONNECT);
    assert_eq!(authority, upstream.to_string());
    assert_eq!(target, Ok(ConnectTarget::Addr(upstream)));
    assert_eq!(
        headers["forwarded"],
        "for=\"10.1.2.3:45678\";host=web.default.svc.cluster.local"
    );
    assert_eq!(forwarded_for, Some("10.1.2.3:45678".parse().unwrap()));
    assert_eq!(host.as_deref(), Some("web.default.svc.cluster.local"));
    assert_eq!(headers["baggage"], CLIENT_BAGGAGE);
    assert_eq!(baggage, Some(client_baggage()));
    assert_eq!(tunnel.peer_baggage(), None, "a 200 without baggage");
    let tp = headers["traceparent"].to_str().unwrap();
    assert!(is_traceparent(tp), "traceparent {tp:?}");

    let data = pattern(8 << 20, 0x5a);
    let got = exchange(tunnel, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

/// 8 MiB each way with the server answering from the tunnel itself (no relay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_8mib_echo_both_ways() {
    let server = start_server(H2Settings::default(), echo).await;
    let pool = HbonePool::new(H2Settings::default());
    let tunnel = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap();
    let data = pattern(8 << 20, 0xa5);
    let got = exchange(tunnel, &data).await;
    assert!(got == data, "echoed bytes differ");
}

/// The server answers 200 with the destination's baggage, as ztunnel does; the client reads it.
/// Rejections carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_200_carries_the_destinations_baggage() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let server = start_server(H2Settings::default(), move |req: InboundRequest| {
        let seen_tx = seen_tx.clone();
        async move {
            if req.target().map(|t| t.port()) == Ok(1) {
                return req.reject(StatusCode::BAD_REQUEST);
            }
            let destination = Baggage {
                cluster: Some("Kubernetes".into()),
                namespace: Some("shop".into()),
                workload_kind: Some("pod".into()),
                workload_name: Some("web-0".into()),
                service_name: Some("web".into()),
                service_version: Some("latest".into()),
                ..Baggage::default()
            };
            let Ok(tunnel) = req.accept_with_baggage(&destination) else {
                return;
            };
            let _ = seen_tx.send(());
            let (mut r, mut w) = tokio::io::split(tunnel);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    })
    .await;
    // A raw client sees the exact header.
    let tls = tls_connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let raw = request("127.0.0.1:9".parse().unwrap())
        .to_http(&new_traceparent())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, _stream) = send.send_request(raw, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["baggage"],
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-0,\
         service.name=web,service.version=latest"
    );
    seen_rx.recv().await.unwrap();

    // The pool's client parses it into the tunnel.
    let pool = HbonePool::new(H2Settings::default());
    let tunnel = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap();
    let peer = tunnel.peer_baggage().expect("baggage on the 200");
    assert_eq!(peer.workload_name.as_deref(), Some("web-0"));
    assert_eq!(peer.service_name.as_deref(), Some("web"));
    assert_eq!(exchange(tunnel, b"ping").await, b"ping");
    let rejected = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:1".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap_err();
    assert_eq!(rejected.status(), Some(StatusCode::BAD_REQUEST));
}

/// The client half-closes; the server sees EOF and still sends a reply that the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_then_reply() {
    let server = start_server(H2Settings::default(), |req: InboundRequest| async move {
        let mut tunnel = req.accept().unwrap();
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap();
        let reply = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        tunnel.write_all(reply.as_bytes()).await.unwrap();
        tunnel.shutdown().await.unwrap();
        // Stay around until the client has read it all and closed its side too.
        let mut rest = [0u8; 1];
        let _ = tunnel.read(&mut rest).await;
    })
    .await;
    let pool = HbonePool::new(H2Settings::default());
    let mut tunnel = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap();
    tunnel.write_all(b"request").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut reply = String::new();
    tunnel.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 7 bytes: request");
    // Writing after shutdown is an error, not a silent loss.
    assert_eq!(
        tunnel.write(b"late").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
}

/// 400 / 401 / 503 become `HboneError::Status` with that code; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_become_status_errors() {
    let server = start_server(H2Settings::default(), |req: InboundRequest| async move {
        match req.target().map(|t| t.port()) {
            Ok(1) => req.reject(StatusCode::BAD_REQUEST),
            Ok(2) => req.reject(StatusCode::UNAUTHORIZED),
            Ok(3) => req.reject(StatusCode::SERVICE_UNAVAILABLE),
            _ => echo(req).await,
        }
    })
    .await;
    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    for (port, status) in [
        (1, StatusCode::BAD_REQUEST),
        (2, StatusCode::UNAUTHORIZED),
        (3, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let err = pool
            .connect(
                key("client", server.addr),
                request(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)),
                dialer(server.addr, dials.clone()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, HboneError::Status(s) if s == status),
            "port {port}: {err}"
        );
        assert!(err.to_string().contains(&status.as_u16().to_string()));
    }
    let ok = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:4".parse().unwrap()),
            dialer(server.addr, dials.clone()),
        )
        .await
        .unwrap();
    assert_eq!(exchange(ok, b"still fine").await, b"still fine");
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "rejections do not cost the connection"
    );
    assert_eq!(pool.streams(), 0, "rejected streams release their slots");
}

/// A GET (raw h2 client) or a CONNECT without a port: `target()` says why it is not acceptable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_connect_and_bad_authority_are_refused() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let server = start_server(H2Settings::default(), move |req: InboundRequest| {
        let seen_tx = seen_tx.clone();
        async move {
            let target = req.target();
            let _ = seen_tx.send(target.clone());
            match target {
                Ok(_) => echo(req).await,
                Err(_) => req.reject(StatusCode::BAD_REQUEST),
            }
        }
    })
    .await;
    let tls = tls_connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);

    let cases = [
        (
            http::Method::GET,
            "https://127.0.0.1/hello",
            "method GET is not CONNECT",
        ),
        (
            http::Method::CONNECT,
            "example.com",
            "is not ip:port or host:port",
        ),
        (
            http::Method::CONNECT,
            "10.0.0.1",
            "is not ip:port or host:port",
        ),
    ];
    for (method, uri, why) in cases {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        let mut send = send.clone().ready().await.unwrap();
        let (response, _stream) = send.send_request(req, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let err = seen_rx.recv().await.unwrap().unwrap_err();
        assert!(err.contains(why), "{err:?} should say {why:?}");
    }
}

/// 100 concurrent connects, 100 streams per connection: one dial, one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_100_concurrent_connects_share_one_connection() {
    let (conns, dials, accepted) = concurrent_connects(100, 100).await;
    assert_eq!(conns, 1);
    assert_eq!(dials, 1);
    assert_eq!(accepted, 1);
}

/// 100 concurrent connects, 10 streams per connection: exactly ten connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_caps_streams_per_connection() {
    let (conns, dials, accepted) = concurrent_connects(100, 10).await;
    assert_eq!(conns, 10);
    assert_eq!(dials, 10);
    assert_eq!(accepted, 10);
}

/// Returns (pooled connections, dials, server-side connections) with all streams open.
async fn concurrent_connects(n: usize, per_conn: usize) -> (usize, usize, usize) {
    let server = start_server(H2Settings::default(), echo).await;
    let pool = HbonePool::new(H2Settings {
        max_streams_per_conn: per_conn,
        ..H2Settings::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let k = key("client", server.addr);
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (pool, k, dials, addr) = (pool.clone(), k.clone(), dials.clone(), server.addr);
        tasks.spawn(async move {
            let mut s = pool
                .connect(
                    k,
                    request("127.0.0.1:9".parse().unwrap()),
                    dialer(addr, dials),
                )
                .await
                .unwrap();
            // Prove each tunnel works while all are open.
            let msg = format!("stream {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0; msg.len()];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg.as_bytes());
            s
        });
    }
    let mut streams = Vec::new();
    while let Some(s) = tasks.join_next().await {
        streams.push(s.unwrap());
    }
    assert_eq!(pool.streams(), n);
    let result = (
        pool.connections_for(&k),
        dials.load(Ordering::SeqCst),
        server.accepted.load(Ordering::SeqCst),
    );
    assert_eq!(pool.connections(), result.0);
    drop(streams);
    eventually("slots released", Duration::from_secs(5), || {
        pool.streams() == 0
    })
    .await;
    result
}

/// Different keys never share a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_use_separate_connections() {
    let server = start_server(H2Settings::default(), echo).await;
    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let (a, b) = (key("a", server.addr), key("b", server.addr));
    let mut streams = Vec::new();
    for k in [&a, &b, &a, &b] {
        let s = pool
            .connect(
                k.clone(),
                request("127.0.0.1:9".parse().unwrap()),
                dialer(server.addr, dials.clone()),
            )
            .await
            .unwrap();
        streams.push(s);
    }
    assert_eq!(pool.connections_for(&a), 1);
    assert_eq!(pool.connections_for(&b), 1);
    assert_eq!(pool.connections(), 2);
    assert_eq!(dials.load(Ordering::SeqCst), 2);
}

/// A connection whose peer went away (TCP closed, no GOAWAY) is replaced on the next connect,
/// even before its driver noticed; one drained with GOAWAY likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_connections_are_replaced() {
    let server = start_server(H2Settings::default(), echo).await;
    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let k = key("client", server.addr);
    let open = || {
        pool.connect(
            k.clone(),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, dials.clone()),
        )
    };

    let s = open().await.unwrap();
    assert_eq!(exchange(s, b"one").await, b"one");
    assert_eq!(pool.connections_for(&k), 1);

    // Abrupt close: connect immediately, racing the driver noticing the EOF.
    server.kill_connections();
    let s = open().await.unwrap();
    assert_eq!(exchange(s, b"two").await, b"two");
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    eventually(
        "dead connection leaves the pool",
        Duration::from_secs(5),
        || pool.connections_for(&k) == 1,
    )
    .await;

    // Graceful drain (GOAWAY) while a stream is open: the stream finishes, new ones go elsewhere.
    let mut held = open().await.unwrap();
    server.drain_connections();
    // Requests racing the GOAWAY may still be served on the old connection; once it has
    // arrived, the next request fails over to a new dial.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dials.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "GOAWAY never made the pool dial");
        let s = open().await.unwrap();
        assert_eq!(exchange(s, b"three").await, b"three");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.write_all(b"four").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"four",
        "the stream open during the drain keeps working"
    );
    assert_eq!(exchange(held, b"").await, b"");
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    eventually(
        "drained connection leaves the pool",
        Duration::from_secs(5),
        || pool.connections_for(&k) == 1,
    )
    .await;
}

/// A failed dial fails the caller and everybody waiting for that dial, with the dial's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failure_is_shared_by_waiters() {
    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    // The dial fails only once all 20 callers are in (counted after the first poll of
    // `connect`, in which a caller registers with the pool), however slowly the tasks start.
    let (entered, (release, gate)) = (Arc::new(AtomicUsize::new(0)), watch::channel(false));
    let k = key("client", "127.0.0.1:1".parse().unwrap());
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let (pool, k, dials) = (pool.clone(), k.clone(), dials.clone());
        let (entered, mut gate) = (entered.clone(), gate.clone());
        tasks.spawn(async move {
            let dial = move || async move {
                dials.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                Err::<TcpStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
            };
            let mut connect =
                std::pin::pin!(pool.connect(k, request("127.0.0.1:9".parse().unwrap()), dial));
            let mut first = true;
            std::future::poll_fn(|cx| {
                let polled = connect.as_mut().poll(cx);
                if std::mem::take(&mut first) {
                    entered.fetch_add(1, Ordering::SeqCst);
                }
                polled
            })
            .await
            .unwrap_err()
        });
    }
    eventually("all 20 callers in", Duration::from_secs(10), || {
        entered.load(Ordering::SeqCst) == 20
    })
    .await;
    release.send_replace(true);
    while let Some(err) = tasks.join_next().await {
        let err = err.unwrap();
        assert!(matches!(err, HboneError::Dial(_)), "{err}");
        assert!(err.to_string().contains("refused"), "{err}");
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connections(), 0);
}

/// Callers waiting for one peer are bounded: past the limit a new one fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_for_one_peer_are_bounded() {
    let pool = HbonePool::new(H2Settings {
        max_waiters_per_peer: 3,
        ..H2Settings::default()
    });
    let k = key("client", "127.0.0.1:1".parse().unwrap());
    let (release, gate) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for _ in 0..3 {
        let (pool, k, mut gate) = (pool.clone(), k.clone(), gate.clone());
        tasks.spawn(async move {
            let dial = move || async move {
                let _ = gate.wait_for(|open| *open).await;
                Err::<TcpStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
            };
            pool.connect(k, request("127.0.0.1:9".parse().unwrap()), dial)
                .await
                .unwrap_err()
        });
    }
    let waiting = || pool.waiting_for(&k);
    eventually("3 callers waiting", Duration::from_secs(10), || {
        waiting() == 3
    })
    .await;
    let dial = || async { Err::<TcpStream, _>(io::Error::other("must not be dialed")) };
    let err = pool
        .connect(k.clone(), request("127.0.0.1:9".parse().unwrap()), dial)
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::PoolFull(3)), "{err}");
    assert_eq!(err.reason(), "hbone_pool_full");
    release.send_replace(true);
    while let Some(err) = tasks.join_next().await {
        assert!(matches!(err.unwrap(), HboneError::Dial(_)));
    }
    assert_eq!(waiting(), 0);
}

/// Connections without streams close after the idle timeout; busy ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_expire() {
    let server = start_server(H2Settings::default(), echo).await;
    let pool = HbonePool::new(H2Settings {
        idle_timeout: Duration::from_millis(300),
        ..H2Settings::default()
    });
    let (a, b) = (key("a", server.addr), key("b", server.addr));
    let open = |k: &PoolKey| {
        pool.connect(
            k.clone(),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
    };
    let busy = open(&a).await.unwrap();
    for _ in 0..3 {
        let s = open(&b).await.unwrap();
        assert_eq!(exchange(s, b"x").await, b"x");
    }
    assert_eq!(pool.connections(), 2);
    // b's connection, idle since its last stream, closes; a's, dialed earlier but busy, stays.
    eventually("idle connection closed", Duration::from_secs(10), || {
        pool.connections_for(&b) == 0
    })
    .await;
    assert_eq!(
        pool.connections_for(&a),
        1,
        "a connection with a stream is not idle"
    );
    drop(busy);
    eventually("all connections closed", Duration::from_secs(10), || {
        pool.connections() == 0
    })
    .await;
    // And the pool dials again afterwards.
    let s = open(&a).await.unwrap();
    assert_eq!(exchange(s, b"again").await, b"again");
}

/// A reader that reads nothing for a while: the writer is held back by flow control (at most
/// one stream window accepted), then everything arrives byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_bounds_the_writer() {
    let settings = H2Settings::default();
    let window = settings.stream_window as usize;
    let (tunnel_tx, mut tunnel_rx) = mpsc::unbounded_channel();
    let server = start_server(settings.clone(), move |req: InboundRequest| {
        let tunnel_tx = tunnel_tx.clone();
        async move {
            let _ = tunnel_tx.send(req.accept().unwrap());
        }
    })
    .await;
    let pool = HbonePool::new(settings);
    let mut tunnel = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap();
    let mut far_end = tunnel_rx.recv().await.unwrap();

    const TOTAL: usize = 32 << 20;
    let data = Arc::new(pattern(TOTAL, 0x33));
    let accepted = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (data, accepted) = (data.clone(), accepted.clone());
        async move {
            let mut off = 0;
            while off < TOTAL {
                let n = tunnel
                    .write(&data[off..(off + 256 * 1024).min(TOTAL)])
                    .await
                    .unwrap();
                off += n;
                accepted.store(off, Ordering::SeqCst);
            }
            tunnel.shutdown().await.unwrap();
            tunnel
        }
    });
    // The writer gets going (however loaded the machine), then has 500 ms to overrun the window
    // if flow control did not hold it back.
    eventually("the writer's first write", Duration::from_secs(10), || {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_flight = accepted.load(Ordering::SeqCst);
    println!("accepted by the writer while the reader slept: {in_flight} bytes (window {window})");
    assert!(
        !writer.is_finished(),
        "the writer must be waiting for the reader"
    );
    assert!(in_flight > 0);
    assert!(
        in_flight <= window,
        "{in_flight} bytes accepted, more than one stream window ({window})"
    );

    let mut got = Vec::with_capacity(TOTAL);
    far_end.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got == *data, "bytes differ");
    let _tunnel = writer.await.unwrap();
}

/// A peer reset surfaces as an error on both read and write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_reset_is_an_io_error() {
    let server = start_server(H2Settings::default(), |req: InboundRequest| async move {
        let mut tunnel = req.accept().unwrap();
        let mut buf = [0u8; 5];
        tunnel.read_exact(&mut buf).await.unwrap();
        // Dropping an unfinished tunnel resets the stream (CANCEL).
        drop(tunnel);
    })
    .await;
    let pool = HbonePool::new(H2Settings::default());
    let mut tunnel = pool
        .connect(
            key("client", server.addr),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(server.addr, Default::default()),
        )
        .await
        .unwrap();
    tunnel.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 16];
    let err = tunnel.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match tunnel.write(&[0u8; 1024]).await {
            Ok(_) => assert!(Instant::now() < deadline, "writes keep succeeding"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
}

/// Keepalive: a peer that stops answering PINGs is dropped from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_keepalive_kills_the_connection() {
    // A TLS server that completes the HTTP/2 preface exchange and then goes silent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stall_tx, stall_rx) = watch::channel(false);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(pki().server.clone())
            .accept(tcp)
            .await
            .unwrap();
        // Empty SETTINGS, then SETTINGS ACK, then read but never answer anything else.
        let mut preface = [0u8; 24];
        tls.read_exact(&mut preface).await.unwrap();
        tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        tls.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
        tls.flush().await.unwrap();
        let mut sink = vec![0u8; 64 * 1024];
        let mut stall_rx = stall_rx;
        let _ = stall_rx.wait_for(|s| *s).await;
        while tls.read(&mut sink).await.unwrap_or(0) > 0 {}
    });
    let pool = HbonePool::new(H2Settings {
        keepalive_interval: Some(Duration::from_millis(100)),
        keepalive_timeout: Duration::from_millis(200),
        ..H2Settings::default()
    });
    let k = key("client", addr);
    // The CONNECT is never answered; once the connection is pooled, give up on the request
    // but keep the connection.
    let attempt = tokio::spawn({
        let (pool, k) = (pool.clone(), k.clone());
        async move {
            pool.connect(
                k,
                request("127.0.0.1:9".parse().unwrap()),
                dialer(addr, Default::default()),
            )
            .await
            .map(|_| ())
        }
    });
    eventually("the connection is pooled", Duration::from_secs(10), || {
        pool.connections_for(&k) == 1
    })
    .await;
    assert!(!attempt.is_finished(), "the silent peer cannot answer");
    attempt.abort();
    let _ = attempt.await;
    // Giving up on the request leaves the connection pooled: only the PING timeout removes it.
    assert_eq!(pool.connections_for(&k), 1);
    let _ = stall_tx.send(true);
    eventually(
        "connection dropped after the PING timeout",
        Duration::from_secs(10),
        || pool.connections_for(&k) == 0,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Throughput measurement (not a pass/fail test)

/// A TCP forwarder that delays every chunk by `one_way` (an emulated RTT of twice that) without
/// limiting bandwidth, to see what the flow-control windows do on a real network path.
async fn delay_line(target: SocketAddr, one_way: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            client.set_nodelay(true).unwrap();
            let server = TcpStream::connect(target).await.unwrap();
            server.set_nodelay(true).unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed_copy(cr, sw, one_way));
            tokio::spawn(delayed_copy(sr, cw, one_way));
        }
    });
    addr
}

async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let mut queue = VecDeque::new();
        while let Some(item) = rx.recv().await {
            queue.push_back(item);
            while let Ok(item) = rx.try_recv() {
                queue.push_back(item);
            }
            while let Some((at, chunk)) = queue.pop_front() {
                tokio::time::sleep_until(at).await;
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
                while let Ok(item) = rx.try_recv() {
                    queue.push_back(item);
                }
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// MB/s of `streams` tunnels on one connection, client -> server, `total` bytes in all.
async fn measure(settings: H2Settings, streams: usize, total: usize, one_way: Duration) -> f64 {
    let server = start_server(settings.clone(), |req: InboundRequest| async move {
        let mut tunnel = req.accept().unwrap();
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut tunnel, &mut sink).await.unwrap();
        tunnel.shutdown().await.unwrap();
    })
    .await;
    let addr = if one_way.is_zero() {
        server.addr
    } else {
        delay_line(server.addr, one_way).await
    };
    let pool = HbonePool::new(settings);
    let k = key("client", addr);
    // Warm up: dial and one stream.
    let s = pool
        .connect(
            k.clone(),
            request("127.0.0.1:9".parse().unwrap()),
            dialer(addr, Default::default()),
        )
        .await
        .unwrap();
    exchange(s, b"warm up").await;
    let per_stream = total / streams;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let (pool, k) = (pool.clone(), k.clone());
        tasks.spawn(async move {
            let mut s = pool
                .connect(
                    k,
                    request("127.0.0.1:9".parse().unwrap()),
                    dialer(addr, Default::default()),
                )
                .await
                .unwrap();
            let chunk = vec![0x42u8; 64 * 1024];
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n]).await.unwrap();
                left -= n;
            }
            s.shutdown().await.unwrap();
            // Wait for the server's END_STREAM: everything was received.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    (per_stream * streams) as f64 / secs / 1e6
}

/// Prints throughput for h2's defaults and for our settings (and a few variants), over plain
/// loopback and over an emulated 2 ms RTT. Run with
/// `cargo test -p mesh-agent --release hbone::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints numbers, asserts nothing"]
async fn throughput() {
    let h2_defaults = H2Settings {
        stream_window: 65_535,
        connection_window: 65_535,
        max_frame_size: 16_384,
        max_send_buffer_size: 400 * 1024,
        ..H2Settings::default()
    };
    let ours = H2Settings::default();
    let variants: Vec<(&str, H2Settings)> = vec![
        (
            "h2 defaults (64 KiB windows, 16 KiB frames, 400 KB send buf)",
            h2_defaults,
        ),
        (
            "ours, 16 KiB frames",
            H2Settings {
                max_frame_size: 16_384,
                ..ours.clone()
            },
        ),
        (
            "ours, 1 MiB send buf",
            H2Settings {
                max_send_buffer_size: 1 << 20,
                ..ours.clone()
            },
        ),
        (
            "ours, 4 MiB send buf",
            H2Settings {
                max_send_buffer_size: 4 << 20,
                ..ours.clone()
            },
        ),
        (
            "ours, 1 MiB stream window",
            H2Settings {
                stream_window: 1 << 20,
                ..ours.clone()
            },
        ),
        ("ours (default)", ours.clone()),
    ];
    let total = std::env::var("HBONE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20;
    let reps = std::env::var("HBONE_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(3)
        .max(1);
    for (one_way, label) in [
        (Duration::ZERO, "loopback"),
        (Duration::from_millis(1), "loopback + 2 ms RTT"),
    ] {
        for streams in [1, 4] {
            for (name, settings) in &variants {
                let mut runs = Vec::new();
                for _ in 0..reps {
                    runs.push(measure(settings.clone(), streams, total, one_way).await);
                }
                runs.sort_by(f64::total_cmp);
                let median = runs[runs.len() / 2];
                println!(
                    "throughput {label:>20}, {streams} stream(s): {median:6.0} MB/s median {runs:.0?}  {name}"
                );
            }
        }
    }
}

/// A client that opens streams and resets them at once, faster than they can be served (the
/// HTTP/2 "rapid reset" flood), loses its connection (GOAWAY ENHANCE_YOUR_CALM); a well-behaved
/// client of the same server is served throughout.
#[tokio::test]
async fn a_rapid_reset_flood_closes_the_flooding_connection_only() {
    let server = start_server(H2Settings::default(), relay_to_target).await;
    let tls = tls_connect(server.addr).await.unwrap();
    let (mut send, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(100_000)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let upstream = tcp_echo_server().await;
    let authority = upstream.to_string();
    for _ in 0..1000 {
        let Ok(ready) = send.clone().ready().await else {
            break;
        };
        send = ready;
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.as_str())
            .body(())
            .unwrap();
        let Ok((response, mut stream)) = send.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the flooding connection is closed")
        .unwrap();
    assert!(ended.is_err(), "the server closed it");
    let server_side = server
        .ended
        .lock()
        .unwrap()
        .pop()
        .expect("the server saw it end");
    match server_side {
        Err(HboneError::H2(e)) => assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM)),
        other => panic!("{other:?}"),
    }

    // Another client is served.
    let pool = HbonePool::new(H2Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut tunnel = pool
        .connect(
            key("client", server.addr),
            request(upstream),
            dialer(server.addr, dials),
        )
        .await
        .unwrap();
    tunnel.write_all(b"still served").await.unwrap();
    let mut buf = [0u8; 12];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still served");
}
