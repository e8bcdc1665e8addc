//! Registering injected pods: the WorkloadEntry that stands for a pod
//! ([`entry`]), what the caches keep of pods and entries
//! ([`injected_pod`], [`registered_entry`]), and the controller that writes
//! entries and sweeps orphans ([`controller`]). Entries are written into the
//! pods' own cluster, or pushed into a config cluster ([`target`]).

use std::collections::BTreeMap;

pub mod controller;
pub mod entry;
pub mod injected_pod;
pub mod registered_entry;
pub mod target;

/// Label on every WorkloadEntry the operator writes; entries without it are
/// never touched.
pub const MANAGED_BY_LABEL: &str = "ferrimesh.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "ferrimesh-operator";
/// Label with the revision of the Mesh that registered the entry.
pub const REVISION_LABEL: &str = "ferrimesh.io/revision";
/// Annotation with the UID of the pod an entry stands for.
pub const POD_UID_ANNOTATION: &str = "ferrimesh.io/pod-uid";
/// Label on an entry pushed into a config cluster: the Mesh's `clusterID`
/// of the cluster whose pod it stands for (as a label value).
pub const CLUSTER_LABEL: &str = "ferrimesh.io/cluster";
/// Annotation on an entry pushed into a config cluster: `<namespace>/<name>`
/// of its pod, which the entry's own name and namespace do not say.
pub const POD_ANNOTATION: &str = "ferrimesh.io/pod";
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
