//! PeerAuthentication and AuthorizationPolicy documents (YAML, as in the config file).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::model::policy::parse_documents;

fuzz_target!(|data: &[u8]| {
    if let Ok(documents) = parse_documents(&String::from_utf8_lossy(data)) {
        for d in &documents {
            let _ = (d.metadata(), d.kind());
        }
    }
});
