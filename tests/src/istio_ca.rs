//! A stand-in for istiod's certificate service, for tests that run a real Istio ztunnel.
//!
//! ztunnel gets its workload certificates by gRPC: `istio.v1.auth.IstioCertificateService/
//! CreateCertificate` over TLS (`CA_ADDRESS`, trusting `CA_ROOT_CA`), with a bearer token
//! (`AUTH_TOKEN`) and the cluster id (`ClusterID`) as request metadata. The request carries a
//! PEM CSR (its SAN is the SPIFFE identity asked for) and the wanted lifetime; the answer is the
//! chain, leaf first and the root last. This server signs those CSRs with the mesh CA the agents
//! use (the PEM files in [`crate::agent::ca_dir`]), so ztunnel and our agents chain to one root.
//!
//! It is HTTP/2 (`h2`) over rustls, with the two messages as `prost` derive structs (the field
//! numbers of ztunnel's `proto/citadel.proto`); no protoc and no build script. Its own TLS
//! certificate comes from a throwaway root made here (not the mesh CA): the control plane's
//! trust is separate from the workloads' in Istio too. Every request is recorded
//! ([`IstioCa::requests`]) so a test can check which identity was asked for and how.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// The gRPC method ztunnel calls.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The host name in the server's certificate besides its IP (what istiod's certificate names).
pub const CA_HOST: &str = "istiod.istio-system.svc";

/// Lifetime cap of a signed certificate (the agents' own certificates live 24 h too).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// `istio.v1.auth.IstioCertificateRequest` (`metadata`, field 4, is not read: prost skips it).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity, seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, the leaf first and the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// One `CreateCertificate` call as the server saw it.
#[derive(Clone, Debug, Default)]
pub struct CaRequest {
    /// The URI SANs of the CSR (the SPIFFE identity asked for).
    pub uri_sans: Vec<String>,
    /// The `authorization` metadata.
    pub authorization: Option<String>,
    /// The `clusterid` metadata.
    pub cluster_id: Option<String>,
    /// The requested lifetime (seconds).
    pub validity_secs: i64,
    /// `None`: signed; else why not (answered with a gRPC error status).
    pub error: Option<String>,
}

/// The running server; dropping it stops it.
pub struct IstioCa {
    /// Where it listens (inside whatever network namespace its listener was opened in).
    pub addr: SocketAddr,
    /// PEM of the root that signed the server's own TLS certificate (ztunnel's `CA_ROOT_CA`).
    pub tls_root_pem: String,
    requests: Arc<Mutex<Vec<CaRequest>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct Signing {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    token: String,
    serial: AtomicU64,
}

impl IstioCa {
    /// Serves on `listener` (open it in the namespace the client runs in, e.g. with
    /// [`crate::Topology::in_pod_netns`]), signing with the mesh CA `ca_cert_pem`/`ca_key_pem`
    /// (a self-signed root: it is also the last element of every answer). Calls without
    /// `authorization: Bearer <token>` are refused (gRPC status 16).
    pub fn start(
        listener: std::net::TcpListener,
        ca_cert_pem: &str,
        ca_key_pem: &str,
        token: &str,
    ) -> Result<IstioCa> {
        let addr = listener.local_addr()?;
        let key = KeyPair::from_pem(ca_key_pem).context("mesh CA key")?;
        let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key).context("mesh CA certificate")?;
        let signing = Arc::new(Signing {
            issuer,
            root_pem: ca_cert_pem.to_string(),
            token: token.to_string(),
            serial: AtomicU64::new(1),
        });
        let (tls_root_pem, server_config) = server_tls(addr.ip())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        listener.set_nonblocking(true)?;
        let recorded = requests.clone();
        let thread = std::thread::Builder::new()
            .name("istio-ca".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("istio-ca: runtime: {e}"),
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("istio-ca: listener: {e}"),
                    };
                    let serve = async {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else {
                                continue;
                            };
                            let (acceptor, signing, recorded) =
                                (acceptor.clone(), signing.clone(), recorded.clone());
                            tokio::spawn(async move {
                                if let Err(e) = serve_conn(acceptor, tcp, signing, recorded).await {
                                    eprintln!("istio-ca: connection: {e:#}");
                                }
                            });
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(IstioCa {
            addr,
            tls_root_pem,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The calls so far.
    pub fn requests(&self) -> Vec<CaRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for IstioCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A throwaway root and a server certificate for `ip` and [`CA_HOST`] signed by it.
fn server_tls(ip: IpAddr) -> Result<(String, rustls::ServerConfig)> {
    let root_key = KeyPair::generate()?;
    let mut root = CertificateParams::default();
    root.distinguished_name = DistinguishedName::new();
    root.distinguished_name
        .push(DnType::CommonName, "test istiod root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![CA_HOST.to_string()])?;
    leaf.subject_alt_names.push(SanType::IpAddress(ip));
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&key, &root_issuer)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf_cert.der().clone(), root_cert.der().clone()],
        key_der,
    )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((root_cert.pem(), config))
}

async fn serve_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    signing: Arc<Signing>,
    recorded: Arc<Mutex<Vec<CaRequest>>>,
) -> Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let mut conn = h2::server::handshake(tls)
        .await
        .context("HTTP/2 handshake")?;
    while let Some(req) = conn.accept().await {
        let (req, respond) = req?;
        let (signing, recorded) = (signing.clone(), recorded.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_call(req, respond, signing, recorded).await {
                eprintln!("istio-ca: call: {e:#}");
            }
        });
    }
    Ok(())
}

async fn serve_call(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    signing: Arc<Signing>,
    recorded: Arc<Mutex<Vec<CaRequest>>>,
) -> Result<()> {
    let (parts, mut body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut call = CaRequest {
        authorization: header("authorization"),
        cluster_id: header("clusterid"),
        ..CaRequest::default()
    };
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let answer = if parts.uri.path() != CREATE_CERTIFICATE {
        Err((12, format!("unknown method {}", parts.uri.path())))
    } else if call.authorization.as_deref() != Some(&format!("Bearer {}", signing.token)) {
        Err((16, "missing or wrong bearer token".to_string()))
    } else {
        match unframe(data.freeze()).and_then(|m| {
            <IstioCertificateRequest as prost::Message>::decode(m).map_err(|e| anyhow!("{e}"))
        }) {
            Err(e) => Err((3, format!("bad request message: {e:#}"))),
            Ok(msg) => {
                call.validity_secs = msg.validity_duration;
                sign(&signing, &msg, &mut call).map_err(|e| (3, format!("{e:#}")))
            }
        }
    };
    if let Err((_, why)) = &answer {
        call.error = Some(why.clone());
    }
    recorded.lock().unwrap().push(call);
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())?;
    let mut trailers = http::HeaderMap::new();
    match answer {
        Ok(resp) => {
            let mut send = respond.send_response(response, false)?;
            send.send_data(frame(&prost::Message::encode_to_vec(&resp)), false)?;
            trailers.insert("grpc-status", "0".parse()?);
            send.send_trailers(trailers)?;
        }
        Err((code, why)) => {
            let mut send = respond.send_response(response, false)?;
            trailers.insert("grpc-status", code.to_string().parse()?);
            trailers.insert(
                "grpc-message",
                why.replace(|c: char| !c.is_ascii_graphic() && c != ' ', "_")
                    .parse()?,
            );
            send.send_trailers(trailers)?;
        }
    }
    Ok(())
}

/// Signs the CSR of `msg` for its one SPIFFE URI SAN: no subject, the CSR's key, valid from a
/// minute ago for the requested lifetime (at most 24 h), serverAuth + clientAuth.
fn sign(
    signing: &Signing,
    msg: &IstioCertificateRequest,
    call: &mut CaRequest,
) -> Result<IstioCertificateResponse> {
    let csr = CertificateSigningRequestParams::from_pem(&msg.csr).context("CSR")?;
    call.uri_sans = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    if call.uri_sans.len() != 1 || !call.uri_sans[0].starts_with("spiffe://") {
        bail!(
            "the CSR must name one SPIFFE URI SAN, not {:?}",
            call.uri_sans
        );
    }
    let lifetime = u64::try_from(msg.validity_duration)
        .ok()
        .filter(|s| *s > 0)
        .map_or(MAX_LIFETIME, |s| Duration::from_secs(s).min(MAX_LIFETIME));
    let now = SystemTime::now();
    let serial = signing.serial.fetch_add(1, Ordering::Relaxed);
    let nanos = now.duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let mut serial_bytes = vec![0x01];
    serial_bytes.extend_from_slice(&nanos.to_be_bytes());
    serial_bytes.extend_from_slice(&serial.to_be_bytes());

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = csr.params.subject_alt_names.clone();
    params.not_before = OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = OffsetDateTime::from(now + lifetime);
    params.serial_number = Some(SerialNumber::from_slice(&serial_bytes));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let csr = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    };
    let cert = csr.signed_by(&signing.issuer)?;
    Ok(IstioCertificateResponse {
        cert_chain: vec![cert.pem(), signing.root_pem.clone()],
    })
}

/// A gRPC length-prefixed message: flag 0 (not compressed), big-endian length, the bytes.
fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The one message of a unary gRPC request body.
fn unframe(mut body: Bytes) -> Result<Bytes> {
    if body.len() < 5 {
        bail!("a gRPC body of {} bytes", body.len());
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        bail!("compressed gRPC messages are not supported");
    }
    if body.len() != len {
        bail!("gRPC frame says {len} bytes, body has {}", body.len());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_use_the_field_numbers_of_citadel_proto() {
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 60,
        };
        // field 1 (string): tag 0x0a; field 3 (varint): tag 0x18.
        assert_eq!(
            prost::Message::encode_to_vec(&req),
            vec![0x0a, 1, b'x', 0x18, 60]
        );
        let resp = IstioCertificateResponse {
            cert_chain: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            prost::Message::encode_to_vec(&resp),
            vec![0x0a, 1, b'a', 0x0a, 1, b'b']
        );
        assert_eq!(unframe(frame(b"abc")).unwrap(), Bytes::from_static(b"abc"));
    }

    #[test]
    fn a_csr_is_signed_for_its_spiffe_san_by_the_mesh_ca() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let signing = Signing {
            issuer: Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap(),
            root_pem: ca_cert.pem(),
            token: "t".into(),
            serial: AtomicU64::new(1),
        };
        let key = KeyPair::generate().unwrap();
        let id = "spiffe://cluster.local/ns/default/sa/zt";
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_string()).unwrap(),
        )];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let mut call = CaRequest::default();
        let resp = sign(
            &signing,
            &IstioCertificateRequest {
                csr,
                validity_duration: 3600,
            },
            &mut call,
        )
        .unwrap();
        assert_eq!(call.uri_sans, vec![id.to_string()]);
        assert_eq!(resp.cert_chain.len(), 2);
        assert_eq!(resp.cert_chain[1], ca_cert.pem());
        let der = pem_der(&resp.cert_chain[0]);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(ca_cert.der()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(
            &*leaf.public_key().subject_public_key.data,
            rcgen::PublicKeyData::der_bytes(&key)
        );
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 3600 + 60);

        let mut bad = CaRequest::default();
        let mut p = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        p.is_ca = IsCa::NoCa;
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let err = sign(
            &signing,
            &IstioCertificateRequest {
                csr,
                validity_duration: 0,
            },
            &mut bad,
        )
        .unwrap_err();
        assert!(err.to_string().contains("one SPIFFE URI SAN"), "{err}");
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }
}
