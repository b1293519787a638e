//! Istio `PeerAuthentication` and L4 `AuthorizationPolicy`: documents, the validated model and
//! pure evaluation (REFERENCE.md "L4 authorization semantics").
//!
//! * [`documents`]: the YAML a user would `kubectl apply` ([`PolicyDocument`], [`parse_documents`]);
//!   strict, every unknown or unsupported field is an error naming it.
//! * [`PolicySet::new`]: documents + root namespace -> the model and its [`Warning`]s.
//! * [`PolicySet::mtls_mode`] and [`PolicySet::evaluate`]: decisions with an operator-readable
//!   [`Reason`]. Nothing here does I/O.
pub mod documents;
mod evaluate;
mod matching;
mod model;
mod mtls;
mod rules;
#[cfg(test)]
mod tests;

pub use documents::{parse_documents, Action, PolicyDocument};
pub use evaluate::{Decision, Reason, Request, Verdict};
pub use matching::{Cidr, Port, StringMatch};
pub use model::{AuthzPolicy, PolicySet, Scope, Warning, DEFAULT_ROOT_NAMESPACE};
pub use mtls::{EffectiveMtls, MtlsMode, MtlsPolicy};
