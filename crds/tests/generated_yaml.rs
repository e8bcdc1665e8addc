//! The checked-in CRD YAML must be exactly what the types generate: run
//! `make crds` after changing a type.

use std::path::Path;

use ferrimesh_crds::{istio_crds, mesh_crds, to_yaml};

fn assert_fresh(
    dir: &str,
    crds: &[k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition],
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    for crd in crds {
        let name = crd.metadata.name.as_deref().expect("named CRD");
        let file = root.join(format!("{name}.yaml"));
        let on_disk = std::fs::read_to_string(&file).unwrap_or_default();
        let generated = to_yaml(std::slice::from_ref(crd)).expect("yaml");
        assert!(
            on_disk == generated,
            "{} is stale or missing: run `make crds` and commit",
            file.display()
        );
    }
}

#[test]
fn mesh_crds_on_disk_are_up_to_date() {
    assert_fresh("config/crd/bases", &mesh_crds());
}

#[test]
fn istio_crds_on_disk_are_up_to_date() {
    assert_fresh("config/istio-crds", &istio_crds());
}

#[test]
fn mesh_defaults_make_an_empty_spec_valid() {
    let mesh: ferrimesh_crds::Mesh = serde_json::from_value(serde_json::json!({
        "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "default"}, "spec": {}
    }))
    .expect("an empty spec parses");
    assert_eq!(mesh.spec, ferrimesh_crds::MeshSpec::default());
    assert_eq!(mesh.spec.proxy.status_port, 15020);
    assert_eq!(mesh.spec.traffic.include_outbound_ip_ranges, "*");
    assert_eq!(mesh.spec.webhook.timeout_seconds, 10);
}

#[test]
fn workload_entry_is_served_in_three_versions_with_v1_stored() {
    let crd = ferrimesh_crds::workload_entry::crd();
    let versions: Vec<_> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.storage))
        .collect();
    assert_eq!(
        versions,
        [("v1", true), ("v1beta1", false), ("v1alpha3", false)]
    );
}
