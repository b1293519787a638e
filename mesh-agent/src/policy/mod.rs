//! Istio `PeerAuthentication` and `AuthorizationPolicy`: the validated model compiled from the
//! documents (`crate::model::policy`) and pure evaluation, following Istio's semantics (see
//! ARCHITECTURE.md, "Policy"). A connection is evaluated at L4; a request with
//! [`HttpAttributes`] (a waypoint's view) with the L7 fields too.
//!
//! * [`PolicySet::new`]: documents + root namespace -> the model and its [`Warning`]s.
//! * [`PolicySet::mtls_mode`] and [`PolicySet::evaluate`]: decisions with an operator-readable
//!   [`Reason`]; [`PolicySet::evaluate_bound`]: a waypoint's decision over the policies bound to
//!   it or to the addressed service by `targetRefs`. Nothing here does I/O.
//! * [`WaypointOnly`] and [`check_waypoint_only`]: no bypass (`mesh.dev/waypoint-only`), decided
//!   at the destination before the AuthorizationPolicies.
mod evaluate;
mod l7;
mod model;
mod mtls;
mod rules;
#[cfg(test)]
mod tests;
mod waypoint_only;

pub use evaluate::{Binding, Connection, Decision, Reason, Request, Verdict, WaypointBinding};
pub use l7::HttpAttributes;
pub use model::{AuthzPolicy, PolicySet, Scope, Warning};
pub use mtls::{EffectiveMtls, MtlsMode, MtlsPolicy};
pub use waypoint_only::{check as check_waypoint_only, WaypointOnly};
