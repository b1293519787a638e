//! End to end: HBONE (HTTP/2 CONNECT in mutual TLS with SPIFFE identities) between pods on the
//! same node and across nodes, service VIPs with load balancing, and clean rejections of bad
//! peers. Two nodes, one agent each, real eBPF and real TLS. Needs root.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_agent::identity::{CaOptions, CertManager, CertificateAuthority, Identity};
use mesh_tests::agent::{
    ca_dir, eventually, metric_sum, render_config, uninstall, write_config, Agent, WorkloadSpec,
};
use mesh_tests::apps::{
    accepted_peers, client, client_with, echo_server, soak, soak_stop, wait_soak_event, Capture,
};
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const PORT: u16 = 7000;
const T: Duration = Duration::from_secs(15);
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/";

struct Mesh {
    // Field order is drop order: agents and apps die before the topology is torn down.
    agents: Vec<Agent>,
    servers: HashMap<String, Proc>,
    topo: Topology,
}

impl Mesh {
    fn agent(&self, node: &str) -> &Agent {
        self.agents.iter().find(|a| a.node == node).expect("agent")
    }

    fn metrics(&self, node: &str) -> String {
        self.agent(node).metrics(&self.topo).expect("metrics")
    }

    fn addr(&self, pod: &str) -> String {
        format!("{}:{PORT}", self.topo.pod(pod).ip4)
    }
}

/// node1: client, near (same-node server); node2: far, s2, s3. Every pod enrolled and every
/// server pod runs an echo server; `extra_yaml` is appended to the config (services).
fn setup(extra_yaml: &str, agent_args: &[&str]) -> Result<Mesh> {
    let topo = Topology::new(&[
        ("node1", &["client", "near"]),
        ("node2", &["far", "s2", "s3"]),
    ])?;
    let pods = ["client", "near", "far", "s2", "s3"];
    let config = topo.work_dir().join("mesh.yaml");
    let specs: Vec<WorkloadSpec> = pods.iter().map(|p| WorkloadSpec::mesh(p)).collect();
    write_config(
        &config,
        &format!("{}{extra_yaml}", render_config(&topo, &specs)),
    )?;
    let mut servers = HashMap::new();
    for pod in &pods[1..] {
        servers.insert(pod.to_string(), echo_server(&topo, pod, PORT)?);
    }
    let agents = vec![
        Agent::start_with(&topo, "node1", &config, agent_args)?,
        Agent::start_with(&topo, "node2", &config, agent_args)?,
    ];
    Ok(Mesh {
        agents,
        servers,
        topo,
    })
}

fn ok(r: &Value) {
    assert_eq!(r["ok"], true, "{r}");
}

#[test]
fn cross_node_and_same_node_echo_over_hbone_with_identities() -> Result<()> {
    let m = setup("", &[])?;
    for (pod, remote_node) in [("far", "node2"), ("near", "node1")] {
        let r = client(&m.topo, "client", &m.addr(pod), 2, 256 * 1024)?;
        ok(&r);
        assert_eq!(
            r["peer"],
            m.addr(pod).as_str(),
            "getpeername shows the original destination"
        );

        let source = [
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_workload", pod),
            ("connection_security_policy", "mutual_tls"),
        ];
        let principal = format!("{SPIFFE}{pod}");
        let src_principal = format!("{SPIFFE}client");
        assert!(
            eventually(T, || metric_sum(&m.metrics("node1"), CLOSED, &source)
                == 2.0),
            "{}",
            m.metrics("node1")
        );
        let text = m.metrics("node1");
        assert_eq!(
            metric_sum(
                &text,
                OPENED,
                &[
                    ("destination_principal", &principal),
                    ("source_workload", "client"),
                    ("reporter", "source")
                ]
            ),
            2.0
        );
        // The destination's agent saw the client's SPIFFE identity over mutual TLS.
        let dest = [
            ("reporter", "destination"),
            ("destination_workload", pod),
            ("source_principal", src_principal.as_str()),
            ("source_workload", "client"),
            ("connection_security_policy", "mutual_tls"),
        ];
        assert!(
            eventually(T, || metric_sum(&m.metrics(remote_node), CLOSED, &dest)
                == 2.0),
            "{}",
            m.metrics(remote_node)
        );
        let bytes = metric_sum(
            &m.metrics(remote_node),
            "istio_tcp_received_bytes_total",
            &dest,
        );
        assert_eq!(bytes, 2.0 * 256.0 * 1024.0);
        let log = m
            .agent(remote_node)
            .wait_log("inbound connection complete", 0, T)?;
        assert!(log.contains(&src_principal), "{log}");
    }
    Ok(())
}

#[test]
fn bytes_between_nodes_are_tls_never_the_application_plaintext() -> Result<()> {
    let m = setup("", &[])?;
    let marker = "PLAINTEXT-MARKER-7f3a";
    let pcap = m.topo.work_dir().join("fabric.pcap");
    let capture = Capture::start(m.topo.fabric_netns(), "any", &pcap)?;
    let r = client_with(
        &m.topo,
        "client",
        &m.addr("far"),
        1,
        256 * 1024,
        &["--marker", marker],
    )?;
    ok(&r);
    let bytes = capture.finish()?;
    assert!(
        bytes.len() > 256 * 1024,
        "the capture saw the transfer ({} bytes)",
        bytes.len()
    );
    assert!(
        !contains(&bytes, marker.as_bytes()),
        "plaintext crossed the fabric"
    );

    // Control: with the mesh uninstalled from the client's node, the same marker is visible, so
    // the capture works.
    let mut m = m;
    m.agents[0].stop(T)?;
    uninstall(&m.topo, "node1")?;
    let capture = Capture::start(m.topo.fabric_netns(), "any", &pcap)?;
    let r = client_with(
        &m.topo,
        "client",
        &m.addr("far"),
        1,
        64 * 1024,
        &["--marker", marker],
    );
    let bytes = capture.finish()?;
    // Without the mesh on node1 the connection goes straight to `far` (nothing enforces STRICT
    // mTLS there).
    ok(&r?);
    assert!(
        contains(&bytes, marker.as_bytes()),
        "control capture did not see the plaintext marker"
    );
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const SERVICE: &str = "services:
  - name: echo
    vips: [10.96.0.10]
    ports: [{ port: 80, targetPort: 7000 }, { port: 81, targetPort: 7999 }]
    endpoints: [near, s2, s3]
  - name: empty
    vips: [10.96.0.11]
    ports: [{ port: 80 }]
";

#[test]
fn a_service_vip_spreads_connections_over_its_endpoints() -> Result<()> {
    let m = setup(SERVICE, &[])?;
    let before: HashMap<&str, usize> = ["near", "s2", "s3"]
        .iter()
        .map(|p| (*p, m.servers[*p].stdout_lines().len()))
        .collect();
    for _ in 0..3 {
        ok(&client(&m.topo, "client", "10.96.0.10:80", 100, 1024)?);
    }
    // Count once all 300 accepts have been reported (each server's output arrives through a
    // pipe, a little after the fact), then each endpoint must be within 10 % of its share.
    let count = |pod: &str| accepted_peers(&m.servers[pod], before[pod]).len();
    let total = || ["near", "s2", "s3"].iter().map(|p| count(p)).sum::<usize>();
    assert!(
        eventually(T, || total() >= 300),
        "{} of 300 accepts reported",
        total()
    );
    assert_eq!(total(), 300);
    for pod in ["near", "s2", "s3"] {
        let n = count(pod);
        assert!((90..=110).contains(&n), "{pod} got {n} of 300 connections");
    }
    let labels = [
        ("destination_service", "echo.default.svc.cluster.local"),
        ("reporter", "source"),
    ];
    assert!(eventually(T, || metric_sum(
        &m.metrics("node1"),
        CLOSED,
        &labels
    ) == 300.0));

    // An unknown VIP port and a service without endpoints fail fast with a reset.
    for addr in ["10.96.0.10:82", "10.96.0.11:80"] {
        let started = Instant::now();
        let r = client_with(&m.topo, "client", addr, 1, 16, &["--timeout-ms", "5000"])?;
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{addr} did not fail fast: {r}"
        );
    }
    let text = m.metrics("node1");
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reason", "unknown_service_port")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reason", "no_healthy_upstream")]
        ),
        1.0,
        "{text}"
    );

    // A DestinationRule hashing on the client's address: the node agent keeps client on one
    // endpoint from then on.
    let config = m.topo.work_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&config)?;
    write_config(
        &config,
        &format!(
            "{text}destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{ name: echo, namespace: default }}
    spec:
      host: echo
      trafficPolicy: {{ loadBalancer: {{ consistentHash: {{ useSourceIp: true }} }} }}
"
        ),
    )?;
    let reloaded = |node: &str| {
        metric_sum(
            &m.metrics(node),
            "mesh_config_reloads_total",
            &[("result", "applied")],
        ) >= 1.0
    };
    assert!(eventually(T, || reloaded("node1")), "node1 did not reload");
    // The reload is counted as the file is read, a moment before the new state is in force:
    // batches until one lands on a single endpoint, then the check.
    let batch = |n: usize| -> Result<Vec<usize>> {
        let before: Vec<usize> = ["near", "s2", "s3"].iter().map(|p| count(p)).collect();
        ok(&client(&m.topo, "client", "10.96.0.10:80", n, 1024)?);
        let new = || -> Vec<usize> {
            ["near", "s2", "s3"]
                .iter()
                .zip(&before)
                .map(|(p, b)| count(p) - b)
                .collect()
        };
        let reported = eventually(T, || new().iter().sum::<usize>() >= n);
        assert!(reported, "{:?} of {n} reported", new());
        Ok(new())
    };
    let deadline = Instant::now() + T;
    while !batch(6)?.contains(&6) {
        assert!(Instant::now() < deadline, "the rule never applied");
    }
    let got = batch(60)?;
    assert!(got.contains(&60), "not all on one endpoint: {got:?}");
    Ok(())
}

#[test]
fn a_refused_upstream_gets_503_and_the_client_sees_the_close_promptly() -> Result<()> {
    let m = setup(SERVICE, &[])?;
    let started = Instant::now();
    let r = client_with(
        &m.topo,
        "client",
        &format!("{}:7999", m.topo.pod("far").ip4),
        1,
        16,
        &["--timeout-ms", "5000"],
    )?;
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "client waited {:?}: {r}",
        started.elapsed()
    );
    let line = m.agent("node2").wait_log("rejected CONNECT", 0, T)?;
    assert!(line.contains("status=503"), "{line}");
    let text = m.metrics("node1");
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reason", "hbone_connect")]
        ),
        1.0,
        "{text}"
    );
    Ok(())
}

#[test]
fn a_hundred_parallel_connections_share_one_pooled_http2_connection() -> Result<()> {
    let m = setup("", &[])?;
    ok(&client(&m.topo, "client", &m.addr("far"), 100, 64 * 1024)?);
    let text = m.metrics("node1");
    assert_eq!(
        metric_sum(&text, OPENED, &[("destination_workload", "far")]),
        100.0,
        "{text}"
    );
    let pool = metric_sum(&text, "mesh_hbone_pool_connections", &[]);
    assert_eq!(
        pool, 1.0,
        "100 streams used {pool} HTTP/2 connections:\n{text}"
    );
    Ok(())
}

// ----- a test client that speaks HBONE itself, with certificates of our choosing -------------

/// The mesh CA the topology's agents use, loaded from their shared state dir.
fn mesh_ca(topo: &Topology, trust_domain: &str) -> Result<CertificateAuthority> {
    Ok(CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: None,
        ca_key: None,
        state_dir: ca_dir(topo),
        trust_domain: trust_domain.into(),
        extra_roots: None,
    })?)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TCP connection from node1's network namespace (routes to every pod) to `addr`.
fn dial_from_node1(topo: &Topology, addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
    let std_stream = topo.in_node_netns("node1", move || {
        Ok(std::net::TcpStream::connect_timeout(&addr, T)?)
    })?;
    std_stream.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(std_stream)?)
}

/// TLS handshake to `far`'s 15008 with `config`; returns the server's leaf certificate serial.
async fn handshake(
    topo: &Topology,
    config: Arc<rustls::ClientConfig>,
) -> Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    String,
)> {
    let ip = topo.pod("far").ip4;
    let tcp = dial_from_node1(topo, std::net::SocketAddr::new(ip.into(), 15008))?;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from(ip).into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .context("server sent no certificate")?[0]
        .clone();
    let (_, cert) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        tls,
        cert.raw_serial_as_string().replace(':', "").to_lowercase(),
    ))
}

/// Reads until the server closes or errors; returns the error text, or "" for a clean close.
async fn server_verdict(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // TLS 1.3 sends the server's verdict on our certificate after the client's handshake ends:
    // send something and read to see it.
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await {
        return e.to_string();
    }
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) => return String::new(),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return "timeout".into(),
        }
    }
}

/// Serials of `far`'s certificates in the order node2's agent issued them (first issuance, then
/// each renewal), from its `issued workload certificate` log lines.
fn far_serials_issued(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .iter()
        .filter(|l| l.contains("issued workload certificate") && l.contains("default/sa/far"))
        .filter_map(|l| {
            let (_, rest) = l.split_once("serial=")?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect()
}

#[test]
fn certificates_rotate_without_dropping_connections() -> Result<()> {
    let m = setup("", &["--cert-lifetime-secs", "10"])?;
    // A long-lived connection (and a new connection every 20 ms) through the mesh while far's
    // certificate is renewed three times (at half-life, every 5 s); stopped once that happened.
    let traffic = soak(&m.topo, "client", &m.addr("far"), 120_000)?;
    wait_soak_event(&traffic, "long_lived_open", 0, T)?;
    let rt = runtime();
    let ca = mesh_ca(&m.topo, "cluster.local")?;
    let bundle = ca.trust_bundle();
    let certs = CertManager::new(
        Arc::new(ca),
        bundle,
        "cluster.local".into(),
        Duration::from_secs(3600),
    );
    let probe = Identity::new("cluster.local", "default", "probe");
    let far = Identity::new("cluster.local", "default", "far");
    rt.block_on(certs.acquire(&probe))?;
    let node2 = m.agent("node2");
    // Renewals are counted from the certificate in use when the long-lived connection opened.
    let base = far_serials_issued(node2).len();
    assert!(base >= 1, "far's certificate was issued");
    // After each renewal the server presents the renewed certificate to new handshakes. The
    // log line comes just before the swap, so a handshake may still see the previous one: retry
    // until it presents what was logged (or a later renewal).
    for renewal in 1..=3 {
        let issued = {
            let mut issued = Vec::new();
            assert!(
                eventually(Duration::from_secs(30), || {
                    issued = far_serials_issued(node2);
                    issued.len() >= base + renewal
                }),
                "renewal {renewal} of far's certificate not logged:\n{:#?}",
                node2.log()
            );
            issued
        };
        let mut presented = String::new();
        let current = eventually(T, || {
            presented = rt
                .block_on(async {
                    let (_tls, serial) = handshake(
                        &m.topo,
                        certs.client_config(&probe, std::slice::from_ref(&far)),
                    )
                    .await?;
                    anyhow::Ok(serial)
                })
                .unwrap_or_default();
            far_serials_issued(node2)[base + renewal - 1..].contains(&presented)
        });
        assert!(
            current,
            "after renewal {renewal} the server presents {presented:?}; issued: {issued:?}"
        );
    }
    let issued = far_serials_issued(node2);
    let mut distinct = issued.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        issued.len(),
        "every renewal has a new serial: {issued:?}"
    );

    // Nothing was dropped: the one long-lived connection lasted through all three renewals and
    // every new connection succeeded.
    let r = soak_stop(traffic)?;
    ok(&r);
    assert_eq!(r["long_lived_errors"], 0, "{r}");
    assert_eq!(r["long_lived_connections"], 1, "{r}");
    assert_eq!(r["new_conns_failed"], 0, "{r}");
    Ok(())
}

/// Accepts any server certificate: these probes test what the *server* accepts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 + h2 client config presenting `cert` (or no certificate).
fn probe_config(cert: Option<&mesh_agent::identity::WorkloadCert>) -> Arc<rustls::ClientConfig> {
    let provider = mesh_agent::identity::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.cert_chain.clone(), c.key.clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Arc::new(config)
}

#[test]
fn peers_with_bad_certificates_are_rejected_and_others_keep_being_served() -> Result<()> {
    let m = setup("", &[])?;
    let rt = runtime();
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let probe = Identity::new("cluster.local", "default", "probe");

    let other_ca = CertificateAuthority::load_or_generate(&CaOptions {
        ca_cert: None,
        ca_key: None,
        state_dir: m.topo.work_dir().join("other-ca"),
        trust_domain: "cluster.local".into(),
        extra_roots: None,
    })?;
    let foreign_domain = mesh_ca(&m.topo, "other.domain")?;
    let mesh = mesh_ca(&m.topo, "cluster.local")?;
    let cases = [
        (
            "a certificate from another CA",
            Some(other_ca.sign_with_validity(&probe, now - hour, now + hour)?),
        ),
        (
            "another trust domain",
            Some(foreign_domain.sign_with_validity(
                &Identity::new("other.domain", "default", "probe"),
                now - hour,
                now + hour,
            )?),
        ),
        (
            "an expired certificate",
            Some(mesh.sign_with_validity(&probe, now - 2 * hour, now - hour)?),
        ),
        ("no certificate", None),
    ];
    for (what, cert) in &cases {
        let skip = m.agent("node2").log().len();
        let verdict = rt.block_on(async {
            match handshake(&m.topo, probe_config(cert.as_ref())).await {
                Ok((mut tls, _)) => server_verdict(&mut tls).await,
                Err(e) => e.to_string(),
            }
        });
        assert!(
            !verdict.is_empty(),
            "{what}: the server did not refuse the handshake"
        );
        let line = m
            .agent("node2")
            .wait_log("rejected inbound HBONE connection", skip, T)?;
        assert!(
            line.contains("reason=tls_handshake") || line.contains("reason=peer_identity"),
            "{what}: {line}"
        );
    }
    let text = m.metrics("node2");
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reason", "tls_handshake")]
        ),
        4.0,
        "{text}"
    );

    // A valid peer asking for a different pod's address gets 400, without killing the connection.
    let good = mesh.sign_with_validity(&probe, now - hour, now + hour)?;
    let pool = mesh_agent::proxy::hbone::HbonePool::new(Default::default());
    let key = mesh_agent::proxy::hbone::PoolKey {
        src: probe.to_string(),
        src_ip: m.topo.node("node1").ip4.into(),
        dst: format!("{SPIFFE}far"),
        dst_addr: std::net::SocketAddr::new(m.topo.pod("far").ip4.into(), 15008),
    };
    let request = |target: &str| mesh_agent::proxy::hbone::ConnectRequest {
        authority: target.parse().expect("addr"),
        forwarded_for: "10.20.1.2:40000".parse().expect("addr"),
        forwarded_host: None,
        baggage: None,
        traceparent: None,
    };
    let config = probe_config(Some(&good));
    let status = rt.block_on(async {
        let dial = || async {
            handshake(&m.topo, config.clone())
                .await
                .map(|(tls, _)| tls)
                .map_err(std::io::Error::other)
        };
        let wrong = pool
            .connect(key.clone(), request(&m.addr("near")), dial)
            .await;
        let right = pool
            .connect(key.clone(), request(&m.addr("far")), dial)
            .await;
        (wrong.err().and_then(|e| e.status()), right.is_ok())
    });
    assert_eq!(status, (Some(http::StatusCode::BAD_REQUEST), true));
    assert_eq!(
        pool.connections_for(&key),
        1,
        "the 400 did not cost the connection"
    );
    let line = m.agent("node2").wait_log("rejected CONNECT", 0, T)?;
    assert!(
        line.contains("status=400") && line.contains("is not this pod"),
        "{line}"
    );

    // Not TLS at all, and garbage after a TLS record header: rejected cleanly too.
    for (what, bytes) in [
        (
            "a plaintext client",
            &b"GET / HTTP/1.1\r\nHost: far\r\n\r\n"[..],
        ),
        (
            "malformed TLS",
            &b"\x16\x03\x01\x00\x05garbage-that-is-not-a-client-hello"[..],
        ),
    ] {
        let skip = m.agent("node2").log().len();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = dial_from_node1(&m.topo, key.dst_addr)?;
            tcp.write_all(bytes).await?;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(T, tcp.read_to_end(&mut buf)).await;
            anyhow::Ok(())
        })?;
        let line = m
            .agent("node2")
            .wait_log("rejected inbound HBONE connection", skip, T)?;
        assert!(line.contains("reason=tls_handshake"), "{what}: {line}");
    }

    // A valid peer that sends something other than CONNECT, or a bad authority, gets 400.
    let statuses = rt.block_on(async {
        let (tls, _) = handshake(&m.topo, config.clone()).await?;
        let (mut h2, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut out = Vec::new();
        for (method, uri) in [
            ("GET", "http://10.20.2.2:7000/"),
            ("CONNECT", "not-an-address:7000"),
        ] {
            let req = http::Request::builder().method(method).uri(uri).body(())?;
            let (resp, _) = h2.send_request(req, true)?;
            out.push(resp.await?.status().as_u16());
        }
        anyhow::Ok(out)
    })?;
    assert_eq!(statuses, [400, 400]);

    // Everyone else is still served.
    ok(&client(&m.topo, "client", &m.addr("far"), 3, 4096)?);
    Ok(())
}

#[test]
fn a_slowloris_peer_gets_a_bounded_share_of_handshakes_and_others_are_served() -> Result<()> {
    use tokio::io::AsyncReadExt;
    const CAP: usize = 16;
    const IDLE: usize = 40;
    let m = setup(
        "",
        &[
            "--max-handshakes-per-source",
            &CAP.to_string(),
            "--handshake-timeout-secs",
            "3",
        ],
    )?;
    // Its own threads: the reads below run (and time each close) while the test goes on.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let far = std::net::SocketAddr::new(m.topo.pod("far").ip4.into(), 15008);
    let rejected = || {
        metric_sum(
            &m.metrics("node2"),
            "mesh_inbound_handshakes_rejected_total",
            &[("reason", "per_source_handshake_limit")],
        )
    };
    // 40 connections from node1's address that never send a byte: 16 wait for their handshake,
    // the other 24 are refused at once.
    let started = Instant::now();
    // (Registering the sockets with tokio needs its runtime.) A reset can come back so fast
    // that the connect itself reports it: that one was refused at once.
    let (idle, reset_at_connect): (Vec<_>, Vec<_>) = rt.block_on(async {
        (0..IDLE)
            .map(|_| dial_from_node1(&m.topo, far))
            .partition(Result::is_ok)
    });
    for e in &reset_at_connect {
        let e = e.as_ref().expect_err("partitioned");
        assert!(e.to_string().contains("reset"), "{e:#}");
    }
    let idle: Vec<_> = idle.into_iter().map(Result::unwrap).collect();
    let mut reads = tokio::task::JoinSet::new();
    for mut s in idle {
        reads.spawn_on(
            async move {
                let mut buf = [0u8; 16];
                let r = tokio::time::timeout(T, s.read(&mut buf)).await;
                assert!(
                    matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                    "a slow connection was not closed: {r:?}"
                );
                started.elapsed()
            },
            rt.handle(),
        );
    }
    assert!(
        eventually(T, || rejected() == (IDLE - CAP) as f64),
        "rejected: {}",
        rejected()
    );
    // Meanwhile everyone else is served: a pod's mesh connection to `far` goes through, its
    // handshakes neither refused nor timed out.
    ok(&client(&m.topo, "client", &m.addr("far"), 3, 1000)?);
    let client_ip = m.topo.pod("client").ip4.to_string();
    assert!(
        m.agent("node2")
            .log()
            .iter()
            .filter(|l| l.contains(&format!("peer={client_ip}:")))
            .all(|l| !l.contains("tls_handshake") && !l.contains("handshake_limit")),
        "the pod's connections were turned away"
    );
    // Each slow connection is closed: the refused ones at once, the admitted ones at the
    // handshake deadline.
    let closed_at: Vec<Duration> = rt.block_on(reads.join_all());
    let late = closed_at
        .iter()
        .filter(|d| **d >= Duration::from_secs(2))
        .count();
    assert_eq!(
        late, CAP,
        "admitted ones wait for the deadline: {closed_at:?}"
    );
    let line = m
        .agent("node2")
        .wait_log("too many TLS handshakes in progress", 0, T)?;
    assert!(line.contains("per_source_handshake_limit"), "{line}");
    Ok(())
}

/// Service `pair` over `near` (node1, the client's node) and `far` (node2).
const PAIR: &str = "services:
  - name: pair
    vips: [10.96.0.20]
    ports: [{ port: 80, targetPort: 7000 }]
    endpoints: [near, far]
";

#[test]
fn a_dead_endpoint_is_ejected_its_connections_retried_and_it_returns_after_the_ejection(
) -> Result<()> {
    let mut m = setup(PAIR, &[])?;
    let failed = |m: &Mesh, node: &str, reporter: &str| {
        metric_sum(
            &m.metrics(node),
            "istio_tcp_connections_failed_total",
            &[("reporter", reporter), ("destination_workload", "far")],
        )
    };
    let served = |m: &Mesh, pod: &str| {
        metric_sum(
            &m.metrics("node1"),
            CLOSED,
            &[
                ("reporter", "source"),
                ("destination_service", "pair.default.svc.cluster.local"),
                ("destination_workload", pod),
            ],
        )
    };
    // Both endpoints serve first, in turn.
    for _ in 0..4 {
        ok(&client(&m.topo, "client", "10.96.0.20:80", 1, 64)?);
    }
    assert!(eventually(T, || served(&m, "near") + served(&m, "far") == 4.0));
    assert_eq!(served(&m, "far"), 2.0);

    // `far` dies: its port is closed, so its agent answers the CONNECT with 503. Connections one
    // after the other (each client run waits for its own) must all succeed, and `far` gets one.
    drop(m.servers.remove("far"));
    let started = Instant::now();
    for _ in 0..10 {
        ok(&client(&m.topo, "client", "10.96.0.20:80", 1, 64)?);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "10 connections took {took:?}: the ejection (5 s) may have ended in between"
    );
    let ejections = |m: &Mesh| {
        metric_sum(
            &m.metrics("node1"),
            "mesh_endpoint_ejections_total",
            &[("service", "default/pair"), ("endpoint", "default/far")],
        )
    };
    assert_eq!(ejections(&m), 1.0, "{}", m.metrics("node1"));
    // One attempt reached `far`'s agent (it counted the refused application once) and the source
    // counted that attempt as failed.
    assert!(eventually(T, || failed(&m, "node2", "destination") >= 1.0));
    assert_eq!(
        failed(&m, "node2", "destination"),
        1.0,
        "{}",
        m.metrics("node2")
    );
    assert_eq!(failed(&m, "node1", "source"), 1.0, "{}", m.metrics("node1"));
    let line =
        m.agent("node1")
            .wait_log("endpoint ejected from the service's load balancing", 0, T)?;
    assert!(
        line.contains("service=default/pair")
            && line.contains("endpoint=default/far")
            && line.contains("ejected_for_ms=5000"),
        "{line}"
    );
    let (code, ejected) =
        mesh_tests::http_get(&m.topo, "node1", "127.0.0.1:15000", "/endpoints/ejected")?;
    assert_eq!(code, 200, "{ejected}");
    let ejected: Value = serde_json::from_str(&ejected)?;
    assert_eq!(ejected[0]["endpoint"], "default/far", "{ejected}");
    // The 10 connections were all served by `near`, each counted once.
    assert!(eventually(T, || served(&m, "near") + served(&m, "far") == 14.0));
    assert_eq!(
        (served(&m, "near"), served(&m, "far")),
        (12.0, 2.0),
        "{}",
        m.metrics("node1")
    );
    assert_eq!(
        metric_sum(
            &m.metrics("node1"),
            OPENED,
            &[
                ("reporter", "source"),
                ("destination_service", "pair.default.svc.cluster.local")
            ]
        ),
        14.0
    );

    // `far` comes back; once its ejection (which began during the loop above) has ended, it gets
    // its share again.
    m.servers
        .insert("far".into(), echo_server(&m.topo, "far", PORT)?);
    std::thread::sleep(Duration::from_secs(5));
    for _ in 0..6 {
        ok(&client(&m.topo, "client", "10.96.0.20:80", 1, 64)?);
    }
    assert!(eventually(T, || served(&m, "near") + served(&m, "far") == 20.0));
    assert_eq!(served(&m, "far"), 5.0, "{}", m.metrics("node1"));
    assert!(!accepted_peers(&m.servers["far"], 0).is_empty());
    let line = m
        .agent("node1")
        .wait_log("endpoint back in the service's load balancing", 0, T)?;
    assert!(line.contains("endpoint=default/far"), "{line}");
    assert_eq!(ejections(&m), 1.0);
    let (_, ejected) =
        mesh_tests::http_get(&m.topo, "node1", "127.0.0.1:15000", "/endpoints/ejected")?;
    assert_eq!(
        serde_json::from_str::<Value>(&ejected)?,
        serde_json::json!([])
    );
    Ok(())
}
