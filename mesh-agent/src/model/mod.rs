//! The mesh as data: namespaces, workloads, services, policy documents, Gateway API HTTPRoutes
//! (`route`). Config sources (the YAML file, the Kubernetes API) build a [`Mesh`]; `state`
//! indexes it into the snapshot the rest of the agent reads. A leaf: nothing here depends on
//! another module of this crate, does I/O or knows where the data came from. See ARCHITECTURE.md.
// First: its `refuse_field!` macro is used by the Istio documents' modules below.
#[macro_use]
pub mod networking;

pub mod destination_rule;
mod mesh;
pub mod policy;
pub mod route;
mod service;
mod validate;
pub mod virtual_service;
pub mod waypoint;
pub mod waypoint_only;
mod workload;

pub use mesh::{Mesh, DEFAULT_ROOT_NAMESPACE};
pub use service::{EjectionPolicy, LoadBalancing, PortProtocol, Service, ServicePort};
pub use validate::{is_dns_label, is_dns_subdomain, FieldError};
pub use waypoint::{UseWaypoint, Waypoint, WaypointFor};
pub use workload::{is_enrolled, Namespace, Workload, DATAPLANE_MODE_LABEL};
