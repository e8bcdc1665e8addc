//! The workload controller (docs/operator.md, "What it does"): a WorkloadEntry for
//! every injected pod while it lives, deleted with the pod, and a sweep that
//! removes entries whose pod is gone (also ones missed while the operator
//! was down). Only injected pods are watched (`security.istio.io/tlsMode`).
//! A Mesh with `workloadRegistration.target` has its pods' entries pushed
//! into a config cluster instead ([`super::target`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferrimesh_crds::istio::SIDECAR_STATUS;
use ferrimesh_crds::mesh::{DEFAULT_REVISION, RegistrationTarget};
use ferrimesh_crds::{Mesh, WorkloadEntry};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::entry::{desired_entry, pushed_entry, pushed_name, pushed_namespace};
use super::injected_pod::InjectedPod;
use super::registered_entry::{RegisteredEntry, up_to_date, written};
use super::target::Targets;
use super::{POD_UID_ANNOTATION, is_ours};
use crate::{Error, FIELD_MANAGER, Result};

/// What the workload controller needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Every Mesh.
    pub meshes: Store<Mesh>,
    /// The WorkloadEntries of ours, to skip writes that change nothing.
    pub entries: Store<RegisteredEntry>,
    /// Nodes (metadata only), for the locality of their pods.
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// Publishes an Event on a pod that cannot be registered.
    pub recorder: Recorder,
    /// The config clusters entries are pushed into.
    pub targets: Arc<Targets>,
}

/// The Mesh that serves `pod` (by its revision), unless being deleted.
pub(crate) fn mesh_for(pod: &InjectedPod, meshes: &Store<Mesh>) -> Option<Arc<Mesh>> {
    let revision = pod.revision.as_deref().unwrap_or(DEFAULT_REVISION);
    meshes
        .state()
        .into_iter()
        .find(|m| m.spec.revision == revision && m.metadata.deletion_timestamp.is_none())
}

/// Deletes the entry `namespace/name`, if it is ours and for the pod `uid`.
pub(crate) async fn delete_entry(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<()> {
    let api: Api<WorkloadEntry> = Api::namespaced(client.clone(), namespace);
    let Some(entry) = api.get_opt(name).await? else {
        return Ok(());
    };
    if !is_ours(entry.labels())
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
pub async fn reconcile(pod: Arc<InjectedPod>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let mesh = mesh_for(&pod, &ctx.meshes).filter(|m| m.spec.workload_registration.enabled);
    let Some(mesh) = mesh.filter(|_| pod.injected && !pod.is_gone()) else {
        on_pod_deleted(&ctx, &pod).await?;
        return Ok(Action::await_change());
    };
    let node = pod
        .node_name
        .as_deref()
        .and_then(|node| ctx.nodes.get(&ObjectRef::new(node)));
    let node_labels = node.as_ref().and_then(|n| n.metadata.labels.as_ref());
    if let Some(target) = &mesh.spec.workload_registration.target {
        return push(&pod, &mesh, target, node_labels, &ctx).await;
    }
    let Some(entry) = desired_entry(&pod, &mesh.spec, node_labels) else {
        return Ok(Action::await_change()); // no IP yet
    };
    let existing = ctx.entries.get(&ObjectRef::new(&name).within(&namespace));
    if existing
        .as_ref()
        .is_some_and(|existing| up_to_date(existing, &entry))
    {
        return Ok(Action::await_change());
    }
    if let Written::NotOurs = write_entry(&ctx.client, entry, existing.is_some()).await? {
        report_not_ours(&ctx.recorder, &pod).await;
    }
    Ok(Action::await_change())
}

/// Writes `pod`'s entry into the config cluster `target` when it differs
/// from what is there (read first: the operator keeps no cache of another
/// cluster), and deletes the entry it may have had beside it before the
/// Mesh named a target. The pod's labels are read from the API server:
/// the pod cache, sized for ten thousand pods, keeps none.
async fn push(
    pod: &InjectedPod,
    mesh: &Mesh,
    target: &RegistrationTarget,
    node_labels: Option<&std::collections::BTreeMap<String, String>>,
    ctx: &Context,
) -> Result<Action> {
    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    if ctx
        .entries
        .get(&ObjectRef::new(&name).within(&namespace))
        .is_some()
    {
        delete_entry(
            &ctx.client,
            &namespace,
            &name,
            &pod.uid().unwrap_or_default(),
        )
        .await?;
    }
    if pod.ip.is_none() {
        return Ok(Action::await_change());
    }
    let client = ctx
        .targets
        .client(target)
        .await
        .map_err(|f| Error::Target(f.message))?;
    let current_pod = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .get_metadata_opt(&name)
        .await?
        .filter(|p| p.uid() == pod.uid());
    let Some(current_pod) = current_pod else {
        return Ok(Action::await_change()); // gone: its deletion removes the entry
    };
    let labels = current_pod.metadata.labels.unwrap_or_default();
    let Some(entry) = pushed_entry(pod, labels, &mesh.spec, target, node_labels) else {
        return Ok(Action::await_change());
    };
    let api: Api<WorkloadEntry> =
        Api::namespaced(client.clone(), &entry.namespace().unwrap_or_default());
    let current = api.get_opt(&entry.name_any()).await?;
    if current
        .as_ref()
        .is_some_and(|current| written(current) == written(&entry))
    {
        return Ok(Action::await_change());
    }
    if let Written::NotOurs = write_entry(&client, entry, current.is_some()).await? {
        report_not_ours(&ctx.recorder, pod).await;
    }
    Ok(Action::await_change())
}

/// Logs and tells the pod's owner (a Warning Event on the pod) that an
/// entry of its name that ferrimesh did not create keeps it unregistered.
async fn report_not_ours(recorder: &Recorder, pod: &InjectedPod) {
    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    tracing::warn!(
        namespace,
        name,
        "a WorkloadEntry of this name is not ours: left alone"
    );
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "WorkloadEntryNotManaged".to_owned(),
        note: Some(format!(
            "WorkloadEntry {namespace}/{name} exists and was not created by ferrimesh: \
             the pod is not registered until that entry is deleted"
        )),
        action: "Register".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

/// What [`write_entry`] did.
enum Written {
    /// The entry is as the operator writes it.
    Written,
    /// An entry of the pod's name exists that the operator did not create.
    NotOurs,
}

/// Writes `desired` (spec, the operator's labels, annotation and owner,
/// then the status): created when the cache has no entry, otherwise read,
/// changed and replaced.
///
/// Not server-side apply: for a custom resource the API server parses an
/// apply body as YAML and merges it field by field against the schema,
/// which cost it more than twice the CPU of a create per entry
/// (docs/benchmarks.md), and entries are the operator's bulk write.
/// The spec is the operator's alone and is replaced whole; of the metadata
/// only its own keys and its pod's owner reference are set, so labels,
/// annotations and owners others add stay. An entry of the same name that
/// the operator did not create is left alone.
async fn write_entry(client: &Client, mut desired: WorkloadEntry, cached: bool) -> Result<Written> {
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<WorkloadEntry> = Api::namespaced(client.clone(), &namespace);
    let status = desired.status.take();
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    let created = if cached {
        false
    } else {
        match api.create(&params, &desired).await {
            Ok(_) => true,
            // Not in the cache: not seen yet, or not ours.
            Err(kube::Error::Api(status)) if status.is_already_exists() => false,
            Err(e) => return Err(e.into()),
        }
    };
    if !created {
        let current = api.get(&name).await?;
        if !is_ours(current.labels()) {
            return Ok(Written::NotOurs);
        }
        // A conflict (changed since the read) fails the reconcile, which is retried.
        api.replace(&name, &params, &merged(current, desired))
            .await?;
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch_status(&name, &params, &Patch::Merge(json!({ "status": status })))
        .await?;
    Ok(Written::Written)
}

/// `current` with what the operator writes taken from `desired`: the spec,
/// its labels and annotation, and the owner reference to its pod (an owner
/// reference to an earlier pod of the same name is dropped).
fn merged(mut current: WorkloadEntry, desired: WorkloadEntry) -> WorkloadEntry {
    let meta = &mut current.metadata;
    let wanted = desired.metadata;
    meta.labels
        .get_or_insert_default()
        .extend(wanted.labels.unwrap_or_default());
    meta.annotations
        .get_or_insert_default()
        .extend(wanted.annotations.unwrap_or_default());
    let ours = wanted.owner_references.unwrap_or_default();
    let owners = meta.owner_references.get_or_insert_default();
    owners.retain(|owner| {
        !ours.iter().any(|o| {
            o.kind == owner.kind && o.api_version == owner.api_version && o.name == owner.name
        })
    });
    owners.extend(ours);
    current.spec = desired.spec;
    current
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(pod: Arc<InjectedPod>, error: &crate::Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pod = %pod.name_any(), %error, "workload reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Deletes the entry of a pod that was deleted (or finished): beside it,
/// and in the config cluster its Mesh pushes into.
pub async fn on_pod_deleted(ctx: &Context, pod: &InjectedPod) -> Result<()> {
    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let uid = pod.uid().unwrap_or_default();
    delete_entry(&ctx.client, &namespace, &name, &uid).await?;
    let Some(mesh) = mesh_for(pod, &ctx.meshes) else {
        return Ok(());
    };
    let Some(target) = &mesh.spec.workload_registration.target else {
        return Ok(());
    };
    let client = ctx
        .targets
        .client(target)
        .await
        .map_err(|f| Error::Target(f.message))?;
    let pushed = pushed_name(&mesh.spec.cluster_id, &name);
    delete_entry(
        &client,
        &pushed_namespace(target, &namespace),
        &pushed,
        &uid,
    )
    .await
}

/// Deletes every entry of ours whose pod no longer exists (or is another
/// pod of the same name), as the caches see it; each orphan is confirmed
/// with the API server first, since a cache may lag behind a pod just
/// created. Returns how many went.
pub async fn sweep_orphans(
    client: &Client,
    pods: &Store<InjectedPod>,
    entries: &Store<RegisteredEntry>,
) -> Result<usize> {
    let live: BTreeSet<(String, String, String)> = pods
        .state()
        .iter()
        .map(|p| {
            (
                p.namespace().unwrap_or_default(),
                p.name_any(),
                p.uid().unwrap_or_default(),
            )
        })
        .collect();
    let is_live = |ns: &str, name: &str, uid: &str| {
        live.contains(&(ns.to_owned(), name.to_owned(), uid.to_owned()))
    };
    let mut deleted = 0;
    for entry in entries.state() {
        if !entry.is_orphan(&is_live) {
            continue;
        }
        let (namespace, name) = (entry.namespace().unwrap_or_default(), entry.name_any());
        let uid = entry.pod_uid.clone().unwrap_or_default();
        let pod = Api::<Pod>::namespaced(client.clone(), &namespace)
            .get_metadata_opt(&name)
            .await?;
        if pod.is_some_and(|p| p.uid() == Some(uid.clone()) && is_injected_meta(&p.metadata)) {
            continue;
        }
        delete_entry(client, &namespace, &name, &uid).await?;
        deleted += 1;
    }
    Ok(deleted)
}

/// Whether a pod's metadata says the webhook injected it.
pub(crate) fn is_injected_meta(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
}

#[cfg(test)]
mod tests {
    //! The reconciler against a scripted API server (tower-test): each test
    //! states the requests it expects, in order, and what the server answers.

    use ferrimesh_crds::MeshSpec;
    use http::StatusCode;
    use serde_json::{Value, json};

    use super::*;
    use crate::test_api::{self, Handle, answer, failure, store, within};
    use crate::workloads::{MANAGED_BY, MANAGED_BY_LABEL};

    fn context_with(meshes: &[Mesh], entries: &[WorkloadEntry]) -> (Arc<Context>, Handle) {
        let (client, handle) = test_api::client();
        (
            Arc::new(Context {
                client: client.clone(),
                meshes: store(meshes),
                entries: store(
                    &entries
                        .iter()
                        .cloned()
                        .map(RegisteredEntry::from)
                        .collect::<Vec<_>>(),
                ),
                nodes: store(&[]),
                recorder: Recorder::new(
                    client.clone(),
                    kube::runtime::events::Reporter {
                        controller: "test".into(),
                        instance: None,
                    },
                ),
                targets: Targets::new(client, "ferrimesh-system").0,
            }),
            handle,
        )
    }

    fn context(meshes: &[Mesh]) -> (Arc<Context>, Handle) {
        context_with(meshes, &[])
    }

    fn pod(status: Value) -> Arc<InjectedPod> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "uid-1", "labels": {"app": "web"},
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [{"name": "web"}]},
            "status": status
        }))
        .expect("pod");
        Arc::new(pod.into())
    }

    fn entry_json(uid: &str) -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": "web-1", "namespace": "shop", "uid": "we-uid",
                            "labels": {MANAGED_BY_LABEL: MANAGED_BY}, "annotations": {POD_UID_ANNOTATION: uid}},
               "spec": {"address": "10.0.0.1"}})
    }

    const ENTRY: &str = "/apis/networking.istio.io/v1/namespaces/shop/workloadentries/web-1";

    const ENTRIES: &str = "/apis/networking.istio.io/v1/namespaces/shop/workloadentries";

    fn ready_with_ip(ip: &str) -> Value {
        json!({"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]})
    }

    /// Answers the read and the delete of the pod's entry beside it.
    async fn expect_entry_deleted(handle: &mut Handle) {
        answer(handle, "GET", ENTRY, StatusCode::OK, entry_json("uid-1")).await;
        answer(handle, "DELETE", ENTRY, StatusCode::OK, entry_json("uid-1")).await;
    }

    /// Answers the status write and checks it is a merge patch of `Healthy`.
    async fn expect_status(handle: &mut Handle) {
        let status = answer(
            handle,
            "PATCH",
            &format!("{ENTRY}/status"),
            StatusCode::OK,
            entry_json("uid-1"),
        )
        .await;
        assert_eq!(status["status"]["conditions"][0]["type"], "Healthy");
        assert!(
            status.get("spec").is_none(),
            "the status write carries the status only"
        );
    }

    #[tokio::test]
    async fn creates_the_entry_then_its_status_once_the_pod_has_an_ip() {
        register_scripted(&[], |mut handle| async move {
            let created = answer(
                &mut handle,
                "POST",
                ENTRIES,
                StatusCode::CREATED,
                entry_json("uid-1"),
            )
            .await;
            assert_eq!(created["spec"]["address"], "10.0.0.1");
            assert_eq!(created["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
            assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            assert!(
                created.get("status").is_none(),
                "the status goes to its subresource"
            );
            expect_status(&mut handle).await;
        })
        .await
        .expect("reconcile");
    }

    /// The entry as the API server has it: written for the pod's earlier
    /// address, with a label, an annotation and an owner someone else added,
    /// and an owner reference to an earlier pod of the same name.
    fn stale_entry() -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": "web-1", "namespace": "shop", "uid": "we-uid", "resourceVersion": "7",
                            "labels": {MANAGED_BY_LABEL: MANAGED_BY, "team": "shop"},
                            "annotations": {POD_UID_ANNOTATION: "uid-0", "note": "kept"},
                            "ownerReferences": [
                                {"apiVersion": "v1", "kind": "Pod", "name": "web-1", "uid": "uid-0", "controller": true},
                                {"apiVersion": "example.com/v1", "kind": "Inventory", "name": "shop", "uid": "inv-1"}]},
               "spec": {"address": "10.0.0.9", "ports": {"old": 9}}})
    }

    /// Answers the read and the replace of [`stale_entry`] and checks what
    /// the operator wrote.
    async fn expect_replace_of_stale_entry(handle: &mut Handle) {
        answer(handle, "GET", ENTRY, StatusCode::OK, stale_entry()).await;
        let replaced = answer(handle, "PUT", ENTRY, StatusCode::OK, stale_entry()).await;
        let meta = &replaced["metadata"];
        assert_eq!(meta["resourceVersion"], "7", "replaced at the version read");
        assert_eq!(replaced["spec"]["address"], "10.0.0.1");
        assert!(
            replaced["spec"].get("ports").is_none(),
            "the spec is replaced whole"
        );
        assert_eq!(meta["labels"]["team"], "shop");
        assert_eq!(meta["annotations"]["note"], "kept");
        assert_eq!(meta["annotations"][POD_UID_ANNOTATION], "uid-1");
        let owners: Vec<&str> = meta["ownerReferences"]
            .as_array()
            .expect("owners")
            .iter()
            .map(|o| o["uid"].as_str().expect("uid"))
            .collect();
        assert_eq!(
            owners,
            ["inv-1", "uid-1"],
            "the earlier pod's reference replaced by this pod's"
        );
    }

    #[tokio::test]
    async fn replaces_a_stale_entry_keeping_what_others_added() {
        let stale: WorkloadEntry = serde_json::from_value(stale_entry()).expect("entry");
        register_scripted(&[stale], |mut handle| async move {
            expect_replace_of_stale_entry(&mut handle).await;
            expect_status(&mut handle).await;
        })
        .await
        .expect("reconcile");
    }

    #[tokio::test]
    async fn an_entry_the_cache_has_not_seen_yet_is_replaced_instead_of_created() {
        register_scripted(&[], |mut handle| async move {
            let exists = failure(409, "AlreadyExists");
            answer(&mut handle, "POST", ENTRIES, StatusCode::CONFLICT, exists).await;
            expect_replace_of_stale_entry(&mut handle).await;
            expect_status(&mut handle).await;
        })
        .await
        .expect("reconcile");
    }

    #[tokio::test]
    async fn an_entry_of_the_same_name_that_is_not_ours_is_left_alone() {
        register_scripted(&[], |mut handle| async move {
            let exists = failure(409, "AlreadyExists");
            answer(&mut handle, "POST", ENTRIES, StatusCode::CONFLICT, exists).await;
            let mut foreign = stale_entry();
            foreign["metadata"]["labels"] = json!({"team": "shop"});
            answer(&mut handle, "GET", ENTRY, StatusCode::OK, foreign).await;
            // Nothing written to the entry; the pod gets a Warning Event.
            let events = "/apis/events.k8s.io/v1/namespaces/shop/events";
            let created = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                                     "metadata": {"name": "e", "namespace": "shop"},
                                     "eventTime": "2026-01-01T00:00:00.000000Z"});
            let event = answer(&mut handle, "POST", events, StatusCode::CREATED, created).await;
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "WorkloadEntryNotManaged");
            assert_eq!(event["regarding"]["kind"], "Pod");
            assert_eq!(event["regarding"]["name"], "web-1");
            assert!(
                event["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("shop/web-1")),
                "{event}"
            );
        })
        .await
        .expect("nothing to do");
    }

    #[tokio::test]
    async fn a_replace_that_lost_a_race_fails_the_reconcile_for_a_retry() {
        let stale: WorkloadEntry = serde_json::from_value(stale_entry()).expect("entry");
        let result = register_scripted(&[stale], |mut handle| async move {
            answer(&mut handle, "GET", ENTRY, StatusCode::OK, stale_entry()).await;
            let conflict = failure(409, "Conflict");
            answer(&mut handle, "PUT", ENTRY, StatusCode::CONFLICT, conflict).await;
        })
        .await;
        assert!(result.is_err(), "a conflict is retried, not ignored");
    }

    /// Reconciles a ready pod with the IP 10.0.0.1 under the default Mesh,
    /// the cache holding `cached`, while `script` plays the API server.
    async fn register_scripted<S, F>(cached: &[WorkloadEntry], script: S) -> Result<Action>
    where
        S: FnOnce(Handle) -> F,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ctx, handle) = context_with(&[Mesh::new("default", MeshSpec::default())], cached);
        reconcile_scripted(pod(ready_with_ip("10.0.0.1")), ctx, handle, script).await
    }

    /// Reconciles `pod` while `script` plays the API server on `handle`;
    /// fails unless every request the script expects came.
    async fn reconcile_scripted<S, F>(
        pod: Arc<InjectedPod>,
        ctx: Arc<Context>,
        handle: Handle,
        script: S,
    ) -> Result<Action>
    where
        S: FnOnce(Handle) -> F,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let server = tokio::spawn(script(handle));
        let result = within(reconcile(pod, ctx)).await;
        server.await.expect("scripted requests");
        result
    }

    /// The default Mesh pushing into the config cluster of the Secret
    /// `ferrimesh-registration-target`, namespace `cluster-a`, as cluster `east`.
    fn pushing_mesh() -> Mesh {
        let mut spec = MeshSpec {
            cluster_id: "east".into(),
            ..MeshSpec::default()
        };
        spec.workload_registration.target = Some(RegistrationTarget {
            namespace: Some("cluster-a".into()),
            ..RegistrationTarget::default()
        });
        Mesh::new("default", spec)
    }

    const SECRET: &str =
        "/api/v1/namespaces/ferrimesh-system/secrets/ferrimesh-registration-target";

    #[tokio::test]
    async fn a_pod_of_a_pushing_mesh_is_not_registered_without_the_target_secret() {
        let (ctx, handle) = context(&[pushing_mesh()]);
        let result = reconcile_scripted(
            pod(ready_with_ip("10.0.0.1")),
            ctx,
            handle,
            |mut handle| async move {
                let missing = failure(404, "NotFound");
                answer(&mut handle, "GET", SECRET, StatusCode::NOT_FOUND, missing).await;
            },
        )
        .await;
        assert!(
            matches!(&result, Err(Error::Target(m)) if m.contains("ferrimesh-registration-target")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_pod_of_a_pushing_mesh_is_pushed_with_its_labels_and_its_local_entry_goes() {
        let mesh = pushing_mesh();
        let target = mesh
            .spec
            .workload_registration
            .target
            .clone()
            .expect("target");
        let local =
            desired_entry(&pod(ready_with_ip("10.0.0.1")), &mesh.spec, None).expect("entry");
        let (ctx, handle) = context_with(&[mesh], &[local]);
        ctx.targets.insert(&target, ctx.client.clone());
        reconcile_scripted(
            pod(ready_with_ip("10.0.0.1")),
            ctx,
            handle,
            |mut handle| async move {
                expect_entry_deleted(&mut handle).await;
                let pod = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                 "metadata": {"name": "web-1", "namespace": "shop", "uid": "uid-1",
                                              "labels": {"app": "web"}}});
                let pod_path = "/api/v1/namespaces/shop/pods/web-1";
                answer(&mut handle, "GET", pod_path, StatusCode::OK, pod).await;
                let pushed = "/apis/networking.istio.io/v1/namespaces/cluster-a/workloadentries";
                let missing = failure(404, "NotFound");
                let path = format!("{pushed}/east-web-1");
                answer(&mut handle, "GET", &path, StatusCode::NOT_FOUND, missing).await;
                let created = answer(
                    &mut handle,
                    "POST",
                    pushed,
                    StatusCode::CREATED,
                    entry_json("uid-1"),
                )
                .await;
                assert_eq!(created["metadata"]["name"], "east-web-1");
                assert_eq!(created["spec"]["labels"]["app"], "web");
                assert_eq!(
                    created["metadata"]["labels"]["ferrimesh.io/cluster"],
                    "east"
                );
                assert_eq!(
                    created["metadata"]["annotations"]["ferrimesh.io/pod"],
                    "shop/web-1"
                );
                assert!(created["metadata"].get("ownerReferences").is_none());
                let status = answer(
                    &mut handle,
                    "PATCH",
                    &format!("{path}/status"),
                    StatusCode::OK,
                    entry_json("uid-1"),
                )
                .await;
                assert_eq!(status["status"]["conditions"][0]["status"], "True");
            },
        )
        .await
        .expect("reconcile");
    }

    #[tokio::test]
    async fn writes_nothing_when_the_cached_entry_is_up_to_date() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let ip = json!({"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]});
        let current = desired_entry(&pod(ip.clone()), &mesh.spec, None).expect("entry");
        let (ctx, _handle) = context_with(&[mesh], &[current]);
        within(reconcile(pod(ip), ctx)).await.expect("reconcile");
    }

    #[tokio::test]
    async fn sweeps_orphans_from_the_caches_after_asking_the_api_server() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let ip = json!({"podIP": "10.0.0.1"});
        let orphan = desired_entry(&pod(ip.clone()), &mesh.spec, None).expect("entry");
        let mut live_pod = (*pod(ip.clone())).clone();
        live_pod.metadata.name = Some("web-2".into());
        live_pod.metadata.uid = Some("uid-2".into());
        let live = desired_entry(&live_pod, &mesh.spec, None).expect("entry");
        let (ctx, mut handle) = context_with(&[mesh], &[orphan, live]);
        let pods = store(&[live_pod]);
        let server = tokio::spawn(async move {
            let pod_path = "/api/v1/namespaces/shop/pods/web-1";
            answer(
                &mut handle,
                "GET",
                pod_path,
                StatusCode::NOT_FOUND,
                failure(404, "NotFound"),
            )
            .await;
            expect_entry_deleted(&mut handle).await;
        });
        let swept = within(sweep_orphans(&ctx.client, &pods, &ctx.entries)).await;
        assert_eq!(swept.expect("sweep"), 1, "only the entry whose pod is gone");
        server.await.expect("scripted requests");
    }

    #[tokio::test]
    async fn the_sweep_spares_an_entry_whose_pod_the_cache_has_not_seen_yet() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let entry =
            desired_entry(&pod(json!({"podIP": "10.0.0.1"})), &mesh.spec, None).expect("entry");
        let (ctx, mut handle) = context_with(&[mesh], &[entry]);
        let server = tokio::spawn(async move {
            let pod = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                             "metadata": {"name": "web-1", "namespace": "shop", "uid": "uid-1",
                                          "annotations": {"sidecar.istio.io/status": "{}"}}});
            let pod_path = "/api/v1/namespaces/shop/pods/web-1";
            answer(&mut handle, "GET", pod_path, StatusCode::OK, pod).await;
        });
        let swept = within(sweep_orphans(&ctx.client, &store(&[]), &ctx.entries)).await;
        assert_eq!(swept.expect("sweep"), 0, "the pod exists: its entry stays");
        server.await.expect("scripted requests");
    }

    #[tokio::test]
    async fn does_nothing_before_the_pod_has_an_ip() {
        let (ctx, _handle) = context(&[Mesh::new("default", MeshSpec::default())]);
        within(reconcile(pod(json!({})), ctx))
            .await
            .expect("reconcile");
    }

    #[tokio::test]
    async fn deletes_the_entry_of_a_finished_pod_and_tolerates_not_found_and_conflict() {
        let finished = json!({"podIP": "10.0.0.1", "phase": "Succeeded"});
        let (ctx, handle) = context(&[Mesh::new("default", MeshSpec::default())]);
        reconcile_scripted(
            pod(finished.clone()),
            ctx,
            handle,
            |mut handle| async move {
                answer(
                    &mut handle,
                    "GET",
                    ENTRY,
                    StatusCode::OK,
                    entry_json("uid-1"),
                )
                .await;
                answer(
                    &mut handle,
                    "DELETE",
                    ENTRY,
                    StatusCode::CONFLICT,
                    failure(409, "Conflict"),
                )
                .await;
            },
        )
        .await
        .expect("a conflict means someone else changed it: fine");

        let (ctx, handle) = context(&[Mesh::new("default", MeshSpec::default())]);
        reconcile_scripted(pod(finished), ctx, handle, |mut handle| async move {
            answer(
                &mut handle,
                "GET",
                ENTRY,
                StatusCode::NOT_FOUND,
                failure(404, "NotFound"),
            )
            .await;
        })
        .await
        .expect("nothing to delete");
    }

    #[tokio::test]
    async fn never_deletes_an_entry_of_another_pod() {
        let (ctx, handle) = context(&[]);
        reconcile_scripted(
            pod(json!({"podIP": "10.0.0.1"})),
            ctx,
            handle,
            |mut handle| async move {
                // No Mesh serves the pod: its entry would go, but this one is another pod's.
                answer(
                    &mut handle,
                    "GET",
                    ENTRY,
                    StatusCode::OK,
                    entry_json("uid-of-another-pod"),
                )
                .await;
            },
        )
        .await
        .expect("reconcile");
    }

    #[tokio::test]
    async fn reports_api_errors() {
        let (ctx, handle) = context(&[Mesh::new("default", MeshSpec::default())]);
        let result = reconcile_scripted(
            pod(json!({"podIP": "10.0.0.1"})),
            ctx,
            handle,
            |mut handle| async move {
                let failure = failure(500, "InternalError");
                answer(
                    &mut handle,
                    "POST",
                    ENTRIES,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    failure,
                )
                .await;
            },
        )
        .await;
        assert!(matches!(result, Err(crate::Error::Kube(_))), "{result:?}");
    }
}
