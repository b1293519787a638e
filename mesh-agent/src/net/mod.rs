//! Sockets: network namespace handles, and every listener and connection the agent opens, with
//! the proxy's mark, in a given network namespace or (`None`) the agent's own. The only module
//! that enters a network namespace (see ARCHITECTURE.md).
pub mod netns;
mod socket;

pub use netns::{netns_cookie, socket_netns_cookie, Netns, NsId};
pub use socket::{connect, connect_transparent, listen, mark, reset};
