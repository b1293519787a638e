//! Istio's `PeerAuthentication` and `AuthorizationPolicy` documents as data, with their value
//! types; `crate::policy` compiles and evaluates them.
pub mod documents;
mod values;

pub use documents::*;
pub(crate) use values::deserialize_parsed;
pub use values::{Cidr, Port, StringMatch};
