//! eBPF programs of the mesh agent.
//!
//! One file per hook; every map lives in [`maps`]. The programs only look things up: all
//! decisions that could change at run time (which pods are enrolled, their addresses, excluded
//! ports) come from maps the agent writes.
//!
//! Built for `bpfel-unknown-none` by `mesh-agent/build.rs` (nightly, `-Z build-std=core`,
//! bpf-linker). On the host it compiles to an empty binary so that `cargo check --workspace`
//! keeps working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod connect;
mod maps;
mod peername;
mod sklookup;
mod sockaddr;
mod sockname;
mod sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it only exists to satisfy no_std.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
