//! Interop with a real Istio ztunnel: HBONE both ways between our agent and ztunnel.
//!
//! Runs only with `MESH_ZTUNNEL_BIN` set to an istio/ztunnel binary (built per ztunnel's own
//! README); without it the test prints one `skipped: …` line and passes. Needs root.
//!
//! The topology: node1 runs our agent with the pods `client` and `server` (enrolled); node2 has
//! the pod `zt`, where ztunnel runs in **dedicated** mode (`PROXY_MODE=dedicated`, proxying for
//! that one workload, `PROXY_WORKLOAD_INFO=default/zt/zt`) beside an echo server. ztunnel reads its
//! workloads and services from a file (`LOCAL_XDS_PATH`, no XDS server: `XDS_ADDRESS=""`) and
//! gets its certificate from [`mesh_tests::istio_ca`], a stand-in for istiod's
//! `IstioCertificateService` listening on the pod's loopback and signing with the mesh CA our
//! agent uses, so both sides trust one root. ztunnel does not connect the application back from
//! the client's address (`ENABLE_ORIG_SRC=false`: nothing in the pod routes it back).
//!
//! How traffic reaches ztunnel's outbound side: through its SOCKS5 listener
//! (`UNSTABLE_ENABLE_SOCKS5=true`, `127.0.0.1:15080` in the pod), which hands connections to the
//! same outbound proxy as its `SO_ORIGINAL_DST` listener; the redirect that listener needs
//! (iptables `REDIRECT` in the pod) would make the test depend on iptables and netfilter NAT,
//! which the rest of the suite does not use. The SOCKS5 client is the test itself, on a thread in
//! the pod's namespace.
//!
//! ztunnel's config knows `zt` (as a pod of the Deployment `zt-deploy`, canonical service
//! `zt-app`) and `server`, not `client`: what it reports about our client comes
//! from our `baggage` (workload, namespace, canonical service and revision, cluster) and the
//! client certificate (principal). Each side has two services on the same target port
//! (`zecho`/`zecho-alt` on `zt`, `echo`/`echo-alt` on `server`), so the service a destination
//! names can only come from the client's `forwarded: …;host=`. ztunnel's inbound cannot report
//! that service in its metrics here: from a local config file it never learns which services a
//! workload belongs to (the file's per-workload `services` map only adds endpoints to services;
//! the workload's own list, which its inbound looks the host up in, stays empty), so it says
//! `destination_service="unknown"` whatever the client sends. The test reads the CONNECT heads
//! ztunnel logs at debug level (`received request`) instead: what it received, byte for byte.
//!
//! Checked (tested with ztunnel at commit 62d82653):
//! * our client → ztunnel's inbound 15008 → the app in `zt`, by both VIPs and by pod IP: bytes
//!   echoed both ways; ztunnel's `istio_tcp_connections_opened_total`/`closed` and byte counters
//!   (`reporter="destination"`) carry our client's principal, workload, namespace, canonical
//!   service/revision, app, version and cluster; the CONNECTs it received carry our `baggage`
//!   exactly, `forwarded: for="<client ip>:…"` with `;host=` the dialed service, a `traceparent`;
//!   its access log names our client's identity; our metrics (`reporter="source"`) name ztunnel's
//!   principal and count the bytes;
//! * ztunnel's outbound → our inbound 15008 in `server` → its app, by both VIPs and by pod IP:
//!   bytes echoed both ways; our metrics (`reporter="destination"`) and log carry ztunnel's
//!   principal and pod address, and the service of its `forwarded` host per VIP; ztunnel's
//!   metrics (`reporter="source"`) name our server's principal and the services;
//! * the CA saw only `zt`'s identity asked for, with ztunnel's bearer token and cluster id;
//! * with `zt` unknown to our agent (a second test): our metrics name the source from ztunnel's
//!   `baggage` (workload `zt-deploy` from `k8s.deployment.name`, app `zt-app`), its namespace
//!   from its certificate;
//! * both ways over IPv6 (a third test): ztunnel receives `:authority` `[v6]:port` and
//!   `forwarded: for="[v6]:port"` from us and reports the connections; ours from it too.
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::agent::{
    ca_dir, eventually, metric_series, metric_sum, render_config, write_config, Agent, WorkloadSpec,
};
use mesh_tests::apps::{client, echo_server};
use mesh_tests::istio_ca::IstioCa;
use mesh_tests::topology::http_get_in;
use mesh_tests::{Proc, Topology};
use serde_json::Value;

const SKIP: &str =
    "skipped: set MESH_ZTUNNEL_BIN to an istio/ztunnel binary to run the interop test";
const PORT: u16 = 7000;
const BYTES: usize = 64 * 1024;
const T: Duration = Duration::from_secs(20);
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/";
const TOKEN: &str = "test-istio-token";
const CLUSTER: &str = "Kubernetes";
/// How ztunnel's config describes its pod `zt`: the workload (a Deployment's), its kind, and
/// its canonical service and revision (what it sends as `baggage`).
const ZT_NAMES: (&str, &str, &str, &str) = ("zt-deploy", "deployment", "zt-app", "v1");
/// The `baggage` our agent sends for `client` (ztunnel's keys and order).
const BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=client,\
                       service.name=client,service.version=latest";
/// (service, VIP, endpoint pod).
const SERVICES: [(&str, &str, &str); 4] = [
    ("zecho", "10.96.0.20", "zt"),
    ("zecho-alt", "10.96.0.21", "zt"),
    ("echo", "10.96.0.22", "server"),
    ("echo-alt", "10.96.0.23", "server"),
];

fn ztunnel_bin() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("MESH_ZTUNNEL_BIN").filter(|p| !p.is_empty())?);
    assert!(
        p.is_file(),
        "MESH_ZTUNNEL_BIN={} does not name a file",
        p.display()
    );
    Some(p)
}

fn host(service: &str) -> String {
    format!("{service}.default.svc.cluster.local")
}

fn vip(service: &str) -> String {
    let (_, vip, _) = SERVICES.iter().find(|s| s.0 == service).expect("service");
    format!("{vip}:80")
}

struct Interop {
    // Field order is drop order: processes and the CA go before the topology.
    ztunnel: Proc,
    ca: IstioCa,
    agent: Agent,
    _apps: Vec<Proc>,
    topo: Topology,
}

impl Interop {
    fn zt_metrics(&self) -> String {
        match http_get_in(
            &self.topo.pod("zt").netns_path,
            "127.0.0.1:15020",
            "/metrics",
            Duration::from_secs(10),
        ) {
            Ok((200, body)) => body,
            other => panic!("ztunnel metrics: {other:?}"),
        }
    }

    fn our_metrics(&self) -> String {
        self.agent.metrics(&self.topo).expect("agent metrics")
    }

    /// Waits until our agent counts `n` closed connections with `labels`, then checks they
    /// received `n` × [`BYTES`] (each echoed its bytes); returns the metrics it read.
    fn assert_our_connections(&self, labels: &[(&str, &str)], n: f64, what: &str) -> String {
        assert!(
            eventually(T, || metric_sum(&self.our_metrics(), CLOSED, labels) == n),
            "{what}:\n{}",
            series(&self.our_metrics(), CLOSED)
        );
        let ours = self.our_metrics();
        assert_eq!(
            metric_sum(&ours, RECEIVED, labels),
            n * BYTES as f64,
            "{what}:\n{}",
            series(&ours, RECEIVED)
        );
        ours
    }

    fn ztunnel_log(&self) -> Vec<String> {
        let mut lines = self.ztunnel.stdout_lines();
        lines.extend(self.ztunnel.stderr_lines());
        lines
    }

    /// ztunnel's debug lines for the inbound CONNECTs it received (with the request head).
    fn ztunnel_connects(&self) -> Vec<String> {
        self.ztunnel_log()
            .into_iter()
            .filter(|l| l.contains("received request") && l.contains("CONNECT"))
            .collect()
    }

    fn addr(&self, pod: &str) -> String {
        format!("{}:{PORT}", self.topo.pod(pod).ip4)
    }
}

/// ztunnel's local config: its own workload, our `server` (HBONE, so ztunnel tunnels to it) and
/// the four services. Not our `client`.
fn ztunnel_config(topo: &Topology) -> String {
    let mut out = String::from("workloads:\n");
    for (pod, node, (workload, kind, app, version)) in [
        ("zt", "node2", ZT_NAMES),
        ("server", "node1", ("server", "pod", "server", "latest")),
    ] {
        let services: String = SERVICES
            .iter()
            .filter(|s| s.2 == pod)
            .map(|(name, _, _)| format!("    \"default/{}\": {{ 80: {PORT} }}\n", host(name)))
            .collect();
        out += &format!(
            "- uid: {CLUSTER}//Pod/default/{pod}
  name: {pod}
  namespace: default
  serviceAccount: {pod}
  trustDomain: cluster.local
  workloadName: {workload}
  workloadType: {kind}
  canonicalName: {app}
  canonicalRevision: {version}
  clusterId: {CLUSTER}
  workloadIps: [\"{ip}\", \"{ip6}\"]
  protocol: HBONE
  node: {node}
  services:
{services}",
            ip = topo.pod(pod).ip4,
            ip6 = topo.pod(pod).ip6
        );
    }
    out += "services:\n";
    for (name, vip, _) in SERVICES {
        out += &format!(
            "- name: {name}
  namespace: default
  hostname: {host}
  vips: [\"/{vip}\"]
  ports: {{ 80: {PORT} }}
",
            host = host(name)
        );
    }
    out
}

/// Our config's services: those whose endpoint is among `pods`.
fn our_services(pods: &[&str]) -> String {
    let mut out = String::from("services:\n");
    for (name, vip, pod) in SERVICES.into_iter().filter(|s| pods.contains(&s.2)) {
        out += &format!(
            "  - name: {name}\n    vips: [{vip}]\n    ports: [{{ port: 80, targetPort: {PORT} }}]\n    endpoints: [{pod}]\n"
        );
    }
    out
}

/// The topology, our agent on node1 (its config holding `our_pods`), ztunnel in `zt`.
fn setup(zt_bin: &std::path::Path, our_pods: &[&str]) -> Result<Interop> {
    let topo = Topology::new(&[("node1", &["client", "server"]), ("node2", &["zt"])])?;
    let config = topo.work_dir().join("mesh.yaml");
    let specs: Vec<WorkloadSpec> = our_pods.iter().map(|p| WorkloadSpec::mesh(p)).collect();
    write_config(
        &config,
        &format!("{}{}", render_config(&topo, &specs), our_services(our_pods)),
    )?;
    let apps = vec![
        echo_server(&topo, "server", PORT)?,
        echo_server(&topo, "zt", PORT)?,
    ];
    // Our agent first: it creates the mesh CA the stand-in istiod signs with.
    let agent = Agent::start(&topo, "node1", &config)?;
    let ca_cert = std::fs::read_to_string(ca_dir(&topo).join("ca-cert.pem"))?;
    let ca_key = std::fs::read_to_string(ca_dir(&topo).join("ca-key.pem"))?;
    let listener = topo.in_pod_netns("zt", || Ok(std::net::TcpListener::bind("127.0.0.1:0")?))?;
    let ca = IstioCa::start(listener, &ca_cert, &ca_key, TOKEN)?;

    let dir = topo.work_dir().join("ztunnel");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca-root.pem"), &ca.tls_root_pem)?;
    std::fs::write(dir.join("istio-token"), TOKEN)?;
    std::fs::write(dir.join("local.yaml"), ztunnel_config(&topo))?;
    let mut cmd = Command::new(zt_bin);
    cmd.current_dir(&dir)
        .env_clear()
        .env("RUST_LOG", "info,ztunnel::proxy::inbound=debug")
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", dir.join("local.yaml"))
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "default/zt/zt")
        .env("NODE_NAME", "node2")
        .env("CLUSTER_ID", CLUSTER)
        .env("CA_ADDRESS", format!("https://{}", ca.addr))
        .env("CA_ROOT_CA", dir.join("ca-root.pem"))
        .env("AUTH_TOKEN", dir.join("istio-token"))
        .env("ENABLE_ORIG_SRC", "false")
        .env("UNSTABLE_ENABLE_SOCKS5", "true")
        .env("ZTUNNEL_WORKER_THREADS", "2");
    let mut ztunnel = topo.spawn_in_pod("zt", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let netns = topo.pod("zt").netns_path.clone();
    loop {
        let ready = http_get_in(
            &netns,
            "127.0.0.1:15021",
            "/healthz/ready",
            Duration::from_secs(2),
        );
        if matches!(ready, Ok((200, _))) {
            break;
        }
        if let Some(status) = ztunnel.try_wait()? {
            bail!("ztunnel exited with {status}:\n{}", ztunnel.diagnostics());
        }
        if Instant::now() > deadline {
            bail!(
                "ztunnel not ready after 30 s ({ready:?}):\n{}",
                ztunnel.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Interop {
        ztunnel,
        ca,
        agent,
        _apps: apps,
        topo,
    })
}

/// Through ztunnel's SOCKS5 listener in `zt`: connects to `target`, sends `bytes` of a pattern
/// (while reading), half-closes and expects the same bytes back, then EOF.
fn socks5_echo(topo: &Topology, target: &str, bytes: usize) -> Result<()> {
    let target: SocketAddr = target.parse()?;
    topo.in_pod_netns("zt", || {
        let mut s = TcpStream::connect("127.0.0.1:15080").context("ztunnel's SOCKS5 listener")?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&[5, 1, 0])?;
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello)?;
        ensure!(hello == [5, 0], "SOCKS5 method answer {hello:?}");
        let mut req = vec![5, 1, 0];
        match target.ip() {
            IpAddr::V4(ip) => {
                req.push(1);
                req.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                req.push(4);
                req.extend_from_slice(&ip.octets());
            }
        }
        req.extend_from_slice(&target.port().to_be_bytes());
        s.write_all(&req)?;
        // VER REP RSV ATYP, then the bound address (ztunnel answers with 0.0.0.0:0).
        let mut reply = [0u8; 4];
        s.read_exact(&mut reply)?;
        ensure!(reply[..2] == [5, 0], "SOCKS5 CONNECT answer {reply:?}");
        let mut bound = vec![0u8; if reply[3] == 4 { 16 + 2 } else { 4 + 2 }];
        s.read_exact(&mut bound)?;
        let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let mut writer = s.try_clone()?;
        let mut back = Vec::with_capacity(bytes);
        std::thread::scope(|scope| -> Result<()> {
            let w = scope.spawn(|| -> std::io::Result<()> {
                writer.write_all(&payload)?;
                writer.shutdown(Shutdown::Write)
            });
            s.read_to_end(&mut back)?;
            w.join().expect("writer")?;
            Ok(())
        })?;
        ensure!(
            back == payload,
            "echo through ztunnel to {target}: sent {bytes} bytes, got {} back{}",
            back.len(),
            if back.len() == bytes {
                " (different)"
            } else {
                ""
            }
        );
        Ok(())
    })
}

fn ok(r: &Value) {
    assert_eq!(r["ok"], true, "{r}");
}

/// Labels of one series, for a failure message.
fn series(text: &str, name: &str) -> String {
    metric_series(text, name)
        .iter()
        .map(|(l, v)| format!("{l:?} {v}\n"))
        .collect()
}

#[test]
fn hbone_both_ways_with_a_real_ztunnel() -> Result<()> {
    let Some(zt_bin) = ztunnel_bin() else {
        println!("{SKIP}");
        return Ok(());
    };
    let m = setup(&zt_bin, &["client", "server", "zt"])?;
    let client_id = format!("{SPIFFE}client");
    let server_id = format!("{SPIFFE}server");
    let zt_id = format!("{SPIFFE}zt");

    // --- Our client -> ztunnel's inbound -> the app in `zt`. ---
    // First by the services' VIPs: two services on the same target port, told apart only by our
    // `forwarded` host.
    for target in [vip("zecho"), vip("zecho-alt")] {
        ok(&client(&m.topo, "client", &target, 2, BYTES)?);
    }
    let from_client = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", client_id.as_str()),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "latest"),
        ("source_app", "client"),
        ("source_version", "latest"),
        ("source_cluster", CLUSTER),
        ("destination_workload", ZT_NAMES.0),
        ("destination_principal", zt_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.zt_metrics(), CLOSED, &from_client)
            == 4.0),
        "ztunnel's view of our client's connections:\n{}",
        series(&m.zt_metrics(), CLOSED)
    );
    // What ztunnel received on each CONNECT (its debug line `received request` prints the
    // request head): our baggage, and the service host in `forwarded` per VIP. (Its metrics cannot
    // show that host here: from a local config file ztunnel does not learn which services a
    // workload belongs to, so its inbound reports `destination_service="unknown"`.)
    let connects = m.ztunnel_connects();
    assert_eq!(connects.len(), 4, "{}", m.ztunnel_log().join("\n"));
    let client_ip = m.topo.pod("client").ip4.to_string();
    for c in &connects {
        assert!(c.contains(&format!("\"baggage\": \"{BAGGAGE}\"")), "{c}");
        assert!(
            c.contains(&format!("\"forwarded\": \"for=\\\"{client_ip}:")),
            "{c}"
        );
        assert!(c.contains("\"traceparent\": \"00-"), "{c}");
    }
    for svc in ["zecho", "zecho-alt"] {
        let host = format!(";host={}\"", host(svc));
        let n = connects.iter().filter(|c| c.contains(&host)).count();
        assert_eq!(n, 2, "CONNECTs with {host}: {connects:#?}");
    }
    // Then to the pod's own address.
    ok(&client(&m.topo, "client", &m.addr("zt"), 2, BYTES)?);
    assert!(
        eventually(T, || metric_sum(&m.zt_metrics(), CLOSED, &from_client)
            == 6.0),
        "{}",
        series(&m.zt_metrics(), CLOSED)
    );
    let zt = m.zt_metrics();
    assert_eq!(
        metric_sum(&zt, OPENED, &from_client),
        6.0,
        "{}",
        series(&zt, OPENED)
    );
    assert_eq!(
        metric_sum(&zt, RECEIVED, &from_client),
        6.0 * BYTES as f64,
        "{}",
        series(&zt, RECEIVED)
    );
    assert_eq!(
        metric_sum(&zt, SENT, &from_client),
        6.0 * BYTES as f64,
        "{}",
        series(&zt, SENT)
    );
    let access = m
        .ztunnel_log()
        .into_iter()
        .filter(|l| l.contains("connection complete") && l.contains(&client_id))
        .collect::<Vec<_>>();
    assert_eq!(
        access.len(),
        6,
        "ztunnel's log:\n{}",
        m.ztunnel_log().join("\n")
    );
    // Our side: the tunnel's peer was ztunnel, with `zt`'s identity.
    let to_zt = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "zt"),
        ("destination_principal", zt_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    m.assert_our_connections(&to_zt, 6.0, "our connections");

    // --- ztunnel's outbound -> our inbound in `server` -> its app. ---
    for target in [m.addr("server"), vip("echo"), vip("echo-alt")] {
        socks5_echo(&m.topo, &target, BYTES)?;
    }
    let from_zt = [
        ("reporter", "destination"),
        ("source_workload", "zt"),
        ("source_principal", zt_id.as_str()),
        ("destination_workload", "server"),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    let ours = m.assert_our_connections(&from_zt, 3.0, "our view of ztunnel's connections");
    for svc in ["echo", "echo-alt"] {
        let h = host(svc);
        let mut labels = from_zt.to_vec();
        labels.push(("destination_service", h.as_str()));
        assert_eq!(
            metric_sum(&ours, CLOSED, &labels),
            1.0,
            "{}",
            series(&ours, CLOSED)
        );
    }
    let inbound: Vec<String> = m
        .agent
        .log()
        .into_iter()
        .filter(|l| l.contains("inbound connection complete") && l.contains(&zt_id))
        .collect();
    assert_eq!(inbound.len(), 3, "{}", m.agent.log().join("\n"));
    let zt_ip = m.topo.pod("zt").ip4.to_string();
    assert!(inbound.iter().all(|l| l.contains(&zt_ip)), "{inbound:?}");
    // ztunnel's side: it reached our server, whose certificate says `server`.
    let to_server = [
        ("reporter", "source"),
        ("source_workload", ZT_NAMES.0),
        ("source_principal", zt_id.as_str()),
        ("destination_workload", "server"),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.zt_metrics(), CLOSED, &to_server) == 3.0),
        "{}",
        series(&m.zt_metrics(), CLOSED)
    );
    let zt = m.zt_metrics();
    for svc in ["echo", "echo-alt"] {
        let h = host(svc);
        let mut labels = to_server.to_vec();
        labels.push(("destination_service", h.as_str()));
        assert_eq!(
            metric_sum(&zt, OPENED, &labels),
            1.0,
            "{}",
            series(&zt, OPENED)
        );
    }

    // --- The certificate ztunnel asked for. ---
    let requests = m.ca.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(r.uri_sans, vec![zt_id.clone()], "{r:?}");
        assert_eq!(
            r.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(r.cluster_id.as_deref(), Some(CLUSTER));
    }
    Ok(())
}

/// ztunnel's outbound to our inbound when our agent does not know ztunnel's pod (not in its
/// config, as for a source in another cluster): our metrics name the source from ztunnel's
/// `baggage` (`k8s.deployment.name`, `service.name`), as ztunnel does for a source it does not
/// know, with the principal and the namespace from its certificate.
#[test]
fn an_unknown_ztunnel_source_is_named_by_its_baggage() -> Result<()> {
    let Some(zt_bin) = ztunnel_bin() else {
        println!("{SKIP}");
        return Ok(());
    };
    let m = setup(&zt_bin, &["client", "server"])?;
    let zt_id = format!("{SPIFFE}zt");
    let server_id = format!("{SPIFFE}server");
    let (workload, _, app, _) = ZT_NAMES;
    for target in [m.addr("server"), vip("echo-alt")] {
        socks5_echo(&m.topo, &target, BYTES)?;
    }
    let from_zt = [
        ("reporter", "destination"),
        ("source_workload", workload),
        ("source_workload_namespace", "default"),
        ("source_app", app),
        ("source_principal", zt_id.as_str()),
        ("destination_workload", "server"),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    let ours = m.assert_our_connections(&from_zt, 2.0, "our view of an unknown ztunnel source");
    let h = host("echo-alt");
    let mut labels = from_zt.to_vec();
    labels.push(("destination_service", h.as_str()));
    assert_eq!(
        metric_sum(&ours, CLOSED, &labels),
        1.0,
        "{}",
        series(&ours, CLOSED)
    );
    Ok(())
}

/// Both ways over IPv6: our client to ztunnel's pod by its IPv6 address (`:authority` and
/// `forwarded` with `[v6]:port`), and ztunnel's outbound to our server's IPv6 address.
#[test]
fn hbone_both_ways_over_ipv6() -> Result<()> {
    let Some(zt_bin) = ztunnel_bin() else {
        println!("{SKIP}");
        return Ok(());
    };
    let m = setup(&zt_bin, &["client", "server", "zt"])?;
    let (zt6, server6, client6) = (
        m.topo.pod("zt").ip6,
        m.topo.pod("server").ip6,
        m.topo.pod("client").ip6,
    );
    ok(&client(
        &m.topo,
        "client",
        &format!("[{zt6}]:{PORT}"),
        2,
        BYTES,
    )?);
    let client_id = format!("{SPIFFE}client");
    let from_client = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_principal", client_id.as_str()),
        ("destination_workload", ZT_NAMES.0),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.zt_metrics(), CLOSED, &from_client)
            == 2.0),
        "{}\n{}",
        series(&m.zt_metrics(), CLOSED),
        m.ztunnel_log().join("\n")
    );
    let connects = m.ztunnel_connects();
    assert_eq!(connects.len(), 2, "{connects:#?}");
    for c in &connects {
        assert!(c.contains(&format!("uri: [{zt6}]:{PORT}")), "{c}");
        assert!(c.contains(&format!("\"for=\\\"[{client6}]:")), "{c}");
    }

    socks5_echo(&m.topo, &format!("[{server6}]:{PORT}"), BYTES)?;
    let zt_id = format!("{SPIFFE}zt");
    let from_zt = [
        ("reporter", "destination"),
        ("source_workload", "zt"),
        ("source_principal", zt_id.as_str()),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(T, || metric_sum(&m.our_metrics(), CLOSED, &from_zt) == 1.0),
        "{}",
        series(&m.our_metrics(), CLOSED)
    );
    let log = m.agent.wait_log("inbound connection complete", 0, T)?;
    assert!(
        log.contains(&format!("[{}]", m.topo.pod("zt").ip6)),
        "{log}"
    );
    Ok(())
}
