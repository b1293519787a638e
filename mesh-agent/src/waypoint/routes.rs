//! Which `HTTPRoute`s a waypoint applies to a request, after Gateway API's mesh attachment
//! (GAMMA, v1.4.1 standard channel): a route whose `parentRefs` name a Service (`group: ""`,
//! `kind: Service`) applies to requests for that Service, on every port, or on the one port
//! named by `port` or by `sectionName` (the Service port's name); a route whose `parentRefs`
//! name this waypoint's Gateway applies to every Service the waypoint fronts that has no route
//! of its own. Without any, a request goes to the Service it was sent to.
//!
//! Istio `VirtualService`s apply to the Services their `hosts` name, on every port, merged as
//! Istio merges them (see `routing::virtual_service`), unless an HTTPRoute is attached to the
//! Service (on any port): then, as in Istio, the HTTPRoutes win and the VirtualServices are not
//! used for it, with a warning naming both. A Service's HTTPRoutes come first, then its
//! VirtualServices, then the waypoint's HTTPRoutes.
//!
//! Routes are compiled once per state snapshot ([`RouteCache`]), not per request.
//!
//! Not supported, and reported (logged when the snapshot is compiled; the route does not
//! attach): a Service parent in another namespace than the route's (a "consumer route"), a
//! `sectionName` or `port` on a waypoint Gateway parent (a waypoint has no listeners to name), a
//! route of another namespace naming the waypoint (Gateway API's default `allowedRoutes`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::model::networking::ServiceRef;
use crate::model::route::{HttpRoute, ParentReference};
use crate::model::virtual_service::VirtualService;
use crate::state::{Service, State};

use super::routing::{virtual_service, RouteTable};

/// The compiled routes of one snapshot, for one waypoint.
#[derive(Debug, Default)]
pub struct Routes {
    /// By (`namespace/name`, port) of a Service.
    services: HashMap<(String, u16), Arc<RouteTable>>,
    /// Routes attached to the waypoint itself.
    waypoint: Option<Arc<RouteTable>>,
    /// What could not be attached, for the log.
    pub warnings: Vec<String>,
}

impl Routes {
    /// Compiles the routes of `state` that apply at the waypoint `waypoint` (`namespace/name`).
    pub fn build(state: &State, waypoint: &str) -> Routes {
        let mut by_port: HashMap<(String, u16), Vec<HttpRoute>> = HashMap::new();
        let mut own = Vec::new();
        let mut warnings = Vec::new();
        for route in &state.routes {
            let mut attached = false;
            for (i, parent) in route.spec.parent_refs.iter().enumerate() {
                let field = format!("HTTPRoute {} spec.parentRefs[{i}]", route.key());
                let namespace = parent
                    .namespace
                    .as_deref()
                    .unwrap_or(&route.metadata.namespace);
                if is_service(parent) {
                    if namespace != route.metadata.namespace {
                        warnings.push(format!(
                            "{field}: a route for a Service of another namespace (a consumer \
                             route) is not supported; it does not attach"
                        ));
                        continue;
                    }
                    let key = format!("{namespace}/{}", parent.name);
                    let Some(service) = state.services.get(&key) else {
                        continue;
                    };
                    for port in ports(service, parent) {
                        let routes = by_port.entry((key.clone(), port)).or_default();
                        if !routes.iter().any(|r| r.key() == route.key()) {
                            routes.push(route.clone());
                        }
                    }
                } else if is_gateway(parent) && format!("{namespace}/{}", parent.name) == waypoint {
                    if namespace != route.metadata.namespace {
                        warnings.push(format!(
                            "{field}: the waypoint takes routes of its own namespace only; it \
                             does not attach"
                        ));
                        continue;
                    }
                    if parent.section_name.is_some() || parent.port.is_some() {
                        warnings.push(format!(
                            "{field}: a waypoint has no listeners to name: sectionName and port \
                             are not supported on its parentRef; it does not attach"
                        ));
                        continue;
                    }
                    if !attached {
                        own.push(route.clone());
                        attached = true;
                    }
                }
            }
        }
        let mut services: HashMap<(String, u16), Arc<RouteTable>> = by_port
            .into_iter()
            .map(|(key, routes)| (key, Arc::new(RouteTable::new(&routes))))
            .collect();
        for (key, tables) in virtual_service_tables(state, &services, &mut warnings) {
            services.insert(key, tables);
        }
        Routes {
            services,
            waypoint: (!own.is_empty()).then(|| Arc::new(RouteTable::new(&own))),
            warnings,
        }
    }

    /// The routes for a request to `service` on `port`: its own HTTPRoutes, else its
    /// VirtualServices, else the waypoint's HTTPRoutes; `None`: no route applies, the request
    /// goes to the service as sent.
    pub fn for_service(&self, service: &Service, port: u16) -> Option<&Arc<RouteTable>> {
        self.services
            .get(&(service.key(), port))
            .or(self.waypoint.as_ref())
    }
}

/// The tables compiled from the VirtualServices of each Service without HTTPRoutes, per
/// service port (a port none of whose rules applies gets none). `http_routes` are the HTTPRoute
/// tables by Service and port.
fn virtual_service_tables(
    state: &State,
    http_routes: &HashMap<(String, u16), Arc<RouteTable>>,
    warnings: &mut Vec<String>,
) -> Vec<((String, u16), Arc<RouteTable>)> {
    let mut by_service: HashMap<String, Vec<&VirtualService>> = HashMap::new();
    for vs in &state.virtual_services {
        for service in vs.services() {
            let key = service.key();
            if !state.services.contains_key(&key) {
                continue;
            }
            // Only the Service's own namespace steers its traffic at the waypoint: a
            // VirtualService elsewhere would re-route every client of another team's Service.
            if key.split_once('/').map(|(ns, _)| ns) != Some(vs.metadata.namespace.as_str()) {
                warnings.push(format!(
                    "VirtualService {} is not applied to Service {key}: a waypoint applies only \
                     the VirtualServices of the Service's own namespace",
                    vs.key()
                ));
                continue;
            }
            let mut attached: Vec<String> = http_routes
                .iter()
                .filter(|((service, _), _)| *service == key)
                .flat_map(|(_, table)| table.routes().iter().map(|r| r.key().to_string()))
                .collect();
            if !attached.is_empty() {
                attached.sort();
                attached.dedup();
                warnings.push(format!(
                    "VirtualService {} is not applied to Service {key}: HTTPRoute {} is attached \
                     to it, and a Service's HTTPRoutes take precedence over VirtualServices (as \
                     in Istio)",
                    vs.key(),
                    attached.join(", HTTPRoute ")
                ));
                continue;
            }
            by_service.entry(key).or_default().push(vs);
        }
    }
    let only_port = |service: &ServiceRef| {
        let ports = &state.services.get(&service.key())?.spec.ports;
        (ports.len() == 1).then(|| ports[0].port)
    };
    let mut tables = Vec::new();
    for (key, virtual_services) in by_service {
        for port in &state.services[&key].spec.ports {
            let mut found = Vec::new();
            let table =
                virtual_service::compile(&virtual_services, port.port, &only_port, &mut found);
            for warning in found {
                if !warnings.contains(&warning) {
                    warnings.push(warning);
                }
            }
            if !table.is_empty() {
                tables.push(((key.clone(), port.port), Arc::new(table)));
            }
        }
    }
    tables
}

fn is_service(parent: &ParentReference) -> bool {
    parent.group.is_empty() && parent.kind == "Service"
}

fn is_gateway(parent: &ParentReference) -> bool {
    parent.group == "gateway.networking.k8s.io" && parent.kind == "Gateway"
}

/// The service ports a Service parentRef selects.
fn ports<'s>(service: &'s Service, parent: &'s ParentReference) -> impl Iterator<Item = u16> + 's {
    service
        .spec
        .ports
        .iter()
        .filter(move |p| parent.port.is_none_or(|port| port == p.port))
        .filter(move |p| {
            parent
                .section_name
                .as_ref()
                .is_none_or(|name| p.name.as_ref() == Some(name))
        })
        .map(|p| p.port)
}

/// The routes of the current snapshot, compiled when the snapshot changes.
pub struct RouteCache {
    waypoint: String,
    /// The snapshot the routes were compiled from (kept, so its address is not reused).
    current: Mutex<(Arc<State>, Arc<Routes>)>,
}

impl RouteCache {
    pub fn new(waypoint: String) -> RouteCache {
        RouteCache {
            waypoint,
            current: Mutex::new((Arc::default(), Arc::default())),
        }
    }

    /// The routes compiled from `state`, the snapshot a request started with; `latest` is the
    /// proxy's current one. Only the latest snapshot replaces the cached routes (and has their
    /// warnings logged): a request that started just before a change gets its own snapshot's
    /// routes compiled for it alone, so requests on both sides of a change cannot make the
    /// cache flip between them.
    pub fn get(&self, state: &Arc<State>, latest: impl FnOnce() -> Arc<State>) -> Arc<Routes> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&current.0, state) {
            return current.1.clone();
        }
        if !Arc::ptr_eq(state, &latest()) {
            drop(current);
            return Arc::new(Routes::build(state, &self.waypoint));
        }
        let routes = Routes::build(state, &self.waypoint);
        for warning in &routes.warnings {
            tracing::warn!(waypoint = %self.waypoint, "{warning}");
        }
        *current = (state.clone(), Arc::new(routes));
        current.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::route::parse_routes;

    const MESH: &str = "
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], endpoints: [a],
      ports: [{ port: 80, name: http }, { port: 9090, name: metrics }] }
  - { name: api, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80 }], endpoints: [a] }
workloads:
  - { name: a, namespace: shop, node: n, ips: [10.0.0.1] }
";

    fn state(routes: &str) -> State {
        state_with(routes, "")
    }

    fn state_with(routes: &str, virtual_services: &str) -> State {
        let mut mesh = crate::config::parse(std::path::Path::new("t.yaml"), MESH).unwrap();
        mesh.routes = parse_routes(routes).unwrap();
        mesh.virtual_services =
            crate::model::virtual_service::parse_virtual_services(virtual_services).unwrap();
        State::from_mesh(&mesh, "n")
    }

    /// A VirtualService `shop/name` for `hosts`, created at `created` if given, with one rule
    /// named after it.
    fn virtual_service(name: &str, created: Option<&str>, hosts: &str) -> String {
        let created = created
            .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: \
             {name}\n  namespace: shop\n{created}spec:\n  hosts: {hosts}\n  http:\n  - name: \
             {name}\n    route: [{{destination: {{host: api}}}}]\n---\n"
        )
    }

    fn route(name: &str, namespace: &str, parents: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{ name: {name}, namespace: {namespace} }}\n\
             spec:\n  parentRefs: {parents}\n  rules: [{{ backendRefs: [{{ name: api, port: 80 }}] }}]\n---\n"
        )
    }

    fn names(routes: &Routes, state: &State, service: &str, port: u16) -> Vec<String> {
        routes
            .for_service(&state.services[service], port)
            .map(|t| t.routes().iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn service_routes_attach_by_port_and_section_name() {
        let text = [
            route("all", "shop", "[{ group: '', kind: Service, name: web }]"),
            route(
                "p80",
                "shop",
                "[{ group: '', kind: Service, name: web, port: 80 }]",
            ),
            route(
                "metrics",
                "shop",
                "[{ group: '', kind: Service, name: web, sectionName: metrics }]",
            ),
            route(
                "gone",
                "shop",
                "[{ group: '', kind: Service, name: nothing }]",
            ),
        ]
        .concat();
        let state = state(&text);
        let routes = Routes::build(&state, "shop/wp");
        assert_eq!(names(&routes, &state, "shop/web", 80), ["all", "p80"]);
        assert_eq!(names(&routes, &state, "shop/web", 9090), ["all", "metrics"]);
        assert!(names(&routes, &state, "shop/api", 80).is_empty());
        assert!(routes.warnings.is_empty(), "{:?}", routes.warnings);
    }

    #[test]
    fn waypoint_routes_apply_where_a_service_has_none() {
        let text = [
            route("own", "shop", "[{ group: '', kind: Service, name: web }]"),
            route("wide", "shop", "[{ name: wp }]"),
            route("other-waypoint", "shop", "[{ name: wp2 }]"),
        ]
        .concat();
        let state = state(&text);
        let routes = Routes::build(&state, "shop/wp");
        assert_eq!(names(&routes, &state, "shop/web", 80), ["own"]);
        assert_eq!(names(&routes, &state, "shop/api", 80), ["wide"]);
    }

    #[test]
    fn unsupported_attachments_are_reported_and_do_not_attach() {
        let text = [
            route(
                "consumer",
                "other",
                "[{ group: '', kind: Service, name: web, namespace: shop }]",
            ),
            route("listener", "shop", "[{ name: wp, sectionName: http }]"),
            route("elsewhere", "other", "[{ name: wp, namespace: shop }]"),
        ]
        .concat();
        let state = state(&text);
        let routes = Routes::build(&state, "shop/wp");
        assert!(names(&routes, &state, "shop/web", 80).is_empty());
        assert!(names(&routes, &state, "shop/api", 80).is_empty());
        assert_eq!(routes.warnings.len(), 3, "{:?}", routes.warnings);
        assert!(routes.warnings[0].starts_with(
            "HTTPRoute other/consumer spec.parentRefs[0]: a route for a Service of another \
             namespace"
        ));
        assert!(routes.warnings[1].contains("HTTPRoute shop/listener spec.parentRefs[0]"));
        assert!(routes.warnings[2].contains("HTTPRoute other/elsewhere spec.parentRefs[0]"));
    }

    #[test]
    fn virtual_services_apply_on_every_port_merged_oldest_first() {
        let text = [
            virtual_service("newer", Some("2025-02-01T00:00:00Z"), "[web]"),
            virtual_service("older", Some("2025-01-01T00:00:00Z"), "[web, api]"),
        ]
        .concat();
        let state = state_with("", &text);
        let routes = Routes::build(&state, "shop/wp");
        assert_eq!(names(&routes, &state, "shop/web", 80), ["older", "newer"]);
        assert_eq!(names(&routes, &state, "shop/web", 9090), ["older", "newer"]);
        assert_eq!(names(&routes, &state, "shop/api", 80), ["older"]);
        let table = routes.for_service(&state.services["shop/web"], 80).unwrap();
        let request = http::Request::get("/").body(()).unwrap().into_parts().0;
        let chosen = table.select(&request).unwrap();
        assert_eq!(chosen.route.name, "older");
        assert_eq!(
            chosen.route.kind,
            super::super::routing::RouteKind::VirtualService
        );
        assert!(routes.warnings.is_empty(), "{:?}", routes.warnings);
    }

    #[test]
    fn an_http_route_of_the_service_wins_over_its_virtual_services_with_a_warning() {
        let http_routes = [
            route(
                "web-80",
                "shop",
                "[{ group: '', kind: Service, name: web, port: 80 }]",
            ),
            route("wide", "shop", "[{ name: wp }]"),
        ]
        .concat();
        let text = virtual_service("web-vs", None, "[web, api]");
        let state = state_with(&http_routes, &text);
        let routes = Routes::build(&state, "shop/wp");
        assert_eq!(names(&routes, &state, "shop/web", 80), ["web-80"]);
        // On its other port too the VirtualService is not used: the waypoint's routes apply.
        assert_eq!(names(&routes, &state, "shop/web", 9090), ["wide"]);
        // A Service without HTTPRoutes of its own: its VirtualService, before the waypoint's.
        assert_eq!(names(&routes, &state, "shop/api", 80), ["web-vs"]);
        assert_eq!(
            routes.warnings,
            [
                "VirtualService shop/web-vs is not applied to Service shop/web: HTTPRoute \
              shop/web-80 is attached to it, and a Service's HTTPRoutes take precedence over \
              VirtualServices (as in Istio)"
            ]
        );
    }

    /// The canary as operators write it: DestinationRule `reviews` with subsets v1 and v2, and
    /// VirtualService `reviews` sending 90 % to v1 and 10 % to v2.
    const CANARY: &str = "
services:
  - { name: reviews, namespace: shop, vips: [10.96.0.9], ports: [{ port: 9080 }],
      endpoints: [reviews-v1, reviews-v2] }
workloads:
  - { name: reviews-v1, namespace: shop, node: n, ips: [10.0.0.11], labels: { version: v1 } }
  - { name: reviews-v2, namespace: shop, node: n, ips: [10.0.0.12], labels: { version: v2 } }
virtualServices:
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: { name: reviews, namespace: shop }
    spec:
      hosts: [reviews]
      http:
        - route:
            - destination: { host: reviews, subset: v1 }
              weight: 90
            - destination: { host: reviews, subset: v2 }
              weight: 10
destinationRules:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: { name: reviews, namespace: shop }
    spec:
      host: reviews
      subsets:
        - { name: v1, labels: { version: v1 } }
        - { name: v2, labels: { version: v2 } }
";

    #[test]
    fn the_canary_sends_each_subset_its_share() {
        let mesh = crate::config::parse(std::path::Path::new("t.yaml"), CANARY).unwrap();
        let state = State::from_mesh(&mesh, "n");
        let routes = Routes::build(&state, "shop/wp");
        assert!(routes.warnings.is_empty(), "{:?}", routes.warnings);
        let table = routes
            .for_service(&state.services["shop/reviews"], 9080)
            .expect("the VirtualService applies");
        let request = http::Request::get("/reviews/1")
            .header("host", "reviews:9080")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let rule = table.select(&request).unwrap().rule;
        let mut picked = std::collections::BTreeMap::new();
        let n = 1000u64;
        for i in 0..n {
            let backend = rule.pick_backend((i << 32).div_ceil(n) as u32).unwrap();
            let reference = &backend.reference;
            assert_eq!(
                (reference.namespace.as_str(), reference.name.as_str()),
                ("shop", "reviews")
            );
            assert_eq!(reference.port, Some(9080));
            *picked.entry(reference.subset.clone().unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            picked.into_iter().collect::<Vec<_>>(),
            [("v1".to_string(), 900), ("v2".to_string(), 100)]
        );
        // Each subset names one of the DestinationRule's.
        let rule = state.destination_rule_for("shop/reviews").unwrap();
        let subsets: Vec<&str> = rule.spec.subsets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(subsets, ["v1", "v2"]);
    }

    #[test]
    fn the_cache_compiles_once_per_snapshot() {
        let cache = RouteCache::new("shop/wp".into());
        let one = Arc::new(state(&route("wide", "shop", "[{ name: wp }]")));
        let a = cache.get(&one, || one.clone());
        assert!(Arc::ptr_eq(&a, &cache.get(&one, || one.clone())));
        let two = Arc::new(state(""));
        let b = cache.get(&two, || two.clone());
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(b.for_service(&two.services["shop/api"], 80).is_none());
        // A request still on snapshot `one` after `two` came: its own routes, and the cache
        // keeps the latest.
        let stale = cache.get(&one, || two.clone());
        assert!(stale.for_service(&one.services["shop/api"], 80).is_some());
        assert!(Arc::ptr_eq(&b, &cache.get(&two, || two.clone())));
    }
}
