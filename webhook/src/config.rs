//! Where the webhook's mesh configuration comes from: a Mesh file (local runs
//! and tests) or the cluster (watches on Mesh, ProxyProfile, Node and
//! Namespace).
//! Either way the admission path reads precomputed indexes ([`index`]): no
//! API call and no scan of a cache per request.

pub mod index;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::mesh::MeshSpec;
use ferrimesh_crds::tags::selected_revision;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use self::index::{
    Feed, Index, MeshIndex, NamespaceFacts, NamespaceIndex, NodeFacts, NodeIndex, ProfileIndex,
    ServedMesh, Shared,
};
use crate::inject::settings::MeshSettings;
use crate::mesh_file;

/// The mesh configuration one admission needs.
#[derive(Clone, Debug)]
pub struct View {
    /// The Mesh serving this webhook's revision.
    pub mesh: Arc<MeshSpec>,
    /// Its Mesh-wide settings, resolved once per Mesh generation; `None`
    /// when the Mesh is refused (the engine then reports why).
    pub mesh_settings: Option<Arc<MeshSettings>>,
    /// The ProxyProfiles of the pod's namespace.
    pub profiles: Arc<Vec<ProxyProfile>>,
    /// What `nativeSidecars: Auto` resolves to for the pod.
    pub native_sidecars_supported: bool,
    /// The Pod Security level the pod's namespace enforces, as its label
    /// (empty when none is known: files carry no namespaces).
    pub pod_security_labels: Arc<BTreeMap<String, String>>,
    /// A note for the admission response, when the configuration is not what
    /// the operator intended (no Mesh for the revision, say).
    pub warning: Option<String>,
}

/// A source of mesh configuration.
pub trait ConfigSource: Send + Sync + 'static {
    /// The configuration for a pod with `pod_labels` in `namespace`, to be
    /// scheduled on `node` when the pod names one.
    fn view(
        &self,
        namespace: &str,
        node: Option<&str>,
        pod_labels: &BTreeMap<String, String>,
    ) -> View;

    /// Whether the source has its initial state (the webhook is ready).
    fn is_ready(&self) -> bool;
}

/// The configuration read from files, indexed as the cluster's is.
struct FileConfig {
    mesh: Arc<ServedMesh>,
    profiles: Arc<ProfileIndex>,
}

/// Mesh and ProxyProfiles from files, re-read when they change.
pub struct FileSource {
    mesh_path: PathBuf,
    profile_paths: Vec<PathBuf>,
    native_sidecars_supported: bool,
    state: RwLock<FileConfig>,
}

fn read_file_config(mesh: &Path, profiles: &[PathBuf]) -> crate::Result<FileConfig> {
    let spec = mesh_file::read_mesh_file(mesh)?;
    let mut all = Vec::new();
    for path in profiles {
        all.extend(mesh_file::read_profile_file(path)?);
    }
    Ok(FileConfig {
        mesh: Arc::new(ServedMesh::resolve(spec, None)),
        profiles: Arc::new(ProfileIndex::of(all)),
    })
}

impl FileSource {
    /// Reads the files once; fails when they cannot be read.
    pub fn load(
        mesh_path: PathBuf,
        profile_paths: Vec<PathBuf>,
        native_sidecars_supported: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let state = read_file_config(&mesh_path, &profile_paths)?;
        Ok(Arc::new(Self {
            mesh_path,
            profile_paths,
            native_sidecars_supported,
            state: RwLock::new(state),
        }))
    }

    /// Re-reads the files every `interval`; a file that does not parse is
    /// reported and the previous configuration kept.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let source = Arc::clone(self);
        tokio::spawn(async move {
            let mut last = stamp(&source.mesh_path, &source.profile_paths);
            loop {
                tokio::time::sleep(interval).await;
                let now = stamp(&source.mesh_path, &source.profile_paths);
                if now == last {
                    continue;
                }
                last = now;
                match read_file_config(&source.mesh_path, &source.profile_paths) {
                    Ok(config) => {
                        tracing::info!(file = %source.mesh_path.display(), "mesh configuration reloaded");
                        *source.state.write().unwrap_or_else(|p| p.into_inner()) = config;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mesh configuration not reloaded; keeping the previous one")
                    }
                }
            }
        })
    }
}

/// A cheap fingerprint of files: length and modification time of each
/// (following symlinks, as Secret and ConfigMap volumes use them).
pub fn stamp(first: &Path, rest: &[PathBuf]) -> Vec<Option<(u64, std::time::SystemTime)>> {
    std::iter::once(first)
        .chain(rest.iter().map(PathBuf::as_path))
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

impl ConfigSource for FileSource {
    fn view(
        &self,
        namespace: &str,
        _node: Option<&str>,
        _pod_labels: &BTreeMap<String, String>,
    ) -> View {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        View {
            mesh: Arc::clone(&state.mesh.spec),
            mesh_settings: state.mesh.settings.clone(),
            profiles: state.profiles.in_namespace(namespace),
            native_sidecars_supported: self.native_sidecars_supported,
            pod_security_labels: Arc::default(),
            warning: None,
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// A configuration that never changes: one Mesh, no ProxyProfiles, native
/// sidecars supported. For benchmarks, fuzzing and embedding the engine.
pub struct FixedSource {
    mesh: ServedMesh,
    profiles: Arc<Vec<ProxyProfile>>,
}

impl FixedSource {
    /// Serves `mesh` to every request.
    pub fn new(mesh: MeshSpec) -> Self {
        Self {
            mesh: ServedMesh::resolve(mesh, None),
            profiles: Arc::default(),
        }
    }
}

impl ConfigSource for FixedSource {
    fn view(
        &self,
        _namespace: &str,
        _node: Option<&str>,
        _pod_labels: &BTreeMap<String, String>,
    ) -> View {
        View {
            mesh: Arc::clone(&self.mesh.spec),
            mesh_settings: self.mesh.settings.clone(),
            profiles: Arc::clone(&self.profiles),
            native_sidecars_supported: true,
            pod_security_labels: Arc::default(),
            warning: None,
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Mesh, ProxyProfiles and Nodes from the cluster, kept current by
/// watches whose events update the indexes an admission reads.
pub struct ClusterSource {
    meshes: Arc<Shared<MeshIndex>>,
    profiles: Arc<Shared<ProfileIndex>>,
    nodes: Arc<Shared<NodeIndex>>,
    namespaces: Arc<Shared<NamespaceIndex>>,
}

/// Runs a watch for good, feeding its events (as `reduce` makes them) to
/// `index`; errors are logged and the watcher retries with backoff.
fn spawn_feed<K, I>(
    kind: &'static str,
    api: Api<K>,
    index: &Arc<Shared<I>>,
    reduce: impl Fn(K) -> I::Object + Send + 'static,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    I: Index + Send + Sync + 'static,
    I::Object: Send,
{
    let mut feed = Feed::new(Arc::clone(index));
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let shared = Arc::clone(index);
    tokio::spawn(events.for_each(move |result| {
        match result {
            Ok(event) => {
                let was_synced = shared.is_synced();
                feed.handle(map_event(event, &reduce));
                if !was_synced && shared.is_synced() {
                    tracing::info!(kind, "watch synced");
                }
            }
            Err(e) => tracing::warn!(kind, error = %e, "watch error; retrying with backoff"),
        }
        futures::future::ready(())
    }));
}

fn map_event<K, T>(event: Event<K>, f: impl Fn(K) -> T) -> Event<T> {
    match event {
        Event::Apply(object) => Event::Apply(f(object)),
        Event::Delete(object) => Event::Delete(f(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(f(object)),
        Event::InitDone => Event::InitDone,
    }
}

impl ClusterSource {
    /// Starts the watches; the source turns ready once all have listed.
    pub fn start(client: Client, revision: &str) -> Arc<Self> {
        let source = Arc::new(Self {
            meshes: Shared::new(MeshIndex::new(revision)),
            profiles: Shared::new(ProfileIndex::default()),
            nodes: Shared::new(NodeIndex::default()),
            namespaces: Shared::new(NamespaceIndex::default()),
        });
        spawn_feed("Mesh", Api::all(client.clone()), &source.meshes, |m| m);
        spawn_feed(
            "ProxyProfile",
            Api::all(client.clone()),
            &source.profiles,
            |p| p,
        );
        // A Node is reduced to its name and kubelet support as it arrives.
        spawn_feed(
            "Node",
            Api::<Node>::all(client.clone()),
            &source.nodes,
            |n| NodeFacts::from(&n),
        );
        // A Namespace is reduced to the Pod Security level it enforces.
        spawn_feed(
            "Namespace",
            Api::<Namespace>::all(client),
            &source.namespaces,
            |n| NamespaceFacts::from(&n),
        );
        source
    }
}

impl ConfigSource for ClusterSource {
    /// The Mesh is the one holding the revision tag that selected the pod,
    /// if a tag did, else the Mesh of the webhook's revision.
    fn view(
        &self,
        namespace: &str,
        node: Option<&str>,
        pod_labels: &BTreeMap<String, String>,
    ) -> View {
        let mesh = {
            let namespaces = self.namespaces.read();
            let labels = namespaces.injection(namespace);
            let selected_by = selected_revision(
                labels.injection.as_deref(),
                labels.revision.as_deref(),
                pod_labels,
            );
            self.meshes.read().served_for(selected_by)
        };
        View {
            mesh: Arc::clone(&mesh.spec),
            mesh_settings: mesh.settings.clone(),
            profiles: self.profiles.read().in_namespace(namespace),
            native_sidecars_supported: self.nodes.read().native_sidecars_supported(node),
            pod_security_labels: self.namespaces.read().pod_security_labels(namespace),
            warning: mesh.warning.clone(),
        }
    }

    fn is_ready(&self) -> bool {
        self.meshes.is_synced()
            && self.profiles.is_synced()
            && self.nodes.is_synced()
            && self.namespaces.is_synced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_source_filters_profiles_by_namespace() {
        let dir = std::env::temp_dir().join(format!("ferrimesh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mesh = dir.join("mesh.yaml");
        let profile = dir.join("profile.yaml");
        std::fs::write(&mesh, "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {revision: canary}\n")
            .expect("write");
        std::fs::write(
            &profile,
            "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: ProxyProfile\nmetadata: {name: p, namespace: shop}\nspec: {}\n",
        )
        .expect("write");
        let source = FileSource::load(mesh, vec![profile], false).expect("load");
        let view = source.view("shop", None, &BTreeMap::new());
        assert_eq!(view.mesh.revision, "canary");
        assert_eq!(view.profiles.len(), 1);
        assert!(
            source
                .view("other", None, &BTreeMap::new())
                .profiles
                .is_empty()
        );
        assert!(!view.native_sidecars_supported);
        std::fs::remove_dir_all(dir).ok();
    }
}
