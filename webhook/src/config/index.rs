//! The indexes an admission reads: built from watch events, so that an
//! admission is a few lookups and never a scan of a cache. Each index is
//! plain data, fed by [`Feed`] from kube's watcher events and tested with
//! plain objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::istio::{INJECTION_LABEL, REVISION};
use ferrimesh_crds::mesh::MeshSpec;
use ferrimesh_crds::pod_security::ENFORCE_LABEL;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher::Event;

use crate::inject::settings::MeshSettings;

/// State folded from one watch's objects.
pub trait Index {
    /// What the watch delivers.
    type Object;

    /// An empty index configured as this one is (a relist fills it).
    fn empty(&self) -> Self;

    /// Takes in an object that was added or changed.
    fn apply(&mut self, object: Self::Object);

    /// Forgets a deleted object.
    fn delete(&mut self, object: &Self::Object);

    /// Whether applying `object` would change nothing (a status write, a
    /// Node's heartbeat): the feed then takes no write lock.
    fn unchanged_by(&self, object: &Self::Object) -> bool;
}

/// An index shared by its watch, the one writer, and the admissions.
pub struct Shared<I> {
    live: RwLock<I>,
    synced: AtomicBool,
}

impl<I: Index> Shared<I> {
    /// A shared index that is not synced yet.
    pub fn new(index: I) -> Arc<Self> {
        Arc::new(Self {
            live: RwLock::new(index),
            synced: AtomicBool::new(false),
        })
    }

    /// The index, for a lookup (a poisoned lock still reads: every write
    /// leaves the index whole).
    pub fn read(&self) -> RwLockReadGuard<'_, I> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, I> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the watch has listed everything once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

/// Folds one watch's events into a [`Shared`] index. A (re)list is built
/// aside and swapped in whole when it completes, so admissions read the
/// previous index meanwhile and objects deleted while the watch was down
/// are gone afterwards (as kube's reflector store does).
pub struct Feed<I> {
    shared: Arc<Shared<I>>,
    relist: Option<I>,
}

impl<I: Index> Feed<I> {
    /// A feed writing into `shared`.
    pub fn new(shared: Arc<Shared<I>>) -> Self {
        Self {
            shared,
            relist: None,
        }
    }

    /// Applies one watch event.
    pub fn handle(&mut self, event: Event<I::Object>) {
        match event {
            Event::Init => self.relist = Some(self.shared.read().empty()),
            Event::InitApply(object) => match self.relist.as_mut() {
                Some(relist) => relist.apply(object),
                None => self.apply(object),
            },
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    *self.shared.write() = relist;
                }
                self.shared.synced.store(true, Ordering::Release);
            }
            Event::Apply(object) => self.apply(object),
            Event::Delete(object) => self.shared.write().delete(&object),
        }
    }

    fn apply(&self, object: I::Object) {
        if !self.shared.read().unchanged_by(&object) {
            self.shared.write().apply(object);
        }
    }
}

/// The identity and version of an object's spec: a new generation or a new
/// object (same name, new uid) changes it; a status write does not.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    uid: Option<String>,
    generation: Option<i64>,
}

impl Version {
    fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            uid: meta.uid.clone(),
            generation: meta.generation,
        }
    }

    /// Whether two versions are known to hold the same spec (an object
    /// without a generation is never assumed unchanged).
    fn same_spec(&self, other: &Self) -> bool {
        self.generation.is_some() && self == other
    }
}

/// The ProxyProfiles by namespace: an admission takes its namespace's list
/// (an `Arc`, no copy).
#[derive(Clone, Debug, Default)]
pub struct ProfileIndex {
    by_namespace: HashMap<String, Arc<Vec<ProxyProfile>>>,
    none: Arc<Vec<ProxyProfile>>,
}

fn profile_key(profile: &ProxyProfile) -> (&str, &str) {
    (
        profile.metadata.namespace.as_deref().unwrap_or_default(),
        profile.metadata.name.as_deref().unwrap_or_default(),
    )
}

impl ProfileIndex {
    /// An index of `profiles`.
    pub fn of(profiles: impl IntoIterator<Item = ProxyProfile>) -> Self {
        let mut index = Self::default();
        for profile in profiles {
            index.apply(profile);
        }
        index
    }

    /// The ProxyProfiles of `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Arc<Vec<ProxyProfile>> {
        Arc::clone(self.by_namespace.get(namespace).unwrap_or(&self.none))
    }

    fn find(&self, profile: &ProxyProfile) -> Option<&ProxyProfile> {
        let (namespace, name) = profile_key(profile);
        self.by_namespace
            .get(namespace)?
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
    }
}

impl Index for ProfileIndex {
    type Object = ProxyProfile;

    fn empty(&self) -> Self {
        Self::default()
    }

    fn apply(&mut self, mut profile: ProxyProfile) {
        // Not read by injection, and often the largest part of an object.
        profile.metadata.managed_fields = None;
        let namespace = profile_key(&profile).0.to_owned();
        let list = Arc::make_mut(self.by_namespace.entry(namespace).or_default());
        match list
            .iter_mut()
            .find(|p| p.metadata.name == profile.metadata.name)
        {
            Some(existing) => *existing = profile,
            None => list.push(profile),
        }
    }

    fn delete(&mut self, profile: &ProxyProfile) {
        let (namespace, name) = profile_key(profile);
        let Some(list) = self.by_namespace.get_mut(namespace) else {
            return;
        };
        if !list
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(name))
        {
            return;
        }
        Arc::make_mut(list).retain(|p| p.metadata.name.as_deref() != Some(name));
        if list.is_empty() {
            self.by_namespace.remove(namespace);
        }
    }

    fn unchanged_by(&self, profile: &ProxyProfile) -> bool {
        self.find(profile).is_some_and(|known| {
            Version::of(&known.metadata).same_spec(&Version::of(&profile.metadata))
        })
    }
}

/// The Mesh a webhook serves, resolved once per Mesh generation.
#[derive(Clone, Debug)]
pub struct ServedMesh {
    /// The Mesh's spec (Mesh defaults when no Mesh serves the revision).
    pub spec: Arc<MeshSpec>,
    /// Its Mesh-wide settings, checked; `None` when the Mesh is refused, so
    /// that each admission reports why as it did before.
    pub settings: Option<Arc<MeshSettings>>,
    /// A note for every admission response (no Mesh for the revision).
    pub warning: Option<String>,
}

impl ServedMesh {
    /// Resolves `spec`'s Mesh-wide settings; a Mesh the injector refuses is
    /// logged here, once per generation.
    pub fn resolve(spec: MeshSpec, warning: Option<String>) -> Self {
        let settings = match MeshSettings::resolve(&spec) {
            Ok(settings) => Some(Arc::new(settings)),
            Err(e) => {
                tracing::warn!(revision = %spec.revision, error = %e, "the Mesh is refused: pods it selects are rejected until it is fixed");
                None
            }
        };
        Self {
            spec: Arc::new(spec),
            settings,
            warning,
        }
    }
}

/// A Mesh of the served revision, as the index keeps it.
#[derive(Clone, Debug)]
struct MeshEntry {
    created: Option<Time>,
    version: Version,
    spec: MeshSpec,
}

/// The Meshes of one revision; the oldest (then by name) serves it. Every
/// Mesh is kept too, for the revision tags: a pod selected through a tag
/// is served by the Mesh holding it (`ferrimesh_crds::tags`).
#[derive(Clone, Debug)]
pub struct MeshIndex {
    revision: String,
    meshes: BTreeMap<String, MeshEntry>,
    served: Arc<ServedMesh>,
    served_by: Option<(String, Version)>,
    /// Every Mesh, by name.
    all: BTreeMap<String, (Version, ferrimesh_crds::Mesh)>,
    /// The Mesh serving each revision tag and each revision but this one
    /// (all Meshes' webhook configurations call this webhook), by name.
    tagged: HashMap<String, Arc<ServedMesh>>,
    /// The tag holders resolved so far, by Mesh name: resolved again only
    /// for a new generation.
    resolved: BTreeMap<String, (Version, Arc<ServedMesh>)>,
}

impl MeshIndex {
    /// An empty index for `revision`: Mesh defaults, with a warning.
    pub fn new(revision: &str) -> Self {
        Self {
            revision: revision.to_owned(),
            meshes: BTreeMap::new(),
            served: Arc::new(Self::defaults(revision)),
            served_by: None,
            all: BTreeMap::new(),
            tagged: HashMap::new(),
            resolved: BTreeMap::new(),
        }
    }

    fn defaults(revision: &str) -> ServedMesh {
        let spec = MeshSpec {
            revision: revision.to_owned(),
            ..MeshSpec::default()
        };
        let note = format!("no Mesh serves revision {revision}; Mesh defaults apply");
        ServedMesh::resolve(spec, Some(note))
    }

    /// The Mesh serving the revision.
    pub fn served(&self) -> Arc<ServedMesh> {
        Arc::clone(&self.served)
    }

    /// The Mesh serving a pod that the revision or tag `selected_by`
    /// selected (`ferrimesh_crds::tags::selected_revision`): the Mesh
    /// holding the tag when it is one, the oldest Mesh of that revision
    /// when it is another revision with a Mesh, else the Mesh of this
    /// revision.
    pub fn served_for(&self, selected_by: Option<&str>) -> Arc<ServedMesh> {
        let tagged = selected_by.and_then(|revision| self.tagged.get(revision));
        Arc::clone(tagged.unwrap_or(&self.served))
    }

    /// Finds again which Mesh holds each tag and serves each other
    /// revision; resolves a holder only when it is a new Mesh or
    /// generation.
    fn retag(&mut self) {
        let meshes: Vec<ferrimesh_crds::Mesh> =
            self.all.values().map(|(_, mesh)| mesh.clone()).collect();
        let other_revisions: BTreeSet<&str> = meshes
            .iter()
            .map(|m| m.spec.revision.as_str())
            .filter(|r| *r != self.revision)
            .collect();
        let holders = other_revisions
            .into_iter()
            .filter_map(|r| Some((r, ferrimesh_crds::tags::revision_holder(r, &meshes)?)))
            // A tag wins over a revision of its name (only `default` can be both).
            .chain(ferrimesh_crds::tags::holders(&meshes));
        let mut resolved = BTreeMap::new();
        let mut tagged = HashMap::new();
        for (selector, holder) in holders {
            let name = holder.metadata.name.clone().unwrap_or_default();
            let version = Version::of(&holder.metadata);
            let served = match resolved.get(&name).or(self.resolved.get(&name)) {
                Some((known, served)) if known.same_spec(&version) => Arc::clone(served),
                _ => Arc::new(ServedMesh::resolve(holder.spec.clone(), None)),
            };
            tagged.insert(selector.to_owned(), Arc::clone(&served));
            resolved.insert(name, (version, served));
        }
        self.tagged = tagged;
        self.resolved = resolved;
    }
    /// Chooses the serving Mesh again after a change; resolves it only when
    /// it is another Mesh or generation than the one served.
    fn choose(&mut self) {
        let oldest = self
            .meshes
            .iter()
            .min_by(|(a_name, a), (b_name, b)| (&a.created, a_name).cmp(&(&b.created, b_name)));
        let chosen = oldest.map(|(name, entry)| (name.clone(), entry.version.clone()));
        let unchanged = match (&chosen, &self.served_by) {
            (Some((name, version)), Some((served_name, served_version))) => {
                name == served_name && version.same_spec(served_version)
            }
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        self.served = Arc::new(match oldest {
            Some((_, entry)) => ServedMesh::resolve(entry.spec.clone(), None),
            None => Self::defaults(&self.revision),
        });
        self.served_by = chosen;
    }
}

impl Index for MeshIndex {
    type Object = ferrimesh_crds::Mesh;

    fn empty(&self) -> Self {
        let mut empty = Self {
            meshes: BTreeMap::new(),
            all: BTreeMap::new(),
            ..self.clone()
        };
        empty.choose();
        empty.retag();
        empty
    }

    fn apply(&mut self, mesh: ferrimesh_crds::Mesh) {
        let name = mesh.metadata.name.clone().unwrap_or_default();
        self.all
            .insert(name.clone(), (Version::of(&mesh.metadata), mesh.clone()));
        self.retag();
        if mesh.spec.revision == self.revision {
            let entry = MeshEntry {
                created: mesh.metadata.creation_timestamp.clone(),
                version: Version::of(&mesh.metadata),
                spec: mesh.spec,
            };
            self.meshes.insert(name, entry);
        } else {
            // It may have served this revision before.
            self.meshes.remove(&name);
        }
        self.choose();
    }

    fn delete(&mut self, mesh: &ferrimesh_crds::Mesh) {
        let name = mesh.metadata.name.as_deref().unwrap_or_default();
        self.meshes.remove(name);
        self.all.remove(name);
        self.choose();
        self.retag();
    }

    fn unchanged_by(&self, mesh: &ferrimesh_crds::Mesh) -> bool {
        // Any Mesh may hold a tag: one of another revision counts too.
        let known = self
            .all
            .get(mesh.metadata.name.as_deref().unwrap_or_default());
        known.is_some_and(|(version, _)| version.same_spec(&Version::of(&mesh.metadata)))
    }
}

/// The oldest kubelet minor version with native sidecars on by default.
const NATIVE_SIDECAR_MINOR: u64 = 33;

/// Whether a kubelet version string (`v1.33.2`, `v1.34.0-gke.1`) is 1.33+.
pub fn kubelet_supports_native_sidecars(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next().and_then(|p| p.parse::<u64>().ok());
    let minor = parts.next().and_then(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .ok()
    });
    matches!((major, minor), (Some(major), Some(minor)) if major > 1 || (major == 1 && minor >= NATIVE_SIDECAR_MINOR))
}

/// What the webhook keeps of a Node: its name and whether its kubelet
/// supports native sidecars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// The Node's name.
    pub name: String,
    /// Whether its kubelet is 1.33 or newer.
    pub native_sidecars: bool,
}

impl From<&Node> for NodeFacts {
    fn from(node: &Node) -> Self {
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            native_sidecars: node
                .status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .is_some_and(|info| kubelet_supports_native_sidecars(&info.kubelet_version)),
        }
    }
}

/// The Nodes' native-sidecar support, by name, and how many lack it.
#[derive(Clone, Debug, Default)]
pub struct NodeIndex {
    supports: HashMap<String, bool>,
    lacking: usize,
}

impl NodeIndex {
    /// What `nativeSidecars: Auto` resolves to for a pod on `node`: that
    /// Node's support when the pod names a known one, otherwise (the usual
    /// case at creation, before scheduling) whether every kubelet has it.
    pub fn native_sidecars_supported(&self, node: Option<&str>) -> bool {
        match node.and_then(|name| self.supports.get(name)) {
            Some(supports) => *supports,
            None if node.is_some() => true,
            None => self.lacking == 0,
        }
    }
}

impl Index for NodeIndex {
    type Object = NodeFacts;

    fn empty(&self) -> Self {
        Self::default()
    }

    fn apply(&mut self, node: NodeFacts) {
        if !node.native_sidecars {
            self.lacking += 1;
        }
        if let Some(false) = self.supports.insert(node.name, node.native_sidecars) {
            self.lacking -= 1;
        }
    }

    fn delete(&mut self, node: &NodeFacts) {
        if let Some(false) = self.supports.remove(&node.name) {
            self.lacking -= 1;
        }
    }

    fn unchanged_by(&self, node: &NodeFacts) -> bool {
        self.supports.get(&node.name) == Some(&node.native_sidecars)
    }
}

/// What the webhook keeps of a Namespace: its name, the Pod Security
/// level it enforces (the label's value), if any, and its injection labels
/// (which revision or tag selects its pods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceFacts {
    /// The Namespace's name.
    pub name: String,
    /// Its `pod-security.kubernetes.io/enforce` label.
    pub enforce: Option<String>,
    /// Its `istio-injection` and `istio.io/rev` labels.
    pub injection: Injection,
}

/// A namespace's `istio-injection` and `istio.io/rev` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Injection {
    /// `istio-injection`.
    pub injection: Option<String>,
    /// `istio.io/rev`.
    pub revision: Option<String>,
}

impl From<&Namespace> for NamespaceFacts {
    fn from(namespace: &Namespace) -> Self {
        let label = |key: &str| {
            namespace
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .cloned()
        };
        Self {
            name: namespace.metadata.name.clone().unwrap_or_default(),
            enforce: label(ENFORCE_LABEL),
            injection: Injection {
                injection: label(INJECTION_LABEL),
                revision: label(REVISION),
            },
        }
    }
}

/// The Pod Security labels of the namespaces that enforce a level, each as
/// the one-label map the engine's Pod Security check reads, and the
/// injection labels of the namespaces that carry one.
#[derive(Clone, Debug, Default)]
pub struct NamespaceIndex {
    enforcing: HashMap<String, Arc<BTreeMap<String, String>>>,
    none: Arc<BTreeMap<String, String>>,
    injection: HashMap<String, Injection>,
    no_injection: Injection,
}

impl NamespaceIndex {
    /// The Pod Security label of `namespace` (empty when it enforces none
    /// or is unknown).
    pub fn pod_security_labels(&self, namespace: &str) -> Arc<BTreeMap<String, String>> {
        Arc::clone(self.enforcing.get(namespace).unwrap_or(&self.none))
    }

    /// The injection labels of `namespace` (none when it is unknown).
    pub fn injection(&self, namespace: &str) -> &Injection {
        self.injection.get(namespace).unwrap_or(&self.no_injection)
    }
}

impl Index for NamespaceIndex {
    type Object = NamespaceFacts;

    fn empty(&self) -> Self {
        Self::default()
    }

    fn apply(&mut self, namespace: NamespaceFacts) {
        if namespace.injection == Injection::default() {
            self.injection.remove(&namespace.name);
        } else {
            self.injection
                .insert(namespace.name.clone(), namespace.injection);
        }
        match namespace.enforce {
            Some(level) => {
                let labels = BTreeMap::from([(ENFORCE_LABEL.to_owned(), level)]);
                self.enforcing.insert(namespace.name, Arc::new(labels));
            }
            None => {
                self.enforcing.remove(&namespace.name);
            }
        }
    }

    fn delete(&mut self, namespace: &NamespaceFacts) {
        self.enforcing.remove(&namespace.name);
        self.injection.remove(&namespace.name);
    }

    fn unchanged_by(&self, namespace: &NamespaceFacts) -> bool {
        let same_injection = *self.injection(&namespace.name) == namespace.injection;
        let same_level = self
            .enforcing
            .get(&namespace.name)
            .map(|labels| labels.get(ENFORCE_LABEL))
            == Some(namespace.enforce.as_ref())
            || (namespace.enforce.is_none() && !self.enforcing.contains_key(&namespace.name));
        same_injection && same_level
    }
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::Mesh;
    use serde_json::json;

    use super::*;

    fn profile(namespace: &str, name: &str, generation: i64) -> ProxyProfile {
        serde_json::from_value(json!({
            "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "ProxyProfile",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("{namespace}-{name}"),
                         "generation": generation,
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"proxy": {"logLevel": format!("gen{generation}")}}
        }))
        .expect("profile")
    }

    fn mesh(name: &str, revision: &str, created: &str, generation: i64) -> Mesh {
        serde_json::from_value(json!({
            "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": name, "uid": name, "generation": generation,
                         "creationTimestamp": created},
            "spec": {"revision": revision, "meshID": format!("{name}-gen{generation}")}
        }))
        .expect("mesh")
    }

    fn node(name: &str, supports: bool) -> NodeFacts {
        NodeFacts {
            name: name.to_owned(),
            native_sidecars: supports,
        }
    }

    fn feed<I: Index>(index: I) -> (Arc<Shared<I>>, Feed<I>) {
        let shared = Shared::new(index);
        (Arc::clone(&shared), Feed::new(shared))
    }

    fn names(profiles: &[ProxyProfile]) -> Vec<&str> {
        let mut names: Vec<&str> = profiles
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn profiles_are_looked_up_by_namespace() {
        let (shared, mut feed) = feed(ProfileIndex::default());
        for event in [
            Event::Init,
            Event::InitApply(profile("shop", "a", 1)),
            Event::InitApply(profile("shop", "b", 1)),
            Event::InitApply(profile("bank", "c", 1)),
            Event::InitDone,
        ] {
            feed.handle(event);
        }
        let index = shared.read();
        assert_eq!(names(&index.in_namespace("shop")), ["a", "b"]);
        assert_eq!(names(&index.in_namespace("bank")), ["c"]);
        assert!(index.in_namespace("other").is_empty());
        assert!(
            index.in_namespace("shop")[0]
                .metadata
                .managed_fields
                .is_none(),
            "managed fields are dropped"
        );
    }

    #[test]
    fn profile_changes_and_deletes_reach_the_namespace_list() {
        let (shared, mut feed) = feed(ProfileIndex::default());
        feed.handle(Event::Apply(profile("shop", "a", 1)));
        feed.handle(Event::Apply(profile("shop", "b", 1)));
        let before = shared.read().in_namespace("shop");
        feed.handle(Event::Apply(profile("shop", "a", 2)));
        feed.handle(Event::Delete(profile("shop", "b", 1)));
        let after = shared.read().in_namespace("shop");
        assert_eq!(names(&after), ["a"]);
        assert_eq!(after[0].spec.proxy.log_level.as_deref(), Some("gen2"));
        assert_eq!(
            names(&before),
            ["a", "b"],
            "a list an admission holds stays as it was"
        );
        feed.handle(Event::Delete(profile("shop", "a", 2)));
        assert!(shared.read().in_namespace("shop").is_empty());
        assert!(shared.read().by_namespace.is_empty());
    }

    #[test]
    fn a_profile_of_a_known_generation_takes_no_write() {
        let index = ProfileIndex::of([profile("shop", "a", 1)]);
        assert!(index.unchanged_by(&profile("shop", "a", 1)));
        assert!(!index.unchanged_by(&profile("shop", "a", 2)));
        assert!(!index.unchanged_by(&profile("bank", "a", 1)));
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let (shared, mut feed) = feed(ProfileIndex::default());
        for event in [
            Event::Init,
            Event::InitApply(profile("shop", "a", 1)),
            Event::InitApply(profile("shop", "b", 1)),
            Event::InitDone,
        ] {
            feed.handle(event);
        }
        feed.handle(Event::Init);
        feed.handle(Event::InitApply(profile("shop", "a", 1)));
        assert_eq!(
            names(&shared.read().in_namespace("shop")),
            ["a", "b"],
            "admissions read the previous index until the relist is done"
        );
        feed.handle(Event::InitApply(profile("bank", "c", 1)));
        feed.handle(Event::InitDone);
        assert_eq!(names(&shared.read().in_namespace("shop")), ["a"]);
        assert_eq!(names(&shared.read().in_namespace("bank")), ["c"]);
    }

    #[test]
    fn an_index_is_synced_after_its_first_list() {
        let (shared, mut feed) = feed(NodeIndex::default());
        feed.handle(Event::Init);
        feed.handle(Event::InitApply(node("n1", true)));
        assert!(!shared.is_synced());
        feed.handle(Event::InitDone);
        assert!(shared.is_synced());
    }

    #[test]
    fn the_oldest_mesh_of_the_revision_serves_it() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        assert!(shared.read().served().warning.is_some());
        assert_eq!(shared.read().served().spec.revision, "default");
        feed.handle(Event::Apply(mesh(
            "newer",
            "default",
            "2026-02-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(mesh(
            "older",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(mesh(
            "canary",
            "canary",
            "2025-01-01T00:00:00Z",
            1,
        )));
        let served = shared.read().served();
        assert_eq!(served.spec.mesh_id, "older-gen1");
        assert!(served.warning.is_none());
        assert!(served.settings.is_some());
        feed.handle(Event::Delete(mesh(
            "older",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        assert_eq!(shared.read().served().spec.mesh_id, "newer-gen1");
        feed.handle(Event::Delete(mesh(
            "newer",
            "default",
            "2026-02-01T00:00:00Z",
            1,
        )));
        let served = shared.read().served();
        assert!(
            served.warning.is_some(),
            "back to the defaults, with a note"
        );
        assert_eq!(served.spec.revision, "default");
    }

    #[test]
    fn the_served_mesh_is_resolved_once_per_generation() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        let first = shared.read().served();
        // A status write: same generation.
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        // A newer Mesh of the revision does not replace the older one.
        feed.handle(Event::Apply(mesh(
            "n",
            "default",
            "2026-03-01T00:00:00Z",
            1,
        )));
        assert!(Arc::ptr_eq(&first, &shared.read().served()));
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            2,
        )));
        let second = shared.read().served();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.spec.mesh_id, "m-gen2");
    }

    fn tagged(name: &str, revision: &str, created: &str, tags: &[&str]) -> Mesh {
        let mut mesh = mesh(name, revision, created, 2);
        mesh.spec.revision_tags = tags.iter().map(|t| (*t).to_owned()).collect();
        mesh
    }

    #[test]
    fn a_pod_selected_through_a_tag_is_served_by_the_mesh_holding_it() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "main",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(tagged(
            "canary",
            "canary",
            "2026-01-02T00:00:00Z",
            &["stable"],
        )));
        let served = |by: Option<&str>| shared.read().served_for(by).spec.mesh_id.clone();
        assert_eq!(served(Some("stable")), "canary-gen2");
        assert_eq!(served(Some("default")), "main-gen1");
        assert_eq!(served(None), "main-gen1");
        // main lists the tag too: it is older, it holds it.
        feed.handle(Event::Apply(tagged(
            "main",
            "default",
            "2026-01-01T00:00:00Z",
            &["stable"],
        )));
        assert_eq!(
            served(Some("stable")),
            "main-gen2",
            "the older Mesh holds it"
        );
        feed.handle(Event::Delete(tagged(
            "main",
            "default",
            "2026-01-01T00:00:00Z",
            &["stable"],
        )));
        assert_eq!(served(Some("stable")), "canary-gen2");
        assert!(
            !shared
                .read()
                .unchanged_by(&mesh("other", "other", "2026-01-03T00:00:00Z", 1)),
            "a Mesh of another revision may hold a tag"
        );
    }

    #[test]
    fn a_pod_selected_by_another_revision_is_served_by_that_revisions_oldest_mesh() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "main",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(mesh(
            "canary-new",
            "canary",
            "2026-01-03T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(mesh(
            "canary-old",
            "canary",
            "2026-01-02T00:00:00Z",
            1,
        )));
        let served = |by: Option<&str>| shared.read().served_for(by).spec.mesh_id.clone();
        assert_eq!(served(Some("canary")), "canary-old-gen1");
        assert_eq!(served(Some("default")), "main-gen1");
        assert_eq!(served(Some("unknown")), "main-gen1");
        feed.handle(Event::Delete(mesh(
            "canary-old",
            "canary",
            "2026-01-02T00:00:00Z",
            1,
        )));
        assert_eq!(served(Some("canary")), "canary-new-gen1");
        // The tag `default` held by a Mesh of another revision wins.
        feed.handle(Event::Apply(tagged(
            "canary-new",
            "canary",
            "2026-01-03T00:00:00Z",
            &["default"],
        )));
        assert_eq!(served(Some("default")), "canary-new-gen2");
    }

    #[test]
    fn a_mesh_moved_to_another_revision_stops_serving() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Apply(mesh("m", "canary", "2026-01-01T00:00:00Z", 2)));
        assert!(shared.read().served().warning.is_some());
    }

    #[test]
    fn a_refused_mesh_is_served_without_settings() {
        let mut refused = mesh("m", "default", "2026-01-01T00:00:00Z", 1);
        refused.spec.traffic.exclude_outbound_ip_ranges = "10.0.0.0/40".into();
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(refused));
        let served = shared.read().served();
        assert_eq!(served.spec.mesh_id, "m-gen1");
        assert!(served.settings.is_none());
    }

    #[test]
    fn a_mesh_relist_replaces_the_served_mesh() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Init);
        feed.handle(Event::InitApply(mesh(
            "n",
            "default",
            "2026-03-01T00:00:00Z",
            1,
        )));
        assert_eq!(shared.read().served().spec.mesh_id, "m-gen1");
        feed.handle(Event::InitDone);
        assert_eq!(shared.read().served().spec.mesh_id, "n-gen1");
    }

    #[test]
    fn a_mesh_relist_without_meshes_serves_the_defaults() {
        let (shared, mut feed) = feed(MeshIndex::new("default"));
        feed.handle(Event::Apply(mesh(
            "m",
            "default",
            "2026-01-01T00:00:00Z",
            1,
        )));
        feed.handle(Event::Init);
        feed.handle(Event::InitDone);
        let served = shared.read().served();
        assert!(served.warning.is_some());
        assert_eq!(served.spec.mesh_id, MeshSpec::default().mesh_id);
    }

    #[test]
    fn native_sidecars_need_every_kubelet_when_the_pod_names_no_node() {
        let (shared, mut feed) = feed(NodeIndex::default());
        for event in [
            Event::Init,
            Event::InitApply(node("n1", true)),
            Event::InitApply(node("n2", true)),
            Event::InitDone,
        ] {
            feed.handle(event);
        }
        assert!(shared.read().native_sidecars_supported(None));
        feed.handle(Event::Apply(node("old", false)));
        assert!(!shared.read().native_sidecars_supported(None));
        assert!(!shared.read().native_sidecars_supported(Some("old")));
        assert!(shared.read().native_sidecars_supported(Some("n1")));
        assert!(
            shared.read().native_sidecars_supported(Some("unknown")),
            "a Node not seen yet is assumed current"
        );
        // A heartbeat, then the kubelet upgraded.
        feed.handle(Event::Apply(node("old", false)));
        assert!(!shared.read().native_sidecars_supported(None));
        feed.handle(Event::Apply(node("old", true)));
        assert!(shared.read().native_sidecars_supported(None));
        feed.handle(Event::Apply(node("n2", false)));
        feed.handle(Event::Delete(node("n2", false)));
        assert!(shared.read().native_sidecars_supported(None));
        assert!(shared.read().native_sidecars_supported(Some("n2")));
    }

    #[test]
    fn a_node_relist_counts_afresh() {
        let (shared, mut feed) = feed(NodeIndex::default());
        feed.handle(Event::Apply(node("old", false)));
        feed.handle(Event::Init);
        feed.handle(Event::InitApply(node("n1", true)));
        assert!(!shared.read().native_sidecars_supported(None));
        feed.handle(Event::InitDone);
        assert!(shared.read().native_sidecars_supported(None));
        assert!(shared.read().native_sidecars_supported(Some("old")));
    }

    #[test]
    fn node_facts_read_the_kubelet_version() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"nodeInfo": {"kubeletVersion": "v1.32.4", "architecture": "", "bootID": "",
                "containerRuntimeVersion": "", "kernelVersion": "", "kubeProxyVersion": "",
                "machineID": "", "operatingSystem": "", "osImage": "", "systemUUID": ""}}
        }))
        .expect("node");
        assert_eq!(NodeFacts::from(&node), super::tests::node("n1", false));
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("node");
        assert!(!NodeFacts::from(&bare).native_sidecars);
    }

    #[test]
    fn reads_kubelet_versions() {
        assert!(kubelet_supports_native_sidecars("v1.33.0"));
        assert!(kubelet_supports_native_sidecars("v1.36.3-eks.1"));
        assert!(kubelet_supports_native_sidecars("v2.0.0"));
        assert!(!kubelet_supports_native_sidecars("v1.32.9"));
        assert!(!kubelet_supports_native_sidecars("garbage"));
    }

    fn namespace(name: &str, enforce: Option<&str>) -> NamespaceFacts {
        NamespaceFacts {
            name: name.to_owned(),
            enforce: enforce.map(str::to_owned),
            injection: Injection::default(),
        }
    }

    #[test]
    fn namespace_index_keeps_the_injection_labels() {
        let (shared, mut feed) = feed(NamespaceIndex::default());
        let stable: Namespace = serde_json::from_value(json!({"metadata": {
            "name": "shop", "labels": {"istio.io/rev": "stable"}}}))
        .expect("namespace");
        feed.handle(Event::Apply(NamespaceFacts::from(&stable)));
        assert_eq!(
            shared.read().injection("shop").revision.as_deref(),
            Some("stable")
        );
        assert_eq!(*shared.read().injection("other"), Injection::default());
        assert!(!shared.read().unchanged_by(&namespace("shop", None)));
        feed.handle(Event::Apply(namespace("shop", None)));
        assert_eq!(*shared.read().injection("shop"), Injection::default());
    }

    #[test]
    fn namespace_index_follows_the_enforced_pod_security_label() {
        let shared = Shared::new(NamespaceIndex::default());
        let mut feed = Feed::new(Arc::clone(&shared));
        feed.handle(Event::Init);
        feed.handle(Event::InitApply(namespace("shop", Some("restricted"))));
        feed.handle(Event::InitApply(namespace("open", None)));
        feed.handle(Event::InitDone);
        let level = |ns: &str| {
            shared
                .read()
                .pod_security_labels(ns)
                .get(ENFORCE_LABEL)
                .cloned()
        };
        assert_eq!(level("shop").as_deref(), Some("restricted"));
        assert_eq!(level("open"), None);
        assert_eq!(level("unknown"), None);
        assert!(
            shared
                .read()
                .unchanged_by(&namespace("shop", Some("restricted")))
        );
        assert!(shared.read().unchanged_by(&namespace("open", None)));
        assert!(
            !shared
                .read()
                .unchanged_by(&namespace("open", Some("baseline")))
        );
        feed.handle(Event::Apply(namespace("open", Some("baseline"))));
        assert_eq!(level("open").as_deref(), Some("baseline"));
        feed.handle(Event::Apply(namespace("shop", None)));
        assert_eq!(level("shop"), None);
        feed.handle(Event::Delete(namespace("open", Some("baseline"))));
        assert_eq!(level("open"), None);
    }
}
