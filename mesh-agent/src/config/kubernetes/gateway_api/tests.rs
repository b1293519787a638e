use std::sync::Arc;

use kube::api::DynamicObject;
use serde_json::{json, Value};

use super::*;
use crate::model::WaypointFor;

fn object(v: Value) -> Arc<DynamicObject> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn gateway(name: &str, class: &str, labels: Value) -> Arc<DynamicObject> {
    object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": { "name": name, "namespace": "shop", "labels": labels, "uid": "u",
                      "resourceVersion": "7", "generation": 3,
                      "managedFields": [{ "manager": "kubectl", "operation": "Apply" }] },
        "spec": { "gatewayClassName": class,
                  "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
        "status": { "conditions": [{ "type": "Programmed", "status": "True" }] }
    }))
}

/// An HTTPRoute as the API server holds it: server-written fields included.
fn route(name: &str, spec: Value) -> Arc<DynamicObject> {
    object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {
            "name": name, "namespace": "shop", "uid": "r", "resourceVersion": "9",
            "generation": 4, "creationTimestamp": "2026-01-02T03:04:05Z",
            "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{}",
                             "team": "cart" },
            "managedFields": [{ "manager": "kubectl", "operation": "Apply" }]
        },
        "spec": spec,
        "status": { "parents": [{ "parentRef": { "name": "x" }, "controllerName": "other.io/c",
                                  "conditions": [] }] }
    }))
}

#[test]
fn a_gateway_of_class_istio_waypoint_becomes_a_waypoint_and_others_are_ignored() {
    let mut warnings = Vec::new();
    let found = waypoints(
        &[
            gateway(
                "wp",
                "istio-waypoint",
                json!({ "istio.io/waypoint-for": "all" }),
            ),
            gateway("ingress", "istio", json!({})),
            gateway("plain", "istio-waypoint", json!({})),
        ],
        &mut warnings,
    );
    assert!(
        warnings.is_empty(),
        "other classes are not ours: {warnings:?}"
    );
    let got: Vec<(String, WaypointFor)> = found.iter().map(|w| (w.key(), w.waypoint_for)).collect();
    assert_eq!(
        got,
        [
            ("shop/plain".to_string(), WaypointFor::Service),
            ("shop/wp".to_string(), WaypointFor::All)
        ]
    );

    let bad = gateway(
        "bad",
        "istio-waypoint",
        json!({ "istio.io/waypoint-for": "pods" }),
    );
    assert!(waypoints(&[bad], &mut warnings).is_empty());
    assert_eq!(
        warnings,
        ["Gateway shop/bad: field `metadata.labels`: istio.io/waypoint-for: \"pods\" is not one \
          of service, workload, all, none; skipped"]
    );
}

#[test]
fn routes_read_strictly_without_the_server_written_fields() {
    let mut warnings = Vec::new();
    let spec = json!({
        "parentRefs": [{ "group": "", "kind": "Service", "name": "cart" }],
        "rules": [{ "backendRefs": [{ "name": "cart-v1", "port": 80, "weight": 90 },
                                    { "name": "cart-v2", "port": 80, "weight": 10 }] }]
    });
    let (routes, rejected) = routes(&[route("split", spec)], &mut warnings);
    assert!(warnings.is_empty() && rejected.is_empty(), "{warnings:?}");
    let r = &routes[0];
    assert_eq!(r.key(), "shop/split");
    assert_eq!(
        r.metadata.creation_timestamp.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    assert_eq!(r.metadata.annotations.len(), 1, "kubectl's copy left out");
    assert_eq!(r.spec.rules[0].backend_refs[1].weight, 10);
}

#[test]
fn a_bad_route_is_excluded_alone_with_its_name_and_field() {
    let good = route(
        "good",
        json!({ "rules": [{ "backendRefs": [{ "name": "a", "port": 80 }] }] }),
    );
    // Fails validation (a path must start with "/").
    let invalid = route(
        "invalid",
        json!({ "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": "api" } }] }] }),
    );
    // Does not read (an experimental field).
    let unreadable = route(
        "unreadable",
        json!({ "rules": [{ "sessionPersistence": { "sessionName": "s" } }] }),
    );
    let mut warnings = Vec::new();
    let (routes, rejected) = routes(&[good, invalid, unreadable], &mut warnings);
    assert_eq!(
        routes.iter().map(|r| r.key()).collect::<Vec<_>>(),
        ["shop/good"]
    );
    let invalid = &rejected["shop/invalid"];
    assert!(
        invalid.starts_with("field `spec.rules[0].matches[0].path.value`:"),
        "{invalid}"
    );
    let unreadable = &rejected["shop/unreadable"];
    assert!(
        unreadable.starts_with("field `spec.rules[0]`:")
            && unreadable.contains("`sessionPersistence`"),
        "{unreadable}"
    );
    assert!(!unreadable.contains("line"), "{unreadable}");
    assert_eq!(warnings.len(), 2);
    assert!(
        warnings[0]
            .starts_with("HTTPRoute shop/invalid: field `spec.rules[0].matches[0].path.value`:"),
        "{warnings:?}"
    );
}
