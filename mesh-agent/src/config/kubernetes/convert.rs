//! Kubernetes objects -> [`Mesh`]: pure, no I/O, unit-tested with objects written as JSON.
//!
//! Valid cluster data never makes the whole Mesh fail: an object the agent cannot take is skipped
//! on its own, with a warning naming `Kind namespace/name` and the reason, and everything that
//! [`Mesh::validate`] checks is checked here first, per object; [`describe_error`] names the
//! object and its field should the whole still fail.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use serde_json::{json, Map, Value};

use super::KubeOptions;
use crate::model::policy::PolicyDocument;
use crate::model::{
    self as model, FieldError, LoadBalancing, Mesh, ServicePort, DATAPLANE_MODE_LABEL,
};

/// The label EndpointSlices carry with the name of their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Identifies one version-independent policy object: `Kind namespace/name uid`. The uid keeps a
/// deleted and re-created object from inheriting its predecessor's last good version.
pub type PolicyId = String;

/// A snapshot of the watchers' stores, plus what earlier conversions remembered.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    /// Pods with `spec.nodeName` = this node.
    pub local_pods: Vec<Arc<Pod>>,
    /// Every other pod of the cluster.
    pub remote_pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub peer_authentications: Vec<Arc<DynamicObject>>,
    pub authorization_policies: Vec<Arc<DynamicObject>>,
    /// `gateway.networking.k8s.io/v1` Gateways (all classes; only `istio-waypoint` is read).
    pub gateways: Vec<Arc<DynamicObject>>,
    /// `gateway.networking.k8s.io/v1` HTTPRoutes.
    pub http_routes: Vec<Arc<DynamicObject>>,
    /// `networking.istio.io/v1` VirtualServices.
    pub virtual_services: Vec<Arc<DynamicObject>>,
    /// `networking.istio.io/v1` DestinationRules.
    pub destination_rules: Vec<Arc<DynamicObject>>,
    /// The last version of each policy object that parsed (see [`Built::good_policies`]).
    pub last_good_policies: HashMap<PolicyId, PolicyDocument>,
}

/// The result of one conversion.
#[derive(Debug)]
pub struct Built {
    pub config: Mesh,
    /// One line per object skipped or changed, `Kind namespace/name: reason`.
    pub warnings: Vec<String>,
    /// The policy documents in force, by object: feed back as [`Objects::last_good_policies`].
    pub good_policies: HashMap<PolicyId, PolicyDocument>,
    /// HTTPRoutes left out of the Mesh, by `namespace/name`: why (`field `spec...`: ...`), for
    /// their status.
    pub rejected_routes: BTreeMap<String, String>,
}

/// Converts the objects to a Mesh; see [`build`].
pub fn build_config(objects: &Objects, opts: &KubeOptions) -> (Mesh, Vec<String>) {
    let built = build(objects, opts);
    (built.config, built.warnings)
}

/// Converts the objects to a Mesh, in a stable order (equal objects give an equal Mesh).
pub fn build(objects: &Objects, opts: &KubeOptions) -> Built {
    let mut warnings = Vec::new();
    let namespaces = namespaces(&objects.namespaces, &mut warnings);
    let mut workloads = workloads(objects, &mut warnings);
    for w in &mut workloads {
        let ns_labels = namespaces
            .iter()
            .find(|ns| ns.name == w.namespace)
            .map(|ns| &ns.labels);
        w.enrolled = model::is_enrolled(&w.labels, ns_labels);
    }
    let services = services(objects, &workloads, &mut warnings);
    let (policies, good_policies) = policies(objects, &mut warnings);
    let waypoints = super::gateway_api::waypoints(&objects.gateways, &mut warnings);
    let (routes, rejected_routes) = super::gateway_api::routes(&objects.http_routes, &mut warnings);
    let virtual_services =
        super::istio_networking::virtual_services(&objects.virtual_services, &mut warnings);
    let destination_rules =
        super::istio_networking::destination_rules(&objects.destination_rules, &mut warnings);
    Built {
        config: Mesh {
            excluded_ports: opts.excluded_ports.clone(),
            namespaces,
            workloads,
            services,
            root_namespace: opts.root_namespace.clone(),
            policies,
            waypoints,
            routes,
            virtual_services,
            destination_rules,
            waypoint_only_default: opts.waypoint_only_default,
        },
        warnings,
        good_policies,
        rejected_routes,
    }
}

/// A [`Mesh::validate`] error of a Mesh built here, as the object and field an operator would
/// look at: `Pod shop/web-1: field status.podIPs[0]: IP ... is already used by ...`.
pub fn describe_error(mesh: &Mesh, e: &FieldError) -> String {
    let (head, index, rest) = split_field(&e.field);
    // `ips[0]`: the model's field (`ips`) and what follows it (`[0]`).
    let rest = rest.trim_start_matches('.');
    let field = rest.split(['.', '[']).next().unwrap_or("");
    let after = &rest[field.len()..];
    let object = match (head, index) {
        ("workloads", Some(i)) => mesh.workloads.get(i).map(|w| {
            let field = match field {
                "name" | "namespace" | "labels" => format!("metadata.{rest}"),
                "serviceAccount" => format!("spec.serviceAccountName{after}"),
                "node" => "spec.nodeName".to_string(),
                "ips" => format!("status.podIPs{after}"),
                _ => rest.to_string(),
            };
            (format!("Pod {}", w.key()), field)
        }),
        ("services", Some(i)) => mesh.services.get(i).map(|s| {
            let field = match field {
                "name" | "namespace" => format!("metadata.{rest}"),
                "vips" => format!("spec.clusterIPs{after}"),
                // The model keeps only the TCP ports: name the port by number, not by an index
                // that may not be the object's.
                "ports" => match split_field(rest).1.and_then(|p| s.ports.get(p)) {
                    Some(port) => format!("spec.ports (port {})", port.port),
                    None => "spec.ports".to_string(),
                },
                "endpoints" => format!(
                    "endpoints (EndpointSlices labelled {SERVICE_NAME_LABEL}={})",
                    s.name
                ),
                _ => rest.to_string(),
            };
            (format!("Service {}", s.key()), field)
        }),
        ("namespaces", Some(i)) => mesh
            .namespaces
            .get(i)
            .map(|ns| (format!("Namespace {}", ns.name), format!("metadata.{rest}"))),
        // `gateways[i].metadata.name`: the model's waypoints are listed in that order.
        ("gateways", Some(i)) => mesh
            .waypoints
            .get(i)
            .map(|w| (format!("Gateway {}", w.key()), rest.to_string())),
        ("routes", Some(i)) => mesh
            .routes
            .get(i)
            .map(|r| (format!("HTTPRoute {}", r.key()), rest.to_string())),
        ("virtualServices", Some(i)) => mesh
            .virtual_services
            .get(i)
            .map(|v| (format!("VirtualService {}", v.key()), rest.to_string())),
        ("destinationRules", Some(i)) => mesh
            .destination_rules
            .get(i)
            .map(|r| (format!("DestinationRule {}", r.key()), rest.to_string())),
        ("excludedPorts", _) => {
            Some(("the agent's options".to_string(), "--excluded-ports".into()))
        }
        _ => None,
    };
    match object {
        Some((object, field)) => format!("{object}: field `{field}`: {}", e.message),
        None => e.to_string(),
    }
}

/// `workloads[3].ips[0]` -> (`workloads`, Some(3), `.ips[0]`).
fn split_field(field: &str) -> (&str, Option<usize>, &str) {
    let Some(open) = field.find('[') else {
        return (field, None, "");
    };
    let Some(close) = field[open..].find(']').map(|c| open + c) else {
        return (field, None, "");
    };
    (
        &field[..open],
        field[open + 1..close].parse().ok(),
        &field[close + 1..],
    )
}

pub(super) fn name_of(meta: &kube::api::ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        (_, None) => "<unnamed>".to_string(),
    }
}

/// The same rule as the file config's: a DNS label of at most 63 characters.
pub(super) fn check_dns_label(what: &str, name: &str) -> Result<(), String> {
    if crate::model::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a DNS label (lower-case letters, digits and '-', at most 63 \
             characters), which the agent needs for workload and identity names"
        ))
    }
}

/// Labels with an `istio.io/dataplane-mode` other than `ambient`/`none` lose that label: it
/// means neither opt-in nor opt-out (Istio ignores values it does not know, too).
fn labels_of(
    kind: &str,
    meta: &kube::api::ObjectMeta,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut labels = meta.labels.clone().unwrap_or_default();
    if let Some(mode) = labels.get(DATAPLANE_MODE_LABEL) {
        if mode != "ambient" && mode != "none" {
            warnings.push(format!(
                "{kind} {}: label {DATAPLANE_MODE_LABEL}={mode:?} is not supported (use \
                 \"ambient\" or \"none\"); treated as absent",
                name_of(meta)
            ));
            labels.remove(DATAPLANE_MODE_LABEL);
        }
    }
    labels
}

/// A `mesh.dev/waypoint-only` value other than `true`/`false` is warned about (naming the object
/// and the label) and read as `true`: whoever set it meant to close the bypass, and reading it as
/// absent could leave the service open.
fn fail_closed_waypoint_only(
    kind: &str,
    key: &str,
    labels: &mut BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) {
    use crate::model::waypoint_only::{check_waypoint_only, WAYPOINT_ONLY_LABEL};
    if let Err(e) = check_waypoint_only(labels) {
        warnings.push(format!(
            "{kind} {key}: label {e}; treated as \"true\" (fail closed)"
        ));
        labels.insert(WAYPOINT_ONLY_LABEL.to_string(), "true".to_string());
    }
}

fn namespaces(objects: &[Arc<Namespace>], warnings: &mut Vec<String>) -> Vec<model::Namespace> {
    let mut out: Vec<model::Namespace> = Vec::new();
    let mut seen = HashSet::new();
    for ns in objects {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        if let Err(e) = check_dns_label("name", &name) {
            warnings.push(format!("Namespace {name}: {e}; skipped"));
            continue;
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        let mut labels = labels_of("Namespace", &ns.metadata, warnings);
        fail_closed_waypoint_only("Namespace", &name, &mut labels, warnings);
        out.push(model::Namespace { name, labels });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A pod that qualifies as a workload, before IP conflicts are settled.
struct Candidate {
    workload: model::Workload,
    terminating: bool,
    created: Option<Time>,
}

fn pod_candidate(pod: &Pod, warnings: &mut Vec<String>) -> Option<Candidate> {
    let meta = &pod.metadata;
    let (Some(name), Some(namespace)) = (meta.name.clone(), meta.namespace.clone()) else {
        return None;
    };
    let spec = pod.spec.as_ref()?;
    // Host-network pods share the node's addresses: they are never workloads of the mesh.
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    // Pending pods have no IP yet; Succeeded and Failed pods keep theirs in the API after the
    // kubelet released it, and a new pod may already have it.
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let key = format!("{namespace}/{name}");
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    for (what, value) in [
        ("name", &name),
        ("namespace", &namespace),
        ("serviceAccountName", &service_account),
    ] {
        if let Err(e) = check_dns_label(what, value) {
            warnings.push(format!("Pod {key}: {e}; skipped"));
            return None;
        }
    }
    let texts: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for text in texts {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) => {
                ips.push(ip.to_canonical())
            }
            Ok(ip) => warnings.push(format!(
                "Pod {key}: more than one {} address, {ip} ignored",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" }
            )),
            Err(_) => warnings.push(format!("Pod {key}: pod IP {text:?} is not an IP address")),
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some(Candidate {
        workload: model::Workload {
            name,
            namespace,
            service_account,
            node,
            ips,
            netns: None,
            labels: labels_of("Pod", meta, warnings),
            // Decided in `build`, which knows the namespaces.
            enrolled: false,
        },
        terminating: meta.deletion_timestamp.is_some(),
        created: meta.creation_timestamp.clone(),
    })
}

fn workloads(objects: &Objects, warnings: &mut Vec<String>) -> Vec<model::Workload> {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut keys = HashSet::new();
    // Local pods first: a pod seen by both watchers while it moves between their selectors is
    // taken from the local one.
    for pod in objects.local_pods.iter().chain(&objects.remote_pods) {
        if let Some(c) = pod_candidate(pod, warnings) {
            if keys.insert(c.workload.key()) {
                candidates.push(c);
            }
        }
    }
    // Two pods claiming one IP: a terminating pod still serves its open connections during its
    // grace period, but the address belongs to the pod that is not going away; between two of
    // the same kind, the newer one.
    candidates.sort_by(|a, b| {
        a.terminating
            .cmp(&b.terminating)
            .then_with(|| b.created.cmp(&a.created))
            .then_with(|| a.workload.key().cmp(&b.workload.key()))
    });
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    let mut out = Vec::new();
    for mut c in candidates {
        let key = c.workload.key();
        c.workload.ips.retain(|ip| match owner.get(ip) {
            Some(other) => {
                warnings.push(format!(
                    "Pod {key}: IP {ip} is also claimed by pod {other}, which keeps it"
                ));
                false
            }
            None => true,
        });
        if c.workload.ips.is_empty() {
            continue;
        }
        for ip in &c.workload.ips {
            owner.insert(*ip, key.clone());
        }
        out.push(c.workload);
    }
    out.sort_by_key(|w| w.key());
    out
}

/// What endpoint references can point at.
struct Known<'a> {
    workloads: &'a HashSet<String>,
    host_network: &'a HashSet<String>,
}

fn services(
    objects: &Objects,
    workloads: &[model::Workload],
    warnings: &mut Vec<String>,
) -> Vec<model::Service> {
    let workload_ips: HashMap<IpAddr, String> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.key())))
        .collect();
    let workload_keys: HashSet<String> = workloads.iter().map(|w| w.key()).collect();
    // Pods the mesh can never reach as workloads: a service backed by one is left to kube-proxy.
    let host_network: HashSet<String> = objects
        .local_pods
        .iter()
        .chain(&objects.remote_pods)
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) == Some(true))
        .map(|p| name_of(&p.metadata))
        .collect();
    let known = Known {
        workloads: &workload_keys,
        host_network: &host_network,
    };
    // Slices by `namespace/service`.
    let mut slices: HashMap<String, Vec<&EndpointSlice>> = HashMap::new();
    for slice in &objects.endpoint_slices {
        let meta = &slice.metadata;
        let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(service)) = (&meta.namespace, service) {
            slices
                .entry(format!("{ns}/{service}"))
                .or_default()
                .push(slice);
        }
    }
    for list in slices.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let mut sorted: Vec<&Arc<Service>> = objects.services.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut vips: HashMap<IpAddr, String> = HashMap::new();
    let mut keys = HashSet::new();
    let mut out = Vec::new();
    for svc in sorted {
        let no_slices = Vec::new();
        let key = name_of(&svc.metadata);
        let svc_slices = slices.get(&key).unwrap_or(&no_slices);
        let Some(service) = service(svc, svc_slices, &known, warnings) else {
            continue;
        };
        if !keys.insert(service.key()) {
            continue;
        }
        let conflict = service.vips.iter().find_map(|vip| {
            workload_ips
                .get(vip)
                .map(|w| format!("VIP {vip} is the address of pod {w}"))
                .or_else(|| {
                    vips.get(vip)
                        .map(|s| format!("VIP {vip} is already used by service {s}"))
                })
        });
        if let Some(conflict) = conflict {
            warnings.push(format!("Service {key}: {conflict}; skipped"));
            continue;
        }
        for vip in &service.vips {
            vips.insert(*vip, key.clone());
        }
        out.push(service);
    }
    out
}

fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|p| p == "TCP")
}

fn service(
    svc: &Service,
    slices: &[&EndpointSlice],
    known: &Known<'_>,
    warnings: &mut Vec<String>,
) -> Option<model::Service> {
    let meta = &svc.metadata;
    let (Some(name), Some(namespace)) = (meta.name.clone(), meta.namespace.clone()) else {
        return None;
    };
    let key = format!("{namespace}/{name}");
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    for (what, value) in [("name", &name), ("namespace", &namespace)] {
        if let Err(e) = check_dns_label(what, value) {
            warnings.push(format!("Service {key}: {e}; skipped"));
            return None;
        }
    }
    let texts: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut vips: Vec<IpAddr> = Vec::new();
    for text in texts {
        if text.is_empty() || text == "None" {
            continue; // headless: clients connect to the pods themselves
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if !vips.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) => {
                vips.push(ip.to_canonical())
            }
            Ok(ip) => warnings.push(format!(
                "Service {key}: second VIP {ip} of its family ignored"
            )),
            Err(_) => warnings.push(format!(
                "Service {key}: cluster IP {text:?} is not an IP address"
            )),
        }
    }
    if vips.is_empty() {
        return None;
    }

    // Endpoints: ready pods that are workloads of this Config. A ready endpoint that is not (no
    // targetRef as for `default/kubernetes`, a hostNetwork pod, a pod of another namespace, an
    // address outside the cluster) cannot be balanced to by the mesh: the whole service is then
    // left out, so its VIP is passed through as plain TCP to kube-proxy rather than black-holed.
    let mut endpoints = BTreeSet::new();
    let mut outside = Vec::new();
    for slice in slices {
        for ep in slice.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let shown = ep.addresses.first().cloned().unwrap_or_default();
            let Some(target) = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
            else {
                outside.push(format!("{shown} (not a pod)"));
                continue;
            };
            let Some(pod) = target.name.as_deref() else {
                outside.push(format!("{shown} (not a pod)"));
                continue;
            };
            // An EndpointSlice may only point at pods of its own namespace (anyone who can
            // write one could otherwise steer a service to another team's pod).
            let pod_ns = target.namespace.as_deref().unwrap_or(&namespace);
            if pod_ns != namespace {
                outside.push(format!("{pod_ns}/{pod} (another namespace)"));
                continue;
            }
            let pod_key = format!("{pod_ns}/{pod}");
            if known.workloads.contains(&pod_key) {
                endpoints.insert(pod_key);
            } else if known.host_network.contains(&pod_key) {
                outside.push(format!("{pod_key} (hostNetwork pod)"));
            }
            // Otherwise a pod just deleted or not seen yet (the slice controller and the pod
            // watcher are not in step): skipped, the rest of the service stays in the mesh.
        }
    }
    if !outside.is_empty() {
        warnings.push(format!(
            "Service {key}: endpoint {} is not a pod workload the agent knows; the service is \
             left to kube-proxy (its VIP is passed through as plain TCP)",
            outside.join(", ")
        ));
        return None;
    }

    let mut ports: Vec<ServicePort> = Vec::new();
    for port in spec.ports.iter().flatten() {
        if !is_tcp(&port.protocol) {
            continue; // UDP and SCTP are not proxied
        }
        let shown = port.name.clone().unwrap_or_else(|| port.port.to_string());
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            warnings.push(format!(
                "Service {key}: port {} is out of range; port skipped",
                port.port
            ));
            continue;
        };
        let target = match &port.target_port {
            None => Some(number),
            Some(IntOrString::Int(n)) => match u16::try_from(*n).ok().filter(|p| *p != 0) {
                Some(n) => Some(n),
                None => {
                    warnings.push(format!(
                        "Service {key}: port {shown}: targetPort {n} is out of range; port skipped"
                    ));
                    continue;
                }
            },
            Some(IntOrString::String(target_name)) => {
                match named_target_port(port.name.as_deref(), slices) {
                    Ok(Some(n)) => Some(n),
                    // No slice names the port: with endpoints, traffic would go to a wrong
                    // port; without, the service answers "no healthy upstream" whatever the
                    // number, so it stays (and resolves once its slices list the port).
                    Ok(None) if !endpoints.is_empty() => {
                        warnings.push(format!(
                            "Service {key}: port {shown}: named targetPort {target_name:?} \
                             is not resolved by any EndpointSlice; port skipped"
                        ));
                        continue;
                    }
                    Ok(None) => None,
                    Err(numbers) => {
                        warnings.push(format!(
                            "Service {key}: port {shown}: named targetPort {target_name:?} \
                             resolves to several numbers ({numbers}) across pods; using the first"
                        ));
                        named_target_port_first(port.name.as_deref(), slices)
                    }
                }
            }
        };
        if ports.iter().any(|p| p.port == number) {
            continue;
        }
        ports.push(ServicePort {
            port: number,
            target_port: target,
            name: port.name.clone(),
            app_protocol: port.app_protocol.clone(),
        });
    }
    if ports.is_empty() {
        return None; // no TCP port: nothing for the mesh to do
    }
    Some(model::Service {
        name,
        namespace,
        vips,
        ports,
        load_balancing: LoadBalancing::RoundRobin,
        ejection: model::EjectionPolicy::default(),
        endpoints: endpoints.into_iter().collect(),
        labels: {
            let mut labels = meta.labels.clone().unwrap_or_default();
            fail_closed_waypoint_only("Service", &key, &mut labels, warnings);
            labels
        },
    })
}

/// The TCP port number EndpointSlices give the service port named `name` (the slice port has the
/// service port's name). `Err` lists the numbers when slices disagree (pods of a rollout whose
/// container port changed).
fn named_target_port(name: Option<&str>, slices: &[&EndpointSlice]) -> Result<Option<u16>, String> {
    let numbers: BTreeSet<u16> = slice_ports(name, slices).collect();
    match numbers.len() {
        0 => Ok(None),
        1 => Ok(numbers.into_iter().next()),
        _ => Err(numbers
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")),
    }
}

fn named_target_port_first(name: Option<&str>, slices: &[&EndpointSlice]) -> Option<u16> {
    slice_ports(name, slices).next()
}

fn slice_ports<'a>(
    name: Option<&'a str>,
    slices: &'a [&'a EndpointSlice],
) -> impl Iterator<Item = u16> + 'a {
    slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(move |p| {
            p.name.as_deref().unwrap_or("") == name.unwrap_or("") && is_tcp(&p.protocol)
        })
        .filter_map(|p| {
            p.port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        })
}

/// The kinds of policy objects, with the apiVersion the agent watches.
pub const POLICY_API_VERSION: &str = "security.istio.io/v1";

/// The part of an object's `metadata` a user writes and documents of ours keep: `name`,
/// `namespace` and `labels` (what the API adds left out).
pub(super) fn user_metadata(meta: &kube::api::ObjectMeta) -> Map<String, Value> {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(meta.name.clone().unwrap_or_default()));
    if let Some(ns) = &meta.namespace {
        metadata.insert("namespace".into(), json!(ns));
    }
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        metadata.insert("labels".into(), json!(labels));
    }
    metadata
}

/// The document the strict policy parser reads: only what a user would write. The API adds
/// uid, resourceVersion, managedFields, creationTimestamp, generation and status.
pub fn policy_document_json(kind: &str, obj: &DynamicObject) -> Value {
    let meta = &obj.metadata;
    let mut metadata = user_metadata(meta);
    if let Some(annotations) = meta.annotations.as_ref().filter(|a| !a.is_empty()) {
        metadata.insert("annotations".into(), json!(annotations));
    }
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), json!(POLICY_API_VERSION));
    doc.insert("kind".into(), json!(kind));
    doc.insert("metadata".into(), Value::Object(metadata));
    if let Some(spec) = obj.data.get("spec").filter(|s| !s.is_null()) {
        doc.insert("spec".into(), spec.clone());
    }
    Value::Object(doc)
}

fn policy_id(kind: &str, obj: &DynamicObject) -> PolicyId {
    format!(
        "{kind} {} {}",
        name_of(&obj.metadata),
        obj.metadata.uid.as_deref().unwrap_or("")
    )
}

fn policies(
    objects: &Objects,
    warnings: &mut Vec<String>,
) -> (Vec<PolicyDocument>, HashMap<PolicyId, PolicyDocument>) {
    let mut all: Vec<(&str, &Arc<DynamicObject>)> = Vec::new();
    all.extend(
        objects
            .peer_authentications
            .iter()
            .map(|o| ("PeerAuthentication", o)),
    );
    all.extend(
        objects
            .authorization_policies
            .iter()
            .map(|o| ("AuthorizationPolicy", o)),
    );
    all.sort_by(|a, b| {
        (a.0, &a.1.metadata.namespace, &a.1.metadata.name).cmp(&(
            b.0,
            &b.1.metadata.namespace,
            &b.1.metadata.name,
        ))
    });
    let mut documents = Vec::new();
    let mut good = HashMap::new();
    for (kind, obj) in all {
        let id = policy_id(kind, obj);
        let shown = format!("{kind} {}", name_of(&obj.metadata));
        let document =
            match serde_json::from_value::<PolicyDocument>(policy_document_json(kind, obj)) {
                Ok(document) => document,
                Err(e) => match objects.last_good_policies.get(&id) {
                    Some(last) => {
                        warnings.push(format!(
                            "{shown}: {e}; its last valid version stays in force"
                        ));
                        last.clone()
                    }
                    None => match fail_closed_stand_in(kind, obj) {
                        // Not remembered as good: the next valid version replaces it.
                        Some((stand_in, what)) => {
                            warnings.push(format!(
                                "{shown}: {e}; enforced as {what} for the workloads it selects \
                                 until it is fixed (fail closed)"
                            ));
                            documents.push(stand_in);
                            continue;
                        }
                        None => {
                            warnings.push(format!("{shown}: {e}; ignored"));
                            continue;
                        }
                    },
                },
            };
        good.insert(id, document.clone());
        documents.push(document);
    }
    (documents, good)
}

/// What an unreadable policy with no earlier valid version is enforced as, so that a policy the
/// agent cannot read never opens access (dropping a DENY, or the only ALLOW, would): a DENY or
/// ALLOW becomes "deny everything" for the workloads it selects (an ALLOW without rules matches
/// nothing), a PeerAuthentication becomes STRICT. A selector that cannot be read either widens
/// it to the whole namespace; readable `targetRefs` keep it bound to them. AUDIT and CUSTOM policies, which the agent does not enforce, stay
/// ignored.
fn fail_closed_stand_in(kind: &str, obj: &DynamicObject) -> Option<(PolicyDocument, &'static str)> {
    let spec = obj.data.get("spec");
    let selector = spec
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
        .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
        .map(|labels| json!({ "matchLabels": labels }));
    let (stand_in_spec, what) = match kind {
        "AuthorizationPolicy" => match spec.and_then(|s| s.get("action")).and_then(Value::as_str) {
            None | Some("ALLOW") => (json!({ "action": "ALLOW" }), "an ALLOW matching nothing"),
            Some("DENY") => (
                json!({ "action": "DENY", "rules": [{}] }),
                "a DENY of everything",
            ),
            Some(_) => return None,
        },
        _ => (json!({ "mtls": { "mode": "STRICT" } }), "STRICT mTLS"),
    };
    let mut stand_in_spec = stand_in_spec;
    if let Some(selector) = selector {
        stand_in_spec["selector"] = selector;
    }
    let mut reduced = policy_document_json(kind, obj);
    reduced["spec"] = stand_in_spec;
    // Labels or annotations of the wrong type would fail again: the stand-in needs none.
    if let Some(meta) = reduced["metadata"].as_object_mut() {
        meta.remove("labels");
        meta.remove("annotations");
    }
    // A policy bound by readable targetRefs stays bound to them (its waypoint denies); with
    // targetRefs that cannot be read, it falls back to the namespace (its agents deny).
    let targets = ["targetRef", "targetRefs"].map(|f| spec.and_then(|s| s.get(f)));
    if targets.iter().any(Option::is_some) && kind == "AuthorizationPolicy" {
        let mut bound = reduced.clone();
        let spec = &mut bound["spec"];
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("selector");
        }
        for (field, value) in ["targetRef", "targetRefs"].iter().zip(targets) {
            if let Some(value) = value {
                spec[*field] = value.clone();
            }
        }
        if let Ok(document) = serde_json::from_value::<PolicyDocument>(bound) {
            return Some((document, what));
        }
    }
    let document = serde_json::from_value::<PolicyDocument>(reduced).ok()?;
    Some((document, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::waypoint::GATEWAY_NAME_LABEL;
    use crate::policy::PolicySet;
    use crate::state::State;

    fn opts() -> KubeOptions {
        KubeOptions {
            node: "node1".into(),
            root_namespace: "istio-system".into(),
            excluded_ports: vec![22],
            route_status_for: None,
            waypoint_only_default: false,
        }
    }

    fn obj<K: serde::de::DeserializeOwned>(v: Value) -> Arc<K> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn ns(name: &str, mode: Option<&str>) -> Arc<Namespace> {
        let labels = match mode {
            Some(m) => json!({ "kubernetes.io/metadata.name": name, DATAPLANE_MODE_LABEL: m }),
            None => json!({ "kubernetes.io/metadata.name": name }),
        };
        obj(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "uid": "u-ns", "resourceVersion": "1", "labels": labels },
            "spec": { "finalizers": ["kubernetes"] }, "status": { "phase": "Active" }
        }))
    }

    /// A running pod on `node` with one IPv4 address; `extra` is merged into the top level.
    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": ns, "uid": format!("u-{name}"), "resourceVersion": "5",
                "creationTimestamp": "2025-01-01T00:00:00Z", "labels": { "app": name },
                "managedFields": [{ "manager": "kubelet", "operation": "Update" }]
            },
            "spec": {
                "nodeName": node, "serviceAccountName": "sa-".to_string() + name,
                "containers": [{ "name": "app", "image": "busybox", "ports": [{ "containerPort": 8080, "name": "http" }] }]
            },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
        })
    }

    fn with(mut base: Value, path: &[&str], value: Value) -> Value {
        let mut at = &mut base;
        for key in &path[..path.len() - 1] {
            at = at.as_object_mut().unwrap().entry(*key).or_insert(json!({}));
        }
        at.as_object_mut()
            .unwrap()
            .insert(path[path.len() - 1].to_string(), value);
        base
    }

    fn svc(ns: &str, name: &str, ips: &[&str], ports: Value) -> Arc<Service> {
        obj(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": ns, "uid": "u-svc", "resourceVersion": "3" },
            "spec": {
                "type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips,
                "selector": { "app": name }, "ports": ports
            }
        }))
    }

    fn slice(
        ns: &str,
        name: &str,
        service: &str,
        endpoints: Value,
        ports: Value,
    ) -> Arc<EndpointSlice> {
        obj(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": name, "namespace": ns, "resourceVersion": "7",
                "labels": { SERVICE_NAME_LABEL: service }
            },
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports
        }))
    }

    fn endpoint(ns: &str, pod: &str, ip: &str, ready: bool) -> Value {
        json!({
            "addresses": [ip], "conditions": { "ready": ready, "serving": ready },
            "targetRef": { "kind": "Pod", "namespace": ns, "name": pod, "uid": format!("u-{pod}") }
        })
    }

    fn build_checked(objects: &Objects) -> (Mesh, Vec<String>) {
        let (config, warnings) = build_config(objects, &opts());
        if let Err(e) = config.validate() {
            panic!("a built config is valid: {}", describe_error(&config, &e));
        }
        (config, warnings)
    }

    #[test]
    fn validation_errors_name_the_object_and_its_field_not_a_line() {
        let objects = Objects {
            namespaces: vec![ns("shop", Some("ambient"))],
            local_pods: vec![obj(pod("shop", "a", "n1", "10.1.0.1"))],
            services: vec![svc("shop", "web", &["10.96.0.1"], json!([{ "port": 80 }]))],
            ..Objects::default()
        };
        let (mut mesh, _) = build_config(&objects, &opts());
        let mut twin = mesh.workloads[0].clone();
        twin.name = "b".into();
        mesh.workloads.push(twin);
        let e = mesh.validate().unwrap_err();
        assert_eq!(
            describe_error(&mesh, &e),
            "Pod shop/b: field `status.podIPs[0]`: IP 10.1.0.1 is already used by shop/a"
        );
        mesh.workloads.pop();
        mesh.services[0].vips = vec!["10.1.0.1".parse().unwrap()];
        let e = mesh.validate().unwrap_err();
        assert_eq!(
            describe_error(&mesh, &e),
            "Service shop/web: field `spec.clusterIPs[0]`: VIP 10.1.0.1 is the address of \
             workload shop/a"
        );
        mesh.services[0].vips = vec!["10.96.0.1".parse().unwrap()];
        let first = mesh.services[0].ports[0].clone();
        mesh.services[0].ports.push(first);
        let e = mesh.validate().unwrap_err();
        assert_eq!(
            describe_error(&mesh, &e),
            "Service shop/web: field `spec.ports (port 80)`: port 80 is listed twice"
        );
        mesh.services[0].ports.pop();
        mesh.services[0].name = "Web".into();
        let e = mesh.validate().unwrap_err();
        assert!(
            describe_error(&mesh, &e).starts_with("Service shop/Web: field `metadata.name`: "),
            "{}",
            describe_error(&mesh, &e)
        );
    }

    #[test]
    fn namespaces_and_pods_become_workloads_with_enrollment() {
        let objects = Objects {
            namespaces: vec![ns("shop", Some("ambient")), ns("legacy", None)],
            local_pods: vec![
                obj(pod("shop", "web", "node1", "10.1.0.5")),
                obj(with(
                    pod("legacy", "db", "node1", "10.1.0.6"),
                    &["metadata", "labels", DATAPLANE_MODE_LABEL],
                    json!("ambient"),
                )),
                obj(with(
                    pod("shop", "batch", "node1", "10.1.0.7"),
                    &["metadata", "labels", DATAPLANE_MODE_LABEL],
                    json!("none"),
                )),
            ],
            remote_pods: vec![obj(pod("shop", "cart", "node2", "10.2.0.5"))],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.excluded_ports, [22]);
        assert_eq!(config.root_namespace, "istio-system");
        assert_eq!(config.namespaces[0].name, "legacy");
        assert_eq!(
            config.namespaces[1]
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .unwrap(),
            "ambient"
        );
        let web = config.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!(web.service_account, "sa-web");
        assert_eq!(web.node, "node1");
        assert_eq!(web.ips, ["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(web.netns, None);
        assert_eq!(web.labels.get("app").unwrap(), "web");
        let enrolled: Vec<_> = config
            .workloads
            .iter()
            .filter(|w| w.enrolled)
            .map(|w| w.key())
            .collect();
        assert_eq!(enrolled, ["legacy/db", "shop/cart", "shop/web"]);
        let state = State::from_mesh(&config, "node1");
        let local: Vec<_> = state.local_enrolled().map(|w| w.key()).collect();
        assert_eq!(local, ["legacy/db", "shop/web"]);
        assert_eq!(state.workloads["shop/cart"].node, "node2");
    }

    #[test]
    fn use_waypoint_labels_name_waypoints_from_watched_gateways() {
        let gateway = |name: &str, class: &str| -> Arc<DynamicObject> {
            obj(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": { "name": name, "namespace": "shop", "uid": "g", "generation": 2,
                              "labels": { "istio.io/waypoint-for": "all" },
                              "managedFields": [{ "manager": "kubectl" }] },
                "spec": { "gatewayClassName": class,
                          "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
                "status": { "conditions": [] }
            }))
        };
        let wp_pod = with(
            with(
                pod("shop", "wp-1", "node1", "10.1.0.9"),
                &["metadata", "labels", GATEWAY_NAME_LABEL],
                json!("wp"),
            ),
            &["spec", "serviceAccountName"],
            json!("wp"),
        );
        let objects = Objects {
            namespaces: vec![ns("shop", Some("ambient"))],
            local_pods: vec![
                obj(with(
                    pod("shop", "web", "node1", "10.1.0.5"),
                    &["metadata", "labels", "istio.io/use-waypoint"],
                    json!("wp"),
                )),
                obj(with(
                    pod("shop", "db", "node1", "10.1.0.6"),
                    &["metadata", "labels", "istio.io/use-waypoint"],
                    json!("gone"),
                )),
                obj(wp_pod),
            ],
            gateways: vec![gateway("wp", "istio-waypoint"), gateway("ingress", "istio")],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config.waypoints.iter().map(|w| w.key()).collect::<Vec<_>>(),
            ["shop/wp"],
            "the Gateway of another class is not ours, and not a warning"
        );
        let state = State::from_mesh(&config, "node1");
        let web = &state.workloads["shop/web"];
        assert!(
            matches!(*state.workload_via(web), crate::state::Via::Waypoint(_)),
            "the label is kept and names the watched waypoint"
        );
        // A waypoint that does not exist: refused, never a silent direct path.
        let db = &state.workloads["shop/db"];
        assert!(matches!(
            *state.workload_via(db),
            crate::state::Via::Missing { .. }
        ));
    }

    #[test]
    fn pods_that_are_not_workloads_are_skipped() {
        let p = || pod("shop", "p", "node1", "10.1.0.9");
        let cases = [
            (
                "hostNetwork",
                with(p(), &["spec", "hostNetwork"], json!(true)),
            ),
            (
                "pending",
                with(p(), &["status"], json!({ "phase": "Pending" })),
            ),
            (
                "succeeded",
                with(p(), &["status", "phase"], json!("Succeeded")),
            ),
            ("failed", with(p(), &["status", "phase"], json!("Failed"))),
            (
                "no ip",
                with(p(), &["status"], json!({ "phase": "Running" })),
            ),
            ("unscheduled", with(p(), &["spec", "nodeName"], json!(""))),
        ];
        for (what, pod) in cases {
            let objects = Objects {
                local_pods: vec![obj(pod)],
                ..Objects::default()
            };
            let (config, warnings) = build_checked(&objects);
            assert!(config.workloads.is_empty(), "{what}");
            assert!(warnings.is_empty(), "{what}: {warnings:?}");
        }
    }

    #[test]
    fn pod_ips_dual_stack_fallback_and_defaults() {
        let dual = with(
            pod("shop", "dual", "node1", "10.1.0.5"),
            &["status", "podIPs"],
            json!([{ "ip": "10.1.0.5" }, { "ip": "fd00::5" }, { "ip": "10.1.0.99" }]),
        );
        let mut only_pod_ip = pod("shop", "old", "node1", "10.1.0.6");
        only_pod_ip["status"]
            .as_object_mut()
            .unwrap()
            .remove("podIPs");
        only_pod_ip["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let objects = Objects {
            local_pods: vec![obj(dual), obj(only_pod_ip)],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        let dual = &config.workloads[0];
        assert_eq!(dual.name, "dual");
        assert_eq!(
            dual.ips,
            [
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("Pod shop/dual") && warnings[0].contains("10.1.0.99"),
            "{warnings:?}"
        );
        let old = &config.workloads[1];
        assert_eq!(old.ips, ["10.1.0.6".parse::<IpAddr>().unwrap()]);
        assert_eq!(old.service_account, "default");
    }

    #[test]
    fn an_ip_claimed_twice_goes_to_the_running_pod_that_is_not_terminating() {
        let terminating = with(
            pod("shop", "old", "node1", "10.1.0.5"),
            &["metadata", "deletionTimestamp"],
            json!("2025-01-02T00:00:00Z"),
        );
        let newer = with(
            pod("shop", "new", "node1", "10.1.0.5"),
            &["metadata", "creationTimestamp"],
            json!("2025-01-01T00:00:30Z"),
        );
        let objects = Objects {
            local_pods: vec![obj(terminating.clone()), obj(newer)],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        let keys: Vec<_> = config.workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["shop/new"]);
        assert!(
            warnings[0].contains("Pod shop/old: IP 10.1.0.5 is also claimed by pod shop/new"),
            "{warnings:?}"
        );
        // Alone, a terminating pod still serves its connections: it stays a workload.
        let objects = Objects {
            local_pods: vec![obj(terminating)],
            ..Objects::default()
        };
        assert_eq!(build_checked(&objects).0.workloads.len(), 1);
        // Two live pods: the newer wins.
        let objects = Objects {
            local_pods: vec![
                obj(pod("shop", "a", "node1", "10.1.0.5")),
                obj(with(
                    pod("shop", "b", "node2", "10.1.0.5"),
                    &["metadata", "creationTimestamp"],
                    json!("2025-03-01T00:00:00Z"),
                )),
            ],
            ..Objects::default()
        };
        let keys: Vec<_> = build_checked(&objects)
            .0
            .workloads
            .iter()
            .map(|w| w.key())
            .collect();
        assert_eq!(keys, ["shop/b"]);
    }

    #[test]
    fn objects_the_validator_would_reject_are_skipped_alone() {
        let objects = Objects {
            namespaces: vec![ns("shop", Some("sidecar"))],
            local_pods: vec![
                obj(pod("shop", "web.v1", "node1", "10.1.0.5")),
                obj(with(
                    pod("shop", "dotted-sa", "node1", "10.1.0.6"),
                    &["spec", "serviceAccountName"],
                    json!("team.a"),
                )),
                obj(with(
                    pod("shop", "odd-mode", "node1", "10.1.0.7"),
                    &["metadata", "labels", DATAPLANE_MODE_LABEL],
                    json!("Ambient"),
                )),
                obj(pod("shop", "fine", "node1", "10.1.0.8")),
            ],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        let keys: Vec<_> = config.workloads.iter().map(|w| w.key()).collect();
        assert_eq!(keys, ["shop/fine", "shop/odd-mode"]);
        assert!(!config.namespaces[0]
            .labels
            .contains_key(DATAPLANE_MODE_LABEL));
        assert!(!config.workloads[1]
            .labels
            .contains_key(DATAPLANE_MODE_LABEL));
        let joined = warnings.join("\n");
        for needle in [
            "Namespace shop: label istio.io/dataplane-mode=\"sidecar\"",
            "Pod shop/web.v1: name \"web.v1\" is not a DNS label",
            "Pod shop/dotted-sa: serviceAccountName \"team.a\"",
            "Pod shop/odd-mode: label istio.io/dataplane-mode=\"Ambient\"",
        ] {
            assert!(joined.contains(needle), "{needle} in {joined}");
        }
    }

    #[test]
    fn services_resolve_vips_ports_and_ready_pod_endpoints() {
        let objects = Objects {
            local_pods: vec![
                obj(pod("shop", "web-1", "node1", "10.1.0.5")),
                obj(pod("shop", "web-2", "node1", "10.1.0.6")),
                obj(pod("shop", "web-3", "node1", "10.1.0.7")),
            ],
            services: vec![
                svc(
                    "shop",
                    "web",
                    &["10.96.0.10", "fd00:96::10"],
                    json!([
                        { "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" },
                        { "name": "admin", "port": 9000, "targetPort": 9090 },
                        { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" }
                    ]),
                ),
                svc(
                    "shop",
                    "udp-only",
                    &["10.96.0.11"],
                    json!([{ "port": 53, "protocol": "UDP" }]),
                ),
                svc("shop", "headless", &["None"], json!([{ "port": 80 }])),
                obj(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": "ext", "namespace": "shop" },
                    "spec": { "type": "ExternalName", "externalName": "example.com" }
                })),
            ],
            endpoint_slices: vec![
                slice(
                    "shop",
                    "web-abc",
                    "web",
                    json!([
                        endpoint("shop", "web-1", "10.1.0.5", true),
                        endpoint("shop", "web-2", "10.1.0.6", false),
                        // Not ready: whatever it is, it does not count.
                        { "addresses": ["192.168.1.1"], "conditions": { "ready": false } }
                    ]),
                    json!([{ "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "admin", "port": 9090 }]),
                ),
                // The IPv6 slice of the same service names web-1 again, plus web-3 (ready unknown).
                slice(
                    "shop",
                    "web-v6",
                    "web",
                    json!([
                        endpoint("shop", "web-1", "fd00::5", true),
                        { "addresses": ["fd00::7"], "targetRef": { "kind": "Pod", "name": "web-3", "namespace": "shop" } }
                    ]),
                    json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
                ),
                slice(
                    "shop",
                    "other",
                    "not-web",
                    json!([endpoint("shop", "web-2", "10.1.0.6", true)]),
                    json!([]),
                ),
            ],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        assert!(warnings.is_empty(), "{warnings:?}");
        let keys: Vec<_> = config.services.iter().map(|s| s.key()).collect();
        assert_eq!(keys, ["shop/web"]);
        let web = &config.services[0];
        assert_eq!(
            web.vips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        let ports: Vec<(u16, Option<u16>)> =
            web.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, [(80, Some(8080)), (9000, Some(9090))]);
        assert_eq!(web.endpoints, ["shop/web-1", "shop/web-3"]);
        let state = State::from_mesh(&config, "node1");
        let resolved = state.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(resolved.target_port(80), Some(8080));
        assert_eq!(resolved.endpoints.len(), 2);
    }

    #[test]
    fn services_with_endpoints_the_mesh_cannot_reach_are_left_to_kube_proxy() {
        let ports = json!([{ "name": "https", "port": 443, "protocol": "TCP" }]);
        let objects = Objects {
            local_pods: vec![
                obj(pod("shop", "web-1", "node1", "10.1.0.5")),
                obj(with(
                    pod("shop", "node-agent", "node1", "192.168.0.11"),
                    &["spec", "hostNetwork"],
                    json!(true),
                )),
            ],
            services: vec![
                svc(
                    "default",
                    "kubernetes",
                    &["10.96.0.1"],
                    json!([{ "name": "https", "port": 443 }]),
                ),
                svc("shop", "steer", &["10.96.0.20"], json!([{ "port": 443 }])),
                svc("shop", "host", &["10.96.0.21"], json!([{ "port": 443 }])),
                svc("shop", "mixed", &["10.96.0.22"], json!([{ "port": 443 }])),
            ],
            endpoint_slices: vec![
                // The API server: an address without a targetRef.
                slice(
                    "default",
                    "kubernetes",
                    "kubernetes",
                    json!([{ "addresses": ["192.168.0.10"], "conditions": { "ready": true } }]),
                    ports.clone(),
                ),
                // A slice in shop pointing at a pod of another namespace.
                slice(
                    "shop",
                    "steer-1",
                    "steer",
                    json!([endpoint("bank", "db", "10.1.0.9", true)]),
                    ports.clone(),
                ),
                // A pod the Config does not hold (hostNetwork, say).
                slice(
                    "shop",
                    "host-1",
                    "host",
                    json!([endpoint("shop", "node-agent", "192.168.0.11", true)]),
                    ports.clone(),
                ),
                // One mesh pod, one bare address.
                slice(
                    "shop",
                    "mixed-1",
                    "mixed",
                    json!([
                        endpoint("shop", "web-1", "10.1.0.5", true),
                        { "addresses": ["203.0.113.7"], "conditions": { "ready": true } }
                    ]),
                    ports,
                ),
            ],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        assert!(config.services.is_empty(), "{:?}", config.services);
        let joined = warnings.join("\n");
        for needle in [
            "Service default/kubernetes: endpoint 192.168.0.10 (not a pod)",
            "Service shop/steer: endpoint bank/db (another namespace)",
            "Service shop/host: endpoint shop/node-agent (hostNetwork pod)",
            "Service shop/mixed: endpoint 203.0.113.7 (not a pod)",
            "left to kube-proxy",
        ] {
            assert!(joined.contains(needle), "{needle} in {joined}");
        }
        // Passed through, not black-holed: the VIP is no service of the State.
        let state = State::from_mesh(&config, "node1");
        assert!(state.service_by_vip("10.96.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn service_conflicts_and_unresolved_named_ports_are_skipped_with_a_warning() {
        let objects = Objects {
            local_pods: vec![obj(pod("shop", "web-1", "node1", "10.1.0.5"))],
            services: vec![
                svc("shop", "a", &["10.96.0.10"], json!([{ "port": 80 }])),
                svc("shop", "b", &["10.96.0.10"], json!([{ "port": 80 }])),
                svc("shop", "c", &["10.1.0.5"], json!([{ "port": 80 }])),
                svc(
                    "shop",
                    "named",
                    &["10.96.0.12"],
                    json!([{ "name": "http", "port": 80, "targetPort": "http" }]),
                ),
                svc(
                    "shop",
                    "nameless",
                    &["10.96.0.13"],
                    json!([{ "name": "http", "port": 80, "targetPort": "http" }]),
                ),
            ],
            endpoint_slices: vec![slice(
                "shop",
                "named-x",
                "named",
                json!([endpoint("shop", "web-1", "10.1.0.5", true)]),
                json!([{ "name": "metrics", "port": 9090 }]),
            )],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        let keys: Vec<_> = config.services.iter().map(|s| s.key()).collect();
        // `nameless` has no endpoints: its unresolved port waits for them, silently.
        assert_eq!(keys, ["shop/a", "shop/nameless"]);
        assert_eq!(config.services[1].ports[0].target_port, None);
        let joined = warnings.join("\n");
        for needle in [
            "Service shop/b: VIP 10.96.0.10 is already used by service shop/a; skipped",
            "Service shop/c: VIP 10.1.0.5 is the address of pod shop/web-1; skipped",
            "Service shop/named: port http: named targetPort \"http\" is not resolved",
        ] {
            assert!(joined.contains(needle), "{needle} in {joined}");
        }
        assert_eq!(warnings.len(), 3, "{joined}");
    }

    fn policy(kind: &str, ns: &str, name: &str, uid: &str, spec: Value) -> Arc<DynamicObject> {
        obj(json!({
            "apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {
                "name": name, "namespace": ns, "uid": uid, "resourceVersion": "9", "generation": 2,
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": { "team": "a" },
                "annotations": { "note": "x" },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }]
            },
            "spec": spec,
            "status": { "validationMessages": [] }
        }))
    }

    #[test]
    fn policies_parse_strictly_from_api_objects() {
        let objects = Objects {
            local_pods: vec![obj(pod("shop", "web", "node1", "10.1.0.5"))],
            peer_authentications: vec![policy(
                "PeerAuthentication",
                "istio-system",
                "default",
                "u1",
                json!({ "mtls": { "mode": "STRICT" } }),
            )],
            authorization_policies: vec![policy(
                "AuthorizationPolicy",
                "shop",
                "deny-legacy",
                "u2",
                json!({
                    "action": "DENY",
                    "selector": { "matchLabels": { "app": "web" } },
                    "rules": [{ "from": [{ "source": { "namespaces": ["legacy"] } }] }]
                }),
            )],
            ..Objects::default()
        };
        let built = build(&objects, &opts());
        assert!(built.warnings.is_empty(), "{:?}", built.warnings);
        let docs: Vec<_> = built
            .config
            .policies
            .iter()
            .map(|d| format!("{} {}", d.kind(), d.metadata().key()))
            .collect();
        assert_eq!(
            docs,
            [
                "AuthorizationPolicy shop/deny-legacy",
                "PeerAuthentication istio-system/default"
            ]
        );
        assert_eq!(built.good_policies.len(), 2);
        let (set, warnings) = PolicySet::new(&built.config.policies, "istio-system");
        assert!(warnings.is_empty(), "{warnings:?}");
        let state = State::from_mesh(&built.config, "node1");
        let web = &state.workloads["shop/web"];
        assert_eq!(set.mtls_mode(web, 80), crate::policy::MtlsMode::Strict);
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version_and_a_new_broken_object_fails_closed() {
        let good = policy(
            "AuthorizationPolicy",
            "shop",
            "deny",
            "u1",
            json!({ "action": "DENY", "rules": [{}] }),
        );
        let broken = policy(
            "AuthorizationPolicy",
            "shop",
            "deny",
            "u1",
            json!({ "action": "DENY", "rules": [{ "to": [{ "operation": { "portz": ["80"] } }] }] }),
        );
        let mut objects = Objects {
            authorization_policies: vec![good.clone()],
            ..Objects::default()
        };
        let first = build(&objects, &opts());
        objects.last_good_policies = first.good_policies;
        objects.authorization_policies = vec![broken.clone()];
        let second = build(&objects, &opts());
        assert_eq!(second.config.policies, first.config.policies);
        assert_eq!(second.warnings.len(), 1);
        assert!(
            second.warnings[0].starts_with("AuthorizationPolicy shop/deny: ")
                && second.warnings[0].contains("portz")
                && second.warnings[0].contains("last valid version stays in force"),
            "{:?}",
            second.warnings
        );
        // Re-created under the same name (a new uid): nothing to fall back to, so it is
        // enforced as a DENY of everything (fail closed), and not remembered as good.
        let mut recreated = (*broken).clone();
        recreated.metadata.uid = Some("u2".into());
        objects.last_good_policies = second.good_policies;
        objects.authorization_policies = vec![Arc::new(recreated)];
        let third = build(&objects, &opts());
        let spec = |docs: &[PolicyDocument]| match &docs[0] {
            PolicyDocument::AuthorizationPolicy(p) => p.spec.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            spec(&third.config.policies),
            spec(&first.config.policies),
            "deny-all, the same as `rules: [{{}}]`"
        );
        assert!(
            third.warnings[0].contains("enforced as a DENY of everything"),
            "{:?}",
            third.warnings
        );
        assert!(third.good_policies.is_empty());
    }

    #[test]
    fn unreadable_policies_without_a_valid_version_fail_closed() {
        let bad_rule = json!([{ "to": [{ "operation": { "portz": ["80"] } }] }]);
        let objects = Objects {
            authorization_policies: vec![
                policy(
                    "AuthorizationPolicy",
                    "shop",
                    "allow",
                    "u1",
                    json!({
                        "selector": { "matchLabels": { "app": "web" } }, "rules": bad_rule.clone()
                    }),
                ),
                policy(
                    "AuthorizationPolicy",
                    "shop",
                    "audit",
                    "u2",
                    json!({
                        "action": "AUDIT", "rules": bad_rule
                    }),
                ),
            ],
            peer_authentications: vec![policy(
                "PeerAuthentication",
                "shop",
                "pa",
                "u3",
                json!({
                    "selector": { "matchLabels": { "app": "web" } }, "mtls": { "mode": "strict" }
                }),
            )],
            ..Objects::default()
        };
        let built = build(&objects, &opts());
        let joined = built.warnings.join("\n");
        assert!(
            joined.contains("AuthorizationPolicy shop/allow: ")
                && joined.contains("an ALLOW matching nothing"),
            "{joined}"
        );
        assert!(
            joined.contains("AuthorizationPolicy shop/audit: ") && joined.contains("ignored"),
            "{joined}"
        );
        assert!(
            joined.contains("PeerAuthentication shop/pa: ") && joined.contains("STRICT mTLS"),
            "{joined}"
        );
        let expected: Vec<PolicyDocument> = [
            ("AuthorizationPolicy", json!({ "selector": { "matchLabels": { "app": "web" } }, "action": "ALLOW" })),
            ("PeerAuthentication", json!({ "selector": { "matchLabels": { "app": "web" } }, "mtls": { "mode": "STRICT" } })),
        ]
        .into_iter()
        .map(|(kind, spec)| {
            let name = if kind == "PeerAuthentication" { "pa" } else { "allow" };
            serde_json::from_value(json!({
                "apiVersion": "security.istio.io/v1", "kind": kind,
                "metadata": { "name": name, "namespace": "shop" }, "spec": spec
            }))
            .unwrap()
        })
        .collect();
        let mut got = built.config.policies.clone();
        got.sort_by_key(|d| d.kind());
        assert_eq!(got, expected);
        assert!(built.good_policies.is_empty());
    }

    #[test]
    fn an_unreadable_bound_policy_stays_bound_or_falls_back_to_its_namespace() {
        let bad_rule = json!([{ "to": [{ "operation": { "methodz": ["GET"] } }] }]);
        let service = json!([{ "kind": "Service", "group": "", "name": "web" }]);
        let objects = Objects {
            authorization_policies: vec![
                policy(
                    "AuthorizationPolicy",
                    "shop",
                    "bound",
                    "u1",
                    json!({ "targetRefs": service.clone(), "action": "DENY", "rules": bad_rule.clone() }),
                ),
                policy(
                    "AuthorizationPolicy",
                    "shop",
                    "unbound",
                    "u2",
                    json!({ "targetRefs": [{ "kind": "ServiceEntry", "group": "networking.istio.io", "name": "x" }] }),
                ),
            ],
            ..Objects::default()
        };
        let built = build(&objects, &opts());
        let expected: Vec<PolicyDocument> = [
            (
                "bound",
                json!({ "targetRefs": service, "action": "DENY", "rules": [{}] }),
            ),
            ("unbound", json!({ "action": "ALLOW" })),
        ]
        .into_iter()
        .map(|(name, spec)| {
            serde_json::from_value(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": { "name": name, "namespace": "shop" }, "spec": spec
            }))
            .unwrap()
        })
        .collect();
        assert_eq!(built.config.policies, expected, "{:?}", built.warnings);
    }

    #[test]
    fn the_reduced_document_has_only_what_a_user_writes() {
        let p = policy("PeerAuthentication", "shop", "pa", "u1", json!({}));
        let doc = policy_document_json("PeerAuthentication", &p);
        assert_eq!(
            doc,
            json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": { "name": "pa", "namespace": "shop", "labels": { "team": "a" }, "annotations": { "note": "x" } },
                "spec": {}
            })
        );
        let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
    }

    #[test]
    fn the_same_objects_in_another_order_give_the_same_config() {
        let mut objects = Objects {
            namespaces: vec![ns("a", None), ns("b", Some("ambient"))],
            local_pods: vec![
                obj(pod("b", "x", "node1", "10.1.0.1")),
                obj(pod("a", "y", "node1", "10.1.0.2")),
            ],
            services: vec![
                svc("a", "s1", &["10.96.0.1"], json!([{ "port": 80 }])),
                svc("a", "s0", &["10.96.0.2"], json!([{ "port": 80 }])),
            ],
            ..Objects::default()
        };
        let (first, _) = build_checked(&objects);
        objects.namespaces.reverse();
        objects.local_pods.reverse();
        objects.services.reverse();
        assert_eq!(build_checked(&objects).0, first);
    }

    #[test]
    fn a_bad_waypoint_only_label_is_warned_about_and_fails_closed() {
        use crate::model::waypoint_only::WAYPOINT_ONLY_LABEL;
        let label =
            |value: &str| Some(BTreeMap::from([(WAYPOINT_ONLY_LABEL.into(), value.into())]));
        let mut web = (*svc("shop", "web", &["10.96.0.1"], json!([{ "port": 80 }]))).clone();
        web.metadata.labels = label("yes");
        let mut api = (*svc("shop", "api", &["10.96.0.2"], json!([{ "port": 80 }]))).clone();
        api.metadata.labels = label("false");
        let mut shop = (*ns("shop", Some("ambient"))).clone();
        shop.metadata.labels = label("maybe");
        let objects = Objects {
            namespaces: vec![Arc::new(shop)],
            services: vec![Arc::new(web), Arc::new(api)],
            ..Objects::default()
        };
        let (config, warnings) = build_checked(&objects);
        assert_eq!(
            warnings,
            [
                "Namespace shop: label mesh.dev/waypoint-only=\"maybe\" is not supported (use \
                 \"true\" or \"false\"); treated as \"true\" (fail closed)",
                "Service shop/web: label mesh.dev/waypoint-only=\"yes\" is not supported (use \
                 \"true\" or \"false\"); treated as \"true\" (fail closed)"
            ]
        );
        let value = |key: &str| {
            let s = config.services.iter().find(|s| s.key() == key).unwrap();
            s.labels[WAYPOINT_ONLY_LABEL].clone()
        };
        assert_eq!(
            (value("shop/web"), value("shop/api")),
            ("true".into(), "false".into())
        );
        assert_eq!(config.namespaces[0].labels[WAYPOINT_ONLY_LABEL], "true");
        assert!(!config.waypoint_only_default);
        let on = KubeOptions {
            waypoint_only_default: true,
            ..opts()
        };
        assert!(build_config(&objects, &on).0.waypoint_only_default);
    }
}
