//! Kubernetes objects as the API server could send them (a JSON list of Namespaces, Pods,
//! Services, EndpointSlices, PeerAuthentications, AuthorizationPolicies, Gateways,
//! HTTPRoutes, VirtualServices and DestinationRules), converted into the
//! agent's config the way a watch event is.
#![no_main]
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_agent::config::kubernetes::{build, KubeOptions, Objects};
use serde_json::Value;

fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> Option<Arc<T>> {
    serde_json::from_value(v.clone()).ok().map(Arc::new)
}

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut objects = Objects::default();
    for item in &items {
        match item["kind"].as_str() {
            Some("Namespace") => objects.namespaces.extend(parse::<Namespace>(item)),
            Some("Pod") => {
                let pod = parse::<Pod>(item);
                let local = item["spec"]["nodeName"] == "node1";
                if local {
                    objects.local_pods.extend(pod);
                } else {
                    objects.remote_pods.extend(pod);
                }
            }
            Some("Service") => objects.services.extend(parse::<Service>(item)),
            Some("EndpointSlice") => objects.endpoint_slices.extend(parse::<EndpointSlice>(item)),
            Some("PeerAuthentication") => objects
                .peer_authentications
                .extend(parse::<DynamicObject>(item)),
            Some("AuthorizationPolicy") => {
                objects
                    .authorization_policies
                    .extend(parse::<DynamicObject>(item))
            }
            Some("Gateway") => objects.gateways.extend(parse::<DynamicObject>(item)),
            Some("HTTPRoute") => objects.http_routes.extend(parse::<DynamicObject>(item)),
            Some("VirtualService") => objects
                .virtual_services
                .extend(parse::<DynamicObject>(item)),
            Some("DestinationRule") => objects
                .destination_rules
                .extend(parse::<DynamicObject>(item)),
            _ => {}
        }
    }
    let opts = KubeOptions {
        node: "node1".into(),
        root_namespace: "istio-system".into(),
        excluded_ports: vec![],
        route_status_for: None,
        waypoint_only_default: false,
    };
    let _ = build(&objects, &opts);
});
