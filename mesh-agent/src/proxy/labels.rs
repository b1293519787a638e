//! Istio metric labels for one connection, from whatever the proxy knows about both ends, and
//! the `baggage` that describes a workload to an HBONE peer.
use super::hbone::Baggage;
use crate::identity::Identity;
use crate::model::Workload;
use crate::state::Service;
use crate::telemetry::ConnLabels;

const UNKNOWN: &str = "unknown";

/// The cluster name in `baggage` (`k8s.cluster.name`): the agent has no setting for it, so it
/// sends Istio's default cluster ID, which is also what ztunnel sends for a workload whose
/// cluster istiod left unset.
pub const CLUSTER_NAME: &str = "Kubernetes";

/// Who is on each end of a connection.
pub struct Ends<'a> {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub src: Option<&'a Workload>,
    pub src_identity: Option<&'a Identity>,
    pub dst: Option<&'a Workload>,
    pub dst_identity: Option<&'a Identity>,
    pub service: Option<&'a Service>,
    /// What the source said about itself (the request's `baggage`): for a source this agent
    /// does not know, its `k8s.<kind>.name`, `k8s.namespace.name` and `service.name` are the
    /// `source_workload`, `source_workload_namespace` and `source_app`, as ztunnel reports an
    /// unknown source's workload and namespace from its baggage (ztunnel too prefers its own view
    /// of a source it knows over the baggage).
    pub src_baggage: Option<&'a Baggage>,
    pub mtls: bool,
}

/// A workload's `app` label (else `app.kubernetes.io/name`), as Istio's `*_app` labels.
pub fn app(w: &Workload) -> String {
    w.labels
        .get("app")
        .or_else(|| w.labels.get("app.kubernetes.io/name"))
        .cloned()
        .unwrap_or_else(|| UNKNOWN.into())
}

/// A workload's `baggage`, as ztunnel describes a workload of kind pod: cluster, namespace,
/// `k8s.pod.name` and Istio's canonical service and revision from its labels. The model's
/// workloads are pods without owners; Istio gives a pod the kind `pod` and the pod's own name
/// unless a Deployment, Job or CronJob owns it (so a bare pod, or a StatefulSet's or
/// DaemonSet's, is sent exactly like this).
pub fn workload_baggage(w: &Workload) -> Baggage {
    Baggage {
        cluster: Some(CLUSTER_NAME.to_string()),
        namespace: Some(w.namespace.clone()),
        workload_kind: Some("pod".to_string()),
        workload_name: Some(w.name.clone()),
        service_name: Some(canonical_name(w)),
        service_version: Some(canonical_revision(w)),
        region: None,
        zone: None,
    }
}

/// Istio's canonical service of a workload: the first of the labels
/// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the workload's name.
pub fn canonical_name(w: &Workload) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|l| w.labels.get(*l))
    .unwrap_or(&w.name)
    .clone()
}

/// Istio's canonical revision of a workload: the first of the labels
/// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else `latest`.
pub fn canonical_revision(w: &Workload) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|l| w.labels.get(*l))
    .map_or_else(|| "latest".to_string(), Clone::clone)
}

/// A Kubernetes object name (a DNS subdomain), for `Option::filter`.
fn k8s_name(v: &&str) -> bool {
    crate::model::is_dns_subdomain(v)
}

fn or_unknown<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| UNKNOWN.to_string(), f)
}

impl Ends<'_> {
    pub fn labels(&self) -> ConnLabels {
        ConnLabels {
            reporter: self.reporter,
            // An unknown source is named by its baggage (as ztunnel does), but only with values
            // shaped like Kubernetes names (no free text in label values, bounded series), and
            // its namespace comes from its certificate when it has one: a peer cannot report
            // its traffic as another namespace's.
            source_workload: match (self.src, self.src_baggage) {
                (None, Some(b)) => {
                    or_unknown(b.workload_name.as_deref().filter(k8s_name), str::to_string)
                }
                (src, _) => or_unknown(src, |w| w.name.clone()),
            },
            source_workload_namespace: match (self.src, self.src_identity, self.src_baggage) {
                (Some(w), _, _) => w.namespace.clone(),
                (None, Some(id), _) => id.namespace.clone(),
                (None, None, b) => or_unknown(
                    b.and_then(|b| b.namespace.as_deref()).filter(k8s_name),
                    str::to_string,
                ),
            },
            source_app: match (self.src, self.src_baggage) {
                (None, Some(b)) => {
                    or_unknown(b.service_name.as_deref().filter(k8s_name), str::to_string)
                }
                (src, _) => or_unknown(src, app),
            },
            source_principal: or_unknown(self.src_identity, |i| i.to_string()),
            destination_workload: or_unknown(self.dst, |w| w.name.clone()),
            destination_workload_namespace: or_unknown(self.dst, |w| w.namespace.clone()),
            destination_app: or_unknown(self.dst, app),
            destination_principal: or_unknown(self.dst_identity, |i| i.to_string()),
            destination_service: or_unknown(self.service, Service::hostname),
            destination_service_name: or_unknown(self.service, |s| s.spec.name.clone()),
            destination_service_namespace: or_unknown(self.service, |s| s.spec.namespace.clone()),
            request_protocol: "tcp",
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: "web-7d9f".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "n1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            netns: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            enrolled: true,
        }
    }

    #[test]
    fn canonical_service_and_revision_follow_istio() {
        let bare = pod(&[]);
        assert_eq!(canonical_name(&bare), "web-7d9f");
        assert_eq!(canonical_revision(&bare), "latest");
        let app = pod(&[("app", "web"), ("version", "v1")]);
        assert_eq!(
            (canonical_name(&app), canonical_revision(&app)),
            ("web".into(), "v1".into())
        );
        let all = pod(&[
            ("app", "a"),
            ("app.kubernetes.io/name", "k"),
            ("service.istio.io/canonical-name", "c"),
            ("version", "v1"),
            ("app.kubernetes.io/version", "k1"),
            ("service.istio.io/canonical-revision", "c1"),
        ]);
        assert_eq!(
            (canonical_name(&all), canonical_revision(&all)),
            ("c".into(), "c1".into())
        );
        let k8s = pod(&[
            ("app", "a"),
            ("app.kubernetes.io/name", "k"),
            ("version", "v1"),
            ("app.kubernetes.io/version", "k1"),
        ]);
        assert_eq!(
            (canonical_name(&k8s), canonical_revision(&k8s)),
            ("k".into(), "k1".into())
        );
    }

    #[test]
    fn a_workloads_baggage_is_what_ztunnel_sends_for_a_pod() {
        assert_eq!(
            workload_baggage(&pod(&[("app", "web"), ("version", "v1")])).header_value(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-7d9f,\
             service.name=web,service.version=v1"
        );
        assert_eq!(
            workload_baggage(&pod(&[])).header_value(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-7d9f,\
             service.name=web-7d9f,service.version=latest"
        );
    }
}
