//! Which traffic goes through a waypoint, resolved once per snapshot.
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::waypoint::use_waypoint;
use crate::model::{Mesh, UseWaypoint, Waypoint, Workload};

/// A waypoint and the pods that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointPods {
    pub waypoint: Waypoint,
    pub pods: Vec<Arc<Workload>>,
}

impl WaypointPods {
    /// Whether `w` is one of its pods (its own traffic never goes back through it).
    pub fn serves_from(&self, w: &Workload) -> bool {
        self.waypoint.has_pod(w)
    }
}

/// Where traffic to a destination goes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Straight to the destination.
    Direct,
    /// Through this waypoint.
    Waypoint(Arc<WaypointPods>),
    /// Through a waypoint (`namespace/name`) that does not exist or has no pod: such traffic
    /// fails, it never skips the waypoint its owner asked for.
    Missing {
        waypoint: String,
        /// `does not exist` or `has no pod`.
        why: &'static str,
    },
}

/// Waypoints by `namespace/name`, with their pods.
pub(super) fn index(mesh: &Mesh, workloads: &BTreeMap<String, Arc<Workload>>) -> Waypoints {
    let by_key = mesh
        .waypoints
        .iter()
        .map(|w| {
            let pods = workloads
                .values()
                .filter(|p| w.has_pod(p))
                .cloned()
                .collect();
            (
                w.key(),
                Arc::new(WaypointPods {
                    waypoint: w.clone(),
                    pods,
                }),
            )
        })
        .collect();
    Waypoints { by_key }
}

#[derive(Debug, Default)]
pub(super) struct Waypoints {
    by_key: BTreeMap<String, Arc<WaypointPods>>,
}

impl Waypoints {
    /// Where traffic to a resource with these labels goes, for a service (`for_service`) or a
    /// workload address. A waypoint that does not take that kind of traffic
    /// (`istio.io/waypoint-for`) is not used.
    pub(super) fn via(
        &self,
        mesh: &Mesh,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        for_service: bool,
    ) -> Via {
        let ns_labels = mesh.namespace(namespace).map(|ns| &ns.labels);
        let UseWaypoint::Named { namespace, name } = use_waypoint(namespace, labels, ns_labels)
        else {
            return Via::Direct;
        };
        let key = format!("{namespace}/{name}");
        let Some(wp) = self.by_key.get(&key) else {
            return Via::Missing {
                waypoint: key,
                why: "does not exist",
            };
        };
        let takes = if for_service {
            wp.waypoint.waypoint_for.takes_services()
        } else {
            wp.waypoint.waypoint_for.takes_workloads()
        };
        if !takes {
            Via::Direct
        } else if wp.pods.is_empty() {
            Via::Missing {
                waypoint: key,
                why: "has no pod",
            }
        } else {
            Via::Waypoint(wp.clone())
        }
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<WaypointPods>> {
        self.by_key.values()
    }
}
