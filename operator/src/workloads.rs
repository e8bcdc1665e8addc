//! The WorkloadEntry that stands for an injected pod (operator.md section
//! 4), as a pure function of the pod, its Mesh and its node.

use std::collections::BTreeMap;

use ferrimesh_crds::workload_entry::{WorkloadCondition, WorkloadPort};
use ferrimesh_crds::{MeshSpec, WorkloadEntry, WorkloadEntrySpec, WorkloadEntryStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::injected_pod::InjectedPod;
use crate::registered_entry::RegisteredEntry;

/// Label on every WorkloadEntry the operator writes; entries without it are
/// never touched.
pub const MANAGED_BY_LABEL: &str = "ferrimesh.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "ferrimesh-operator";
/// Label with the revision of the Mesh that registered the entry.
pub const REVISION_LABEL: &str = "ferrimesh.io/revision";
/// Annotation with the UID of the pod an entry stands for.
pub const POD_UID_ANNOTATION: &str = "ferrimesh.io/pod-uid";
/// istiod reads an entry's `Healthy` condition only when the entry carries
/// this annotation set to `"true"`; without it the entry counts as healthy
/// whatever its pod's state.
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

/// Whether an entry with these labels is the operator's (carries
/// [`MANAGED_BY_LABEL`]=[`MANAGED_BY`]).
pub fn is_ours(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY)
}

/// `<region>/<zone>` from the node's topology labels.
fn locality(node_labels: Option<&BTreeMap<String, String>>) -> Option<String> {
    let labels = node_labels?;
    let region = labels.get("topology.kubernetes.io/region")?;
    Some(match labels.get("topology.kubernetes.io/zone") {
        Some(zone) => format!("{region}/{zone}"),
        None => region.clone(),
    })
}

/// The pod's `Ready` condition as the entry's `Healthy` condition.
fn healthy(pod: &InjectedPod) -> WorkloadCondition {
    WorkloadCondition {
        type_: "Healthy".to_owned(),
        status: pod.ready.as_deref().unwrap_or("Unknown").to_owned(),
        last_probe_time: None,
        last_transition_time: pod.ready_since.as_ref().map(|t| t.0.to_string()),
        reason: None,
        message: None,
    }
}

/// The WorkloadEntry for `pod` (on a node with `node_labels`), or `None`
/// while it has no IP.
pub fn desired_entry(
    pod: &InjectedPod,
    mesh: &MeshSpec,
    node_labels: Option<&BTreeMap<String, String>>,
) -> Option<WorkloadEntry> {
    let ip = pod.ip.clone()?;
    let name = pod.metadata.name.clone()?;
    let uid = pod.metadata.uid.clone()?;
    let spec = WorkloadEntrySpec {
        address: Some(ip),
        ports: pod
            .ports
            .iter()
            .map(|(name, port)| (name.clone(), WorkloadPort(*port)))
            .collect(),
        // No labels: istiod already sees the pod, and a Kubernetes Service
        // or ServiceEntry selector that matched the pod's labels would
        // select the entry too and list the pod twice (istiod adds entries
        // to EndpointSlice endpoints without de-duplication). An entry with
        // no labels is selected by nothing (docs/operator.md).
        labels: BTreeMap::new(),
        network: (!mesh.network.is_empty()).then(|| mesh.network.clone()),
        locality: locality(node_labels),
        weight: None,
        service_account: pod.service_account.clone(),
    };
    let mut entry = WorkloadEntry::new(&name, spec);
    entry.metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: pod.metadata.namespace.clone(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            (REVISION_LABEL.to_owned(), mesh.revision.clone()),
        ])),
        annotations: Some(BTreeMap::from([
            (POD_UID_ANNOTATION.to_owned(), uid.clone()),
            (HEALTH_CHECKS_ANNOTATION.to_owned(), "true".to_owned()),
        ])),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".to_owned(),
            kind: "Pod".to_owned(),
            name,
            uid,
            controller: Some(true),
            block_owner_deletion: Some(false),
        }]),
        ..ObjectMeta::default()
    };
    entry.status = Some(WorkloadEntryStatus {
        conditions: vec![healthy(pod)],
    });
    Some(entry)
}

/// Whether a cached entry is an orphan of ours: its pod is not among `live`
/// (namespace, name, uid) triples.
pub fn is_orphan(entry: &RegisteredEntry, live: &dyn Fn(&str, &str, &str) -> bool) -> bool {
    let meta = &entry.metadata;
    match (
        entry.ours,
        meta.namespace.as_deref(),
        meta.name.as_deref(),
        entry.pod_uid.as_deref(),
    ) {
        (true, Some(ns), Some(name), Some(uid)) => !live(ns, name, uid),
        (true, ..) => true,
        (false, ..) => false,
    }
}

#[cfg(test)]
mod tests {
    use kube::ResourceExt;
    use serde_json::json;

    use super::*;

    fn pod() -> InjectedPod {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "pod-uid-1", "labels": {"app": "web"},
                         "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null}"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n1",
                     "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9999}]}],
                     "initContainers": [{"name": "istio-proxy", "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]}]},
            "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        pod.into()
    }

    #[test]
    fn entry_mirrors_the_pod() {
        let node = BTreeMap::from([
            (
                "topology.kubernetes.io/region".to_owned(),
                "eu-west".to_owned(),
            ),
            (
                "topology.kubernetes.io/zone".to_owned(),
                "eu-west-1a".to_owned(),
            ),
        ]);
        let mesh = MeshSpec {
            network: "net1".into(),
            ..MeshSpec::default()
        };
        let entry = desired_entry(&pod(), &mesh, Some(&node)).expect("entry");
        assert_eq!(entry.spec.address.as_deref(), Some("10.1.2.3"));
        assert_eq!(
            entry.labels().get(REVISION_LABEL).map(String::as_str),
            Some("default")
        );
        assert_eq!(
            entry.spec.ports,
            BTreeMap::from([("http".to_owned(), WorkloadPort(8080))])
        );
        assert!(
            entry.spec.labels.is_empty(),
            "no selector may pick the entry as well as its pod"
        );
        assert_eq!(
            entry
                .annotations()
                .get(HEALTH_CHECKS_ANNOTATION)
                .map(String::as_str),
            Some("true"),
            "istiod reads Healthy only with it"
        );
        assert_eq!(entry.spec.service_account.as_deref(), Some("web"));
        assert_eq!(entry.spec.network.as_deref(), Some("net1"));
        assert_eq!(entry.spec.locality.as_deref(), Some("eu-west/eu-west-1a"));
        let owner = &entry.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("Pod", "pod-uid-1", Some(true), Some(false))
        );
        assert_eq!(entry.status.expect("status").conditions[0].status, "True");
    }

    #[test]
    fn no_entry_without_an_ip_and_unknown_health_without_ready() {
        let mut p = pod();
        p.ip = None;
        assert!(desired_entry(&p, &MeshSpec::default(), None).is_none());
        let mut p = pod();
        p.ready = None;
        let entry = desired_entry(&p, &MeshSpec::default(), None).expect("entry");
        assert_eq!(
            entry.status.expect("status").conditions[0].status,
            "Unknown"
        );
        assert!(entry.spec.locality.is_none() && entry.spec.network.is_none());
    }

    #[test]
    fn finds_orphans_among_its_own_entries_only() {
        let entry = desired_entry(&pod(), &MeshSpec::default(), None).expect("entry");
        let cached = RegisteredEntry::from(entry.clone());
        assert!(!is_orphan(&cached, &|ns, name, uid| (ns, name, uid)
            == ("shop", "web-1", "pod-uid-1")));
        assert!(
            is_orphan(&cached, &|_, _, uid| uid == "another-uid"),
            "a new pod of the same name"
        );
        let mut foreign = entry;
        foreign.metadata.labels = None;
        assert!(
            !is_orphan(&foreign.into(), &|_, _, _| false),
            "entries without our label are never touched"
        );
    }
}
