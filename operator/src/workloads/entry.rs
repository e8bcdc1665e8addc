//! The WorkloadEntry that stands for an injected pod, as a pure function of
//! the pod, its Mesh and its node (docs/operator.md, "What it does").

use std::collections::BTreeMap;

use ferrimesh_crds::workload_entry::{WorkloadCondition, WorkloadPort};
use ferrimesh_crds::{MeshSpec, WorkloadEntry, WorkloadEntrySpec, WorkloadEntryStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::injected_pod::InjectedPod;
use super::{
    HEALTH_CHECKS_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, POD_UID_ANNOTATION, REVISION_LABEL,
};

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
}
