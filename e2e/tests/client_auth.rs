//! Mutual TLS from the API server (`config/components/webhook-client-auth`):
//! the webhook started with `--client-ca-file` answers a real
//! kube-apiserver that presents its client certificate (through the
//! admission configuration docs/operator.md shows), and no one without one;
//! `config/overlays/hardened` (with the NetworkPolicies) is accepted by the
//! API server.

use std::time::Duration;

use ferrimesh_e2e::fixtures::{
    WAIT, create_until_injected, mesh_selecting_mesh_on, namespace, namespace_label,
    start_operator_and_webhook_with, wait_for_crds,
};
use ferrimesh_e2e::tls::Authority;
use ferrimesh_e2e::{ControlPlane, Scratch, eventually, free_port, write_private};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;

/// A CA and a client certificate it signed for the API server, as files in
/// `scratch`: `client-ca.crt`, `apiserver-client.crt`, `apiserver-client.key`.
fn issue_client_certificate(scratch: &Scratch) -> anyhow::Result<()> {
    let authority = Authority::new()?;
    let client = authority.client("kube-apiserver")?;
    std::fs::write(scratch.path("client-ca.crt"), authority.ca_pem())?;
    std::fs::write(scratch.path("apiserver-client.crt"), &client.cert_pem)?;
    write_private(&scratch.path("apiserver-client.key"), &client.key_pem)
}

/// The admission configuration that makes the API server present its
/// client certificate to the webhook at `127.0.0.1:<port>`; its path.
fn admission_configuration(scratch: &Scratch, port: u16) -> anyhow::Result<String> {
    let kubeconfig = scratch.path("webhook-client.kubeconfig");
    write_private(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: '127.0.0.1:{port}'\n  user:\n    client-certificate: {}\n    client-key: {}\n",
            scratch.path("apiserver-client.crt").display(),
            scratch.path("apiserver-client.key").display()
        ),
    )?;
    let config = scratch.path("admission.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n- name: MutatingAdmissionWebhook\n  configuration:\n    apiVersion: apiserver.config.k8s.io/v1\n    kind: WebhookAdmissionConfiguration\n    kubeConfigFile: {}\n",
            kubeconfig.display()
        ),
    )?;
    Ok(config.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_requiring_client_certificates_answers_only_the_api_server() -> anyhow::Result<()> {
    let files = Scratch::new("client-auth")?;
    issue_client_certificate(&files)?;
    let port = free_port()?;
    let admission = admission_configuration(&files, port)?;
    let plane =
        ControlPlane::start_with(&[format!("--admission-control-config-file={admission}")]).await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    // The overlay a cluster would use: config/default, this component and
    // the NetworkPolicies, accepted by the API server.
    let hardened = plane.dry_run_kustomization("config/overlays/hardened")?;
    for object in [
        "deployment.apps/ferrimesh-webhook",
        "networkpolicy.networking.k8s.io/ferrimesh-webhook",
        "networkpolicy.networking.k8s.io/ferrimesh-operator",
    ] {
        assert!(
            hardened.contains(object),
            "{object} not applied:\n{hardened}"
        );
    }
    mesh_selecting_mesh_on(&client).await?;
    let client_ca = files.path("client-ca.crt").display().to_string();
    let installed =
        start_operator_and_webhook_with(&plane, &client, port, &["--client-ca-file", &client_ca])
            .await?;

    // Without a client certificate: no answer at all.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .build()?
        .post(&installed.webhook_url)
        .json(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
        .send()
        .await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was answered: {anonymous:?}"
    );

    // The API server, with its certificate: pods are injected.
    namespace(&client, "demo", &[("mesh", "on")]).await?;
    eventually("demo labelled", WAIT, || {
        let client = client.clone();
        async move { namespace_label(&client, "demo", "istio-injection").await }
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "hello-"},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "hello", "image": "registry.example/hello:1"}]}
    }))?;
    let injected = create_until_injected(&pods, &pod).await?;
    assert!(
        injected
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .any(|c| c.name == "istio-proxy"),
        "{injected:?}"
    );
    Ok(())
}
