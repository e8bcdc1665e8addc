//! The webhook called by a real kube-apiserver over TLS: pods created
//! through the API server come back injected (or untouched) as the selector
//! matrix and the Mesh say, the webhook reads its Mesh from the cluster and
//! follows changes without a restart, and a bad annotation fails the create
//! with the injector's message. With the webhook down, `failurePolicy: Fail`
//! refuses a pod and `Ignore` lets it through uninjected (the API server's
//! audit log shows it called the webhook and failed open); once the webhook
//! is back, the same pod created again is injected.

use std::time::{Duration, Instant};

use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::selection::webhook_configuration;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::fixtures::{self, namespace, wait_for_crds};
use ferrimesh_e2e::{ControlPlane, Process, ServingCertificate, free_port};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

fn pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        // No ServiceAccount admission plugin here: name the account ourselves.
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
    .expect("pod")
}

fn injected(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == "istio-proxy")
}

fn proxy_env(pod: &Pod, name: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let proxy = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == "istio-proxy")?;
    proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value
        .clone()
}

struct Webhook {
    _process: Option<Process>,
    url: String,
}

/// Starts `ferrimesh-webhook` in cluster mode, as its ServiceAccount, and waits until it is ready.
async fn serve_as_service_account(
    plane: &ControlPlane,
    cert: &ServingCertificate,
) -> anyhow::Result<Webhook> {
    let port = free_port()?;
    let process = fixtures::start_webhook(
        plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &cert.cert,
        &cert.key,
    )
    .await?;
    Ok(Webhook {
        _process: Some(process),
        url: format!("https://127.0.0.1:{port}/inject"),
    })
}

async fn configure_webhook(
    client: &Client,
    mesh: &MeshSpec,
    webhook: &Webhook,
    ca_pem: &str,
) -> anyhow::Result<()> {
    let client_config = WebhookClientConfig {
        url: Some(webhook.url.clone()),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    };
    let config = webhook_configuration(mesh, &client_config, &SYSTEM_NAMESPACES);
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = config.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("ferrimesh-e2e").force(),
        &Patch::Apply(&config),
    )
    .await?;
    Ok(())
}

async fn create(client: &Client, ns: &str, pod: &Pod) -> kube::Result<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), pod)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_api_server_calls_the_webhook_over_tls() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    meshes
        .create(
            &PostParams::default(),
            &Mesh::new("default", MeshSpec::default()),
        )
        .await?;
    let cert = ServingCertificate::issue(plane.scratch().path("").as_path())?;
    let webhook = serve_as_service_account(&plane, &cert).await?;
    configure_webhook(&client, &MeshSpec::default(), &webhook, &cert.ca_pem).await?;

    namespace(&client, "enabled", &[("istio-injection", "enabled")]).await?;
    namespace(&client, "plain", &[]).await?;
    namespace(&client, "disabled", &[("istio-injection", "disabled")]).await?;
    namespace(&client, "rev-default", &[("istio.io/rev", "default")]).await?;

    // The webhook configuration takes a moment to reach the admission chain.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let created = create(&client, "enabled", &pod("first", json!({}), json!({}))).await?;
        if injected(&created) || Instant::now() > deadline {
            break created;
        }
        Api::<Pod>::namespaced(client.clone(), "enabled")
            .delete("first", &DeleteParams::default())
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        injected(&first),
        "a pod in an istio-injection=enabled namespace is injected"
    );
    let annotations = first.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key("sidecar.istio.io/status"));
    assert_eq!(
        annotations.get("istio.io/rev").map(String::as_str),
        Some("default")
    );

    assert!(
        !injected(&create(&client, "plain", &pod("p1", json!({}), json!({}))).await?),
        "unlabelled namespace"
    );
    assert!(!injected(
        &create(
            &client,
            "disabled",
            &pod("p2", json!({"sidecar.istio.io/inject": "true"}), json!({}))
        )
        .await?
    ));
    let opted_out = pod("p3", json!({"sidecar.istio.io/inject": "false"}), json!({}));
    assert!(
        !injected(&create(&client, "enabled", &opted_out).await?),
        "pod label inject=false"
    );
    let opted_in = pod("p4", json!({"sidecar.istio.io/inject": "true"}), json!({}));
    assert!(
        injected(&create(&client, "plain", &opted_in).await?),
        "pod opt-in in an unlabelled namespace"
    );
    assert!(
        injected(&create(&client, "rev-default", &pod("p5", json!({}), json!({}))).await?),
        "istio.io/rev=default"
    );
    let other_rev = pod("p6", json!({"istio.io/rev": "canary"}), json!({}));
    assert!(
        !injected(&create(&client, "plain", &other_rev).await?),
        "another revision's pod label"
    );

    // A pod of Istio's gateway Helm chart: it opts in, asks for the gateway
    // template and brings its own istio-proxy with `image: auto`; the API
    // server admits it injected, the image resolved, as a proxy router.
    let gateway: Pod = serde_json::from_value(json!({
        "metadata": {"name": "gw", "labels": {"app": "ingress", "sidecar.istio.io/inject": "true"},
                     "annotations": {"inject.istio.io/templates": "gateway"}},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "istio-proxy", "image": "auto"}]}
    }))?;
    let gateway = create(&client, "plain", &gateway).await?;
    let spec = gateway.spec.as_ref().expect("spec");
    let proxy = spec
        .containers
        .iter()
        .find(|c| c.name == "istio-proxy")
        .expect("the gateway's proxy");
    assert_ne!(proxy.image.as_deref(), Some("auto"), "image resolved");
    assert_eq!(
        proxy
            .args
            .as_ref()
            .and_then(|a| a.get(1))
            .map(String::as_str),
        Some("router")
    );
    assert!(
        spec.init_containers.as_ref().is_none_or(Vec::is_empty),
        "no istio-init, no native sidecar"
    );

    // A Deployment's pod: generateName and a controlling ReplicaSet.
    let mut generated = pod(
        "",
        json!({"app": "web", "pod-template-hash": "5f6d7c"}),
        json!({}),
    );
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web-5f6d7c-".to_owned());
    generated.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5f6d7c", "uid": "0c2e4a6b-1111-2222-3333-444455556666", "controller": true
    }))?]);
    let created = create(&client, "enabled", &generated).await?;
    assert_eq!(
        proxy_env(&created, "ISTIO_META_WORKLOAD_NAME").as_deref(),
        Some("web")
    );
    assert_eq!(
        proxy_env(&created, "ISTIO_META_OWNER").as_deref(),
        Some("kubernetes://apis/apps/v1/namespaces/enabled/deployments/web")
    );

    // A bad annotation: the create fails with the injector's message.
    let bad = pod(
        "bad",
        json!({}),
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "*"}),
    );
    let error = create(&client, "enabled", &bad)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("traffic.sidecar.istio.io/excludeInboundPorts"),
        "{error}"
    );

    // The webhook follows a Mesh change through its watch, without a restart.
    meshes
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"proxy": {"image": "my.registry/proxyv2:9"}}})),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut image = None;
    for attempt in 0.. {
        let created = create(
            &client,
            "enabled",
            &pod(&format!("after-{attempt}"), json!({}), json!({})),
        )
        .await?;
        let spec = created.spec.unwrap_or_default();
        image = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == "istio-proxy")
            .and_then(|c| c.image.clone());
        if image.as_deref() == Some("my.registry/proxyv2:9") || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(image.as_deref(), Some("my.registry/proxyv2:9"));

    // And a ProxyProfile created in the namespace, through the same watches.
    let profile: ferrimesh_crds::ProxyProfile = serde_json::from_value(json!({
        "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "ProxyProfile",
        "metadata": {"name": "quiet", "namespace": "enabled"},
        "spec": {"proxy": {"logLevel": "error"}, "traffic": {"excludeOutboundPorts": "5432"}}
    }))?;
    Api::<ferrimesh_crds::ProxyProfile>::namespaced(client.clone(), "enabled")
        .create(&PostParams::default(), &profile)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut args = Vec::new();
    for attempt in 0.. {
        let created = create(
            &client,
            "enabled",
            &pod(&format!("profiled-{attempt}"), json!({}), json!({})),
        )
        .await?;
        let spec = created.spec.unwrap_or_default();
        let containers = spec.init_containers.unwrap_or_default();
        args = containers
            .iter()
            .flat_map(|c| c.args.clone().unwrap_or_default())
            .collect();
        if args.iter().any(|a| a == "--proxyLogLevel=error") || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        args.iter().any(|a| a == "--proxyLogLevel=error"),
        "{args:?}"
    );
    assert!(args.windows(2).any(|w| w == ["-o", "5432"]), "{args:?}");
    Ok(())
}

/// The webhooks the API server failed open on (called, failed, and let the
/// request through as `failurePolicy: Ignore` says) in the `nth` (from 0)
/// successful create of pod `ns/name`: its audit annotations
/// `failed-open.mutation.webhook.admission.k8s.io/round_<r>_index_<i>`.
fn failed_open(
    plane: &ControlPlane,
    ns: &str,
    name: &str,
    nth: usize,
) -> anyhow::Result<Vec<String>> {
    let event = plane
        .audited_writes()
        .into_iter()
        .filter(|e| {
            e["verb"] == "create"
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["namespace"] == ns
                && e["objectRef"]["name"] == name
                && e["responseStatus"]["code"] == 201
        })
        .nth(nth)
        .ok_or_else(|| anyhow::anyhow!("no audit event for create #{nth} of pod {ns}/{name}"))?;
    Ok(event["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.starts_with("failed-open.mutation.webhook.admission.k8s.io/"))
        .filter_map(|(_, webhook)| webhook.as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_fails_or_ignores_as_the_mesh_says() -> anyhow::Result<()> {
    let mut plane = ControlPlane::start().await?;
    plane.enable_audit_log().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let cert = ServingCertificate::issue(plane.scratch().path("").as_path())?;
    let webhook = serve_as_service_account(&plane, &cert).await?;
    namespace(&client, "enabled", &[("istio-injection", "enabled")]).await?;
    let url = webhook.url.clone();
    drop(webhook); // killed: nothing listens on its port any more

    let mut mesh = MeshSpec::default();
    mesh.webhook.timeout_seconds = 2;
    let dead = Webhook {
        _process: None,
        url,
    };
    configure_webhook(&client, &mesh, &dead, &cert.ca_pem).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        match create(&client, "enabled", &pod("refused", json!({}), json!({}))).await {
            Err(e) => break e.to_string(),
            Ok(_) => {
                Api::<Pod>::namespaced(client.clone(), "enabled")
                    .delete("refused", &DeleteParams::default())
                    .await?;
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "failurePolicy Fail never took effect"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(
        error.contains("failed calling webhook") && error.contains("sidecar-injector.ferrimesh.io"),
        "{error}"
    );

    mesh.webhook.failure_policy = ferrimesh_crds::mesh::FailurePolicy::Ignore;
    configure_webhook(&client, &mesh, &dead, &cert.ca_pem).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let created = loop {
        match create(&client, "enabled", &pod("ignored", json!({}), json!({}))).await {
            Ok(pod) => break pod,
            Err(e) => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "failurePolicy Ignore never took effect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(
        !injected(&created),
        "with Ignore the pod is created uninjected"
    );
    // The API server called the webhook for this very pod, failed, and let
    // the pod through (not a webhook configuration that never matched).
    assert_eq!(
        failed_open(&plane, "enabled", "ignored", 0)?,
        ["namespace.sidecar-injector.ferrimesh.io"],
        "the API server failed open on the namespace-label webhook for pod ignored"
    );

    // The webhook back on its port: the same pod, created again, is injected.
    let port: u16 = dead
        .url
        .trim_start_matches("https://127.0.0.1:")
        .trim_end_matches("/inject")
        .parse()?;
    let _back = fixtures::start_webhook(
        &plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &cert.cert,
        &cert.key,
    )
    .await?;
    Api::<Pod>::namespaced(client.clone(), "enabled")
        .delete("ignored", &DeleteParams::default())
        .await?;
    let recreated = create(&client, "enabled", &pod("ignored", json!({}), json!({}))).await?;
    assert!(
        injected(&recreated),
        "re-created with the webhook back, the pod is injected"
    );
    assert_eq!(
        failed_open(&plane, "enabled", "ignored", 1)?,
        Vec::<String>::new(),
        "no failing open once the webhook is back"
    );
    Ok(())
}
