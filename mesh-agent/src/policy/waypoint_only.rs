//! No bypass (`mesh.dev/waypoint-only`, see `crate::model::waypoint_only`): the destination's
//! side of a Service marked so. A connection to one of the Service's target ports on one of its
//! endpoints is accepted only from an HBONE peer whose identity is one its waypoint's pods run
//! as; anything else (another identity, plaintext) is denied before any AuthorizationPolicy is
//! read. A waypoint that does not exist or has no pod admits nobody: fail closed.
use std::sync::Arc;

use super::evaluate::{Decision, Reason};
use crate::identity::Identity;

/// One marked Service, as the agents of its endpoints enforce it on its target ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointOnly {
    /// `namespace/name` of the Service.
    pub service: String,
    /// `namespace/name` of its waypoint.
    pub waypoint: String,
    /// The (namespace, service account) pairs its waypoint's pods run as; empty when the
    /// waypoint is missing. The trust domain is not compared: an HBONE peer's certificate is
    /// already of the mesh's own.
    pub identities: Vec<(String, String)>,
    /// Why the waypoint cannot admit anyone (`does not exist`, `has no pod`); `None` when it has
    /// pods.
    pub missing: Option<&'static str>,
}

impl WaypointOnly {
    /// Whether `src` (`None`: plaintext) is this Service's waypoint.
    pub fn admits(&self, src: Option<&Identity>) -> bool {
        src.is_some_and(|id| {
            self.identities
                .iter()
                .any(|(ns, sa)| *ns == id.namespace && *sa == id.service_account)
        })
    }
}

/// The denial for a connection to a port that `guards` (the marked Services targeting it) cover,
/// from `src`; `None` when no guard covers the port or one of them admits the peer (traffic for
/// a port that several marked Services share may come from any of their waypoints). The first
/// guard is the one named in the reason.
pub fn check(guards: &[Arc<WaypointOnly>], src: Option<&Identity>) -> Option<Decision> {
    let first = guards.first()?;
    if guards.iter().any(|g| g.admits(src)) {
        return None;
    }
    Some(Decision::deny(Reason::WaypointOnly {
        service: first.service.clone(),
        waypoint: first.waypoint.clone(),
        missing: first.missing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(service: &str, waypoint: &str) -> Arc<WaypointOnly> {
        let (ns, name) = waypoint.split_once('/').unwrap();
        Arc::new(WaypointOnly {
            service: service.into(),
            waypoint: waypoint.into(),
            identities: vec![(ns.into(), name.into())],
            missing: None,
        })
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    #[test]
    fn only_the_waypoint_identity_passes() {
        let web = guard("shop/web", "shop/wp");
        assert_eq!(check(&[], None), None, "no guard: nothing to say");
        assert_eq!(
            check(std::slice::from_ref(&web), Some(&id("shop", "wp"))),
            None
        );
        let denied = check(std::slice::from_ref(&web), Some(&id("shop", "client"))).unwrap();
        assert!(!denied.is_allowed());
        assert_eq!(
            denied.reason.to_string(),
            "service shop/web accepts only its waypoint shop/wp (no-bypass)"
        );
        assert_eq!(denied.reason.metric_label(), "waypoint_bypass");
        assert!(
            check(std::slice::from_ref(&web), None).is_some(),
            "plaintext is never the waypoint"
        );
        assert!(
            check(std::slice::from_ref(&web), Some(&id("other", "wp"))).is_some(),
            "the same account name in another namespace is not the waypoint"
        );
    }

    #[test]
    fn a_port_shared_by_marked_services_takes_any_of_their_waypoints() {
        let (web, api) = (
            guard("shop/web", "shop/wp"),
            guard("shop/api", "infra/shared"),
        );
        assert_eq!(
            check(&[web.clone(), api.clone()], Some(&id("infra", "shared"))),
            None
        );
        let denied = check(&[web.clone(), api.clone()], Some(&id("shop", "client"))).unwrap();
        assert!(denied.reason.to_string().starts_with("service shop/web "));
    }

    #[test]
    fn a_missing_waypoint_admits_nobody() {
        let lost = Arc::new(WaypointOnly {
            identities: Vec::new(),
            missing: Some("does not exist"),
            ..(*guard("shop/web", "shop/gone")).clone()
        });
        let denied = check(&[lost], Some(&id("shop", "gone"))).unwrap();
        assert_eq!(
            denied.reason.to_string(),
            "service shop/web accepts only its waypoint shop/gone, which does not exist \
             (no-bypass)"
        );
    }
}
