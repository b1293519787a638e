//! The mesh CA kept in a Kubernetes Secret (`--create-ca-secret`), against the in-process API
//! server stand-in: agents starting at once agree on one root; an existing Secret (Istio's
//! `cacerts` layout) is used as it is; a broken one and missing RBAC are reported clearly.
use mesh_agent::identity::ca_secret::{load_or_create, CERT_CHAIN_KEY};
use mesh_agent::identity::generate_root_pem;
use mesh_tests::apiserver::FakeApiServer;
use serde_json::json;

fn client(api: &FakeApiServer) -> kube::Client {
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

const AGENTS: usize = 8;

#[tokio::test(flavor = "multi_thread")]
async fn agents_starting_together_agree_on_one_root() {
    let api = FakeApiServer::start().unwrap();
    // Every agent finds no Secret and tries to create one: the creates are held until all
    // eight are in, so exactly one wins and seven take the conflict path, on any machine.
    api.hold("POST", "/api/v1/namespaces/mesh-system/secrets");
    let mut tasks = Vec::new();
    for _ in 0..AGENTS {
        let client = client(&api);
        tasks.push(tokio::spawn(async move {
            load_or_create(client, "mesh-system", "mesh-ca", "cluster.local", vec![])
                .await
                .map(|ca| ca.root_pem())
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while api.held() < AGENTS {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {AGENTS} creates arrived",
            api.held()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    api.release();
    let mut roots = Vec::new();
    for t in tasks {
        roots.push(t.await.unwrap().unwrap());
    }
    roots.dedup();
    assert_eq!(
        roots.len(),
        1,
        "every agent uses the root that won the race"
    );
    // One create succeeded; the seven that got 409 read the winner's Secret (a second GET).
    let reqs = api.requests();
    let posts = reqs.iter().filter(|r| r.method == "POST").count();
    let gets = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/secrets/mesh-ca"))
        .count();
    assert_eq!(posts, AGENTS, "{reqs:#?}");
    assert_eq!(gets, 2 * AGENTS - 1, "{reqs:#?}");
    let secret = api
        .get("v1", "Secret", Some("mesh-system"), "mesh-ca")
        .unwrap();
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "mesh-agent"
    );
}

#[tokio::test]
async fn an_existing_cacerts_secret_is_used_as_it_is() {
    let api = FakeApiServer::start().unwrap();
    let root = generate_root_pem("cluster.local").unwrap();
    // Secret data is base64 in JSON, as k8s-openapi writes it.
    let b64 =
        |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap();
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "cacerts", "namespace": "istio-system" },
        "type": "Opaque",
        "data": {
            "ca-cert.pem": b64(&root.cert_pem),
            "ca-key.pem": b64(&root.key_pem),
            "root-cert.pem": b64(&root.cert_pem),
            CERT_CHAIN_KEY: b64(&root.cert_pem),
        },
    }));
    let ca = load_or_create(
        client(&api),
        "istio-system",
        "cacerts",
        "cluster.local",
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(ca.root_pem().trim(), root.cert_pem.trim());
    assert!(
        api.requests().iter().all(|r| r.method != "POST"),
        "nothing is created when the Secret exists"
    );

    // A Secret without the key is named in the error, and nothing is overwritten.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "broken", "namespace": "istio-system" },
        "data": { CERT_CHAIN_KEY: b64(&root.cert_pem) },
    }));
    let err = load_or_create(
        client(&api),
        "istio-system",
        "broken",
        "cluster.local",
        vec![],
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("Secret istio-system/broken has no \"ca-key.pem\""),
        "{err}"
    );
}

#[tokio::test]
async fn forbidden_points_at_the_rbac_manifest() {
    let api = FakeApiServer::start().unwrap();
    api.fail_next("/api/v1/namespaces/mesh-system/secrets", 403, 1);
    let err = load_or_create(
        client(&api),
        "mesh-system",
        "mesh-ca",
        "cluster.local",
        vec![],
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("may not get Secret mesh-system/mesh-ca") && err.contains("rbac.yaml"),
        "{err}"
    );
}
