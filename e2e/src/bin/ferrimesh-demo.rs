//! `make demo`: a local control plane with the operator and the webhook, a
//! Mesh selecting a sample namespace, a Deployment-style pod created through
//! the API server, and the result shown: the namespace's labels, the
//! injected pod, its WorkloadEntry and the Mesh's status.
//!
//! The control plane stays up (kubeconfig printed) until Ctrl-C, or the
//! demo exits at once with `DEMO_EXIT=1`.

use std::process::Command;

use ferrimesh_e2e::fixtures::{
    WAIT, namespace, namespace_label, start_operator_and_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually, kubectl, repo_root};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(plane: &ControlPlane, args: &[&str]) -> anyhow::Result<()> {
    println!("$ kubectl {}", args.join(" "));
    let status = Command::new(kubectl()?)
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(args)
        .status()?;
    anyhow::ensure!(status.success(), "kubectl {} failed", args.join(" "));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferrimesh_e2e::until_terminated(run()).await
}

async fn run() -> anyhow::Result<()> {
    step("starting etcd and kube-apiserver on loopback (built from their Go modules on first run)");
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;

    step(
        "installing ferrimesh: kubectl apply -k config/overlays/local, then the sample Mesh (config/samples)",
    );
    print!("{}", plane.apply_kustomization("config/overlays/local")?);
    wait_for_crds(&client).await?;
    print!("{}", plane.apply_kustomization("config/samples")?);

    step(
        "starting ferrimesh-operator and ferrimesh-webhook as local processes, each as its own ServiceAccount",
    );
    let installed = start_operator_and_webhook(&plane, &client).await?;
    println!(
        "operator and webhook running; webhook at {}",
        installed.webhook_url
    );

    step("creating namespace demo with the label mesh=on, which the Mesh selects");
    namespace(&client, "demo", &[("mesh", "on")]).await?;
    eventually("the operator to label namespace demo", WAIT, || {
        let client = client.clone();
        async move { namespace_label(&client, "demo", "istio-injection").await }
    })
    .await?;
    show(&plane, &["get", "namespace", "demo", "--show-labels"])?;

    step("creating a Deployment-style pod (examples/demo-pod.yaml) through the API server");
    let text = std::fs::read_to_string(repo_root().join("examples/demo-pod.yaml"))?;
    let pod: Pod = serde_yaml::from_str(&text)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let created = pods.create(&PostParams::default(), &pod).await?;
    let name = created.name_any();
    println!("pod/{name} created");
    show(
        &plane,
        &[
            "get",
            "pod",
            "-n",
            "demo",
            &name,
            "-o",
            "custom-columns=INIT CONTAINERS:.spec.initContainers[*].name,CONTAINERS:.spec.containers[*].name,REVISION:.metadata.annotations.istio\\.io/rev",
        ],
    )?;
    show(
        &plane,
        &[
            "get",
            "pod",
            "-n",
            "demo",
            &name,
            "-o",
            "jsonpath={.metadata.annotations.sidecar\\.istio\\.io/status}{\"\\n\"}",
        ],
    )?;

    step("playing the kubelet: the pod gets an IP and turns Ready");
    let status = serde_json::json!({"status": {"podIP": "10.42.0.7", "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let entries: Api<ferrimesh_crds::WorkloadEntry> = Api::namespaced(client.clone(), "demo");
    eventually("the WorkloadEntry", WAIT, || {
        let (entries, name) = (entries.clone(), name.clone());
        async move { Ok(entries.get_opt(&name).await?.filter(|e| e.status.is_some())) }
    })
    .await?;
    let registered = std::time::Instant::now();
    show(
        &plane,
        &["get", "workloadentry", "-n", "demo", &name, "-o", "yaml"],
    )?;
    // The Mesh counts entries from its own reconcile, which entry changes
    // trigger at most twice a second: show the status once it has caught up.
    let meshes: Api<ferrimesh_crds::Mesh> = Api::all(client.clone());
    eventually("the Mesh counting the WorkloadEntry", WAIT, || {
        let meshes = meshes.clone();
        async move {
            let mesh = meshes.get("default").await?;
            Ok(mesh.status.filter(|s| s.registered_workloads == 1))
        }
    })
    .await?;
    println!(
        "(the Mesh's registeredWorkloads counted the entry {} ms after the demo saw it)",
        registered.elapsed().as_millis()
    );
    show(&plane, &["get", "mesh"])?;

    if std::env::var_os("DEMO_EXIT").is_some_and(|v| v == "1") {
        println!("\nDEMO_EXIT=1: stopping the control plane.");
        return Ok(());
    }
    println!(
        "\nThe control plane is up. Try: export KUBECONFIG={}",
        plane.kubeconfig.display()
    );
    println!("  kubectl get pod -n demo {name} -o yaml     # the full injected pod");
    println!("  kubectl label namespace demo mesh-          # the operator removes its label");
    println!("Press Ctrl-C to stop everything.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    Ok(())
}
