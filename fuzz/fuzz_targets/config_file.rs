//! The mesh config file (file mode): YAML in, a validated config or an error naming the field.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_agent::state::State;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = mesh_agent::config::parse(Path::new("fuzz.yaml"), &text) {
        // What the agent does next with an accepted file.
        let _ = State::from_mesh(&config, "node1");
    }
});
