use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::*;
use crate::model::WaypointFor;

const NOW: &str = "2026-12-06T12:00:00Z";

fn waypoint(name: &str) -> Waypoint {
    Waypoint {
        name: name.into(),
        namespace: "shop".into(),
        waypoint_for: WaypointFor::Service,
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waypoint `shop/wp` (listener `mesh` on 15008, routes from the same namespace), Services
/// `cart` (uses wp; port 80 `http`), `cart-v1`, `cart-v2` and `web` (no waypoint).
fn ctx() -> StatusContext {
    let service = |l: &[(&str, &str)]| ServiceInfo {
        labels: labels(l),
        ports: vec![(80, Some("http".into()))],
    };
    let mut services = HashMap::new();
    services.insert(
        "shop/cart".into(),
        service(&[("istio.io/use-waypoint", "wp")]),
    );
    services.insert("shop/cart-v1".into(), service(&[]));
    services.insert("shop/cart-v2".into(), service(&[]));
    services.insert("shop/web".into(), service(&[]));
    services.insert(
        "other/api".into(),
        service(&[
            ("istio.io/use-waypoint", "wp"),
            ("istio.io/use-waypoint-namespace", "shop"),
        ]),
    );
    let mut namespaces = HashMap::new();
    namespaces.insert("shop".to_string(), labels(&[]));
    namespaces.insert("other".to_string(), labels(&[("team", "b")]));
    StatusContext {
        waypoint: Some(waypoint("wp")),
        listeners: Listener::from_gateway_spec(
            &json!({ "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] }),
        ),
        waypoints: [
            ("shop/wp".to_string(), waypoint("wp")),
            ("shop/wp2".to_string(), waypoint("wp2")),
        ]
        .into_iter()
        .collect(),
        services,
        namespaces,
        now: NOW.into(),
    }
}

fn route(namespace: &str, spec: Value) -> RouteObject {
    RouteObject {
        namespace: namespace.into(),
        name: "r".into(),
        generation: 3,
        spec,
        parents: Vec::new(),
        rejected: None,
    }
}

fn to_cart(backends: Value) -> Value {
    json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "cart" }],
            "rules": [{ "backendRefs": backends }] })
}

/// `(status, reason, message)` of condition `kind` in the only entry of ours.
fn verdict(parents: &[Value], kind: &str) -> (String, String, String) {
    let ours: Vec<&Value> = parents
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    assert_eq!(ours.len(), 1, "{parents:?}");
    let c = ours[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap();
    assert_eq!(c["observedGeneration"], 3);
    let s = |k: &str| c[k].as_str().unwrap().to_string();
    (s("status"), s("reason"), s("message"))
}

fn reasons(r: &RouteObject) -> (String, String) {
    let parents = route_parents(r, &ctx()).expect("ours");
    (
        verdict(&parents, "Accepted").1,
        verdict(&parents, "ResolvedRefs").1,
    )
}

#[test]
fn a_good_route_is_accepted_with_its_refs_resolved() {
    let r = route(
        "shop",
        to_cart(json!([{ "name": "cart-v1", "port": 80, "weight": 90 },
                                         { "name": "cart-v2", "port": 80, "weight": 10 }])),
    );
    let parents = route_parents(&r, &ctx()).unwrap();
    assert_eq!(
        verdict(&parents, "Accepted"),
        (
            "True".into(),
            "Accepted".into(),
            "accepted by waypoint shop/wp".into()
        )
    );
    assert_eq!(verdict(&parents, "ResolvedRefs").1, "ResolvedRefs");
    assert_eq!(
        parents[0]["parentRef"],
        json!({ "group": "", "kind": "Service", "name": "cart" })
    );
    assert_eq!(parents[0]["conditions"][0]["lastTransitionTime"], NOW);
}

#[test]
fn routes_not_attached_to_this_waypoint_get_nothing() {
    let to_web = json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "web" },
                                        { "name": "wp2" }, { "name": "ingress" }] });
    assert_eq!(route_parents(&route("shop", to_web), &ctx()), None);
    // A node agent (no waypoint) writes nothing.
    let r = route("shop", to_cart(json!([])));
    let agent = StatusContext {
        waypoint: None,
        ..ctx()
    };
    assert_eq!(route_parents(&r, &agent), None);
}

#[test]
fn unresolved_backends_give_each_reason_and_name_the_field() {
    let cases = [
        (json!([{ "name": "cart-v9", "port": 80 }]), "BackendNotFound",
         "spec.rules[0].backendRefs[0]: Service shop/cart-v9 not found"),
        (json!([{ "group": "example.com", "kind": "Bucket", "name": "b" }]), "InvalidKind",
         "spec.rules[0].backendRefs[0]: Bucket.example.com is not a supported backend kind (only Service)"),
        (json!([{ "name": "cart-v1", "namespace": "other", "port": 80 }]), "RefNotPermitted",
         "spec.rules[0].backendRefs[0]: Service other/cart-v1 is in another namespace and ReferenceGrants are not read by this implementation, so none permits it"),
    ];
    for (backends, reason, message) in cases {
        let parents = route_parents(&route("shop", to_cart(backends)), &ctx()).unwrap();
        assert_eq!(verdict(&parents, "Accepted").0, "True");
        assert_eq!(
            verdict(&parents, "ResolvedRefs"),
            ("False".into(), reason.into(), message.into())
        );
    }
    // A mirror's backend counts too; the first failure gives the reason, all are listed.
    let spec = json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "cart" }],
        "rules": [{ "filters": [{ "type": "RequestMirror",
                                  "requestMirror": { "backendRef": { "name": "shadow", "port": 80 } } }],
                    "backendRefs": [{ "name": "cart-v1", "kind": "Pod" }] }] });
    let (_, reason, message) = verdict(
        &route_parents(&route("shop", spec), &ctx()).unwrap(),
        "ResolvedRefs",
    );
    assert_eq!(reason, "BackendNotFound");
    assert_eq!(
        message,
        "spec.rules[0].filters[0].requestMirror.backendRef: Service shop/shadow not found; \
         spec.rules[0].backendRefs[0]: Pod is not a supported backend kind (only Service)"
    );
}

#[test]
fn parents_that_do_not_match_give_each_accepted_reason() {
    let with_parent = |ns: &str, parent: Value| {
        route(
            ns,
            json!({ "parentRefs": [parent], "rules": [{ "backendRefs": [] }] }),
        )
    };
    // A port or section the Service or Gateway does not have.
    let r = with_parent(
        "shop",
        json!({ "group": "", "kind": "Service", "name": "cart", "port": 8080 }),
    );
    assert_eq!(reasons(&r).0, "NoMatchingParent");
    let r = with_parent(
        "shop",
        json!({ "group": "", "kind": "Service", "name": "cart", "sectionName": "grpc" }),
    );
    assert_eq!(reasons(&r).0, "NoMatchingParent");
    let r = with_parent(
        "shop",
        json!({ "group": "", "kind": "Service", "name": "cart", "port": 80, "sectionName": "http" }),
    );
    assert_eq!(reasons(&r).0, "Accepted");
    // The waypoint's Gateway: sectionName and port are not supported (no listener is named).
    let r = with_parent("shop", json!({ "name": "wp", "sectionName": "mesh" }));
    let parents = route_parents(&r, &ctx()).unwrap();
    assert_eq!(
        verdict(&parents, "Accepted"),
        (
            "False".into(),
            "UnsupportedValue".into(),
            "Gateway shop/wp is a waypoint: sectionName and port are not supported on its \
             parentRef"
                .into()
        )
    );
    let r = with_parent("shop", json!({ "name": "wp", "port": 15008 }));
    assert_eq!(reasons(&r).0, "UnsupportedValue");
    let r = with_parent("shop", json!({ "name": "wp" }));
    assert_eq!(reasons(&r).0, "Accepted");
    // The listener takes routes of its own namespace only (`Same`, the default).
    let r = with_parent("other", json!({ "name": "wp", "namespace": "shop" }));
    assert_eq!(reasons(&r).0, "NotAllowedByListeners");
    let mut c = ctx();
    c.listeners[0].from = "Selector".into();
    c.listeners[0].selector = Some(json!({ "matchLabels": { "team": "b" } }));
    // Listeners opening the waypoint to other namespaces are not followed (routing would not
    // attach the route): still not allowed.
    let parents = route_parents(&r, &c).unwrap();
    assert_eq!(verdict(&parents, "Accepted").1, "NotAllowedByListeners");
    // A consumer route (Service of another namespace): not supported.
    let r = with_parent(
        "shop",
        json!({ "group": "", "kind": "Service", "name": "api", "namespace": "other" }),
    );
    assert_eq!(reasons(&r).0, "UnsupportedValue");
}

#[test]
fn a_route_that_fails_validation_is_not_accepted_and_says_the_field() {
    let mut r = route("shop", to_cart(json!([{ "name": "cart-v1", "port": 80 }])));
    r.rejected = Some("field `spec.rules[0].matches[0].path.value`: must start with \"/\"".into());
    let parents = route_parents(&r, &ctx()).unwrap();
    assert_eq!(
        verdict(&parents, "Accepted"),
        (
            "False".into(),
            "UnsupportedValue".into(),
            "field `spec.rules[0].matches[0].path.value`: must start with \"/\"; the route is not used".into()
        )
    );
    assert_eq!(verdict(&parents, "ResolvedRefs").1, "ResolvedRefs");
}

#[test]
fn others_entries_stay_transition_times_are_kept_and_stale_entries_of_ours_go() {
    let mut r = route("shop", to_cart(json!([{ "name": "cart-v9", "port": 80 }])));
    let theirs = json!({ "parentRef": { "name": "ingress" }, "controllerName": "example.com/gw",
                         "conditions": [{ "type": "Accepted", "status": "True" }] });
    r.parents = vec![theirs.clone()];
    let first = route_parents(&r, &ctx()).unwrap();
    assert_eq!(first[0], theirs, "kept first, untouched");
    // Later: same statuses, new message and time: the times stay.
    r.parents = first.clone();
    r.spec = to_cart(json!([{ "name": "cart-v8", "port": 80 }]));
    let later = StatusContext {
        now: "2026-12-07T00:00:00Z".into(),
        ..ctx()
    };
    let second = route_parents(&r, &later).unwrap();
    assert_eq!(second[1]["conditions"][1]["lastTransitionTime"], NOW);
    assert!(second[1]["conditions"][1]["message"]
        .as_str()
        .unwrap()
        .contains("cart-v8"));
    // The status flips: a new time.
    r.parents = second;
    r.spec = to_cart(json!([{ "name": "cart-v1", "port": 80 }]));
    let third = route_parents(&r, &later).unwrap();
    assert_eq!(
        third[1]["conditions"][1]["lastTransitionTime"],
        "2026-12-07T00:00:00Z"
    );
    assert_eq!(third[1]["conditions"][0]["lastTransitionTime"], NOW);
    // Written again from the same inputs: equal, so nothing to write.
    r.parents = third.clone();
    assert_eq!(route_parents(&r, &later).unwrap(), third);

    // The parentRef to this waypoint's Gateway leaves the spec: our entry for it goes.
    let mut r = route("shop", json!({ "parentRefs": [{ "name": "wp" }] }));
    let written = route_parents(&r, &ctx()).unwrap();
    r.parents = [written.clone(), vec![theirs.clone()]].concat();
    r.spec = json!({ "parentRefs": [{ "name": "ingress" }] });
    assert_eq!(route_parents(&r, &ctx()).unwrap(), vec![theirs]);

    // Our copy is older than what we wrote before (observedGeneration newer): wait.
    let mut r = route("shop", json!({ "parentRefs": [{ "name": "wp" }] }));
    r.parents = written;
    r.generation = 2;
    assert_eq!(route_parents(&r, &ctx()), None);
}
