//! What every Mesh shares has one reconciler: Meshes created at once on an
//! empty cluster get one CA that every webhook configuration trusts and
//! that verifies the certificate the webhook serves, and each selected
//! namespace is labelled once, with one Event on the Namespace. A failure
//! of that reconciler shows on the Meshes as `Ready=False` with its reason,
//! and clears once the cause is gone.

use ferrimesh_crds::selection::webhook_configuration_name;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::fixtures::{
    WAIT, events_about, mesh_condition, namespace, namespace_label, start_operator,
    start_operator_and_webhook_with, trusted_by_bundle, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// The revisions of the Meshes created at once; Mesh `r` selects the
/// namespaces labelled `mesh=r`.
const REVISIONS: [&str; 3] = ["default", "canary", "stable"];

fn mesh(revision: &str) -> anyhow::Result<Mesh> {
    let spec = MeshSpec {
        revision: revision.to_owned(),
        namespace_selector: Some(serde_json::from_value(
            json!({"matchLabels": {"mesh": revision}}),
        )?),
        ..MeshSpec::default()
    };
    Ok(Mesh::new(revision, spec))
}

/// `count` Meshes created at once on an empty cluster with the operator
/// starting: one CA, every webhook configuration trusting the certificate
/// the webhook serves (the API server injects through each), each
/// namespace labelled once.
async fn meshes_at_once(count: usize) -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let revisions = &REVISIONS[..count];
    for revision in revisions {
        namespace(&client, &format!("ns-{revision}"), &[("mesh", revision)]).await?;
    }
    let meshes: Api<Mesh> = Api::all(client.clone());
    let created = revisions.iter().map(|revision| {
        let meshes = meshes.clone();
        async move {
            meshes
                .create(&PostParams::default(), &mesh(revision)?)
                .await?;
            anyhow::Ok(())
        }
    });
    futures::future::try_join_all(created).await?;
    let port = free_port()?;
    let _installed = start_operator_and_webhook_with(&plane, &client, port, &[]).await?;

    for revision in revisions {
        eventually(&format!("Mesh {revision} Ready"), WAIT, || async {
            Ok(mesh_condition(&client, revision, "Ready")
                .await?
                .filter(|(status, _, _)| status == "True"))
        })
        .await?;
    }

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ferrimesh-system");
    let ca = secrets
        .get("ferrimesh-webhook-ca")
        .await?
        .data
        .unwrap_or_default();
    let ca_pem = String::from_utf8(ca.get("ca.crt").map(|b| b.0.clone()).unwrap_or_default())?;
    assert_eq!(ca_pem.matches("BEGIN CERTIFICATE").count(), 1, "{ca_pem}");
    assert!(
        !ca.contains_key("previous-ca.crt"),
        "no CA replaced another"
    );
    let issued = events_about(
        &client,
        "ferrimesh-system",
        "CAIssued",
        "Secret",
        "ferrimesh-webhook-tls",
    )
    .await?;
    assert_eq!(issued.len(), 1, "one CA issued: {issued:?}");
    assert!(
        issued[0].series.is_none(),
        "issued once: {:?}",
        issued[0].series
    );

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    for revision in revisions {
        let config = configs.get(&webhook_configuration_name(revision)).await?;
        for webhook in config.webhooks.unwrap_or_default() {
            let bundle = webhook
                .client_config
                .ca_bundle
                .map(|b| b.0)
                .unwrap_or_default();
            let bundle = String::from_utf8(bundle)?;
            assert_eq!(
                bundle, ca_pem,
                "{revision}: {} trusts the one CA",
                webhook.name
            );
            assert!(
                trusted_by_bundle(port, &bundle).await?,
                "{revision}: the served certificate verifies against {}'s caBundle",
                webhook.name
            );
        }
        // The API server calls the webhook through this configuration: a
        // certificate its bundle did not verify would fail the creation.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &format!("ns-{revision}"));
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "spec": {"serviceAccountName": "app",
                     "containers": [{"name": "app", "image": "registry.example/app:1"}]}
        }))?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        assert!(
            created
                .annotations()
                .contains_key("sidecar.istio.io/status"),
            "{revision}: injected through its webhook configuration"
        );
    }

    for revision in revisions {
        let name = format!("ns-{revision}");
        let key = if *revision == "default" {
            "istio-injection"
        } else {
            "istio.io/rev"
        };
        let value = if *revision == "default" {
            "enabled"
        } else {
            revision
        };
        assert_eq!(
            namespace_label(&client, &name, key).await?.as_deref(),
            Some(value)
        );
        let labelled =
            events_about(&client, "default", "NamespaceLabelled", "Namespace", &name).await?;
        assert_eq!(
            labelled.len(),
            1,
            "{name}: one Event on the Namespace: {labelled:?}"
        );
        assert!(
            labelled[0].series.is_none(),
            "{name} labelled once: {:?}",
            labelled[0].series
        );
        let on_mesh =
            events_about(&client, "default", "NamespaceLabelled", "Mesh", revision).await?;
        assert!(on_mesh.is_empty(), "no label Event on a Mesh: {on_mesh:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_three_meshes_at_once_share_one_ca_and_label_each_namespace_once()
-> anyhow::Result<()> {
    meshes_at_once(2).await?;
    meshes_at_once(3).await
}

/// A ValidatingAdmissionPolicy that refuses every write of a Secret in
/// `ferrimesh-system`, and its binding.
fn secret_write_refusal()
-> anyhow::Result<(ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding)> {
    let policy = serde_json::from_value(json!({
        "metadata": {"name": "test-refuses-certificate-secrets"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ferrimesh-system"}},
                "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                   "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]}]
            },
            "validations": [{"expression": "false", "reason": "Forbidden",
                             "message": "the test refuses the certificate Secrets"}]
        }
    }))?;
    let binding = serde_json::from_value(json!({
        "metadata": {"name": "test-refuses-certificate-secrets"},
        "spec": {"policyName": "test-refuses-certificate-secrets", "validationActions": ["Deny"]}
    }))?;
    Ok((policy, binding))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_secret_that_cannot_be_written_shows_ready_false_until_it_can()
-> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let (policy, binding) = secret_write_refusal()?;
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    bindings.create(&PostParams::default(), &binding).await?;
    // The API server loads policies asynchronously: wait until a dry-run
    // write of a Secret there is refused.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ferrimesh-system");
    eventually("the policy in force", WAIT, || {
        let secrets = secrets.clone();
        async move {
            let probe: Secret = serde_json::from_value(json!({"metadata": {"name": "probe"}}))?;
            let result = secrets
                .create(
                    &PostParams {
                        dry_run: true,
                        ..PostParams::default()
                    },
                    &probe,
                )
                .await;
            Ok(matches!(result, Err(kube::Error::Api(s)) if s.code == 403).then_some(()))
        }
    })
    .await?;
    namespace(&client, "ns-default", &[("mesh", "default")]).await?;
    Api::<Mesh>::all(client.clone())
        .create(&PostParams::default(), &mesh("default")?)
        .await?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let _operator = start_operator(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
    )?;

    let (_, reason, message) = eventually("Ready=False", WAIT, || async {
        Ok(mesh_condition(&client, "default", "Ready")
            .await?
            .filter(|(status, _, _)| status == "False"))
    })
    .await?;
    assert_eq!(reason, "CertificateNotReady");
    assert!(
        message.contains("the test refuses the certificate Secrets"),
        "{message}"
    );
    let (status, reason, message) = mesh_condition(&client, "default", "CertificateReady")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no CertificateReady"))?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Forbidden"),
        "{message}"
    );
    // What does not depend on the certificate goes on.
    eventually("ns-default labelled all the same", WAIT, || {
        namespace_label(&client, "ns-default", "istio-injection")
    })
    .await?;
    assert_eq!(
        mesh_condition(&client, "default", "NamespacesLabelled")
            .await?
            .map(|c| c.0)
            .as_deref(),
        Some("True")
    );

    bindings
        .delete("test-refuses-certificate-secrets", &DeleteParams::default())
        .await?;
    eventually(
        "Ready=True once the Secrets can be written",
        WAIT,
        || async {
            Ok(mesh_condition(&client, "default", "Ready")
                .await?
                .filter(|(status, _, _)| status == "True"))
        },
    )
    .await?;
    let (status, _, message) = mesh_condition(&client, "default", "CertificateReady")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no CertificateReady"))?;
    assert_eq!(status, "True");
    assert!(message.contains("valid until"), "{message}");
    Ok(())
}
