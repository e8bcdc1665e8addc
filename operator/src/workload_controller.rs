//! The workload controller (operator.md section 4): a WorkloadEntry for
//! every injected pod while it lives, deleted with the pod, and a sweep that
//! removes entries whose pod is gone (also ones missed while the operator
//! was down). Only injected pods are watched (`security.istio.io/tlsMode`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferrimesh_crds::mesh::DEFAULT_REVISION;
use ferrimesh_crds::{Mesh, WorkloadEntry};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::workloads::{
    MANAGED_BY, MANAGED_BY_LABEL, POD_UID_ANNOTATION, desired_entry, is_gone, is_injected,
    is_orphan,
};
use crate::{FIELD_MANAGER, Result};

/// The label selector of the pods the controller watches.
pub const INJECTED_PODS: &str = "security.istio.io/tlsMode=istio";

/// What the workload controller needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Every Mesh.
    pub meshes: Store<Mesh>,
}

fn mesh_for(pod: &Pod, meshes: &Store<Mesh>) -> Option<Arc<Mesh>> {
    let revision = pod
        .annotations()
        .get("istio.io/rev")
        .map_or(DEFAULT_REVISION, String::as_str);
    meshes
        .state()
        .into_iter()
        .find(|m| m.spec.revision == revision && m.metadata.deletion_timestamp.is_none())
}

/// Deletes the entry standing for `pod`, if it is ours and for this pod.
async fn delete_entry(client: &Client, namespace: &str, name: &str, uid: &str) -> Result<()> {
    let api: Api<WorkloadEntry> = Api::namespaced(client.clone(), namespace);
    let Some(entry) = api.get_opt(name).await? else {
        return Ok(());
    };
    let ours = entry
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY);
    if !ours
        || entry
            .annotations()
            .get(POD_UID_ANNOTATION)
            .is_some_and(|u| u != uid)
    {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: entry.metadata.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {
            tracing::info!(namespace, name, "WorkloadEntry deleted");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reconciles one injected pod.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let mesh = mesh_for(&pod, &ctx.meshes).filter(|m| m.spec.workload_registration.enabled);
    let Some(mesh) = mesh.filter(|_| is_injected(&pod) && !is_gone(&pod)) else {
        delete_entry(&ctx.client, &namespace, &name, &uid).await?;
        return Ok(Action::await_change());
    };
    let node = match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(node) => Api::<Node>::all(ctx.client.clone()).get_opt(node).await?,
        None => None,
    };
    let Some(entry) = desired_entry(&pod, &mesh.spec, node.as_ref()) else {
        return Ok(Action::await_change()); // no IP yet
    };
    let api: Api<WorkloadEntry> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut spec_only = entry.clone();
    spec_only.status = None;
    api.patch(&name, &params, &Patch::Apply(&spec_only)).await?;
    let status = json!({"apiVersion": WorkloadEntry::api_version(&()), "kind": WorkloadEntry::kind(&()), "status": entry.status});
    api.patch_status(&name, &params, &Patch::Apply(&status))
        .await?;
    Ok(Action::await_change())
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(pod: Arc<Pod>, error: &crate::Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pod = %pod.name_any(), %error, "workload reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Deletes the entry of a pod that was deleted.
pub async fn on_pod_deleted(client: &Client, pod: &Pod) -> Result<()> {
    delete_entry(
        client,
        &pod.namespace().unwrap_or_default(),
        &pod.name_any(),
        &pod.uid().unwrap_or_default(),
    )
    .await
}

/// Deletes every entry of ours whose pod no longer exists (or is another
/// pod of the same name); returns how many.
pub async fn sweep_orphans(client: &Client) -> Result<usize> {
    let pods: Api<Pod> = Api::all(client.clone());
    let live: BTreeSet<(String, String, String)> = pods
        .list_metadata(&ListParams::default().labels(INJECTED_PODS))
        .await?
        .items
        .into_iter()
        .map(|p| {
            (
                p.namespace().unwrap_or_default(),
                p.name_any(),
                p.uid().unwrap_or_default(),
            )
        })
        .collect();
    let entries: Api<WorkloadEntry> = Api::all(client.clone());
    let mut deleted = 0;
    for entry in entries
        .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
        .await?
    {
        let is_live = |ns: &str, name: &str, uid: &str| {
            live.contains(&(ns.to_owned(), name.to_owned(), uid.to_owned()))
        };
        if is_orphan(&entry, &is_live) {
            let uid = entry
                .annotations()
                .get(POD_UID_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            delete_entry(
                client,
                &entry.namespace().unwrap_or_default(),
                &entry.name_any(),
                &uid,
            )
            .await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
