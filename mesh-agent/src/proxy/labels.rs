//! Istio metric labels for one connection, from whatever the proxy knows about both ends.
use crate::identity::Identity;
use crate::model::Workload;
use crate::state::Service;
use crate::telemetry::ConnLabels;

const UNKNOWN: &str = "unknown";

/// Who is on each end of a connection.
pub struct Ends<'a> {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub src: Option<&'a Workload>,
    pub src_identity: Option<&'a Identity>,
    pub dst: Option<&'a Workload>,
    pub dst_identity: Option<&'a Identity>,
    pub service: Option<&'a Service>,
    pub mtls: bool,
}

fn app(w: &Workload) -> String {
    w.labels
        .get("app")
        .or_else(|| w.labels.get("app.kubernetes.io/name"))
        .cloned()
        .unwrap_or_else(|| UNKNOWN.into())
}

fn or_unknown<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| UNKNOWN.to_string(), f)
}

impl Ends<'_> {
    pub fn labels(&self) -> ConnLabels {
        ConnLabels {
            reporter: self.reporter,
            source_workload: or_unknown(self.src, |w| w.name.clone()),
            source_workload_namespace: or_unknown(self.src, |w| w.namespace.clone()),
            source_app: or_unknown(self.src, app),
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
