//! Pod Security admission of the real API server as the judge of what
//! ferrimesh injects: in namespaces labelled
//! `pod-security.kubernetes.io/enforce=restricted`, a restricted-compliant
//! pod is injected and admitted by a Mesh in Istio CNI mode (with the
//! `RuntimeDefault` seccomp profile), and the same pod is refused with the
//! API server's Pod Security message when a Mesh in iptables mode injects
//! `istio-init`, after the webhook (watching the cluster, so it knows the
//! namespace's level) warned that it would be.

use std::path::Path;
use std::time::Duration;

use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::selection::webhook_configuration;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::fixtures::{self, create_until_injected, namespace, wait_for_crds};
use ferrimesh_e2e::{ControlPlane, Process, ServingCertificate, eventually, free_port, kubectl};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Pod, SeccompProfile};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// A pod that passes Pod Security `restricted` on its own.
fn restricted_pod() -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "hardened"},
        "spec": {
            "serviceAccountName": "default",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        }
    }))
    .expect("pod")
}

/// Starts a webhook serving `mesh` and points the API server at it for the
/// Mesh's revision: from a file, or (`in_cluster`) created in the cluster
/// and watched there, namespaces included.
async fn serve(
    plane: &ControlPlane,
    client: &Client,
    cert: &ServingCertificate,
    mesh: Mesh,
    in_cluster: bool,
) -> anyhow::Result<Process> {
    let revision = mesh.spec.revision.clone();
    let file = plane.scratch().path(&format!("mesh-{revision}.yaml"));
    let source = if in_cluster {
        Api::<Mesh>::all(client.clone())
            .create(&PostParams::default(), &mesh)
            .await?;
        vec!["--revision", revision.as_str()]
    } else {
        std::fs::write(&file, serde_yaml::to_string(&mesh)?)?;
        vec!["--mesh-file", path(&file)?]
    };
    let port = free_port()?;
    let process = fixtures::start_webhook_with(
        plane,
        &plane.kubeconfig,
        port,
        (&cert.cert, &cert.key),
        &source,
    )
    .await?;
    let client_config = WebhookClientConfig {
        url: Some(format!("https://127.0.0.1:{port}/inject")),
        ca_bundle: Some(ByteString(cert.ca_pem.as_bytes().to_vec())),
        service: None,
    };
    let config = webhook_configuration(&mesh.spec, &client_config, &SYSTEM_NAMESPACES);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            &config.name_any(),
            &PatchParams::apply("ferrimesh-e2e").force(),
            &Patch::Apply(&config),
        )
        .await?;
    Ok(process)
}

fn path(file: &Path) -> anyhow::Result<&str> {
    file.to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", file.display()))
}

fn container_names(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_pod_security_admits_cni_mode_and_refuses_istio_init_under_restricted()
-> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let cert = ServingCertificate::issue(plane.scratch().path("").as_path())?;

    let mut cni = MeshSpec::default();
    cni.traffic.cni.enabled = true;
    cni.proxy.seccomp_profile = Some(SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    });
    let _cni_webhook = serve(&plane, &client, &cert, Mesh::new("default", cni), false).await?;
    let iptables = MeshSpec {
        revision: "iptables".to_owned(),
        ..MeshSpec::default()
    };
    let _iptables_webhook = serve(
        &plane,
        &client,
        &cert,
        Mesh::new("iptables", iptables),
        true,
    )
    .await?;

    let enforce = ("pod-security.kubernetes.io/enforce", "restricted");
    namespace(&client, "cni", &[("istio-injection", "enabled"), enforce]).await?;
    namespace(
        &client,
        "iptables",
        &[("istio.io/rev", "iptables"), enforce],
    )
    .await?;
    namespace(&client, "plain", &[enforce]).await?;

    // The pod passes restricted on its own.
    Api::<Pod>::namespaced(client.clone(), "plain")
        .create(&PostParams::default(), &restricted_pod())
        .await?;

    let cni_pods = Api::<Pod>::namespaced(client.clone(), "cni");
    let admitted = create_until_injected(&cni_pods, &restricted_pod()).await?;
    let names = container_names(&admitted);
    assert!(
        names.contains(&"istio-validation".to_owned()) && names.contains(&"istio-proxy".to_owned()),
        "{names:?}"
    );
    assert!(!names.contains(&"istio-init".to_owned()), "{names:?}");

    // iptables mode: the API server refuses the injected pod (once the
    // webhook configuration has reached the admission chain), and the
    // response carries the webhook's warning (kubectl prints it).
    let manifest = plane.scratch().path("restricted-pod.yaml");
    std::fs::write(&manifest, serde_yaml::to_string(&restricted_pod())?)?;
    let iptables_pods = Api::<Pod>::namespaced(client.clone(), "iptables");
    let refusal = eventually(
        "a Pod Security refusal",
        Duration::from_secs(30),
        || async {
            let output = std::process::Command::new(kubectl()?)
                .arg("--kubeconfig")
                .arg(&plane.kubeconfig)
                .args(["create", "-n", "iptables", "-o", "name", "-f"])
                .arg(&manifest)
                .output()?;
            if output.status.success() {
                for pod in iptables_pods.list(&Default::default()).await? {
                    iptables_pods
                        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                        .await?;
                }
                return Ok(None);
            }
            Ok(Some(String::from_utf8(output.stderr)?))
        },
    )
    .await?;
    assert!(
        refusal.contains("violates PodSecurity \"restricted")
            && refusal.contains("istio-init")
            && refusal.contains("NET_ADMIN"),
        "{refusal}"
    );
    assert!(
        refusal.contains("Warning: the namespace enforces Pod Security restricted")
            && refusal.contains("traffic.cni.enabled"),
        "the webhook's warning: {refusal}"
    );
    Ok(())
}
