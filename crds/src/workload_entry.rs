//! Istio's `WorkloadEntry` (`networking.istio.io/v1`): the Rust type the
//! operator writes, and a CRD for clusters that do not have Istio's own.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// A non-Kubernetes-native workload (here: an injected pod) as istiod sees it.
// Each `printcolumn(...)` repeats the same keys, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "WorkloadEntry",
    namespaced,
    shortname = "we",
    status = "WorkloadEntryStatus",
    category = "istio-io",
    category = "networking-istio-io",
    doc = "Istio WorkloadEntry: the properties of a single workload.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.address) || has(self.network)").message("address or network is required"))]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// Address of the workload (an IP address or a DNS name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub address: Option<String>,
    /// Port name -> port number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 128))]
    pub ports: BTreeMap<String, WorkloadPort>,
    /// Labels of the workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub labels: BTreeMap<String, String>,
    /// Network the address belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `region/zone/subzone` of the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// Load-balancing weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4_294_967_295_i64))]
    pub weight: Option<i64>,
    /// Service account the workload runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account: Option<String>,
}

/// A port number, 1..65535.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct WorkloadPort(#[schemars(range(min = 1, max = 65535))] pub i32);

/// Observed state of a WorkloadEntry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryStatus {
    /// Istio-style conditions; ferrimesh writes `Healthy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<WorkloadCondition>,
}

/// An Istio condition (`istio.analysis.v1alpha1.IstioCondition`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCondition {
    /// The condition type, e.g. `Healthy`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When the condition was last checked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<String>,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// A machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The WorkloadEntry CRD as Istio serves it: `v1` (storage) plus the older
/// `v1beta1` and `v1alpha3`, all with the same schema.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = WorkloadEntry::crd();
    let v1 = crd.spec.versions[0].clone();
    for name in ["v1beta1", "v1alpha3"] {
        let mut older = v1.clone();
        older.name = name.to_owned();
        older.storage = false;
        crd.spec.versions.push(older);
    }
    crd
}
