//! Writes the HTTPRoute status a waypoint computes ([`route_parents`]) through the `/status`
//! subresource: a `PUT` (verb `update`) of `status.parents` with the resourceVersion the watcher
//! saw, so a list changed meanwhile by another controller is refused (409) and merged again from
//! the newer version the watch brings. Only the waypoint process writes (node agents never do),
//! and only for the routes attached to its Gateway or to the Services that use it.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::convert::{Built, Objects};
use super::route_status::{route_parents, Listener, RouteObject, ServiceInfo, StatusContext};
use super::{gateway_api_resource, Resource};

/// The field manager named in the API server's managedFields.
pub const FIELD_MANAGER: &str = "mesh-agent-waypoint";
/// A write that failed for another reason than a conflict is tried again after this.
const RETRY: Duration = Duration::from_secs(5);

/// What one round of status writing works from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub routes: Vec<(RouteObject, Option<String>)>,
    pub ctx: StatusContext,
}

/// `2026-12-06T13:12:09Z`: metav1.Time, whole seconds, UTC.
fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The inputs of [`route_parents`] for the waypoint `waypoint` (`namespace/name`).
pub fn snapshot(objects: &Objects, built: &Built, waypoint: &str) -> Snapshot {
    let config = &built.config;
    let me = config
        .waypoints
        .iter()
        .find(|w| w.key() == waypoint)
        .cloned();
    let listeners = objects
        .gateways
        .iter()
        .find(|g| super::convert::name_of(&g.metadata) == waypoint)
        .and_then(|g| g.data.get("spec"))
        .map(Listener::from_gateway_spec)
        .unwrap_or_default();
    let services = objects
        .services
        .iter()
        .map(|s| {
            let ports = s
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .filter_map(|p| Some((u16::try_from(p.port).ok()?, p.name.clone())))
                .collect();
            let info = ServiceInfo {
                labels: s.metadata.labels.clone().unwrap_or_default(),
                ports,
            };
            (super::convert::name_of(&s.metadata), info)
        })
        .collect();
    let namespaces = objects
        .namespaces
        .iter()
        .filter_map(|ns| {
            Some((
                ns.metadata.name.clone()?,
                ns.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();
    let routes = objects
        .http_routes
        .iter()
        .filter_map(|r| {
            let key = super::convert::name_of(&r.metadata);
            let route = RouteObject {
                namespace: r.metadata.namespace.clone()?,
                name: r.metadata.name.clone()?,
                generation: r.metadata.generation.unwrap_or(1),
                spec: r.data.get("spec").cloned().unwrap_or(Value::Null),
                parents: r
                    .data
                    .pointer("/status/parents")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                rejected: built.rejected_routes.get(&key).cloned(),
            };
            Some((route, r.metadata.resource_version.clone()))
        })
        .collect();
    Snapshot {
        routes,
        ctx: StatusContext {
            waypoint: me,
            listeners,
            waypoints: config
                .waypoints
                .iter()
                .map(|w| (w.key(), w.clone()))
                .collect(),
            services,
            namespaces,
            now: now_rfc3339(),
        },
    }
}

/// Writes the status of every snapshot sent on `rx` until its sender is gone.
pub async fn run(client: kube::Client, mut rx: watch::Receiver<Arc<Snapshot>>) {
    let ar = gateway_api_resource("HTTPRoute");
    // The resourceVersion each route had when we last wrote it: a route whose watch event has
    // not arrived yet is not written again from the same old version.
    let mut written: HashMap<String, String> = HashMap::new();
    let mut last_error: Option<String> = None;
    let mut failed = false;
    loop {
        if failed {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        } else if rx.changed().await.is_err() {
            return;
        }
        let snapshot = rx.borrow_and_update().clone();
        failed = false;
        for (route, version) in &snapshot.routes {
            let Some(parents) = route_parents(route, &snapshot.ctx) else {
                continue;
            };
            let key = format!("{}/{}", route.namespace, route.name);
            if parents == route.parents
                || (version.is_some() && written.get(&key) == version.as_ref())
            {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &route.namespace, &ar);
            let mut obj = DynamicObject::new(&route.name, &ar).within(&route.namespace);
            obj.metadata.resource_version = version.clone();
            obj.data = json!({ "status": { "parents": parents } });
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            match api.replace_status(&route.name, &params, &obj).await {
                Ok(_) => {
                    info!(route = %key, "HTTPRoute status written");
                    if let Some(v) = version {
                        written.insert(key, v.clone());
                    }
                    last_error = None;
                }
                // Changed since we read it: the watch brings the new version and a new round.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(route = %key, "HTTPRoute changed meanwhile; status merged again next round")
                }
                Err(e) => {
                    failed = true;
                    let message = match &e {
                        kube::Error::Api(s) if s.code == 403 => "the waypoint may not update \
                             httproutes/status (403 Forbidden): grant verbs \"update\" and \
                             \"patch\" on resource \"httproutes/status\" in API group \
                             \"gateway.networking.k8s.io\" to its ServiceAccount in the route's \
                             namespace (see deploy/examples/waypoint/rbac.yaml)"
                            .to_string(),
                        other => format!("{other}"),
                    };
                    if last_error.as_ref() != Some(&message) {
                        warn!(route = %key, resource = %Resource::HttpRoutes, "cannot write the HTTPRoute status, retrying: {message}");
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}
