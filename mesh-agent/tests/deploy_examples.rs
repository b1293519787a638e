//! The Kubernetes manifests under deploy/ checked against the agent itself (the offline schema
//! checks are `cargo xtask validate-manifests`):
//!
//! * every policy in deploy/examples parses with the agent's own strict parser, warns about
//!   nothing, and decides what the example promises;
//! * the table of policy cases shared with the CRD validator (xtask/manifests/policy-cases.yaml)
//!   gets the verdicts it states from the agent's parsers (VirtualService and DestinationRule
//!   cases from their own readers);
//! * the traffic examples (deploy/examples/traffic) read with the agent's VirtualService and
//!   DestinationRule readers and mean what their comments say;
//! * the DaemonSet's command line is one `mesh-agent run` accepts, and its probes and Prometheus
//!   annotations name endpoints the agent serves.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use mesh_agent::cli::{explain, AfterHandover, Cli, Command, ExplainArgs};
use mesh_agent::model::destination_rule::parse_destination_rules;
use mesh_agent::model::policy::parse_documents;
use mesh_agent::model::virtual_service::parse_virtual_services;
use mesh_agent::model::DEFAULT_ROOT_NAMESPACE;
use mesh_agent::policy::PolicySet;
use mesh_agent::telemetry::{admin, Metrics, Readiness};
use serde_yaml_ng::{Mapping, Value};

const POLICY_KINDS: [&str; 2] = ["PeerAuthentication", "AuthorizationPolicy"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("mesh-agent is in the workspace")
        .to_path_buf()
}

fn read_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every document of deploy/examples (the kustomization itself aside).
fn example_documents() -> Vec<Value> {
    let dir = repo().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| read_documents(f)).collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> String {
    format!(
        "{} {}/{}",
        kind(doc),
        doc["metadata"]["namespace"].as_str().unwrap_or_default(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn yaml(doc: &Value) -> String {
    serde_yaml_ng::to_string(doc).expect("a YAML value serializes")
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    serde_yaml_ng::from_value(value.clone()).unwrap_or_default()
}

#[test]
fn example_policies_parse_with_the_agents_parser_and_warn_about_nothing() {
    let policies: Vec<Value> = example_documents()
        .into_iter()
        .filter(|d| POLICY_KINDS.contains(&kind(d)))
        .collect();
    let kinds: Vec<&str> = policies.iter().map(kind).collect();
    assert!(
        POLICY_KINDS.iter().all(|k| kinds.contains(k)),
        "deploy/examples should hold a PeerAuthentication and an AuthorizationPolicy, has {kinds:?}"
    );
    let mut parsed = Vec::new();
    for doc in &policies {
        let documents = parse_documents(&yaml(doc))
            .unwrap_or_else(|e| panic!("{}: mesh-agent rejects it: {e}", name(doc)));
        assert_eq!(documents.len(), 1, "{}", name(doc));
        parsed.extend(documents);
    }
    let (_, warnings) = PolicySet::new(&parsed, DEFAULT_ROOT_NAMESPACE);
    assert!(warnings.is_empty(), "the examples warn: {warnings:?}");
}

/// A file-mode config holding the example namespaces, one workload per example Deployment (plus a
/// `stranger` with the namespace's default service account) and the example policies.
fn example_config() -> (String, u16) {
    let docs = example_documents();
    let namespaces: Vec<Value> = docs
        .iter()
        .filter(|d| kind(d) == "Namespace")
        .map(|d| {
            let mut ns = Mapping::new();
            ns.insert("name".into(), d["metadata"]["name"].clone());
            ns.insert("labels".into(), d["metadata"]["labels"].clone());
            Value::Mapping(ns)
        })
        .collect();
    let mut workloads = Vec::new();
    let mut server_port = None;
    for (i, d) in docs.iter().filter(|d| kind(d) == "Deployment").enumerate() {
        let pod = &d["spec"]["template"];
        let workload = serde_yaml_ng::to_value(BTreeMap::from([
            ("name", Value::from(d["metadata"]["name"].as_str().unwrap())),
            ("namespace", d["metadata"]["namespace"].clone()),
            ("serviceAccount", pod["spec"]["serviceAccountName"].clone()),
            ("node", Value::from("node1")),
            ("ips", Value::from(vec![format!("10.0.0.{}", i + 2)])),
            ("labels", pod["metadata"]["labels"].clone()),
        ]))
        .unwrap();
        if d["metadata"]["name"] == "server" {
            server_port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok());
        }
        workloads.push(workload);
    }
    workloads.push(
        serde_yaml_ng::from_str(
            "{name: stranger, namespace: demo, node: node1, ips: [10.0.0.99], \
             labels: {app: stranger}}",
        )
        .unwrap(),
    );
    let policies: Vec<Value> = docs
        .into_iter()
        .filter(|d| POLICY_KINDS.contains(&kind(d)))
        .collect();
    let config = serde_yaml_ng::to_value(BTreeMap::from([
        ("namespaces", Value::from(namespaces)),
        ("workloads", Value::from(workloads)),
        ("policies", Value::from(policies)),
    ]))
    .unwrap();
    (
        yaml(&config),
        server_port.expect("the example server Deployment declares its containerPort"),
    )
}

#[test]
fn example_policies_decide_what_the_example_promises() {
    let (config, port) = example_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, &config).unwrap();
    let decide = |from: &str, to: &str, plaintext: bool| {
        let text = explain::explain(&ExplainArgs {
            config: path.clone(),
            from: from.to_string(),
            to: to.to_string(),
            plaintext,
            trust_domain: "cluster.local".to_string(),
            method: None,
            path: None,
            host: None,
            headers: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("explain {from} -> {to}: {e:#}\nconfig:\n{config}"));
        text.lines()
            .find_map(|l| l.strip_prefix("decision:"))
            .map(|d| d.trim().to_string())
            .unwrap_or_else(|| panic!("no decision in:\n{text}"))
    };
    let server = format!("demo/server:{port}");
    let cases = [
        ("demo/client", server.as_str(), false, "ALLOW"),
        ("demo/client", server.as_str(), true, "DENY"), // STRICT: plaintext refused
        ("demo/stranger", server.as_str(), false, "DENY"), // not the client's identity
        ("demo/client", "demo/server:9090", false, "DENY"), // only the server's port
        ("demo/server", "demo/client:8080", false, "ALLOW"), // no ALLOW policy for the client
        ("demo/server", "demo/client:8080", true, "DENY"), // STRICT for the whole namespace
    ];
    let mut wrong = Vec::new();
    for (from, to, plaintext, expected) in cases {
        let got = decide(from, to, plaintext);
        if got != expected {
            wrong.push(format!(
                "{from} -> {to}{}: {got}, expected {expected}",
                if plaintext { " (plaintext)" } else { "" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn policy_cases_get_the_agent_verdicts_the_table_states() {
    let path = repo().join("xtask/manifests/policy-cases.yaml");
    let table = read_documents(&path).remove(0);
    let cases = table["cases"].as_sequence().expect("cases: a list");
    assert!(cases.len() > 10, "the table is too small to mean much");
    let mut wrong = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let expected = case["agent"].as_str().unwrap_or("?");
        let text = yaml(&case["doc"]);
        // The networking kinds have readers of their own; their result is counted the same way.
        let result = match kind(&case["doc"]) {
            "VirtualService" => parse_virtual_services(&text).map(|v| v.len()),
            "DestinationRule" => parse_destination_rules(&text).map(|v| v.len()),
            _ => parse_documents(&text).map(|docs| {
                // Building the model must not fail either.
                let _ = PolicySet::new(&docs, DEFAULT_ROOT_NAMESPACE);
                docs.len()
            }),
        };
        match (expected, &result) {
            ("accept", Ok(1)) => {}
            ("reject", Err(e)) => {
                if let Some(part) = case["agentError"].as_str() {
                    if !e.contains(part) {
                        wrong.push(format!("{name}: rejected, but not for {part:?}: {e}"));
                    }
                }
            }
            _ => wrong.push(format!("{name}: expected {expected}, got {result:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The mesh-agent container of the DaemonSet.
fn agent_container() -> Value {
    daemonset()["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "mesh-agent"))
        .cloned()
        .expect("a container named mesh-agent")
}

fn strings(value: &Value) -> Vec<String> {
    serde_yaml_ng::from_value(value.clone()).unwrap_or_default()
}

/// The port a probe of the container targets (a number: the DaemonSet declares no ports).
fn probe_port(container: &Value, probe: &str) -> u16 {
    container[probe]["httpGet"]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("{probe}: httpGet.port is not a port number"))
}

fn daemonset() -> Value {
    read_documents(&repo().join("deploy/agent/daemonset.yaml"))
        .into_iter()
        .find(|d| kind(d) == "DaemonSet")
        .expect("a DaemonSet in deploy/agent/daemonset.yaml")
}

#[test]
fn daemonset_command_line_is_one_mesh_agent_run_accepts() {
    let container = agent_container();
    let mut argv = strings(&container["command"]);
    argv.extend(
        strings(&container["args"])
            .into_iter()
            .map(|a| a.replace("$(NODE_NAME)", "node-a")),
    );
    assert_eq!(
        argv.get(..2),
        Some(&["mesh-agent".to_string(), "run".to_string()][..])
    );

    // Every flag first, so one run names all the missing ones.
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("a run subcommand");
    let known: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    let unknown: Vec<&str> = argv[2..]
        .iter()
        .filter_map(|a| a.split('=').next())
        .filter(|flag| flag.starts_with("--") && !known.iter().any(|k| k == flag))
        .collect();
    assert!(
        unknown.is_empty(),
        "deploy/agent/daemonset.yaml passes flags `mesh-agent run` does not have: {}",
        unknown.join(", ")
    );

    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("mesh-agent rejects the DaemonSet's command line: {e}"));
    let Command::Run(args) = cli.command else {
        panic!("{argv:?} is not `mesh-agent run`");
    };
    // The ports the DaemonSet probes and scrapes are the ones the agent listens on.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(args.readiness_addr.port(), probe_port(&container, probe));
    }
    let annotations = string_map(&daemonset()["spec"]["template"]["metadata"]["annotations"]);
    assert_eq!(
        annotations["prometheus.io/port"],
        args.metrics_addr.port().to_string()
    );

    // A hitless rollout: the new pod starts next to the old one (surge), which hands over,
    // drains within the grace period, then waits for its SIGTERM instead of exiting (the kubelet
    // would restart the old version).
    let ds = daemonset();
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "{rolling:?}");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "{rolling:?}");
    assert_eq!(args.after_handover, AfterHandover::Wait);
    let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > args.drain_timeout_secs,
        "grace {grace} s must cover the {} s drain",
        args.drain_timeout_secs
    );
    // Declared ports would be host ports (hostNetwork) and keep the surge pod off the node.
    assert!(
        container["ports"].is_null(),
        "the agent container declares ports: a surge pod could not be scheduled"
    );
}

#[test]
fn daemonset_probes_and_scrape_annotations_name_served_endpoints() {
    let container = agent_container();
    let readiness = admin::readiness_routes(Arc::new(Readiness::default()));
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let path = get["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe}: no httpGet.path"));
        // Not ready yet (503) is fine; a path the agent does not serve (404) is not.
        let (status, _, body) = readiness(path);
        assert_ne!(status.as_u16(), 404, "{probe} {path}: {body}");
    }

    let annotations = string_map(&daemonset()["spec"]["template"]["metadata"]["annotations"]);
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    let metrics = admin::metrics_routes(Arc::new(Metrics::new()));
    let (status, _, _) = metrics(&annotations["prometheus.io/path"]);
    assert_eq!(status.as_u16(), 200, "the scrape path is served");
}

/// Every document of the waypoint example (deploy/examples/waypoint).
fn waypoint_example() -> Vec<Value> {
    let dir = repo().join("deploy/examples/waypoint");
    ["gateway.yaml", "waypoint.yaml", "rbac.yaml", "route.yaml"]
        .iter()
        .flat_map(|f| read_documents(&dir.join(f)))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == kind_ && d["metadata"]["name"] == name_)
        .unwrap_or_else(|| panic!("no {kind_} {name_} in deploy/examples/waypoint"))
}

#[test]
fn waypoint_example_is_a_waypoint_the_agents_recognise_with_a_route_they_read() {
    use mesh_agent::model::route::parse_routes;
    use mesh_agent::model::waypoint::{GatewayDocument, GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL};

    let docs = waypoint_example();
    let gateway: GatewayDocument =
        serde_yaml_ng::from_value(find(&docs, "Gateway", "waypoint").clone()).unwrap();
    let waypoint = gateway.waypoint().unwrap().expect("class istio-waypoint");
    assert!(waypoint.waypoint_for.takes_services());

    // The pods: the label and the service account the model requires.
    let deployment = find(&docs, "Deployment", &waypoint.name);
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"][GATEWAY_NAME_LABEL].as_str(),
        Some(waypoint.name.as_str())
    );
    assert_eq!(
        pod["spec"]["serviceAccountName"].as_str(),
        Some(waypoint.name.as_str())
    );
    find(&docs, "ServiceAccount", &waypoint.name);
    let service = find(&docs, "Service", &waypoint.name);
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(15008));

    // The command line is `mesh-agent waypoint` in Kubernetes mode; what it takes from the
    // environment is set by the container (the Gateway's name literally, the rest by the
    // downward API).
    let container = &pod["spec"]["containers"][0];
    let mut argv = strings(&container["command"]);
    argv.extend(strings(&container["args"]));
    let cli = Cli::try_parse_from(argv.iter().chain(&[
        "--name".to_string(),
        waypoint.name.clone(),
        "--pod".to_string(),
        "waypoint-1".to_string(),
    ]))
    .unwrap_or_else(|e| panic!("mesh-agent rejects the waypoint's command line: {e}"));
    let Command::Waypoint(args) = cli.command else {
        panic!("{argv:?} is not `mesh-agent waypoint`");
    };
    assert!(args.config.is_none(), "Kubernetes mode");
    let env: BTreeMap<String, Value> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    let cli = Cli::command();
    let sub = cli.find_subcommand("waypoint").unwrap();
    for id in ["name", "pod", "namespace", "node"] {
        let arg = sub.get_arguments().find(|a| a.get_id() == id).unwrap();
        let var = arg.get_env().expect("read from the environment");
        let var = var.to_str().unwrap();
        assert!(env.contains_key(var), "the container does not set {var}");
    }
    assert_eq!(
        env["GATEWAY_NAME"]["value"].as_str(),
        Some(waypoint.name.as_str())
    );

    // The route: read by the strict parser, 90/10, attached to a Service that uses the waypoint.
    let route = find(&docs, "HTTPRoute", "shop");
    let routes = parse_routes(&serde_yaml_ng::to_string(route).unwrap()).unwrap();
    let weights: Vec<u32> = routes[0].spec.rules[0]
        .backend_refs
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(weights, [90, 10]);
    let parent = &routes[0].spec.parent_refs[0];
    assert_eq!(
        (parent.group.as_str(), parent.kind.as_str()),
        ("", "Service")
    );
    let shop = find(&docs, "Service", &parent.name);
    assert_eq!(
        shop["metadata"]["labels"][USE_WAYPOINT_LABEL].as_str(),
        Some(waypoint.name.as_str())
    );
    for backend in &routes[0].spec.rules[0].backend_refs {
        find(&docs, "Service", &backend.backend.name);
    }
}

/// The traffic examples (deploy/examples/traffic) read with the agent's own strict readers and
/// say what their comments promise.
#[test]
fn traffic_examples_read_with_the_agents_readers_and_mean_what_they_say() {
    use mesh_agent::model::virtual_service::AbortError;
    let dir = repo().join("deploy/examples/traffic");
    let mut virtual_services = Vec::new();
    let mut destination_rules = Vec::new();
    for file in [
        "canary",
        "retries-timeout",
        "fault-injection",
        "circuit-breaker",
    ] {
        for doc in read_documents(&dir.join(format!("{file}.yaml"))) {
            let text = yaml(&doc);
            match kind(&doc) {
                "VirtualService" => virtual_services.extend(
                    parse_virtual_services(&text).unwrap_or_else(|e| panic!("{file}: {e}")),
                ),
                "DestinationRule" => destination_rules.extend(
                    parse_destination_rules(&text).unwrap_or_else(|e| panic!("{file}: {e}")),
                ),
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
    }
    let vs = |name: &str| {
        virtual_services
            .iter()
            .find(|v| v.metadata.name == name)
            .unwrap_or_else(|| panic!("no VirtualService {name}"))
    };
    let dr = |name: &str| {
        destination_rules
            .iter()
            .find(|r| r.metadata.name == name)
            .unwrap_or_else(|| panic!("no DestinationRule {name}"))
    };
    // The canary: subsets v1 and v2 by `version`, 90/10.
    let reviews = dr("reviews");
    assert_eq!(reviews.service().unwrap().key(), "demo/reviews");
    for v in ["v1", "v2"] {
        assert_eq!(reviews.subset(v).unwrap().labels["version"], v);
    }
    let split: Vec<(Option<&str>, u32)> = vs("reviews").spec.http[0]
        .route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, [(Some("v1"), 90), (Some("v2"), 10)]);
    // Retries and a timeout.
    let ratings = &vs("ratings").spec.http[0];
    assert_eq!(ratings.timeout, Some(std::time::Duration::from_secs(10)));
    let retries = ratings.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.per_try_timeout),
        (3, Some(std::time::Duration::from_secs(2)))
    );
    // Faults: jason always delayed 7 s, 10 % of the others aborted with 503.
    let details = &vs("details").spec.http;
    let delay = details[0].fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!(
        (delay.share(), delay.fixed_delay),
        (1.0, std::time::Duration::from_secs(7))
    );
    let abort = details[1].fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!(
        (abort.share(), abort.error),
        (0.1, AbortError::HttpStatus(503))
    );
    // The circuit breaker.
    let policy = dr("ratings").effective_policy(None, Some(9080));
    let pool = policy.connection_pool.unwrap();
    assert_eq!(pool.tcp.unwrap().max_connections(), 100);
    assert_eq!(pool.http.unwrap().http1_max_pending_requests(), 10);
    let outlier = policy.outlier_detection.unwrap();
    assert_eq!(
        (outlier.consecutive_5xx_errors, outlier.max_ejection_percent),
        (5, 50)
    );
    assert_eq!(
        outlier.base_ejection_time,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(policy.load_balancer, None, "the proxy's default balancer");
}
