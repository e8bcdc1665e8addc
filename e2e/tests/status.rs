//! `ferrimesh status` against a real API server, with the webhook injecting
//! for real: a pod created before its namespace was enabled is counted
//! uninjected; a Mesh image change makes exactly its injected pods
//! outdated; a ProxyProfile change only the pods it selects; reverting
//! brings the counts back to up to date. The test plays the kubelet (pods
//! are never scheduled; a pod with no phase counts as live).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::selection::webhook_configuration;
use ferrimesh_crds::{Mesh, MeshSpec, ProxyProfile};
use ferrimesh_e2e::fixtures::{
    self, create_until_injected, debug_profile, namespace, patch_default_mesh, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, ServingCertificate, free_port, workspace_binary};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn pod(name: &str, app: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?)
}

/// `ferrimesh status -o json --pods`, with the kubeconfig given by flag and
/// context (`by_flag`) or by `KUBECONFIG`.
fn status(kubeconfig: &Path, by_flag: bool) -> anyhow::Result<Value> {
    let mut command = Command::new(workspace_binary("ferrimesh")?);
    command.args(["status", "-o", "json", "--pods"]);
    if by_flag {
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--context", "e2e"]);
    } else {
        command.env("KUBECONFIG", kubeconfig);
    }
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "ferrimesh status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("ferrimesh status -o json")
}

/// The counts of `ns` (up to date, outdated, uninjected), zeros when the
/// report does not list it.
fn counts(report: &Value, ns: &str) -> (u64, u64, u64) {
    let entry = report["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["namespace"] == ns);
    let count = |key: &str| entry.and_then(|e| e[key].as_u64()).unwrap_or(0);
    (count("upToDate"), count("outdated"), count("uninjected"))
}

/// The state and reason kind of pod `ns/name` in the report.
fn pod_state(report: &Value, ns: &str, name: &str) -> Option<(String, Option<String>)> {
    let entry = report["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["namespace"] == ns)?;
    let pod = entry["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?;
    Some((
        pod["state"].as_str()?.to_owned(),
        pod["reason"]["kind"].as_str().map(str::to_owned),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_uninjected_and_outdated_pods() -> anyhow::Result<()> {
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
    let port = free_port()?;
    let _webhook = fixtures::start_webhook(
        &plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &cert.cert,
        &cert.key,
    )
    .await?;
    let client_config = WebhookClientConfig {
        url: Some(format!("https://127.0.0.1:{port}/inject")),
        ca_bundle: Some(ByteString(cert.ca_pem.as_bytes().to_vec())),
        service: None,
    };
    let config = webhook_configuration(&MeshSpec::default(), &client_config, &SYSTEM_NAMESPACES);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            config.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::apply("ferrimesh-e2e").force(),
            &Patch::Apply(&config),
        )
        .await?;

    // Injected pods in an enabled namespace: up to date.
    namespace(&client, "shop", &[("istio-injection", "enabled")]).await?;
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let api = create_until_injected(&shop, &pod("api", "api")?).await?;
    create_until_injected(&shop, &pod("web", "web")?).await?;
    assert!(
        api.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("ferrimesh.io/injection-hash")),
        "the webhook stamps what it injects"
    );

    // A pod created before its namespace is enabled.
    namespace(&client, "late", &[]).await?;
    Api::<Pod>::namespaced(client.clone(), "late")
        .create(&PostParams::default(), &pod("early", "early")?)
        .await?;
    let report = status(&plane.kubeconfig, true)?;
    assert_eq!(counts(&report, "late"), (0, 0, 0), "{report:#}");
    assert_eq!(counts(&report, "shop"), (2, 0, 0), "{report:#}");
    Api::<Namespace>::all(client.clone())
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio-injection": "enabled"}}})),
        )
        .await?;
    let report = status(&plane.kubeconfig, false)?;
    assert_eq!(counts(&report, "late"), (0, 0, 1), "{report:#}");
    assert_eq!(
        pod_state(&report, "late", "early"),
        Some(("uninjected".to_owned(), None))
    );

    // The Mesh's image changes: exactly its injected pods are outdated.
    patch_default_mesh(
        &client,
        json!({"proxy": {"image": "registry.example/proxyv2:next"}}),
    )
    .await?;
    let report = status(&plane.kubeconfig, true)?;
    assert_eq!(counts(&report, "shop"), (0, 2, 0), "{report:#}");
    assert_eq!(counts(&report, "late"), (0, 0, 1), "{report:#}");
    assert_eq!(
        pod_state(&report, "shop", "api"),
        Some(("outdated".to_owned(), Some("image".to_owned())))
    );
    let image = ferrimesh_crds::settings::DEFAULT_PROXY_IMAGE;
    patch_default_mesh(&client, json!({"proxy": {"image": image}})).await?;
    assert_eq!(counts(&status(&plane.kubeconfig, true)?, "shop"), (2, 0, 0));

    // A ProxyProfile concerns only the pods it selects.
    debug_profile(&client, "shop", "api").await?;
    let profiles: Api<ProxyProfile> = Api::namespaced(client.clone(), "shop");
    let report = status(&plane.kubeconfig, true)?;
    assert_eq!(counts(&report, "shop"), (1, 1, 0), "{report:#}");
    assert_eq!(
        pod_state(&report, "shop", "api"),
        Some(("outdated".to_owned(), Some("hash".to_owned())))
    );
    assert_eq!(
        pod_state(&report, "shop", "web"),
        Some(("up-to-date".to_owned(), None))
    );
    profiles
        .delete("api-debug", &DeleteParams::default())
        .await?;
    let report = status(&plane.kubeconfig, true)?;
    assert_eq!(counts(&report, "shop"), (2, 0, 0), "{report:#}");
    Ok(())
}
