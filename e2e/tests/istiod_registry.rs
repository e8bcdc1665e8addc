//! WorkloadEntry registration as a real istiod sees it. istiod watches the
//! same cluster as the operator, so it already knows each pod: registering
//! the pod as a WorkloadEntry must not change what any Kubernetes Service or
//! ServiceEntry resolves to in istiod's own view (`/debug/endpointShardz`),
//! and the entry must be one istiod's validation accepts, with the health
//! istiod reads.

use std::time::Duration;

use ferrimesh_crds::{MeshSpec, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, injected_pod, mesh_selecting_mesh_on, namespace, start_operator, wait_for_crds,
};
use ferrimesh_e2e::istiod::{Istiod, endpoints_with, post_review};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

const NS: &str = "shop";
const IP: &str = "10.6.0.1";
const SERVICE_HOST: &str = "hello.shop.svc.cluster.local";
const SERVICE_ENTRY_HOST: &str = "hello.example.com";

/// How many endpoints with `ip` istiod lists for `host`.
fn endpoints_of(shardz: &Value, host: &str, ip: &str) -> usize {
    endpoints_with(shardz, host, ip).len()
}

async fn create(client: &Client, gvk: &GroupVersionKind, object: Value) -> anyhow::Result<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &ApiResource::from_gvk(gvk));
    api.create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    Ok(())
}

/// Waits until istiod lists `host`'s endpoints, then returns how many
/// times it lists `IP` once its view has settled (the same count twice in a
/// row, a second apart).
async fn settled_count(istiod: &Istiod, host: &str) -> anyhow::Result<usize> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        let count = endpoints_of(&istiod.debug("endpointShardz").await?, host, IP);
        if count > 0 && last == Some(count) {
            return Ok(count);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "istiod's endpoints of {host} did not settle (last count {count})"
        );
        last = Some(count);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_changes_nothing_istiod_resolves_and_passes_its_validation()
-> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    // istiod's CRDs replace ferrimesh's WorkloadEntry CRD, as in a cluster with Istio.
    let istiod = Istiod::start(&plane, &MeshSpec::default()).await?;
    mesh_selecting_mesh_on(&client).await?;
    namespace(&client, NS, &[]).await?;

    // The workload as Kubernetes knows it: a Service, its EndpointSlice (we
    // play the endpoints controller), and a ServiceEntry selecting the same pods.
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"selector": {"app": "hello"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &service)
        .await?;
    injected_pod(&client, NS, "hello", IP).await?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "hello-1", "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [IP], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": NS, "name": "hello"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &slice)
        .await?;
    let service_entry = GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry");
    create(
        &client,
        &service_entry,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "hello", "namespace": NS},
            "spec": {"hosts": [SERVICE_ENTRY_HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
                     "workloadSelector": {"labels": {"app": "hello"}}}
        }),
    )
    .await?;

    // Without registration: what istiod resolves on its own.
    let service_alone = settled_count(&istiod, SERVICE_HOST).await?;
    let entry_alone = settled_count(&istiod, SERVICE_ENTRY_HOST).await?;
    assert_eq!((service_alone, entry_alone), (1, 1));

    // The failing case this guards against: an entry that copies its pod's
    // labels makes istiod list the pod twice.
    let workload_entry = GroupVersionKind::gvk("networking.istio.io", "v1", "WorkloadEntry");
    create(
        &client,
        &workload_entry,
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "copied-labels", "namespace": NS},
            "spec": {"address": IP, "labels": {"app": "hello"}}
        }),
    )
    .await?;
    eventually("istiod listing the pod twice", WAIT, || async {
        let shardz = istiod.debug("endpointShardz").await?;
        Ok((endpoints_of(&shardz, SERVICE_HOST, IP) == 2
            && endpoints_of(&shardz, SERVICE_ENTRY_HOST, IP) == 2)
            .then_some(()))
    })
    .await?;
    Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk(&workload_entry),
    )
    .delete("copied-labels", &Default::default())
    .await?;

    // With registration: the operator's entry for the pod.
    let identity = plane.kubeconfig_for("ferrimesh-operator")?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let _operator = start_operator(&plane, &identity, "operator", &url)?;
    let entries: Api<WorkloadEntry> = Api::namespaced(client.clone(), NS);
    let entry = eventually("the pod's WorkloadEntry, healthy", WAIT, || {
        let entries = entries.clone();
        async move {
            let entry = entries.get_opt("hello").await?;
            Ok(entry.filter(|e| {
                e.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Healthy" && c.status == "True")
                })
            }))
        }
    })
    .await?;
    assert_eq!(
        entry
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("proxy.istio.io/health-checks-enabled"))
            .map(String::as_str),
        Some("true"),
        "istiod reads Healthy only with this annotation"
    );
    // istiod knows the entry...
    eventually("istiod's config holding the entry", WAIT, || async {
        let configz = istiod.debug("configz").await?;
        let known = configz.as_array().into_iter().flatten().any(|c| {
            c["kind"] == "WorkloadEntry"
                && c["metadata"]["name"] == "hello"
                && c["metadata"]["namespace"] == NS
        });
        Ok(known.then_some(()))
    })
    .await?;
    // ...and resolves both services exactly as without it.
    assert_eq!(settled_count(&istiod, SERVICE_HOST).await?, service_alone);
    assert_eq!(
        settled_count(&istiod, SERVICE_ENTRY_HOST).await?,
        entry_alone
    );

    // istiod's own validating webhook accepts the entry as written.
    let mut object = serde_json::to_value(&entry)?;
    object["metadata"]
        .as_object_mut()
        .map(|m| m.remove("managedFields"));
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-00000000000e",
            "kind": {"group": "networking.istio.io", "version": "v1", "kind": "WorkloadEntry"},
            "resource": {"group": "networking.istio.io", "version": "v1", "resource": "workloadentries"},
            "namespace": NS, "name": "hello", "operation": "CREATE",
            "userInfo": {"username": "e2e"}, "object": object,
        }
    });
    let answer = post_review(&format!("{}/validate", istiod.https_url), &review).await?;
    assert_eq!(
        answer["response"]["allowed"],
        json!(true),
        "istiod's validation: {answer}"
    );

    // Health follows the pod: Ready=False turns the entry unhealthy.
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch_status(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        )
        .await?;
    eventually("the entry unhealthy", WAIT, || {
        let entries = entries.clone();
        async move {
            let entry = entries.get("hello").await?;
            Ok(entry
                .status
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Healthy" && c.status == "False")
                })
                .then_some(()))
        }
    })
    .await?;
    Ok(())
}
