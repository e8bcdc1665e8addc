//! Which injection labels the operator wants on a namespace
//! (docs/operator.md, "What it does"), as a pure function of the namespace
//! and the Meshes. A namespace in Istio's ambient mode
//! (`istio.io/dataplane-mode=ambient`) is never labelled: ztunnel does not
//! capture pods with a sidecar.
//!
//! The operator writes labels with server-side apply under its own field
//! manager. Applying a smaller set later releases only the labels it owns:
//! a label a user set by hand is co-owned by the user and survives, exactly
//! the "remove only what it set" rule.

use std::collections::{BTreeMap, BTreeSet};

use ferrimesh_crds::Mesh;
use ferrimesh_crds::ambient::AMBIENT;
use ferrimesh_crds::istio::{DATAPLANE_MODE, INJECTION_LABEL, REVISION, SYSTEM_NAMESPACES};
use ferrimesh_crds::mesh::DEFAULT_REVISION;
use ferrimesh_crds::selection::matches;
use k8s_openapi::api::core::v1::Namespace;

use crate::FIELD_MANAGER;

/// The label a Mesh of `revision` puts on the namespaces it selects:
/// `istio-injection=enabled` for `default`, `istio.io/rev=<revision>` else.
pub fn injection_label(revision: &str) -> (&'static str, String) {
    if revision == DEFAULT_REVISION {
        (INJECTION_LABEL, "enabled".to_owned())
    } else {
        (REVISION, revision.to_owned())
    }
}

/// Whether `namespace` is one the operator never labels.
pub fn is_excluded(namespace: &str, operator_namespace: &str) -> bool {
    SYSTEM_NAMESPACES.contains(&namespace) || namespace == operator_namespace
}

/// The Mesh that labels `namespace`, if any: among live Meshes whose
/// `namespaceSelector` matches, the oldest (then by name). `None` for
/// excluded namespaces and those a user labelled `istio-injection=disabled`.
pub fn selecting_mesh<'m>(
    namespace: &Namespace,
    meshes: &'m [Mesh],
    operator_namespace: &str,
) -> Option<&'m Mesh> {
    let name = namespace.metadata.name.as_deref().unwrap_or_default();
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    if is_excluded(name, operator_namespace)
        || labels.get(INJECTION_LABEL).is_some_and(|v| v == "disabled")
    {
        return None;
    }
    let mut candidates: Vec<&Mesh> = meshes
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter(|m| {
            m.spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| matches(s, &labels))
        })
        .collect();
    candidates.sort_by(|a, b| {
        let created = |m: &Mesh| m.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    candidates.first().copied()
}

/// Whether `namespace` is in Istio's ambient mode
/// (`istio.io/dataplane-mode=ambient`): a Mesh that selects it does not
/// label it.
pub fn is_ambient(namespace: &Namespace) -> bool {
    namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(DATAPLANE_MODE))
        .is_some_and(|mode| mode == AMBIENT)
}

/// The labels the operator wants to own on `namespace` (empty: none, also
/// for an ambient namespace a Mesh selects).
pub fn desired_labels(
    namespace: &Namespace,
    meshes: &[Mesh],
    operator_namespace: &str,
) -> BTreeMap<String, String> {
    if is_ambient(namespace) {
        return BTreeMap::new();
    }
    selecting_mesh(namespace, meshes, operator_namespace)
        .map(|mesh| {
            let (key, value) = injection_label(&mesh.spec.revision);
            BTreeMap::from([(key.to_owned(), value)])
        })
        .unwrap_or_default()
}

/// Whether the operator has applied labels to `namespace` before (so an
/// empty desired set must be applied to release them).
pub fn managed_by_operator(namespace: &Namespace) -> bool {
    namespace
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
        })
}

/// The labels the operator's field manager owns on `namespace`, read from
/// its managed fields (`f:metadata` / `f:labels` / `f:<key>`).
pub fn owned_labels(namespace: &Namespace) -> BTreeSet<String> {
    namespace
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
        })
        .filter_map(|entry| entry.fields_v1.as_ref())
        .filter_map(|fields| {
            fields
                .0
                .get("f:metadata")?
                .get("f:labels")?
                .as_object()
                .cloned()
        })
        .flat_map(|labels| {
            labels
                .into_iter()
                .filter_map(|(k, _)| k.strip_prefix("f:").map(str::to_owned))
        })
        .collect()
}

/// Whether the namespace already carries exactly what the operator wants
/// to own: nothing to apply.
pub fn up_to_date(namespace: &Namespace, desired: &BTreeMap<String, String>) -> bool {
    let current = namespace.metadata.labels.clone().unwrap_or_default();
    let owned = owned_labels(namespace);
    owned.iter().eq(desired.keys()) && desired.iter().all(|(k, v)| current.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::MeshSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, ManagedFieldsEntry, ObjectMeta, Time,
    };

    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn mesh(name: &str, revision: &str, selector: &[(&str, &str)], created: i64) -> Mesh {
        let mut mesh = Mesh::new(
            name,
            MeshSpec {
                revision: revision.to_owned(),
                ..MeshSpec::default()
            },
        );
        mesh.spec.namespace_selector = Some(LabelSelector {
            match_labels: Some(
                selector
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            match_expressions: None,
        });
        mesh.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(created).expect("timestamp"),
        ));
        mesh
    }

    #[test]
    fn default_revision_labels_istio_injection_and_others_istio_rev() {
        let meshes = [mesh("default", "default", &[("mesh", "on")], 1)];
        assert_eq!(
            desired_labels(
                &namespace("shop", &[("mesh", "on")]),
                &meshes,
                "ferrimesh-system"
            ),
            BTreeMap::from([("istio-injection".to_owned(), "enabled".to_owned())])
        );
        let canary = [mesh("canary", "canary", &[("mesh", "canary")], 1)];
        assert_eq!(
            desired_labels(
                &namespace("shop", &[("mesh", "canary")]),
                &canary,
                "ferrimesh-system"
            ),
            BTreeMap::from([("istio.io/rev".to_owned(), "canary".to_owned())])
        );
        assert!(desired_labels(&namespace("shop", &[]), &meshes, "ferrimesh-system").is_empty());
    }

    #[test]
    fn never_labels_system_own_or_disabled_namespaces() {
        let meshes = [mesh("default", "default", &[], 1)];
        for name in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "local-path-storage",
            "ferrimesh-system",
        ] {
            assert!(
                desired_labels(&namespace(name, &[]), &meshes, "ferrimesh-system").is_empty(),
                "{name}"
            );
        }
        let disabled = namespace("legacy", &[("istio-injection", "disabled")]);
        assert!(desired_labels(&disabled, &meshes, "ferrimesh-system").is_empty());
        assert_eq!(
            desired_labels(&namespace("any", &[]), &meshes, "ferrimesh-system").len(),
            1,
            "{{}} selects all"
        );
    }

    #[test]
    fn never_labels_an_ambient_namespace_the_mesh_selects() {
        let meshes = [mesh("default", "default", &[("mesh", "on")], 1)];
        let ambient = namespace(
            "shop",
            &[("mesh", "on"), ("istio.io/dataplane-mode", "ambient")],
        );
        assert!(is_ambient(&ambient));
        assert!(desired_labels(&ambient, &meshes, "ferrimesh-system").is_empty());
        assert_eq!(
            selecting_mesh(&ambient, &meshes, "ferrimesh-system")
                .and_then(|m| m.metadata.name.as_deref()),
            Some("default"),
            "still selected: the Mesh reports it"
        );
        let sidecars = namespace(
            "shop",
            &[("mesh", "on"), ("istio.io/dataplane-mode", "none")],
        );
        assert!(!is_ambient(&sidecars));
        assert_eq!(
            desired_labels(&sidecars, &meshes, "ferrimesh-system").len(),
            1,
            "only ambient is held back"
        );
    }

    #[test]
    fn oldest_mesh_wins_and_deleted_meshes_release() {
        let mut meshes = vec![
            mesh("canary", "canary", &[("mesh", "on")], 2),
            mesh("default", "default", &[("mesh", "on")], 1),
        ];
        let ns = namespace("shop", &[("mesh", "on")]);
        assert_eq!(
            selecting_mesh(&ns, &meshes, "x").and_then(|m| m.metadata.name.as_deref()),
            Some("default")
        );
        meshes[1].metadata.deletion_timestamp =
            Some(Time(jiff::Timestamp::from_second(3).expect("ts")));
        assert_eq!(
            selecting_mesh(&ns, &meshes, "x").and_then(|m| m.metadata.name.as_deref()),
            Some("canary")
        );
    }

    #[test]
    fn reads_the_labels_it_owns_from_managed_fields() {
        let mut ns = namespace("shop", &[("istio-injection", "enabled"), ("team", "a")]);
        let desired = BTreeMap::from([("istio-injection".to_owned(), "enabled".to_owned())]);
        assert!(
            !up_to_date(&ns, &desired),
            "labelled by hand, not owned yet"
        );
        ns.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.to_owned()),
            operation: Some("Apply".to_owned()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                serde_json::json!({
                    "f:metadata": {"f:labels": {"f:istio-injection": {}}}
                }),
            )),
            ..ManagedFieldsEntry::default()
        }]);
        assert_eq!(
            owned_labels(&ns),
            BTreeSet::from(["istio-injection".to_owned()])
        );
        assert!(up_to_date(&ns, &desired));
        assert!(
            !up_to_date(&ns, &BTreeMap::new()),
            "owned but no longer wanted: must be released"
        );
    }

    #[test]
    fn knows_which_namespaces_it_labelled() {
        let mut ns = namespace("shop", &[]);
        assert!(!managed_by_operator(&ns));
        ns.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.to_owned()),
            operation: Some("Apply".to_owned()),
            ..ManagedFieldsEntry::default()
        }]);
        assert!(managed_by_operator(&ns));
    }
}
