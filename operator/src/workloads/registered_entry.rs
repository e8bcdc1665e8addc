//! What the operator keeps of a WorkloadEntry of its own: whose it is, and
//! a digest of what the operator writes into it.
//!
//! The cache holds every entry of ours (one per injected pod). Whole, an
//! entry takes a few kilobytes in memory, most of it the tree nodes of its
//! four small maps; a [`RegisteredEntry`] keeps no map and takes a few
//! hundred bytes, and still answers the questions asked of the cache: is
//! this entry already what the operator would write ([`up_to_date`]), does
//! its pod still exist (the sweep), and which Mesh revision registered it
//! (the Mesh status).

use std::hash::{DefaultHasher, Hasher};

use ferrimesh_crds::WorkloadEntry;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{
    HEALTH_CHECKS_ANNOTATION, MANAGED_BY_LABEL, POD_UID_ANNOTATION, REVISION_LABEL, is_ours,
};
use crate::runtime::reduced::reduced_resource;

/// A WorkloadEntry as the operator's cache keeps it. A [`kube::Resource`] of kind
/// WorkloadEntry, so that a reflector can hold it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisteredEntry {
    /// Name, namespace, uid, resourceVersion and owner references (to map
    /// a deleted entry back to its pod); nothing else.
    pub metadata: ObjectMeta,
    /// Whether the entry carries the operator's managed-by label.
    pub ours: bool,
    /// The operator's revision label.
    pub revision: Option<String>,
    /// The pod-uid annotation: the pod the entry was written for.
    pub pod_uid: Option<String>,
    /// The digest of what the operator writes ([`written`]).
    pub written: u64,
}

/// A digest of the parts of `entry` the operator writes: the spec, its own
/// labels and annotation, the owner, and the status conditions. Fields
/// others add do not count.
pub fn written(entry: &WorkloadEntry) -> u64 {
    let meta = &entry.metadata;
    let label = |key| meta.labels.as_ref().and_then(|l| l.get(key));
    let annotation = |key| meta.annotations.as_ref().and_then(|a| a.get(key));
    let uid = annotation(POD_UID_ANNOTATION);
    let health_checks = annotation(HEALTH_CHECKS_ANNOTATION);
    let conditions = entry.status.as_ref().map(|s| &s.conditions);
    // The operator's owner reference is to a pod; others may add theirs.
    let pod_owners: Vec<_> = meta
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "Pod" && o.api_version == "v1")
        .collect();
    let parts = (
        &entry.spec,
        label(MANAGED_BY_LABEL),
        label(REVISION_LABEL),
        uid,
        health_checks,
        pod_owners,
        conditions,
    );
    // Maps serialise in key order: the same content gives the same bytes.
    let bytes = serde_json::to_vec(&parts).unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    hasher.write(&bytes);
    hasher.finish()
}

/// Whether the cached entry already holds what `desired` would write.
pub fn up_to_date(existing: &RegisteredEntry, desired: &WorkloadEntry) -> bool {
    existing.written == written(desired)
}

impl RegisteredEntry {
    /// Whether a cached entry is an orphan of ours: its pod is not among `live`
    /// (namespace, name, uid) triples.
    pub fn is_orphan(&self, live: &dyn Fn(&str, &str, &str) -> bool) -> bool {
        let meta = &self.metadata;
        match (
            self.ours,
            meta.namespace.as_deref(),
            meta.name.as_deref(),
            self.pod_uid.as_deref(),
        ) {
            (true, Some(ns), Some(name), Some(uid)) => !live(ns, name, uid),
            (true, ..) => true,
            (false, ..) => false,
        }
    }
}

impl From<WorkloadEntry> for RegisteredEntry {
    fn from(entry: WorkloadEntry) -> Self {
        let written = written(&entry);
        let mut meta = entry.metadata;
        let mut labels = meta.labels.take().unwrap_or_default();
        Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                owner_references: meta.owner_references,
                ..ObjectMeta::default()
            },
            ours: is_ours(&labels),
            revision: labels.remove(REVISION_LABEL),
            pod_uid: meta
                .annotations
                .and_then(|mut a| a.remove(POD_UID_ANNOTATION)),
            written,
        }
    }
}

reduced_resource!(RegisteredEntry, WorkloadEntry);

#[cfg(test)]
mod tests {
    use ferrimesh_crds::MeshSpec;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::Resource;
    use kube::runtime::watcher;
    use serde_json::json;

    use super::*;
    use crate::runtime::reduced::reduce;
    use crate::workloads::entry::desired_entry;
    use crate::workloads::injected_pod::InjectedPod;

    fn desired() -> WorkloadEntry {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "pod-uid-1", "labels": {"app": "web"},
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"serviceAccountName": "web",
                     "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        desired_entry(&InjectedPod::from(pod), &MeshSpec::default(), None).expect("entry")
    }

    /// The entry as the API server returns it once written, with what
    /// others added.
    fn as_served(mut entry: WorkloadEntry) -> WorkloadEntry {
        let meta = &mut entry.metadata;
        meta.resource_version = Some("7".into());
        meta.uid = Some("entry-uid".into());
        meta.labels
            .get_or_insert_default()
            .insert("extra".into(), "kept".into());
        meta.annotations
            .get_or_insert_default()
            .insert("istio.io/connectedAt".into(), "now".into());
        meta.owner_references
            .get_or_insert_default()
            .push(OwnerReference {
                api_version: "example.com/v1".into(),
                kind: "Inventory".into(),
                name: "shop".into(),
                uid: "inventory-uid".into(),
                ..OwnerReference::default()
            });
        entry
    }

    #[test]
    fn an_entry_is_up_to_date_when_what_we_write_is_there() {
        let desired = desired();
        let cached = RegisteredEntry::from(as_served(desired.clone()));
        assert!(
            up_to_date(&cached, &desired),
            "fields of others do not count"
        );

        let mut moved = as_served(desired.clone());
        moved.spec.address = Some("10.9.9.9".into());
        assert!(!up_to_date(&moved.into(), &desired));
        let mut unhealthy = as_served(desired.clone());
        unhealthy.status = None;
        assert!(!up_to_date(&unhealthy.into(), &desired));
        let mut relabelled = as_served(desired.clone());
        relabelled
            .metadata
            .labels
            .get_or_insert_default()
            .remove(REVISION_LABEL);
        assert!(!up_to_date(&relabelled.into(), &desired));
        let mut orphaned = as_served(desired.clone());
        orphaned.metadata.owner_references = None;
        assert!(!up_to_date(&orphaned.into(), &desired));
    }

    #[test]
    fn keeps_whose_entry_it_is_and_drops_the_rest() {
        let cached = RegisteredEntry::from(as_served(desired()));
        let meta = &cached.metadata;
        assert_eq!(
            (
                meta.name.as_deref(),
                meta.namespace.as_deref(),
                meta.uid.as_deref()
            ),
            (Some("web-1"), Some("shop"), Some("entry-uid"))
        );
        assert!(meta.labels.is_none() && meta.annotations.is_none());
        assert!(cached.ours);
        assert_eq!(cached.revision.as_deref(), Some("default"));
        assert_eq!(cached.pod_uid.as_deref(), Some("pod-uid-1"));
        assert_eq!(
            meta.owner_references.as_ref().map(|o| o[0].uid.as_str()),
            Some("pod-uid-1"),
            "the owner, for mapping a deleted entry back to its pod"
        );
    }

    #[test]
    fn is_a_workload_entry_to_the_api() {
        assert_eq!(
            RegisteredEntry::url_path(&(), Some("shop")),
            "/apis/networking.istio.io/v1/namespaces/shop/workloadentries"
        );
        match reduce::<_, RegisteredEntry>(watcher::Event::Delete(desired())) {
            watcher::Event::Delete(entry) => {
                assert_eq!(entry.metadata.name.as_deref(), Some("web-1"))
            }
            other => panic!("not a Delete: {other:?}"),
        }
    }

    #[test]
    fn finds_orphans_among_its_own_entries_only() {
        let entry = desired();
        let cached = RegisteredEntry::from(entry.clone());
        assert!(
            !cached.is_orphan(&|ns, name, uid| (ns, name, uid) == ("shop", "web-1", "pod-uid-1"))
        );
        assert!(
            cached.is_orphan(&|_, _, uid| uid == "another-uid"),
            "a new pod of the same name"
        );
        let mut foreign = entry;
        foreign.metadata.labels = None;
        assert!(
            !RegisteredEntry::from(foreign).is_orphan(&|_, _, _| false),
            "entries without our label are never touched"
        );
    }
}
