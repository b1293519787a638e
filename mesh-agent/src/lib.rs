//! The mesh node agent as a library: the binary in `main.rs` is a thin CLI over these modules.
//!
//! Data flows one way: `config` -> `state` -> {`datapath`, `inpod`, `proxy`}; `telemetry` observes.
pub mod cli;
pub mod config;
pub mod datapath;
pub mod handover;
pub mod identity;
pub mod inpod;
pub mod model;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod waypoint;
