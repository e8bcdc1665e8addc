//! The WorkloadEntry that stands for an injected pod, as a pure function of
//! the pod, its Mesh and its node (docs/operator.md, "What it does"): the
//! one written beside the pod ([`desired_entry`]) and the one pushed into a
//! config cluster ([`pushed_entry`]).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};

use ferrimesh_crds::mesh::RegistrationTarget;
use ferrimesh_crds::workload_entry::{WorkloadCondition, WorkloadPort};
use ferrimesh_crds::{MeshSpec, WorkloadEntry, WorkloadEntrySpec, WorkloadEntryStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::injected_pod::InjectedPod;
use super::{
    CLUSTER_LABEL, HEALTH_CHECKS_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, POD_ANNOTATION,
    POD_UID_ANNOTATION, REVISION_LABEL,
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

/// A cluster ID as a label value and name prefix: lower case, characters
/// other than letters, digits, `-` and `.` turned into `-`, at most 63
/// characters, starting and ending with a letter or digit.
pub fn cluster_label(cluster_id: &str) -> String {
    let mapped: String = cluster_id
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "cluster".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// The longest object name the API server accepts.
const MAX_NAME: usize = 253;

/// The name of a pod's entry in a config cluster: `<cluster>-<pod>`, so that
/// pods of the same name in several clusters pushing into one namespace do
/// not collide. A name that would be too long keeps its start and ends with
/// a digest of the whole.
pub fn pushed_name(cluster_id: &str, pod: &str) -> String {
    let name = format!("{}-{pod}", cluster_label(cluster_id));
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut hasher = DefaultHasher::new();
    hasher.write(name.as_bytes());
    let digest = format!("{:016x}", hasher.finish());
    let keep = name
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|i| *i < MAX_NAME - digest.len())
        .last()
        .unwrap_or(0);
    let start = name[..keep].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{start}-{digest}")
}

/// The namespace of a pod's entry in a config cluster: the target's, or
/// the pod's own namespace name.
pub fn pushed_namespace(target: &RegistrationTarget, pod_namespace: &str) -> String {
    target
        .namespace
        .clone()
        .unwrap_or_else(|| pod_namespace.to_owned())
}

/// The WorkloadEntry for `pod` (with `labels`) in the config cluster
/// `target`, or `None` while it has no IP. Unlike [`desired_entry`] it
/// carries the pod's labels (istiod there does not see the pod, so a
/// ServiceEntry must select the entry), no owner reference (the pod is in
/// another cluster), and says whose it is with the cluster label and the
/// pod annotation instead.
pub fn pushed_entry(
    pod: &InjectedPod,
    labels: BTreeMap<String, String>,
    mesh: &MeshSpec,
    target: &RegistrationTarget,
    node_labels: Option<&BTreeMap<String, String>>,
) -> Option<WorkloadEntry> {
    let mut entry = desired_entry(pod, mesh, node_labels)?;
    let pod_namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let pod_name = entry.metadata.name.take().unwrap_or_default();
    let meta = &mut entry.metadata;
    meta.name = Some(pushed_name(&mesh.cluster_id, &pod_name));
    meta.namespace = Some(pushed_namespace(target, &pod_namespace));
    meta.owner_references = None;
    meta.labels
        .get_or_insert_default()
        .insert(CLUSTER_LABEL.to_owned(), cluster_label(&mesh.cluster_id));
    meta.annotations.get_or_insert_default().insert(
        POD_ANNOTATION.to_owned(),
        format!("{pod_namespace}/{pod_name}"),
    );
    entry.spec.labels = labels;
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

    #[test]
    fn a_pushed_entry_carries_the_pod_labels_and_says_whose_it_is_without_an_owner() {
        let mesh = MeshSpec {
            cluster_id: "Cluster_A".into(),
            network: "net-a".into(),
            ..MeshSpec::default()
        };
        let target = RegistrationTarget {
            namespace: Some("cluster-a".into()),
            ..RegistrationTarget::default()
        };
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let entry = pushed_entry(&pod(), labels.clone(), &mesh, &target, None).expect("entry");
        assert_eq!(entry.name_any(), "cluster-a-web-1");
        assert_eq!(entry.namespace().as_deref(), Some("cluster-a"));
        assert_eq!(entry.spec.labels, labels);
        assert!(entry.metadata.owner_references.is_none());
        assert_eq!(
            entry.labels().get(CLUSTER_LABEL).map(String::as_str),
            Some("cluster-a")
        );
        assert_eq!(
            entry.annotations().get(POD_ANNOTATION).map(String::as_str),
            Some("shop/web-1")
        );
        assert_eq!(
            entry
                .annotations()
                .get(POD_UID_ANNOTATION)
                .map(String::as_str),
            Some("pod-uid-1")
        );
        assert_eq!(entry.spec.network.as_deref(), Some("net-a"));
        assert_eq!(entry.spec.service_account.as_deref(), Some("web"));
        let same_names = pushed_entry(
            &pod(),
            BTreeMap::new(),
            &mesh,
            &RegistrationTarget::default(),
            None,
        );
        assert_eq!(
            same_names.and_then(|e| e.namespace()).as_deref(),
            Some("shop"),
            "without a target namespace: the pod's namespace name"
        );
    }

    #[test]
    fn pushed_names_stay_valid_and_distinct_per_cluster() {
        assert_eq!(cluster_label("Kubernetes"), "kubernetes");
        assert_eq!(cluster_label("__"), "cluster");
        assert_eq!(cluster_label(&"x".repeat(100)).len(), 63);
        assert_ne!(pushed_name("east", "web-1"), pushed_name("west", "web-1"));
        let long = "p".repeat(253);
        let (a, b) = (pushed_name("east", &long), pushed_name("west", &long));
        assert!(a.len() <= 253 && b.len() <= 253, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("east-ppp"));
    }
}
