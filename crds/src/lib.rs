//! The ferrimesh API: the `Mesh` and `ProxyProfile` custom resources
//! (`mesh.ferrimesh.io/v1alpha1`) and Istio's `WorkloadEntry`
//! (`networking.istio.io/v1`).
//!
//! This crate is vocabulary: types, their defaults and their schemas, plus
//! the pure rules every other crate must read alike (which webhook entry
//! selects a pod, whether a pod is injected, which ProxyProfiles apply, the
//! injection stamp, a running pod's drift). It does no I/O. The CRD YAML
//! under `config/` is generated from these types by the `crdgen` binary and
//! never edited by hand.

pub mod ambient;
pub mod decision;
pub mod drift;
pub mod istio;
mod layered;
pub mod mesh;
pub mod pod_security;
pub mod proxy_profile;
pub mod selection;
pub mod settings;
pub mod stamp;
pub mod tags;
pub mod workload_entry;

pub use mesh::{Mesh, MeshSpec, MeshStatus};
pub use proxy_profile::{ProxyProfile, ProxyProfileSpec};
pub use workload_entry::{WorkloadEntry, WorkloadEntrySpec, WorkloadEntryStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of ferrimesh's own kinds.
pub const GROUP: &str = "mesh.ferrimesh.io";

/// Every CRD ferrimesh installs itself (`config/crd/bases`), in install order.
pub fn mesh_crds() -> Vec<CustomResourceDefinition> {
    vec![Mesh::crd(), ProxyProfile::crd()]
}

/// The CRDs of the Istio kinds ferrimesh writes, for clusters without Istio
/// (`config/istio-crds`, an optional kustomize component).
pub fn istio_crds() -> Vec<CustomResourceDefinition> {
    vec![workload_entry::crd()]
}

/// Renders CRDs as one multi-document YAML stream, each document preceded by
/// `---`, as `kubectl apply -f` and kustomize read it.
pub fn to_yaml(crds: &[CustomResourceDefinition]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(crd)?);
    }
    Ok(out)
}
