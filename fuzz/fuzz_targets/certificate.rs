//! A peer's certificate (DER) and the SPIFFE ID in it, as the TLS server and client read them
//! after the handshake; and a SPIFFE URI alone.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::{peer_identity, Identity};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let chain = [CertificateDer::from(data.to_vec())];
    let _ = peer_identity(Some(&chain));
    let _ = Identity::parse(&String::from_utf8_lossy(data));
});
