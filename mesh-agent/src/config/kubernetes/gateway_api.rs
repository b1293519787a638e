//! Gateway API objects (`gateway.networking.k8s.io/v1`, standard channel v1.4.1) -> the Mesh's
//! waypoints and HTTPRoutes. Pure, like `convert`.
//!
//! * A `Gateway` of class `istio-waypoint` is a waypoint ([`GatewayDocument::waypoint`]); a
//!   Gateway of any other class belongs to another controller and is skipped without a word.
//! * An `HTTPRoute` is read as strictly as in file mode (unknown fields and values refused) from
//!   the document a user wrote: what the API server adds (uid, resourceVersion, generation,
//!   managedFields, status, kubectl's last-applied copy) is left out first. A route that does not
//!   read or fails [`HttpRoute::validate`] is left out of the Mesh alone, with a warning naming
//!   `HTTPRoute namespace/name` and the field, and its reason is kept for its status.
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use kube::api::DynamicObject;
use serde_json::{json, Map, Value};

use super::convert::{name_of, user_metadata};
use crate::model::route::HttpRoute;
use crate::model::waypoint::{GatewayDocument, Waypoint, GATEWAY_API_VERSION};

/// The annotation `kubectl apply` fills with a copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The Gateway as the file mode's `gateways:` entry: identity, labels, the class.
fn gateway_document_json(obj: &DynamicObject) -> Value {
    let meta = &obj.metadata;
    let class = obj
        .data
        .pointer("/spec/gatewayClassName")
        .cloned()
        .unwrap_or(Value::Null);
    json!({
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": {
            "name": meta.name.clone().unwrap_or_default(),
            "namespace": meta.namespace.clone().unwrap_or_default(),
            "labels": meta.labels.clone().unwrap_or_default(),
        },
        "spec": { "gatewayClassName": class },
    })
}

/// The waypoints among the Gateways, sorted by `namespace/name`.
pub fn waypoints(objects: &[Arc<DynamicObject>], warnings: &mut Vec<String>) -> Vec<Waypoint> {
    let mut out: Vec<Waypoint> = Vec::new();
    let mut seen = HashSet::new();
    for obj in objects {
        let shown = format!("Gateway {}", name_of(&obj.metadata));
        let document = match serde_json::from_value::<GatewayDocument>(gateway_document_json(obj)) {
            Ok(document) => document,
            // Without a class it cannot be ours (the API server requires one anyway).
            Err(_) => continue,
        };
        match document.waypoint() {
            Ok(Some(waypoint)) => {
                if let Err(e) = super::convert::check_dns_label("name", &waypoint.name) {
                    warnings.push(format!("{shown}: {e}; skipped"));
                    continue;
                }
                if seen.insert(waypoint.key()) {
                    out.push(waypoint);
                }
            }
            Ok(None) => {}
            Err(e) => {
                let described = match e.split_once(": ") {
                    Some((field, message)) => format!("field `{field}`: {message}"),
                    None => e,
                };
                warnings.push(format!("{shown}: {described}; skipped"));
            }
        }
    }
    out.sort_by_key(Waypoint::key);
    out
}

/// The document a user wrote: `apiVersion`, `kind`, `metadata` (name, namespace, labels,
/// annotations without kubectl's copy, creationTimestamp for precedence) and `spec`.
pub fn route_document_json(obj: &DynamicObject) -> Value {
    user_document_json(obj, GATEWAY_API_VERSION, "HTTPRoute")
}

/// As [`route_document_json`], for any kind read strictly from what its user wrote (also the
/// Istio networking documents).
pub(super) fn user_document_json(obj: &DynamicObject, api_version: &str, kind: &str) -> Value {
    let meta = &obj.metadata;
    let mut metadata = user_metadata(meta);
    let annotations: BTreeMap<&String, &String> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != LAST_APPLIED)
        .collect();
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), json!(annotations));
    }
    if let Some(created) = &meta.creation_timestamp {
        metadata.insert("creationTimestamp".into(), json!(created));
    }
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), json!(api_version));
    doc.insert("kind".into(), json!(kind));
    doc.insert("metadata".into(), Value::Object(metadata));
    doc.insert(
        "spec".into(),
        obj.data.get("spec").cloned().unwrap_or_else(|| json!({})),
    );
    Value::Object(doc)
}

/// Reads and validates one route; the error names the field (`field `spec.rules[0]...`: ...`).
pub fn read_route(obj: &DynamicObject) -> Result<HttpRoute, String> {
    // Through YAML text: its reader reports the path of a bad field, JSON's does not.
    let text = serde_yaml_ng::to_string(&route_document_json(obj)).map_err(|e| e.to_string())?;
    let route: HttpRoute = serde_yaml_ng::from_str(&text).map_err(|e| parse_error(&e))?;
    route.validate().map_err(|e| e.to_string())?;
    Ok(route)
}

/// `spec.rules[0]: unknown field ... at line 7 column 5` -> ``field `spec.rules[0]`: unknown
/// field ...`` (the line is of a document made here, not of anything the user has).
pub(super) fn parse_error(e: &serde_yaml_ng::Error) -> String {
    let text = e.to_string();
    let text = match (text.rfind(" at line "), e.location()) {
        (Some(at), Some(_)) => text[..at].to_string(),
        _ => text,
    };
    match text.split_once(": ") {
        Some((path, message)) if path.starts_with("spec") || path.starts_with("metadata") => {
            format!("field `{path}`: {message}")
        }
        _ => text,
    }
}

/// The routes that read and validate, sorted by `namespace/name`, and why each other one was
/// left out.
pub fn routes(
    objects: &[Arc<DynamicObject>],
    warnings: &mut Vec<String>,
) -> (Vec<HttpRoute>, BTreeMap<String, String>) {
    let mut out: Vec<HttpRoute> = Vec::new();
    let mut rejected = BTreeMap::new();
    for obj in objects {
        let key = name_of(&obj.metadata);
        match read_route(obj) {
            Ok(route) => {
                if !out.iter().any(|r| r.key() == route.key()) {
                    out.push(route);
                }
            }
            Err(e) => {
                warnings.push(format!(
                    "HTTPRoute {key}: {e}; the route is not used (see its status)"
                ));
                rejected.insert(key, e);
            }
        }
    }
    out.sort_by_key(HttpRoute::key);
    (out, rejected)
}

#[cfg(test)]
mod tests;
