//! TLS 1.3 bulk throughput over loopback TCP through tokio-rustls, per crypto provider and
//! cipher suite: the measurement behind the mesh's choice of rustls provider.
//!
//! ```text
//! cargo run --release -p mesh-agent --example tls_throughput -- \
//!     [--bytes 1G] [--runs 3] [--providers ring,aws-lc-rs] [--suites aes128,aes256,chacha20] \
//!     [--modes tcp,memory]
//! ```
//!
//! One client streams `--bytes` of application data to one server (a P-256 certificate, TLS 1.3
//! only, ALPN h2, as HBONE uses). Mode `tcp`: tokio-rustls over 127.0.0.1, client and server on
//! two runtime workers (what the proxy sees). Mode `memory`: both rustls connections in one thread
//! exchanging records through a buffer, so the cost is rustls plus the cipher without the kernel.
//! Runs alternate between providers, so drift of the machine affects all alike; the table reports
//! the median Gbit/s per mode, suite and provider.
//!
//! Only ring is compiled into the workspace. To compare with aws-lc-rs, build this file in a
//! scratch crate whose rustls has the `aws_lc_rs` feature and which declares a feature named
//! `aws-lc-rs` that enables it (the workspace deliberately does not depend on aws-lc-rs).
// The `aws-lc-rs` feature exists only in that scratch crate.
#![allow(unexpected_cfgs)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const CHUNK: usize = 256 * 1024;

struct Args {
    bytes: u64,
    runs: usize,
    providers: Vec<String>,
    suites: Vec<String>,
    modes: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: tls_throughput [--bytes 1G] [--runs 3] [--providers {}] \
         [--suites aes128,aes256,chacha20] [--modes tcp,memory]",
        compiled_providers().join(",")
    );
    std::process::exit(2)
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    Ok((n * mult as f64) as u64)
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        bytes: 1 << 30,
        runs: 3,
        providers: compiled_providers().iter().map(|s| s.to_string()).collect(),
        suites: vec!["aes128".into(), "aes256".into(), "chacha20".into()],
        modes: vec!["tcp".into(), "memory".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--bytes" => args.bytes = parse_size(&value())?,
            "--runs" => args.runs = value().parse().context("--runs")?,
            "--providers" => args.providers = value().split(',').map(str::to_string).collect(),
            "--suites" => args.suites = value().split(',').map(str::to_string).collect(),
            "--modes" => args.modes = value().split(',').map(str::to_string).collect(),
            "-h" | "--help" => usage(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.runs == 0 || args.bytes == 0 {
        bail!("--runs and --bytes must be positive");
    }
    if let Some(m) = args
        .modes
        .iter()
        .find(|m| !matches!(m.as_str(), "tcp" | "memory"))
    {
        bail!("unknown mode {m:?} (tcp, memory)");
    }
    Ok(args)
}

fn compiled_providers() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut names = vec!["ring"];
    #[cfg(feature = "aws-lc-rs")]
    names.push("aws-lc-rs");
    names
}

fn provider(name: &str) -> anyhow::Result<CryptoProvider> {
    match name {
        "ring" => Ok(rustls::crypto::ring::default_provider()),
        #[cfg(feature = "aws-lc-rs")]
        "aws-lc-rs" => Ok(rustls::crypto::aws_lc_rs::default_provider()),
        other => bail!(
            "provider {other:?} is not compiled in (available: {})",
            compiled_providers().join(", ")
        ),
    }
}

fn suite_id(name: &str) -> anyhow::Result<CipherSuite> {
    Ok(match name {
        "aes128" => CipherSuite::TLS13_AES_128_GCM_SHA256,
        "aes256" => CipherSuite::TLS13_AES_256_GCM_SHA384,
        "chacha20" => CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        other => bail!("unknown suite {other:?} (aes128, aes256, chacha20)"),
    })
}

/// The provider restricted to one TLS 1.3 cipher suite, or None if it does not offer it.
fn provider_with_suite(name: &str, suite: CipherSuite) -> anyhow::Result<Option<CryptoProvider>> {
    let mut p = provider(name)?;
    p.cipher_suites.retain(|s| s.suite() == suite);
    Ok((!p.cipher_suites.is_empty()).then_some(p))
}

struct Pki {
    root: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A P-256 root and a P-256 leaf for 127.0.0.1, as the mesh issues them.
fn pki() -> anyhow::Result<Pki> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench root");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::URI("spiffe://cluster.local/ns/bench/sa/server".try_into()?),
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&key, &issuer)?;
    Ok(Pki {
        root: root.der().clone(),
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

fn configs(
    pki: &Pki,
    provider: CryptoProvider,
) -> anyhow::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone())?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.enable_sni = false;
    Ok((Arc::new(server), Arc::new(client)))
}

/// Streams `bytes` from a client to a server; returns the elapsed time (first byte written to
/// last byte read, handshake excluded) and the negotiated suite.
async fn transfer(
    server_cfg: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
    bytes: u64,
) -> anyhow::Result<(Duration, String)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = TlsAcceptor::from(server_cfg).accept(tcp).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let done = Instant::now();
        tls.write_all(b"k").await?;
        tls.shutdown().await?;
        anyhow::Ok((total, done))
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut tls = TlsConnector::from(client_cfg).connect(name, tcp).await?;
    let suite = tls
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "?".into());
    let data = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        tls.write_all(&data[..n]).await?;
        left -= n as u64;
    }
    tls.flush().await?;
    // Half-close: the server reads to EOF, then acknowledges.
    tls.get_mut().1.send_close_notify();
    tls.flush().await?;
    let mut ack = [0u8; 1];
    tls.read_exact(&mut ack).await?;
    let (received, done) = server.await??;
    if received != bytes {
        bail!("server received {received} of {bytes} bytes");
    }
    Ok((done - start, suite))
}

/// Moves every pending TLS record from `from` to `to` through `wire`, and drains the plaintext
/// `to` receives into `sink`; returns how many plaintext bytes that was.
fn pump(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl rustls::SideData>>,
    wire: &mut Vec<u8>,
    sink: &mut [u8],
) -> anyhow::Result<u64> {
    use std::io::{ErrorKind, Read as _};
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire)?;
    }
    let mut rest = &wire[..];
    let mut received = 0u64;
    while !rest.is_empty() {
        to.read_tls(&mut rest)?;
        to.process_new_packets()?;
        loop {
            match to.reader().read(sink) {
                Ok(0) => break,
                Ok(n) => received += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(received)
}

/// Streams `bytes` between two in-memory rustls connections on this thread.
fn memory_transfer(
    server_cfg: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
    bytes: u64,
) -> anyhow::Result<(Duration, String)> {
    use std::io::Write as _;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut client = rustls::ClientConnection::new(client_cfg, name)?;
    let mut server = rustls::ServerConnection::new(server_cfg)?;
    let mut wire = Vec::with_capacity(2 * CHUNK);
    let mut sink = vec![0u8; CHUNK];
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server, &mut wire, &mut sink)?;
        pump(&mut server, &mut client, &mut wire, &mut sink)?;
    }
    let suite = client
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "?".into());
    client.set_buffer_limit(None);
    let data = vec![0x5au8; CHUNK];
    let (mut left, mut received) = (bytes, 0u64);
    let start = Instant::now();
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        client.writer().write_all(&data[..n])?;
        left -= n as u64;
        received += pump(&mut client, &mut server, &mut wire, &mut sink)?;
    }
    let elapsed = start.elapsed();
    if received != bytes {
        bail!("server received {received} of {bytes} bytes");
    }
    Ok((elapsed, suite))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pki = pki()?;
    println!(
        "TLS 1.3 over 127.0.0.1, P-256 certificate, {} MiB per run, {} run(s), providers alternating",
        args.bytes >> 20,
        args.runs
    );
    // (mode, suite, provider, negotiated suite, Gbit/s of each run)
    type Row = (String, String, String, String, Vec<f64>);
    let mut results: Vec<Row> = Vec::new();
    for mode in &args.modes {
        for suite_name in &args.suites {
            let suite = suite_id(suite_name)?;
            for p in &args.providers {
                if provider_with_suite(p, suite)?.is_some() {
                    results.push((
                        mode.clone(),
                        suite_name.clone(),
                        p.clone(),
                        String::new(),
                        Vec::new(),
                    ));
                } else {
                    println!("{p}: does not offer {suite_name}; skipped");
                }
            }
        }
    }
    for run in 1..=args.runs {
        for (mode, suite_name, p, negotiated, gbps) in results.iter_mut() {
            let prov = provider_with_suite(p, suite_id(suite_name)?)?.expect("checked above");
            let (server_cfg, client_cfg) = configs(&pki, prov)?;
            let (elapsed, suite) = if mode == "tcp" {
                runtime.block_on(transfer(server_cfg, client_cfg, args.bytes))?
            } else {
                memory_transfer(server_cfg, client_cfg, args.bytes)?
            };
            let rate = args.bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
            println!(
                "run {run}  {mode:<6} {p:<10} {suite:<32} {rate:>6.2} Gbit/s  ({:.2} s)",
                elapsed.as_secs_f64()
            );
            *negotiated = suite;
            gbps.push(rate);
        }
    }
    println!();
    println!(
        "{:<6} {:<32} {:<10} {:>14}  runs",
        "mode", "cipher suite", "provider", "median Gbit/s"
    );
    for (mode, _, p, suite, gbps) in results.iter_mut() {
        let runs: Vec<String> = gbps.iter().map(|g| format!("{g:.2}")).collect();
        println!(
            "{mode:<6} {suite:<32} {p:<10} {:>14.2}  {}",
            median(gbps),
            runs.join(" ")
        );
    }
    Ok(())
}
