//! What the stores keep of each object: only the fields the conversion reads, so a cluster of
//! many pods costs a few hundred bytes per pod (no container specs, no managedFields, no
//! annotations, no status beyond phase and IPs).
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{
    Namespace, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::{json, Map, Value};

/// The annotation `kubectl apply` fills with a copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Metadata: identity, labels and the timestamps the conversion reads.
fn meta(m: &mut ObjectMeta) {
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        uid: m.uid.take(),
        resource_version: m.resource_version.take(),
        labels: m.labels.take(),
        creation_timestamp: m.creation_timestamp.take(),
        deletion_timestamp: m.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

pub fn namespace(ns: &mut Namespace) {
    meta(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

pub fn pod(pod: &mut Pod) {
    meta(&mut pod.metadata);
    pod.spec = pod.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        service_account_name: s.service_account_name,
        service_account: s.service_account,
        host_network: s.host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..PodStatus::default()
    });
}

pub fn service(svc: &mut Service) {
    meta(&mut svc.metadata);
    svc.spec = svc.spec.take().map(|s| ServiceSpec {
        type_: s.type_,
        cluster_ip: s.cluster_ip,
        cluster_ips: s.cluster_ips,
        ports: s.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    app_protocol: p.app_protocol,
                    port: p.port,
                    protocol: p.protocol,
                    target_port: p.target_port,
                    ..ServicePort::default()
                })
                .collect()
        }),
        ..ServiceSpec::default()
    });
    svc.status = None;
}

pub fn endpoint_slice(slice: &mut EndpointSlice) {
    meta(&mut slice.metadata);
    slice.endpoints = slice.endpoints.take().map(|endpoints| {
        endpoints
            .into_iter()
            .map(|e| Endpoint {
                // The first address only names the endpoint in messages.
                addresses: e.addresses.into_iter().take(1).collect(),
                conditions: e.conditions.map(|c| EndpointConditions {
                    ready: c.ready,
                    ..EndpointConditions::default()
                }),
                target_ref: e.target_ref.map(|r| ObjectReference {
                    kind: r.kind,
                    name: r.name,
                    namespace: r.namespace,
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            })
            .collect()
    });
    slice.ports = slice.ports.take().map(|ports| {
        ports
            .into_iter()
            .map(|p| EndpointPort {
                name: p.name,
                port: p.port,
                protocol: p.protocol,
                ..EndpointPort::default()
            })
            .collect()
    });
}

/// Gateways keep labels, `spec.gatewayClassName` and what of `spec.listeners` route status reads
/// (name, port, allowedRoutes); no status, no addresses, no annotations.
pub fn gateway(obj: &mut DynamicObject) {
    meta(&mut obj.metadata);
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let mut kept = Map::new();
    if let Some(class) = spec.get("gatewayClassName") {
        kept.insert("gatewayClassName".into(), class.clone());
    }
    if let Some(listeners) = spec.get("listeners").and_then(Value::as_array) {
        let listeners = listeners
            .iter()
            .map(|l| {
                let mut out = Map::new();
                for key in ["name", "port", "allowedRoutes"] {
                    if let Some(v) = l.get(key) {
                        out.insert(key.into(), v.clone());
                    }
                }
                Value::Object(out)
            })
            .collect();
        kept.insert("listeners".into(), Value::Array(listeners));
    }
    obj.data = json!({ "spec": Value::Object(kept) });
}

/// HTTPRoutes keep what a user writes (labels, annotations without kubectl's copy, `spec`), the
/// `generation` route status reports as `observedGeneration`, and `status` (the parents of every
/// controller: a status update must keep the others' entries). Fields the server writes
/// (managedFields, uid, resourceVersion, ...) are left out of the document the strict parser
/// reads by `convert::route_document_json`.
pub fn http_route(obj: &mut DynamicObject) {
    let annotations = obj.metadata.annotations.take().map(|mut a| {
        a.remove(LAST_APPLIED);
        a
    });
    let generation = obj.metadata.generation;
    meta(&mut obj.metadata);
    obj.metadata.annotations = annotations.filter(|a| !a.is_empty());
    obj.metadata.generation = generation;
    if let Some(data) = obj.data.as_object_mut() {
        data.retain(|key, _| key == "spec" || key == "status");
    }
}

/// Policies keep their annotations (the strict parser tolerates them) but not kubectl's copy of
/// the object, and only `spec` of the data (no `status`).
pub fn policy(obj: &mut DynamicObject) {
    let annotations = obj.metadata.annotations.take().map(|mut a| {
        a.remove(LAST_APPLIED);
        a
    });
    meta(&mut obj.metadata);
    obj.metadata.annotations = annotations.filter(|a| !a.is_empty());
    if let Some(data) = obj.data.as_object_mut() {
        data.retain(|key, _| key == "spec");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::super::{build_config, KubeOptions, Objects};

    #[test]
    fn stripped_objects_convert_like_the_originals() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "4",
                "labels": { "app": "web" }, "annotations": { "big": "x".repeat(1000) },
                "managedFields": [{ "manager": "kubelet" }],
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "r" }]
            },
            "spec": {
                "nodeName": "node1", "serviceAccountName": "web",
                "containers": [{ "name": "app", "image": "nginx", "env": [{ "name": "A", "value": "b" }] }],
                "volumes": [{ "name": "v", "emptyDir": {} }]
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.5", "podIPs": [{ "ip": "10.1.0.5" }],
                "conditions": [{ "type": "Ready", "status": "True" }], "hostIP": "192.168.0.1"
            }
        }))
        .unwrap();
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": "shop", "annotations": { "a": "b" } },
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": { "app": "web" },
                "ports": [{ "name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "appProtocol": "http" }]
            },
            "status": { "loadBalancer": {} }
        }))
        .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": { "name": "web-x", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.1.0.5"], "nodeName": "node1", "zone": "a",
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "targetRef": { "kind": "Pod", "name": "web", "namespace": "shop", "uid": "u" }
            }],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http" }]
        }))
        .unwrap();
        let objects = |pod, svc, slice| Objects {
            local_pods: vec![Arc::new(pod)],
            services: vec![Arc::new(svc)],
            endpoint_slices: vec![Arc::new(slice)],
            ..Objects::default()
        };
        let opts = KubeOptions::default();
        let before = build_config(&objects(pod.clone(), svc.clone(), slice.clone()), &opts);
        let (mut p, mut s, mut e) = (pod.clone(), svc.clone(), slice.clone());
        super::pod(&mut p);
        super::service(&mut s);
        super::endpoint_slice(&mut e);
        let after = build_config(&objects(p.clone(), s, e), &opts);
        assert_eq!(before, after);
        assert_eq!(after.0.services[0].endpoints, ["shop/web"]);
        assert!(size(&p) * 4 < size(&pod), "{} vs {}", size(&p), size(&pod));
        assert!(p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none());
        assert_eq!(p.metadata.resource_version.as_deref(), Some("4"));
    }

    #[test]
    fn policies_keep_spec_labels_and_annotations_only() {
        let mut obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "p", "namespace": "shop", "uid": "u", "resourceVersion": "3",
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "me" },
                "managedFields": [{ "manager": "kubectl" }], "generation": 4
            },
            "spec": { "action": "DENY" },
            "status": { "conditions": [] }
        }))
        .unwrap();
        super::policy(&mut obj);
        assert_eq!(obj.data, json!({ "spec": { "action": "DENY" } }));
        assert_eq!(
            obj.metadata
                .annotations
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [("keep".to_string(), "me".to_string())]
        );
        assert!(obj.metadata.managed_fields.is_none() && obj.metadata.generation.is_none());
        assert_eq!(obj.metadata.uid.as_deref(), Some("u"));
    }

    #[test]
    fn routes_keep_spec_status_and_generation_gateways_their_class_and_listeners() {
        let mut route: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {
                "name": "r", "namespace": "shop", "uid": "u", "resourceVersion": "3", "generation": 7,
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{...}" },
                "managedFields": [{ "manager": "kubectl" }]
            },
            "spec": { "parentRefs": [{ "name": "wp" }] },
            "status": { "parents": [] },
            "extra": 1
        }))
        .unwrap();
        super::http_route(&mut route);
        assert_eq!(
            route.data,
            json!({ "spec": { "parentRefs": [{ "name": "wp" }] }, "status": { "parents": [] } })
        );
        assert_eq!(route.metadata.generation, Some(7));
        assert!(route.metadata.managed_fields.is_none() && route.metadata.annotations.is_none());
        assert_eq!(route.metadata.resource_version.as_deref(), Some("3"));

        let mut gateway: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": { "name": "wp", "namespace": "shop", "managedFields": [{ "manager": "k" }] },
            "spec": { "gatewayClassName": "istio-waypoint", "addresses": [{ "value": "10.0.0.1" }],
                      "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE",
                                      "allowedRoutes": { "namespaces": { "from": "All" } } }] },
            "status": { "conditions": [] }
        }))
        .unwrap();
        super::gateway(&mut gateway);
        assert_eq!(
            gateway.data,
            json!({ "spec": { "gatewayClassName": "istio-waypoint",
                              "listeners": [{ "name": "mesh", "port": 15008,
                                              "allowedRoutes": { "namespaces": { "from": "All" } } }] } })
        );
    }

    /// Serialized size, to compare memory before and after stripping.
    fn size<T: serde::Serialize>(value: &T) -> usize {
        serde_json::to_vec(value).unwrap().len()
    }
}
