//! The proxy: outbound capture (15001) and the byte relay.
pub mod hbone;
mod outbound;
mod relay;
mod tracker;

pub use outbound::{serve_outbound, PodContext, Proxy};
pub use tracker::ConnTracker;

/// Socket options every proxy-owned socket carries.
pub(crate) fn mark_socket(socket: &socket2::Socket) -> std::io::Result<()> {
    socket.set_mark(mesh_common::PROXY_MARK)
}
