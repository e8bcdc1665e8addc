//! WorkloadEntries pushed into a config cluster
//! (`Mesh.spec.workloadRegistration.target`): two real control planes, A
//! (the workloads and the operator) and B (the config cluster, with a real
//! istiod and no credentials for A). The operator in A holds a kubeconfig
//! for B, in a Secret, with only the rights of
//! config/components/registration-target; pods created in A become
//! endpoints of a ServiceEntry in B, in istiod's own view.

use std::time::{Duration, Instant};

use ferrimesh_crds::mesh::RegistrationTarget;
use ferrimesh_crds::{Mesh, MeshSpec, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, grant_target_rights, injected_pod, namespace, start_operator, target_secret,
    wait_for_crds,
};
use ferrimesh_e2e::istiod::{Istiod, endpoints_with};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The workload namespace in A.
const NS: &str = "shop";
/// The namespace of every entry of A in B.
const TARGET_NS: &str = "cluster-a";
/// A's cluster ID: the prefix of its entries' names in B.
const CLUSTER: &str = "east";
const HOST: &str = "hello.example.com";

/// The Mesh of A, pushing into B's namespace [`TARGET_NS`].
async fn pushing_mesh(client: &Client) -> anyhow::Result<()> {
    let mut spec = MeshSpec {
        cluster_id: CLUSTER.into(),
        ..MeshSpec::default()
    };
    spec.workload_registration.target = Some(RegistrationTarget {
        namespace: Some(TARGET_NS.into()),
        ..RegistrationTarget::default()
    });
    Api::<Mesh>::all(client.clone())
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    Ok(())
}

/// A's entry for the pod `pod` in B, once it exists.
async fn pushed(b: &Client, pod: &str) -> anyhow::Result<Option<WorkloadEntry>> {
    Ok(Api::<WorkloadEntry>::namespaced(b.clone(), TARGET_NS)
        .get_opt(&format!("{CLUSTER}-{pod}"))
        .await?)
}

/// The entry's `Healthy` status, if it has one.
fn healthy(entry: &WorkloadEntry) -> Option<String> {
    entry
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Healthy")
        .map(|c| c.status.clone())
}

/// The `WorkloadsRegistered` condition of A's Mesh: (status, reason, message).
async fn registered(a: &Client) -> anyhow::Result<Option<(String, String, String)>> {
    let mesh = Api::<Mesh>::all(a.clone()).get("default").await?;
    Ok(mesh
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "WorkloadsRegistered")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
}

/// Waits for `WorkloadsRegistered` to have `status`, `reason` and a
/// message containing `says`.
async fn wait_registered(a: &Client, status: &str, reason: &str, says: &str) -> anyhow::Result<()> {
    eventually(
        &format!("WorkloadsRegistered={status} ({reason}: ...{says}...)"),
        WAIT,
        || async {
            Ok(registered(a)
                .await?
                .filter(|(s, r, m)| s == status && r == reason && m.contains(says))
                .map(|_| ()))
        },
    )
    .await
}

/// istiod's endpoints of [`HOST`] with `ip`.
async fn istiod_endpoints(istiod: &Istiod, ip: &str) -> anyhow::Result<Vec<Value>> {
    let shardz = istiod.debug("endpointShardz").await?;
    Ok(endpoints_with(&shardz, HOST, ip)
        .into_iter()
        .cloned()
        .collect())
}

/// An injected pod of A, ready with `ip`, that the ServiceEntry in B
/// selects (`app: hello`).
async fn hello_pod(a: &Client, name: &str, ip: &str) -> anyhow::Result<()> {
    injected_pod(a, NS, name, ip).await?;
    Api::<Pod>::namespaced(a.clone(), NS)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "hello"}}})),
        )
        .await?;
    Ok(())
}

/// Sets the pod's Ready condition, as a kubelet would.
async fn set_ready(a: &Client, pod: &str, ready: bool) -> anyhow::Result<()> {
    let status = if ready { "True" } else { "False" };
    Api::<Pod>::namespaced(a.clone(), NS)
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": status}]}})),
        )
        .await?;
    Ok(())
}

/// Waits until B's entry for `pod` is as `check` wants it.
async fn wait_entry(
    b: &Client,
    pod: &str,
    what: &str,
    check: impl Fn(Option<&WorkloadEntry>) -> bool,
) -> anyhow::Result<()> {
    eventually(what, WAIT, || async {
        Ok(check(pushed(b, pod).await?.as_ref()).then_some(()))
    })
    .await
}

/// The names of A's entries in B.
async fn entry_names(b: &Client) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Api::<WorkloadEntry>::namespaced(b.clone(), TARGET_NS)
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_workload_cluster_become_endpoints_of_a_service_entry_in_the_config_cluster()
-> anyhow::Result<()> {
    // B: the config cluster, with istiod, Istio's CRDs and a ServiceEntry.
    let mut plane_b = ControlPlane::start().await?;
    let b = plane_b.client().await?;
    let istiod = Istiod::start(&plane_b, &MeshSpec::default()).await?;
    namespace(&b, TARGET_NS, &[]).await?;
    grant_target_rights(&plane_b, TARGET_NS)?;
    let service_entry = GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry");
    let entry: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "hello", "namespace": TARGET_NS},
        "spec": {"hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
                 "workloadSelector": {"labels": {"app": "hello"}}}
    }))?;
    Api::<DynamicObject>::namespaced_with(
        b.clone(),
        TARGET_NS,
        &ApiResource::from_gvk(&service_entry),
    )
    .create(&PostParams::default(), &entry)
    .await?;

    // A: the workloads, the operator with B's kubeconfig in its Secret.
    let plane_a = ControlPlane::start().await?;
    let a = plane_a.client().await?;
    plane_a.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&a).await?;
    let b_kubeconfig = std::fs::read_to_string(plane_b.kubeconfig_for("ferrimesh-operator")?)?;
    target_secret(&a, &b_kubeconfig).await?;
    pushing_mesh(&a).await?;
    namespace(&a, NS, &[]).await?;
    let identity = plane_a.kubeconfig_for("ferrimesh-operator")?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let mut operator = Some(start_operator(&plane_a, &identity, "operator", &url)?);

    // A pod in A: an endpoint of the ServiceEntry in B, healthy.
    hello_pod(&a, "hello", "10.7.0.1").await?;
    wait_entry(&b, "hello", "the pod's entry in B, healthy", |e| {
        e.is_some_and(|e| healthy(e).as_deref() == Some("True"))
    })
    .await?;
    let entry = pushed(&b, "hello").await?.expect("entry");
    assert_eq!(
        entry.spec.labels.get("app").map(String::as_str),
        Some("hello"),
        "the pod's labels, for the ServiceEntry to select"
    );
    assert!(entry.metadata.owner_references.is_none());
    // istiod serves a WorkloadEntry with health checks only while Healthy
    // is True: listed means healthy.
    let endpoint = eventually("istiod in B serving the pod", WAIT, || async {
        let endpoints = istiod_endpoints(&istiod, "10.7.0.1").await?;
        Ok((endpoints.len() == 1).then(|| endpoints[0].clone()))
    })
    .await?;
    assert_eq!(endpoint["WorkloadName"], "east-hello");
    assert_eq!(
        endpoint["ServiceAccount"], "spiffe://cluster.local/ns/cluster-a/sa/default",
        "istiod derives the identity from the entry's namespace, not the pod's (docs/operator.md)"
    );
    wait_registered(&a, "True", "Pushed", "1 WorkloadEntries").await?;

    // NotReady: unhealthy in B and in istiod's view; Ready again: back.
    set_ready(&a, "hello", false).await?;
    wait_entry(&b, "hello", "the entry unhealthy", |e| {
        e.is_some_and(|e| healthy(e).as_deref() == Some("False"))
    })
    .await?;
    eventually(
        "istiod no longer serving the unhealthy endpoint",
        WAIT,
        || async {
            Ok(istiod_endpoints(&istiod, "10.7.0.1")
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    set_ready(&a, "hello", true).await?;
    eventually("istiod serving the endpoint again", WAIT, || async {
        Ok((istiod_endpoints(&istiod, "10.7.0.1").await?.len() == 1).then_some(()))
    })
    .await?;

    // Deleting the pod: the entry leaves B, and istiod, within a bound.
    hello_pod(&a, "gone", "10.7.0.2").await?;
    eventually("istiod serving the second pod", WAIT, || async {
        Ok((istiod_endpoints(&istiod, "10.7.0.2").await?.len() == 1).then_some(()))
    })
    .await?;
    let deleted = Instant::now();
    Api::<Pod>::namespaced(a.clone(), NS)
        .delete("gone", &DeleteParams::default().grace_period(0))
        .await?;
    wait_entry(&b, "gone", "the deleted pod's entry gone from B", |e| {
        e.is_none()
    })
    .await?;
    let from_b = deleted.elapsed();
    eventually("istiod no longer serving the deleted pod", WAIT, || async {
        Ok(istiod_endpoints(&istiod, "10.7.0.2")
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    let from_istiod = deleted.elapsed();
    eprintln!(
        "deleted pod: entry gone from B after {from_b:?}, from istiod's endpoints after {from_istiod:?}"
    );
    assert!(from_istiod < Duration::from_secs(5), "{from_istiod:?}");

    // Revoked rights in B: the Mesh says so; restored: converges.
    Api::<RoleBinding>::namespaced(b.clone(), TARGET_NS)
        .delete("ferrimesh-registration", &DeleteParams::default())
        .await?;
    wait_registered(&a, "False", "TargetUnauthorized", "forbidden").await?;
    hello_pod(&a, "while-revoked", "10.7.0.3").await?;
    grant_target_rights(&plane_b, TARGET_NS)?;
    wait_entry(
        &b,
        "while-revoked",
        "the pod created while revoked, pushed",
        |e| e.is_some(),
    )
    .await?;
    wait_registered(&a, "True", "Pushed", "2 WorkloadEntries").await?;

    // A rotated kubeconfig is used without a restart: a bad one is refused,
    // the good one again converges.
    target_secret(&a, &b_kubeconfig.replace("token: ", "token: revoked")).await?;
    wait_registered(&a, "False", "TargetUnauthorized", "Unauthorized").await?;
    target_secret(&a, &b_kubeconfig).await?;
    wait_registered(&a, "True", "Pushed", "2 WorkloadEntries").await?;

    // B's API server restarted: the next pod is pushed all the same.
    plane_b.restart_apiserver().await?;
    hello_pod(&a, "after-restart", "10.7.0.4").await?;
    wait_entry(&b, "after-restart", "a pod pushed after B's restart", |e| {
        e.is_some()
    })
    .await?;

    // The operator down while a pod goes and another comes: at restart, no
    // orphan and no duplicate.
    operator
        .take()
        .map(|p| p.stop(Duration::from_secs(10)))
        .transpose()?;
    Api::<Pod>::namespaced(a.clone(), NS)
        .delete("while-revoked", &DeleteParams::default().grace_period(0))
        .await?;
    hello_pod(&a, "while-down", "10.7.0.5").await?;
    let _operator = start_operator(&plane_a, &identity, "operator-2", &url)?;
    let expected: Vec<String> = ["after-restart", "hello", "while-down"]
        .iter()
        .map(|p| format!("{CLUSTER}-{p}"))
        .collect();
    eventually("B holding exactly one entry per pod of A", WAIT, || async {
        Ok((entry_names(&b).await? == expected).then_some(()))
    })
    .await?;
    wait_registered(&a, "True", "Pushed", "3 WorkloadEntries").await?;
    Ok(())
}
