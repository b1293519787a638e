//! Rebuild the eBPF object when bpf-linker changes (a new LLVM can change the generated code).
//!
//! This crate is only ever built for `bpfel-unknown-none` by `mesh-agent/build.rs`, which already
//! checks that bpf-linker exists and says how to install it; a missing linker is not an error here
//! so that `cargo metadata` and IDEs keep working.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
