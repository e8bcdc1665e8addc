//! The install path: `kubectl apply -k config/default` into an empty API
//! server, then the local overlay with the operator and webhook running as
//! their own ServiceAccounts (RBAC from `config/rbac` and the admission
//! policies from `config/policy`, enforced), a Mesh from
//! `config/samples`, and a workload injected and registered end to end.

use std::time::Duration;

use ferrimesh_crds::{Mesh, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, namespace, namespace_label, start_operator_and_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomize_install_with_enforced_rbac_injects_and_registers() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;

    let applied = plane.apply_kustomization("config/default")?;
    for object in [
        "namespace/ferrimesh-system",
        "customresourcedefinition.apiextensions.k8s.io/meshes.mesh.ferrimesh.io",
        "deployment.apps/ferrimesh-operator",
        "deployment.apps/ferrimesh-webhook",
        "service/ferrimesh-webhook",
        "poddisruptionbudget.policy/ferrimesh-webhook",
        "clusterrole.rbac.authorization.k8s.io/ferrimesh-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/ferrimesh-operator-namespaces",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/ferrimesh-operator-webhook-configurations",
    ] {
        assert!(applied.contains(object), "{object} not applied:\n{applied}");
    }
    plane.apply_kustomization("config/overlays/local")?;
    // The local operator calls its webhook at a loopback URL, which
    // config/default's policy ferrimesh-operator-webhook-service refuses
    // (config/overlays/local leaves it out); the other policies stay.
    let (name, params) = (
        "ferrimesh-operator-webhook-service",
        DeleteParams::default(),
    );
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(name, &params)
        .await?;
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(name, &params)
        .await?;
    wait_for_crds(&client).await?;
    plane.apply_kustomization("config/samples")?;

    let _installed = start_operator_and_webhook(&plane, &client).await?;

    namespace(&client, "demo", &[("mesh", "on")]).await?;
    eventually("demo labelled", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "demo", "istio-injection")
                .await?
                .filter(|v| v == "enabled"))
        }
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "hello-6d8f9c-", "labels": {"app": "hello", "pod-template-hash": "6d8f9c"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-6d8f9c",
                                          "uid": "7b0c1d2e-0000-4000-8000-000000000001", "controller": true}]},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "hello", "image": "registry.example/hello:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))?;
    let created = eventually("an injected pod", WAIT, || {
        let (pods, pod) = (pods.clone(), pod.clone());
        async move {
            let created = pods.create(&PostParams::default(), &pod).await?;
            if created
                .annotations()
                .contains_key("sidecar.istio.io/status")
            {
                return Ok(Some(created));
            }
            pods.delete(
                &created.name_any(),
                &DeleteParams::default().grace_period(0),
            )
            .await?;
            Ok(None)
        }
    })
    .await?;
    let name = created.name_any();
    let status = json!({"status": {"podIP": "10.9.0.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let entries: Api<WorkloadEntry> = Api::namespaced(client.clone(), "demo");
    let entry = eventually("the WorkloadEntry", WAIT, || {
        let (entries, name) = (entries.clone(), name.clone());
        async move { Ok(entries.get_opt(&name).await?) }
    })
    .await?;
    assert_eq!(entry.spec.address.as_deref(), Some("10.9.0.7"));

    let mesh = eventually("Mesh Ready", Duration::from_secs(30), || {
        let meshes: Api<Mesh> = Api::all(client.clone());
        async move {
            let mesh = meshes.get("default").await?;
            let ready = mesh.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            Ok(ready.then_some(mesh))
        }
    })
    .await?;
    assert_eq!(mesh.status.map(|s| s.labelled_namespaces), Some(1));
    Ok(())
}
