//! Revision tags (`Mesh.spec.revisionTags`, as `istioctl tag set`): which
//! Mesh holds each tag, and so which Mesh the webhook entries that select a
//! pod belong to. The operator writes the tags' webhook configurations from
//! this, and `ferrimesh status`, the operator's drift report and the webhook
//! resolve a pod's Mesh from it, so all agree.
//!
//! A tag is held by one Mesh: the oldest live one listing it
//! (creationTimestamp, then name); the others are refused it. A tag that is
//! a Mesh's revision is held by none (its pods are that revision's), except
//! `default` held by a Mesh of another revision: it takes over what the
//! default revision selects, `istio-injection=enabled`, the pod opt-in and
//! `istio.io/rev=default`, and the default revision's own configuration
//! then has no entry, so no pod matches two webhooks. (Istio's chart drops
//! the default revision's `istio-injection` entries; its `istio.io/rev`
//! entries would match `istio.io/rev=default` beside the tag's.)

use std::collections::BTreeMap;
use std::fmt;

use crate::istio::{INJECT, REVISION};
use crate::mesh::{DEFAULT_REVISION, Mesh};
use crate::selection::{WebhookSelectors, matches, webhook_selectors};

/// Why a Mesh does not hold a tag it lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An older Mesh (named) lists it too and holds it.
    HeldBy(String),
    /// The tag is the revision of a Mesh (named).
    NamesRevision(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeldBy(mesh) => write!(f, "held by the older Mesh {mesh}"),
            Self::NamesRevision(mesh) => write!(f, "it is the revision of Mesh {mesh}"),
        }
    }
}

fn live(mesh: &Mesh) -> bool {
    mesh.metadata.deletion_timestamp.is_none()
}

fn name(mesh: &Mesh) -> &str {
    mesh.metadata.name.as_deref().unwrap_or_default()
}

/// The Mesh whose revision `tag`, listed by `mesh`, names, if one does
/// (`default` listed by a Mesh of another revision names none).
fn revision_named<'m>(tag: &str, mesh: &Mesh, meshes: &'m [Mesh]) -> Option<&'m Mesh> {
    if tag == DEFAULT_REVISION && mesh.spec.revision != tag {
        return None;
    }
    meshes.iter().find(|m| live(m) && m.spec.revision == tag)
}

/// Whether `tag` listed by `mesh` is refused, and why.
pub fn refusal(tag: &str, mesh: &Mesh, meshes: &[Mesh]) -> Option<Refusal> {
    if let Some(other) = revision_named(tag, mesh, meshes) {
        return Some(Refusal::NamesRevision(name(other).to_owned()));
    }
    let created = |m: &Mesh| m.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let oldest = meshes
        .iter()
        .filter(|m| live(m) && m.spec.revision_tags.iter().any(|t| t == tag))
        .filter(|m| revision_named(tag, m, meshes).is_none())
        .min_by(|a, b| {
            created(a)
                .cmp(&created(b))
                .then_with(|| name(a).cmp(name(b)))
        })?;
    (name(oldest) != name(mesh)).then(|| Refusal::HeldBy(name(oldest).to_owned()))
}

/// Who holds each tag the live Meshes list, by tag.
pub fn holders(meshes: &[Mesh]) -> BTreeMap<&str, &Mesh> {
    let mut held = BTreeMap::new();
    for mesh in meshes.iter().filter(|m| live(m)) {
        for tag in &mesh.spec.revision_tags {
            if refusal(tag, mesh, meshes).is_none() {
                held.insert(tag.as_str(), mesh);
            }
        }
    }
    held
}

/// The Mesh that serves `revision`: the oldest live one of that revision
/// (creationTimestamp, then name), the one the webhook injects with. A
/// younger Mesh of the same revision serves nothing: it writes no webhook
/// configuration and says so in its status.
pub fn revision_holder<'m>(revision: &str, meshes: &'m [Mesh]) -> Option<&'m Mesh> {
    let created = |m: &Mesh| m.metadata.creation_timestamp.as_ref().map(|t| t.0);
    meshes
        .iter()
        .filter(|m| live(m) && m.spec.revision == revision)
        .min_by(|a, b| {
            created(a)
                .cmp(&created(b))
                .then_with(|| name(a).cmp(name(b)))
        })
}

/// Whether a Mesh of another revision holds the tag `default`, so that the
/// default revision's own configuration has no entry.
pub fn default_taken_over(meshes: &[Mesh]) -> bool {
    holders(meshes).contains_key(DEFAULT_REVISION)
}

/// The entries of the configuration of `mesh`'s revision: its selector
/// matrix, or none for the default revision while another Mesh holds the
/// tag `default`.
pub fn own_selectors(mesh: &Mesh, meshes: &[Mesh], excluded: &[&str]) -> Vec<WebhookSelectors> {
    if mesh.spec.revision == DEFAULT_REVISION && default_taken_over(meshes) {
        return Vec::new();
    }
    webhook_selectors(&mesh.spec.revision, excluded)
}

/// Every webhook entry that sends pods to `mesh` today: its revision's
/// ([`own_selectors`]) and those of the tags it holds, with `excluded`
/// namespaces left out.
pub fn selectors_of(mesh: &Mesh, meshes: &[Mesh], excluded: &[&str]) -> Vec<WebhookSelectors> {
    let mut entries = own_selectors(mesh, meshes, excluded);
    for (tag, holder) in holders(meshes) {
        if name(holder) == name(mesh) {
            entries.extend(webhook_selectors(tag, excluded));
        }
    }
    entries
}

/// The Mesh whose webhook entries select a pod with `pod_labels` created in
/// a namespace with `namespace_labels` (which carry
/// `kubernetes.io/metadata.name`), through its revision or a tag it holds.
pub fn selecting_mesh<'m>(
    meshes: &'m [Mesh],
    excluded: &[&str],
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Option<&'m Mesh> {
    let selecting = meshes.iter().find(|mesh| {
        selectors_of(mesh, meshes, excluded).iter().any(|e| {
            matches(&e.namespace_selector, namespace_labels)
                && matches(&e.object_selector, pod_labels)
        })
    })?;
    // Of two Meshes of one revision, the one that serves it.
    revision_holder(&selecting.spec.revision, meshes).or(Some(selecting))
}

/// The revision (or tag) whose webhook entries select a pod with
/// `pod_labels` in a namespace whose `istio-injection` and `istio.io/rev`
/// labels are `namespace_injection` and `namespace_revision`, by Istio's
/// selector matrix (`selection`): `default` for `istio-injection=enabled`
/// and the pod opt-in, else the namespace's `istio.io/rev`, else the pod's.
/// `None` when no entry selects it. The webhook reads it from a label
/// lookup, with no selector to evaluate.
pub fn selected_revision<'a>(
    namespace_injection: Option<&'a str>,
    namespace_revision: Option<&'a str>,
    pod_labels: &'a BTreeMap<String, String>,
) -> Option<&'a str> {
    let pod = |key: &str| pod_labels.get(key).map(String::as_str);
    if pod(INJECT) == Some("false") {
        return None;
    }
    match (namespace_injection, namespace_revision, pod(REVISION)) {
        (Some("enabled"), _, _) => Some(DEFAULT_REVISION),
        (Some(_), _, _) => None,
        (None, Some(revision), _) | (None, None, Some(revision)) => Some(revision),
        (None, None, None) => (pod(INJECT) == Some("true")).then_some(DEFAULT_REVISION),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::istio::{INJECTION_LABEL, SYSTEM_NAMESPACES};
    use crate::mesh::MeshSpec;
    use crate::selection::selecting_entry;

    fn mesh(name: &str, revision: &str, tags: &[&str], created: i64) -> Mesh {
        let mut mesh = Mesh::new(
            name,
            MeshSpec {
                revision: revision.to_owned(),
                revision_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                ..MeshSpec::default()
            },
        );
        mesh.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).expect("time"),
        ));
        mesh
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selected(meshes: &[Mesh], ns: &[(&str, &str)], pod: &[(&str, &str)]) -> Option<String> {
        selecting_mesh(meshes, &SYSTEM_NAMESPACES, &labels(ns), &labels(pod))
            .and_then(|m| m.metadata.name.clone())
    }

    #[test]
    fn the_oldest_live_mesh_of_a_revision_serves_it() {
        let mut meshes = vec![
            mesh("young", "canary", &[], 200),
            mesh("old", "canary", &[], 100),
            mesh("same-age-b", "stable", &[], 100),
            mesh("same-age-a", "stable", &[], 100),
        ];
        let holder = |meshes: &[Mesh], revision: &str| {
            revision_holder(revision, meshes).and_then(|m| m.metadata.name.clone())
        };
        assert_eq!(holder(&meshes, "canary").as_deref(), Some("old"));
        assert_eq!(holder(&meshes, "stable").as_deref(), Some("same-age-a"));
        assert_eq!(holder(&meshes, "default"), None);
        let pod = [(REVISION, "canary")];
        assert_eq!(selected(&meshes, &[], &pod).as_deref(), Some("old"));
        meshes[1].metadata.deletion_timestamp = meshes[1].metadata.creation_timestamp.clone();
        assert_eq!(
            holder(&meshes, "canary").as_deref(),
            Some("young"),
            "the next one takes over from a Mesh being deleted"
        );
        assert_eq!(selected(&meshes, &[], &pod).as_deref(), Some("young"));
    }

    #[test]
    fn the_selected_revision_agrees_with_the_selector_matrix() {
        let namespaces: [&[(&str, &str)]; 6] = [
            &[],
            &[(INJECTION_LABEL, "enabled")],
            &[(INJECTION_LABEL, "disabled")],
            &[(REVISION, "stable")],
            &[(REVISION, "stable"), (INJECTION_LABEL, "enabled")],
            &[(REVISION, "default")],
        ];
        let pods: [&[(&str, &str)]; 6] = [
            &[],
            &[(INJECT, "true")],
            &[(INJECT, "false")],
            &[(REVISION, "canary")],
            &[(REVISION, "canary"), (INJECT, "true")],
            &[(REVISION, "canary"), (INJECT, "false")],
        ];
        for ns in namespaces {
            for pod in pods {
                let (ns, pod) = (labels(ns), labels(pod));
                let get = |key: &str| ns.get(key).map(String::as_str);
                let selected = selected_revision(get(INJECTION_LABEL), get(REVISION), &pod);
                for revision in ["default", "stable", "canary"] {
                    let matrix = selecting_entry(revision, &SYSTEM_NAMESPACES, &ns, &pod);
                    assert_eq!(
                        matrix.is_some(),
                        selected == Some(revision),
                        "{ns:?} {pod:?}: {revision} matrix {matrix:?}, selected {selected:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_oldest_mesh_listing_a_tag_holds_it_and_the_others_are_refused() {
        let meshes = [
            mesh("b", "1-30", &["stable"], 2),
            mesh("a", "1-29", &["stable"], 1),
        ];
        assert_eq!(refusal("stable", &meshes[1], &meshes), None);
        assert_eq!(
            refusal("stable", &meshes[0], &meshes),
            Some(Refusal::HeldBy("a".into()))
        );
        let held = holders(&meshes);
        assert_eq!(
            held.get("stable").and_then(|m| m.metadata.name.as_deref()),
            Some("a")
        );
        let mut deleted = meshes.clone();
        deleted[1].metadata.deletion_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(3).expect("time"),
        ));
        assert_eq!(
            refusal("stable", &deleted[0], &deleted),
            None,
            "a deleted Mesh lets go"
        );
    }

    #[test]
    fn a_tag_naming_a_revision_is_refused_but_default_takes_over() {
        let meshes = [
            mesh("main", "default", &["default"], 1),
            mesh("canary", "canary", &["canary", "default"], 2),
            mesh("next", "1-30", &["canary"], 3),
        ];
        assert_eq!(
            refusal("canary", &meshes[2], &meshes),
            Some(Refusal::NamesRevision("canary".into()))
        );
        assert_eq!(
            refusal("default", &meshes[0], &meshes),
            Some(Refusal::NamesRevision("main".into())),
            "the default revision does not tag itself"
        );
        assert_eq!(refusal("default", &meshes[1], &meshes), None);
        assert!(default_taken_over(&meshes));
    }

    #[test]
    fn tagged_pods_resolve_to_the_holder_and_default_takes_over_istio_injection() {
        let main = mesh("main", "default", &[], 1);
        let canary = mesh("canary", "canary", &["stable"], 2);
        let meshes = [main.clone(), canary.clone()];
        let enabled = [(INJECTION_LABEL, "enabled")];
        assert_eq!(
            selected(&meshes, &[(REVISION, "stable")], &[]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            selected(&meshes, &[], &[(REVISION, "stable")]).as_deref(),
            Some("canary")
        );
        assert_eq!(selected(&meshes, &enabled, &[]).as_deref(), Some("main"));
        assert_eq!(selected(&meshes, &[(REVISION, "other")], &[]), None);

        let taken = [main, mesh("canary", "canary", &["default"], 2)];
        assert_eq!(selected(&taken, &enabled, &[]).as_deref(), Some("canary"));
        assert_eq!(
            selected(&taken, &[], &[(INJECT, "true")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            selected(&taken, &[(REVISION, "default")], &[]).as_deref(),
            Some("canary"),
            "istio.io/rev=default is the tag's too"
        );
        assert!(
            selectors_of(&taken[0], &taken, &SYSTEM_NAMESPACES).is_empty(),
            "the default revision selects nothing while another Mesh holds the tag"
        );
        assert_eq!(
            selected(&taken[..1], &enabled, &[]).as_deref(),
            Some("main")
        );
    }
}
