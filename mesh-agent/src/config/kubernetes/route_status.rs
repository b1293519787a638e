//! The status a waypoint writes on HTTPRoutes: Gateway API v1.4.1 `RouteStatus.parents[]`
//! (`RouteParentStatus`), computed by a pure function ([`route_parents`]) from what the watchers
//! hold; `status_writer` puts it through the `/status` subresource.
//!
//! **Which parents.** A waypoint (Gateway `ns/name`) answers for the route's `parentRefs` that
//! are its own Gateway (`group: gateway.networking.k8s.io`, `kind: Gateway`) and those that are a
//! Service (`group: ""`, `kind: Service`) whose `istio.io/use-waypoint` (or its namespace's)
//! names it, when the waypoint takes service traffic. Each gets one entry with
//! [`CONTROLLER_NAME`]; entries of other controllers are kept as they are (the list is
//! `atomic`, so the writer reads, merges and replaces it with the resourceVersion it read).
//! Entries of ours whose `parentRef` left the spec, or names no waypoint any more, are removed.
//!
//! **Conditions**, each with `observedGeneration` = the route's `metadata.generation` and a
//! `lastTransitionTime` that is kept while the condition's `status` stays the same:
//!
//! | condition | status / reason | when |
//! |---|---|---|
//! | `Accepted` | False / `NoMatchingParent` | a Service parentRef's `port` or `sectionName` (a port name) matches no port of the Service |
//! | | False / `NotAllowedByListeners` | no listener of the waypoint's Gateway allows the route: its namespace (`allowedRoutes.namespaces.from`: `Same`, the default, `All`, `Selector` with `matchLabels`) or its kind (`allowedRoutes.kinds`) |
//! | | False / `UnsupportedValue` | the route does not read or validate (the message names the field); a Service parent in another namespace than the route's (a consumer route); `sectionName` or `port` on the waypoint Gateway's parentRef (not supported, as `waypoint::routes` does not attach them) |
//! | | True / `Accepted` | otherwise |
//! | `ResolvedRefs` | False / `InvalidKind` | a backendRef (or a `RequestMirror`'s) is not a core `Service` |
//! | | False / `RefNotPermitted` | it is in another namespace (ReferenceGrants are not read, so none permits it) |
//! | | False / `BackendNotFound` | the Service does not exist |
//! | | True / `ResolvedRefs` | otherwise |
//!
//! The first failing reference in document order gives the reason; the message lists all of
//! them by field path. A condition of ours with an `observedGeneration` newer than the route we
//! hold means our copy is stale: nothing is written for that route until the watch catches up.
use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::model::waypoint::{use_waypoint, UseWaypoint};
use crate::model::Waypoint;

/// The `controllerName` of this implementation's status entries (`DOMAIN/PATH`).
pub const CONTROLLER_NAME: &str = "mesh-agent.dev/waypoint-controller";

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A Service as route status sees it.
#[derive(Debug, Clone, Default)]
pub struct ServiceInfo {
    pub labels: BTreeMap<String, String>,
    /// `(port, name)` of every port.
    pub ports: Vec<(u16, Option<String>)>,
}

/// One listener of the waypoint's Gateway (`spec.listeners[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub port: Option<u16>,
    /// `allowedRoutes.namespaces.from`: `Same` (the default), `All` or `Selector`.
    pub from: String,
    /// `allowedRoutes.namespaces.selector`, raw.
    pub selector: Option<Value>,
    /// `allowedRoutes.kinds[].kind` (empty: the listener's protocol decides; HTTPRoute taken).
    pub kinds: Vec<(String, String)>,
}

impl Listener {
    /// The listeners of a Gateway object's `spec`.
    pub fn from_gateway_spec(spec: &Value) -> Vec<Listener> {
        let text = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        spec.get("listeners")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|l| Listener {
                name: text(l, "/name").unwrap_or_default(),
                port: l
                    .get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok()),
                from: text(l, "/allowedRoutes/namespaces/from").unwrap_or_else(|| "Same".into()),
                selector: l.pointer("/allowedRoutes/namespaces/selector").cloned(),
                kinds: l
                    .pointer("/allowedRoutes/kinds")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        (
                            text(k, "/group").unwrap_or_else(|| GATEWAY_GROUP.into()),
                            text(k, "/kind").unwrap_or_default(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    fn allows(
        &self,
        route_ns: &str,
        gateway_ns: &str,
        ns_labels: Option<&BTreeMap<String, String>>,
    ) -> Result<(), String> {
        if !self.kinds.is_empty()
            && !self
                .kinds
                .iter()
                .any(|(g, k)| g == GATEWAY_GROUP && k == "HTTPRoute")
        {
            return Err(format!(
                "listener {:?} does not allow kind HTTPRoute (allowedRoutes.kinds)",
                self.name
            ));
        }
        let allowed = match self.from.as_str() {
            "All" => true,
            "Same" => route_ns == gateway_ns,
            "Selector" => selector_matches(self.selector.as_ref(), ns_labels),
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "listener {:?} does not allow routes from namespace {route_ns} \
                 (allowedRoutes.namespaces.from: {})",
                self.name, self.from
            ))
        }
    }
}

/// A label selector with `matchLabels` only (a `matchExpressions` term is not evaluated, so the
/// selector matches nothing: fail closed).
fn selector_matches(selector: Option<&Value>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    if selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty())
    {
        return false;
    }
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

/// What the status of one waypoint's routes is computed from.
#[derive(Debug, Clone, Default)]
pub struct StatusContext {
    /// The waypoint writing (this process's Gateway).
    pub waypoint: Option<Waypoint>,
    /// Its Gateway's listeners.
    pub listeners: Vec<Listener>,
    /// Every waypoint of the mesh, by `namespace/name`.
    pub waypoints: HashMap<String, Waypoint>,
    /// Every Service of the cluster, by `namespace/name`.
    pub services: HashMap<String, ServiceInfo>,
    /// Namespace labels, by name.
    pub namespaces: HashMap<String, BTreeMap<String, String>>,
    /// `lastTransitionTime` of a condition that changes now (RFC 3339, whole seconds, UTC).
    pub now: String,
}

/// One HTTPRoute as the API holds it (spec read leniently, so that a route the strict reader
/// refuses still gets its status).
#[derive(Debug, Clone)]
pub struct RouteObject {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// `spec`, raw.
    pub spec: Value,
    /// `status.parents`, raw.
    pub parents: Vec<Value>,
    /// Why the route is not used (it does not read or validate), naming the field.
    pub rejected: Option<String>,
}

/// A parentRef with the defaults applied, for comparing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parent {
    group: String,
    kind: String,
    namespace: String,
    name: String,
    section_name: Option<String>,
    port: Option<u16>,
}

impl Parent {
    fn read(raw: &Value, route_ns: &str) -> Parent {
        let text = |p: &str| raw.get(p).and_then(Value::as_str).map(str::to_string);
        Parent {
            group: text("group").unwrap_or_else(|| GATEWAY_GROUP.into()),
            kind: text("kind").unwrap_or_else(|| "Gateway".into()),
            namespace: text("namespace").unwrap_or_else(|| route_ns.into()),
            name: text("name").unwrap_or_default(),
            section_name: text("sectionName"),
            port: raw
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok()),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn is_gateway(&self) -> bool {
        self.group == GATEWAY_GROUP && self.kind == "Gateway"
    }

    fn is_service(&self) -> bool {
        (self.group.is_empty() || self.group == "core") && self.kind == "Service"
    }
}

/// The waypoint a parentRef is served by, if any of the mesh's.
fn served_by<'a>(parent: &Parent, ctx: &'a StatusContext) -> Option<&'a Waypoint> {
    if parent.is_gateway() {
        return ctx.waypoints.get(&parent.key());
    }
    if !parent.is_service() {
        return None;
    }
    let service = ctx.services.get(&parent.key())?;
    match use_waypoint(
        &parent.namespace,
        &service.labels,
        ctx.namespaces.get(&parent.namespace),
    ) {
        UseWaypoint::Named { namespace, name } => ctx
            .waypoints
            .get(&format!("{namespace}/{name}"))
            .filter(|w| w.waypoint_for.takes_services()),
        UseWaypoint::No => None,
    }
}

/// One condition: `(status, reason, message)`.
type Verdict = (bool, &'static str, String);

fn accepted(
    route: &RouteObject,
    parent: &Parent,
    waypoint: &Waypoint,
    ctx: &StatusContext,
) -> Verdict {
    let refused = |reason, message: String| (false, reason, message);
    if parent.is_gateway() {
        // As `waypoint::routes` attaches them: a waypoint's listener is not named by routes.
        if parent.section_name.is_some() || parent.port.is_some() {
            return refused(
                "UnsupportedValue",
                format!(
                    "Gateway {} is a waypoint: sectionName and port are not supported on its \
                     parentRef",
                    parent.key()
                ),
            );
        }
        let ns_labels = ctx.namespaces.get(&route.namespace);
        let mut why = Vec::new();
        // As `waypoint::routes` attaches them: routes of the waypoint's own namespace only
        // (Gateway API's default); listeners opening it to others are not followed.
        let allowed = if route.namespace != waypoint.namespace {
            why.push(format!(
                "routes from namespace {} are not attached: this waypoint takes routes of its \
                 own namespace {} only (allowedRoutes.namespaces.from All or Selector is not \
                 supported)",
                route.namespace, waypoint.namespace
            ));
            false
        } else if ctx.listeners.is_empty() {
            true
        } else {
            ctx.listeners.iter().any(|l| {
                l.allows(&route.namespace, &waypoint.namespace, ns_labels)
                    .map_err(|e| why.push(e))
                    .is_ok()
            })
        };
        if !allowed {
            if why.is_empty() {
                why.push(format!(
                    "routes from namespace {} are not allowed (only {})",
                    route.namespace, waypoint.namespace
                ));
            }
            return refused("NotAllowedByListeners", why.join("; "));
        }
    } else {
        if parent.namespace != route.namespace {
            return refused(
                "UnsupportedValue",
                format!(
                    "parentRef Service {} is in another namespace than the route: consumer \
                     routes are not supported, attach the route in the Service's namespace",
                    parent.key()
                ),
            );
        }
        let ports = ctx
            .services
            .get(&parent.key())
            .map(|s| s.ports.as_slice())
            .unwrap_or_default();
        let port_ok = parent
            .port
            .is_none_or(|p| ports.iter().any(|(n, _)| *n == p));
        let section_ok = parent
            .section_name
            .as_ref()
            .is_none_or(|s| ports.iter().any(|(_, n)| n.as_ref() == Some(s)));
        if !port_ok || !section_ok {
            return refused(
                "NoMatchingParent",
                format!(
                    "Service {} has no port{}{}",
                    parent.key(),
                    parent
                        .section_name
                        .as_ref()
                        .map(|s| format!(" named {s:?}"))
                        .unwrap_or_default(),
                    parent.port.map(|p| format!(" {p}")).unwrap_or_default()
                ),
            );
        }
    }
    if let Some(why) = &route.rejected {
        return refused("UnsupportedValue", format!("{why}; the route is not used"));
    }
    (
        true,
        "Accepted",
        format!("accepted by waypoint {}", waypoint.key()),
    )
}

/// Every backend reference of the spec with its field path: rules' `backendRefs` and the
/// `backendRef` of `RequestMirror` filters (of rules and of backends).
fn backend_refs(spec: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    let rules = spec.get("rules").and_then(Value::as_array);
    for (r, rule) in rules.into_iter().flatten().enumerate() {
        let at = format!("spec.rules[{r}]");
        push_mirrors(rule.get("filters"), &format!("{at}.filters"), &mut out);
        let refs = rule.get("backendRefs").and_then(Value::as_array);
        for (b, backend) in refs.into_iter().flatten().enumerate() {
            let at = format!("{at}.backendRefs[{b}]");
            out.push((at.clone(), backend));
            push_mirrors(backend.get("filters"), &format!("{at}.filters"), &mut out);
        }
    }
    out
}

fn push_mirrors<'a>(filters: Option<&'a Value>, at: &str, out: &mut Vec<(String, &'a Value)>) {
    for (f, filter) in filters
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(backend) = filter.pointer("/requestMirror/backendRef") {
            out.push((format!("{at}[{f}].requestMirror.backendRef"), backend));
        }
    }
}

fn resolved_refs(route: &RouteObject, ctx: &StatusContext) -> Verdict {
    let mut failures: Vec<(&'static str, String)> = Vec::new();
    for (at, backend) in backend_refs(&route.spec) {
        let text = |p: &str| backend.get(p).and_then(Value::as_str);
        let group = text("group").unwrap_or("");
        let kind = text("kind").unwrap_or("Service");
        let name = text("name").unwrap_or("");
        let namespace = text("namespace").unwrap_or(&route.namespace);
        if !(group.is_empty() || group == "core") || kind != "Service" {
            let shown = if group.is_empty() {
                kind.to_string()
            } else {
                format!("{kind}.{group}")
            };
            failures.push((
                "InvalidKind",
                format!("{at}: {shown} is not a supported backend kind (only Service)"),
            ));
        } else if namespace != route.namespace {
            failures.push((
                "RefNotPermitted",
                format!(
                    "{at}: Service {namespace}/{name} is in another namespace and ReferenceGrants \
                     are not read by this implementation, so none permits it"
                ),
            ));
        } else if !ctx.services.contains_key(&format!("{namespace}/{name}")) {
            failures.push((
                "BackendNotFound",
                format!("{at}: Service {namespace}/{name} not found"),
            ));
        }
    }
    match failures.first() {
        None => (true, "ResolvedRefs", "all references resolved".into()),
        Some((reason, _)) => (
            false,
            reason,
            failures
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

fn ours(entry: &Value) -> bool {
    entry.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
}

/// A condition object, keeping `lastTransitionTime` from `previous` when its status is the same.
fn condition(
    kind: &str,
    (ok, reason, message): Verdict,
    generation: i64,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let previous = previous.and_then(|entry| {
        entry
            .get("conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
    });
    let since = previous
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// The route's new `status.parents` as this waypoint writes it, or `None` when this waypoint
/// has nothing to write there (no parentRef of it, no entry of ours it should remove) or its copy
/// of the route is stale. The result may equal `route.parents` (then nothing needs writing).
pub fn route_parents(route: &RouteObject, ctx: &StatusContext) -> Option<Vec<Value>> {
    let me = ctx.waypoint.as_ref()?;
    let raw_parents: Vec<&Value> = route
        .spec
        .get("parentRefs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let parents: Vec<(Parent, &Value)> = raw_parents
        .iter()
        .map(|raw| (Parent::read(raw, &route.namespace), *raw))
        .collect();
    let mine: Vec<&(Parent, &Value)> = parents
        .iter()
        .filter(|(p, _)| served_by(p, ctx).is_some_and(|w| w.key() == me.key()))
        .collect();
    // Our entries for parents no waypoint serves any more (or that left the spec): removed by
    // whichever waypoint writes the route.
    let stale = |entry: &Value| {
        let parent = entry
            .get("parentRef")
            .map(|p| Parent::read(p, &route.namespace));
        parent.is_none_or(|p| {
            !parents.iter().any(|(q, _)| *q == p)
                || served_by(&p, ctx).is_none()
                || (p.is_gateway() && p.key() == me.key() && !mine.iter().any(|(q, _)| *q == p))
        })
    };
    let has_stale = route.parents.iter().any(|e| ours(e) && stale(e));
    if mine.is_empty() && !has_stale {
        return None;
    }
    let newer = route.parents.iter().filter(|e| ours(e)).any(|e| {
        e.get("conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("observedGeneration")
                    .and_then(Value::as_i64)
                    .is_some_and(|g| g > route.generation)
            })
    });
    if newer {
        return None;
    }
    let entry_for = |parent: &Parent, raw: &Value, previous: Option<&Value>| {
        let mut entry = Map::new();
        entry.insert("parentRef".into(), raw.clone());
        entry.insert("controllerName".into(), json!(CONTROLLER_NAME));
        let accepted = accepted(route, parent, me, ctx);
        let resolved = resolved_refs(route, ctx);
        let (generation, now) = (route.generation, ctx.now.as_str());
        entry.insert(
            "conditions".into(),
            json!([
                condition("Accepted", accepted, generation, previous, now),
                condition("ResolvedRefs", resolved, generation, previous, now),
            ]),
        );
        Value::Object(entry)
    };
    // In the order of the list as it is: others' entries kept, ours replaced where they are or
    // removed when stale; entries for parents new to us at the end.
    let mut out: Vec<Value> = Vec::new();
    let mut written: Vec<&Parent> = Vec::new();
    for entry in &route.parents {
        if !ours(entry) {
            out.push(entry.clone());
            continue;
        }
        let parent = entry
            .get("parentRef")
            .map(|p| Parent::read(p, &route.namespace));
        let own = parent
            .as_ref()
            .and_then(|p| mine.iter().find(|(q, _)| q == p));
        match own {
            Some((parent, raw)) if !written.contains(&parent) => {
                out.push(entry_for(parent, raw, Some(entry)));
                written.push(parent);
            }
            // A second entry of ours for one parent: not kept.
            Some(_) => {}
            None if stale(entry) => {}
            None => out.push(entry.clone()),
        }
    }
    for (parent, raw) in &mine {
        if !written.contains(&parent) {
            out.push(entry_for(parent, raw, None));
            written.push(parent);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
