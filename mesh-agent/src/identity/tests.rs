//! Real TLS over loopback TCP between configs of the [`CertManager`], and renewal under load.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, SignatureScheme};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::signer::hex;
use super::testutil::temp_dir;
use super::*;

const TD: &str = "cluster.local";

fn new_ca(dir: &tempfile::TempDir, name: &str, trust_domain: &str) -> Arc<CertificateAuthority> {
    Arc::new(
        CertificateAuthority::load_or_generate(&CaOptions {
            ca_cert: None,
            ca_key: None,
            state_dir: dir.path().join(name),
            trust_domain: trust_domain.into(),
            extra_roots: None,
        })
        .unwrap(),
    )
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn manager(ca: &Arc<CertificateAuthority>, lifetime: Duration) -> Arc<CertManager> {
    CertManager::new(ca.clone(), ca.trust_bundle(), TD.into(), lifetime)
}

type Handshake = (
    std::io::Result<server::TlsStream<TcpStream>>,
    std::io::Result<client::TlsStream<TcpStream>>,
);

/// One TLS connection over 127.0.0.1; the client dials with the IP as the (unsent) server name.
async fn handshake(
    server_cfg: Arc<rustls::ServerConfig>,
    client_cfg: Arc<rustls::ClientConfig>,
) -> Handshake {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsAcceptor::from(server_cfg).accept(tcp).await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let client = TlsConnector::from(client_cfg).connect(name, tcp).await;
    let server = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server handshake finished")
        .unwrap();
    (server, client)
}

/// The error the client sees: from the handshake, or (TLS 1.3 client auth is judged after the
/// client's last flight) from its first read.
async fn client_error(client: std::io::Result<client::TlsStream<TcpStream>>) -> String {
    match client {
        Err(e) => e.to_string(),
        Ok(mut stream) => {
            let mut buf = [0u8; 16];
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("client read finished")
            {
                Err(e) => e.to_string(),
                Ok(n) => panic!("client read {n} bytes from a server that should have refused"),
            }
        }
    }
}

fn server_error(server: std::io::Result<server::TlsStream<TcpStream>>) -> String {
    match server {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the server accepted a client it should have refused"),
    }
}

async fn ping_pong(
    server: &mut server::TlsStream<TcpStream>,
    client: &mut client::TlsStream<TcpStream>,
    msg: &[u8],
) {
    client.write_all(msg).await.unwrap();
    client.flush().await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
    server.write_all(&buf).await.unwrap();
    server.flush().await.unwrap();
    let mut back = vec![0u8; msg.len()];
    client.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

fn leaf_serial(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(&certs.unwrap()[0]).unwrap();
    hex(x.raw_serial())
}

#[tokio::test]
async fn mutual_tls_between_spiffe_identities() {
    let tmp = temp_dir("tls-ok");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    m.acquire(&srv).await.unwrap();
    m.acquire(&cli).await.unwrap();

    for round in 0..2 {
        let (server, client) = handshake(
            m.server_config(&srv),
            m.client_config(&cli, &[id("x", "other"), srv.clone()]),
        )
        .await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        {
            let s = server.get_ref().1;
            let c = client.get_ref().1;
            assert_eq!(peer_identity(s.peer_certificates()).unwrap(), cli);
            assert_eq!(peer_identity(c.peer_certificates()).unwrap(), srv);
            assert_eq!(s.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(c.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            assert_eq!(s.server_name(), None, "no SNI is sent");
            assert_eq!(
                c.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "round {round}: no resumption"
            );
            assert_eq!(
                leaf_serial(c.peer_certificates()),
                m.current(&srv).unwrap().serial
            );
        }
        ping_pong(&mut server, &mut client, b"hello over hbone").await;
    }
}

#[tokio::test]
async fn client_rejects_a_server_it_does_not_expect() {
    let tmp = temp_dir("tls-unexpected");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    m.acquire(&srv).await.unwrap();
    m.acquire(&cli).await.unwrap();
    let want = id("backend", "db");
    let (server, client) = handshake(m.server_config(&srv), m.client_config(&cli, &[want])).await;
    let err = client_error(client).await;
    assert!(
        err.contains(
            "server identity spiffe://cluster.local/ns/backend/sa/api is not the expected \
             spiffe://cluster.local/ns/backend/sa/db"
        ),
        "{err}"
    );
    let err = server_error(server);
    assert!(err.contains("CertificateUnknown"), "{err}");
}

/// A client that presents no certificate.
#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn server_rejects_a_client_without_certificate() {
    let tmp = temp_dir("tls-nocert");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let srv = id("backend", "api");
    m.acquire(&srv).await.unwrap();
    let client_cfg = tls::client_config(
        crypto_provider(),
        &ca.trust_bundle(),
        std::slice::from_ref(&srv),
        Arc::new(NoCert),
    );
    let (server, client) = handshake(m.server_config(&srv), client_cfg).await;
    let err = server_error(server);
    assert!(err.contains("peer sent no certificates"), "{err}");
    let err = client_error(client).await;
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[tokio::test]
async fn server_rejects_a_client_of_another_ca() {
    let tmp = temp_dir("tls-otherca");
    let ca = new_ca(&tmp, "ca", TD);
    let other = new_ca(&tmp, "other", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    // The client trusts both roots, so only the server's check can fail.
    let m2 = CertManager::new(
        other.clone(),
        other.trust_bundle().merged(&ca.trust_bundle()),
        TD.into(),
        Duration::from_secs(3600),
    );
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    m.acquire(&srv).await.unwrap();
    m2.acquire(&cli).await.unwrap();
    let (server, client) = handshake(
        m.server_config(&srv),
        m2.client_config(&cli, std::slice::from_ref(&srv)),
    )
    .await;
    let err = server_error(server);
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = client_error(client).await;
    assert!(err.contains("UnknownCA"), "{err}");
}

/// Signs any identity, whatever its trust domain (a misbehaving or foreign CA).
struct AnyDomainSigner(Arc<CertificateAuthority>);

impl Signer for AnyDomainSigner {
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a> {
        let now = SystemTime::now();
        let signed = self
            .0
            .issue(id, now - Duration::from_secs(60), now + lifetime);
        Box::pin(std::future::ready(signed))
    }
}

#[tokio::test]
async fn server_rejects_a_client_of_another_trust_domain() {
    let tmp = temp_dir("tls-otherdomain");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let m2 = CertManager::new(
        Arc::new(AnyDomainSigner(ca.clone())),
        ca.trust_bundle(),
        "other.local".into(),
        Duration::from_secs(3600),
    );
    let srv = id("backend", "api");
    let foreign = Identity::new("other.local", "frontend", "web");
    m.acquire(&srv).await.unwrap();
    m2.acquire(&foreign).await.unwrap();
    let (server, client) = handshake(
        m.server_config(&srv),
        m2.client_config(&foreign, std::slice::from_ref(&srv)),
    )
    .await;
    let err = server_error(server);
    assert!(
        err.contains(
            "peer identity spiffe://other.local/ns/frontend/sa/web is not in trust domain \
             \"cluster.local\""
        ),
        "{err}"
    );
    let err = client_error(client).await;
    assert!(err.contains("CertificateUnknown"), "{err}");
}

#[tokio::test]
async fn server_rejects_an_expired_client_certificate() {
    let tmp = temp_dir("tls-expired");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let m2 = manager(&ca, Duration::from_secs(3600));
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    m.acquire(&srv).await.unwrap();
    let now = SystemTime::now();
    let expired = ca
        .sign_with_validity(
            &cli,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    // The manager itself refuses an expired certificate from its signer ...
    struct Expired(Arc<CertificateAuthority>);
    impl Signer for Expired {
        fn sign<'a>(&'a self, id: &'a Identity, _: Duration) -> SignFuture<'a> {
            let now = SystemTime::now();
            Box::pin(std::future::ready(self.0.sign_with_validity(
                id,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )))
        }
    }
    let refusing = CertManager::new(
        Arc::new(Expired(ca.clone())),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_secs(3600),
    );
    let err = refusing.acquire(&cli).await.unwrap_err().to_string();
    assert!(err.contains("expired"), "{err}");
    // ... so present one by force.
    m2.install_for_test(expired);
    let (server, client) = handshake(
        m.server_config(&srv),
        m2.client_config(&cli, std::slice::from_ref(&srv)),
    )
    .await;
    let err = server_error(server);
    assert!(err.contains("certificate expired"), "{err}");
    let err = client_error(client).await;
    assert!(err.contains("CertificateExpired"), "{err}");
}

#[tokio::test]
async fn server_without_certificate_for_its_identity_refuses() {
    let tmp = temp_dir("tls-released");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(3600));
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    m.acquire(&srv).await.unwrap();
    m.acquire(&cli).await.unwrap();
    let server_cfg = m.server_config(&srv);
    m.release(&srv);
    assert!(m.current(&srv).is_none());
    let (server, client) = handshake(
        server_cfg,
        m.client_config(&cli, std::slice::from_ref(&srv)),
    )
    .await;
    // The server has no certificate to present, so it aborts the handshake itself (it does not
    // get as far as judging the client), and tells the client with an access_denied alert.
    let err = server_error(server);
    assert!(
        err.contains("no server certificate chain resolved"),
        "{err}"
    );
    let err = client_error(client).await;
    assert!(err.contains("received fatal alert: AccessDenied"), "{err}");
}

/// Counts calls and fails while `failing` is set.
struct ScriptedSigner {
    ca: Arc<CertificateAuthority>,
    calls: AtomicUsize,
    failing: AtomicBool,
}

impl ScriptedSigner {
    fn new(ca: &Arc<CertificateAuthority>) -> Arc<ScriptedSigner> {
        Arc::new(ScriptedSigner {
            ca: ca.clone(),
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Signer for ScriptedSigner {
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(IdentityError::Sign {
                    identity: id.to_string(),
                    reason: "injected CA outage".into(),
                });
            }
            self.ca.sign(id, lifetime).await
        })
    }
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_certificates_without_touching_live_connections() {
    let tmp = temp_dir("renew");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(4));
    let (srv, cli) = (id("backend", "api"), id("frontend", "web"));
    let start = Instant::now();
    m.acquire(&srv).await.unwrap();
    m.acquire(&cli).await.unwrap();
    let first = m.current(&srv).unwrap();
    let server_cfg = m.server_config(&srv);
    let client_cfg = m.client_config(&cli, std::slice::from_ref(&srv));

    let (server, client) = handshake(server_cfg.clone(), client_cfg.clone()).await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    ping_pong(&mut server, &mut client, b"before renewal").await;

    wait_for("renewal", Duration::from_secs(10), || {
        m.current(&srv).unwrap().serial != first.serial
    })
    .await;
    let elapsed = start.elapsed();
    // At half-life: not before ~2 s, and well before the first certificate expires (4-5 s:
    // not_after is rounded up to whole seconds), leaving 2 s for a loaded machine.
    assert!(
        elapsed >= Duration::from_millis(1900),
        "renewed after {elapsed:?}"
    );
    assert!(
        SystemTime::now() < first.not_after,
        "renewed only after expiry ({elapsed:?})"
    );
    let second = m.current(&srv).unwrap();
    assert!(second.not_after > first.not_after);

    // The connection made with the old certificate carries on.
    ping_pong(&mut server, &mut client, b"after renewal").await;
    assert_eq!(
        leaf_serial(client.get_ref().1.peer_certificates()),
        first.serial
    );

    // A new handshake (same configs) presents the new certificate.
    let (_server2, client2) = handshake(server_cfg, client_cfg).await;
    let client2 = client2.unwrap();
    assert_eq!(
        leaf_serial(client2.get_ref().1.peer_certificates()),
        second.serial
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewal_keeps_the_certificate_and_retries() {
    let tmp = temp_dir("renew-fail");
    let ca = new_ca(&tmp, "ca", TD);
    let signer = ScriptedSigner::new(&ca);
    let m = CertManager::new(
        signer.clone(),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_secs(1),
    );
    let srv = id("backend", "api");
    m.acquire(&srv).await.unwrap();
    assert_eq!(signer.calls(), 1);
    let first = m.current(&srv).unwrap();
    signer.failing.store(true, Ordering::SeqCst);

    // The renewal at half-life fails, and so does the (pulled-in) retry.
    wait_for("two failed renewals", Duration::from_secs(10), || {
        signer.calls() >= 3
    })
    .await;
    assert_eq!(
        m.current(&srv).unwrap().serial,
        first.serial,
        "a failed renewal keeps the current certificate"
    );

    signer.failing.store(false, Ordering::SeqCst);
    wait_for("a successful retry", Duration::from_secs(20), || {
        m.current(&srv).unwrap().serial != first.serial
    })
    .await;
    assert!(m.current(&srv).unwrap().is_valid_at(SystemTime::now()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_release_stops_renewal() {
    let tmp = temp_dir("release");
    let ca = new_ca(&tmp, "ca", TD);
    let signer = ScriptedSigner::new(&ca);
    let m = CertManager::new(
        signer.clone(),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_millis(400),
    );
    let srv = id("backend", "api");
    m.acquire(&srv).await.unwrap();
    m.acquire(&srv).await.unwrap(); // a second pod of the same service account
    assert_eq!(signer.calls(), 1, "one certificate per identity");
    wait_for("a renewal", Duration::from_secs(10), || signer.calls() >= 2).await;

    m.release(&srv);
    assert!(m.current(&srv).is_some(), "one reference is left");
    let calls = signer.calls();
    wait_for(
        "renewal after the first release",
        Duration::from_secs(10),
        || signer.calls() > calls,
    )
    .await;

    let last = m.current(&srv).unwrap();
    m.release(&srv);
    assert!(m.current(&srv).is_none());
    let calls = signer.calls();
    // A live renewal task renews at half-life, and reports an expiry at the latest: once the
    // released certificate's own expiry has passed, a task still running would have called.
    wait_for(
        "the released certificate's expiry",
        Duration::from_secs(10),
        || SystemTime::now() > last.not_after + Duration::from_millis(200),
    )
    .await;
    assert_eq!(signer.calls(), calls, "no renewal after the last release");
}

#[test]
fn acquire_outside_a_runtime_is_an_error() {
    let tmp = temp_dir("noruntime");
    let ca = new_ca(&tmp, "ca", TD);
    let m = manager(&ca, Duration::from_secs(60));
    let err = futures::executor::block_on(m.acquire(&id("a", "b"))).unwrap_err();
    assert!(matches!(err, IdentityError::NoRuntime), "{err}");
}

#[tokio::test]
async fn acquire_checks_what_the_signer_returns() {
    let tmp = temp_dir("acquire-check");
    let ca = new_ca(&tmp, "ca", TD);
    let other = new_ca(&tmp, "other", TD);
    // A signer from another CA: its certificates would not verify at any peer.
    let m = CertManager::new(
        other.clone(),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_secs(60),
    );
    let err = m.acquire(&id("a", "b")).await.unwrap_err().to_string();
    assert!(
        err.contains("does not verify against the trust bundle"),
        "{err}"
    );
    assert!(m.current(&id("a", "b")).is_none());
    // A CA refuses identities of other trust domains.
    let m = manager(&ca, Duration::from_secs(60));
    let err = m
        .acquire(&Identity::new("other.local", "a", "b"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::WrongTrustDomain { .. }),
        "{err}"
    );
}

/// Signs with `ca` once `gate` lets it: calls that arrive together are all in flight at once.
struct GatedSigner {
    ca: Arc<CertificateAuthority>,
    gate: tokio::sync::Barrier,
    calls: AtomicUsize,
}

impl Signer for GatedSigner {
    fn sign<'a>(&'a self, id: &'a Identity, lifetime: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.gate.wait().await;
            self.ca.sign(id, lifetime).await
        })
    }
}

#[tokio::test]
async fn concurrent_acquires_of_one_identity_share_one_entry() {
    let tmp = temp_dir("acquire-race");
    let ca = new_ca(&tmp, "ca", TD);
    let signer = Arc::new(GatedSigner {
        ca: ca.clone(),
        gate: tokio::sync::Barrier::new(2),
        calls: AtomicUsize::new(0),
    });
    let m = CertManager::new(
        signer.clone(),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_secs(3600),
    );
    let srv = id("backend", "api");
    // Both find no entry and ask the signer; neither signature comes back before both asked.
    let (a, b) = tokio::join!(m.acquire(&srv), m.acquire(&srv));
    a.unwrap();
    b.unwrap();
    assert_eq!(signer.calls.load(Ordering::SeqCst), 2);
    assert_eq!(m.refs(&srv), Some(2));
    assert_eq!(m.entries_created(), 1, "one entry, so one renewal task");
    assert_eq!(m.certificates().len(), 1);
    m.release(&srv);
    assert_eq!(m.refs(&srv), Some(1));
    m.release(&srv);
    assert!(m.current(&srv).is_none());
}

#[test]
fn acquire_signs_off_the_runtime_workers() {
    use super::signer::tests::RecordingRuntime;
    let tmp = temp_dir("acquire-blocking");
    let ca = new_ca(&tmp, "ca", TD);
    for (flavor, rt) in [
        ("multi-thread", RecordingRuntime::multi_thread(2)),
        ("current-thread", RecordingRuntime::current_thread()),
    ] {
        let m = manager(&ca, Duration::from_secs(3600));
        let srv = id("acquire-blocking-pool", flavor);
        let acquiring = m.clone();
        let acquired = srv.clone();
        rt.runtime.block_on(async move {
            tokio::spawn(async move { acquiring.acquire(&acquired).await })
                .await
                .unwrap()
                .unwrap()
        });
        assert!(m.current(&srv).is_some());
        rt.assert_signed_on_blocking_pool(&srv);
    }
}

/// A `tracing` writer that keeps what is logged.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Set in the child process that runs [`renewal_failures_and_expiry_are_logged_child`].
const LOG_CHILD: &str = "MESH_TEST_EXPIRY_LOG_CHILD";

/// `tracing` decides once per call site, for the whole process, whether anyone listens; a test
/// thread's own subscriber loses that race against other tests hitting the same call sites (the
/// renewal warning went missing whenever another identity test ran beside this one). So the
/// logging is checked in a child process of this test binary running only that test, with its
/// subscriber installed process-wide.
#[test]
fn renewal_failures_and_expiry_are_logged() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "identity::tests::renewal_failures_and_expiry_are_logged_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(LOG_CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran no test: {text}");
}

#[tokio::test]
#[ignore = "run by renewal_failures_and_expiry_are_logged in a child process"]
async fn renewal_failures_and_expiry_are_logged_child() {
    if std::env::var_os(LOG_CHILD).is_none() {
        return;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let tmp = temp_dir("expiry-log");
    let ca = new_ca(&tmp, "ca", TD);
    let signer = ScriptedSigner::new(&ca);
    let m = CertManager::new(
        signer.clone(),
        ca.trust_bundle(),
        TD.into(),
        Duration::from_secs(4),
    );
    let srv = id("backend", "api");
    // A 4 s certificate: the failing renewal at half-life (~2 s) comes well before the expiry
    // (4-5 s: not_after is rounded up to whole seconds).
    m.acquire(&srv).await.unwrap();
    let first = m.current(&srv).unwrap();
    signer.failing.store(true, Ordering::SeqCst);
    // The expiry is reported, then the next failed attempt says so again: once that is logged,
    // the expiry report has had its chance to repeat.
    wait_for(
        "a failed attempt after the expiry",
        Duration::from_secs(40),
        || {
            logs.text()
                .contains("certificate renewal failed again; the current certificate has expired")
        },
    )
    .await;
    assert!(
        SystemTime::now() >= first.not_after,
        "reported before the expiry"
    );
    let text = logs.text();
    let issued = text
        .lines()
        .find(|l| l.contains("issued workload certificate"))
        .unwrap_or_else(|| panic!("no issuance log in {text}"));
    assert!(issued.contains(" INFO "), "{issued}");
    assert!(issued.contains(&srv.to_string()), "{issued}");
    assert!(issued.contains(&first.serial), "{issued}");
    assert!(issued.contains("not_after="), "{issued}");
    let failed = text
        .lines()
        .find(|l| l.contains("keeping the still-valid certificate"))
        .unwrap_or_else(|| panic!("no renewal warning in {text}"));
    assert!(failed.contains(" WARN "), "{failed}");
    assert!(failed.contains(&srv.to_string()), "{failed}");
    assert!(failed.contains("injected CA outage"), "{failed}");
    let expired: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("expired without renewal"))
        .collect();
    assert_eq!(expired.len(), 1, "reported once: {text}");
    assert!(expired[0].contains("ERROR"), "{}", expired[0]);
    assert!(expired[0].contains(&srv.to_string()), "{}", expired[0]);
    assert_eq!(m.current(&srv).unwrap().serial, first.serial);
}
