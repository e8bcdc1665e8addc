//! Where the webhook's mesh configuration comes from: a Mesh file (local runs
//! and tests) or the cluster (reflectors on Mesh, ProxyProfile and Node).
//! Either way the admission path reads in-memory state only: no API call per
//! request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrimesh_crds::mesh::MeshSpec;
use ferrimesh_crds::{Mesh, ProxyProfile};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::manifests;

/// The mesh configuration one admission needs.
#[derive(Clone, Debug)]
pub struct View {
    /// The Mesh serving this webhook's revision.
    pub mesh: Arc<MeshSpec>,
    /// The ProxyProfiles of the pod's namespace.
    pub profiles: Vec<ProxyProfile>,
    /// What `nativeSidecars: Auto` resolves to for the pod.
    pub native_sidecars_supported: bool,
    /// A note for the admission response, when the configuration is not what
    /// the operator intended (no Mesh for the revision, say).
    pub warning: Option<String>,
}

/// A source of mesh configuration.
pub trait ConfigSource: Send + Sync + 'static {
    /// The configuration for a pod in `namespace`, to be scheduled on `node`
    /// when the pod names one.
    fn view(&self, namespace: &str, node: Option<&str>) -> View;

    /// Whether the source has its initial state (the webhook is ready).
    fn is_ready(&self) -> bool;
}

/// Mesh and ProxyProfiles from files, re-read when they change.
pub struct FileSource {
    mesh_path: PathBuf,
    profile_paths: Vec<PathBuf>,
    native_sidecars_supported: bool,
    state: RwLock<(Arc<MeshSpec>, Arc<Vec<ProxyProfile>>)>,
}

fn read_file_config(
    mesh: &Path,
    profiles: &[PathBuf],
) -> anyhow::Result<(MeshSpec, Vec<ProxyProfile>)> {
    let name = mesh.display().to_string();
    let text = std::fs::read_to_string(mesh).map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
    let spec = manifests::read_mesh(&name, &text)?;
    let mut all = Vec::new();
    for path in profiles {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
        all.extend(manifests::read_profiles(&name, &text)?);
    }
    Ok((spec, all))
}

impl FileSource {
    /// Reads the files once; fails when they cannot be read.
    pub fn load(
        mesh_path: PathBuf,
        profile_paths: Vec<PathBuf>,
        native_sidecars_supported: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let (mesh, profiles) = read_file_config(&mesh_path, &profile_paths)?;
        Ok(Arc::new(Self {
            mesh_path,
            profile_paths,
            native_sidecars_supported,
            state: RwLock::new((Arc::new(mesh), Arc::new(profiles))),
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
                    Ok((mesh, profiles)) => {
                        tracing::info!(file = %source.mesh_path.display(), "mesh configuration reloaded");
                        if let Ok(mut state) = source.state.write() {
                            *state = (Arc::new(mesh), Arc::new(profiles));
                        }
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
    fn view(&self, namespace: &str, _node: Option<&str>) -> View {
        let (mesh, profiles) = match self.state.read() {
            Ok(state) => (Arc::clone(&state.0), Arc::clone(&state.1)),
            Err(poisoned) => {
                let state = poisoned.into_inner();
                (Arc::clone(&state.0), Arc::clone(&state.1))
            }
        };
        View {
            mesh,
            profiles: profiles
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
                .cloned()
                .collect(),
            native_sidecars_supported: self.native_sidecars_supported,
            warning: None,
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// A configuration that never changes: one Mesh, no ProxyProfiles, native
/// sidecars supported. For benchmarks, fuzzing and embedding the engine.
pub struct FixedSource(Arc<MeshSpec>);

impl FixedSource {
    /// Serves `mesh` to every request.
    pub fn new(mesh: MeshSpec) -> Self {
        Self(Arc::new(mesh))
    }
}

impl ConfigSource for FixedSource {
    fn view(&self, _namespace: &str, _node: Option<&str>) -> View {
        View {
            mesh: Arc::clone(&self.0),
            profiles: Vec::new(),
            native_sidecars_supported: true,
            warning: None,
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Mesh, ProxyProfiles and Nodes from the cluster, kept current by watches.
pub struct ClusterSource {
    revision: String,
    meshes: Store<Mesh>,
    profiles: Store<ProxyProfile>,
    nodes: Store<Node>,
    ready: Arc<AtomicBool>,
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

fn node_supports(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .is_some_and(|info| kubelet_supports_native_sidecars(&info.kubelet_version))
}

impl ClusterSource {
    /// Starts the watches; the source turns ready once all have listed.
    pub fn start(client: Client, revision: &str) -> Arc<Self> {
        let (meshes, mesh_writer) = reflector::store();
        let (profiles, profile_writer) = reflector::store();
        let (nodes, node_writer) = reflector::store();
        let config = watcher::Config::default();
        let mesh_stream = watcher(Api::<Mesh>::all(client.clone()), config.clone())
            .default_backoff()
            .reflect(mesh_writer)
            .applied_objects();
        let profile_stream = watcher(Api::<ProxyProfile>::all(client.clone()), config.clone())
            .default_backoff()
            .reflect(profile_writer)
            .applied_objects();
        // Nodes are large; keep only what the kubelet version check reads.
        let node_stream = watcher(Api::<Node>::all(client), config)
            .default_backoff()
            .modify(|node: &mut Node| {
                node.metadata.managed_fields = None;
                node.metadata.annotations = None;
                node.spec = None;
                if let Some(status) = node.status.as_mut() {
                    status.images = None;
                    status.conditions = None;
                    status.volumes_attached = None;
                    status.volumes_in_use = None;
                }
            })
            .reflect(node_writer)
            .applied_objects();
        for (kind, stream) in [
            ("Mesh", mesh_stream.map(|r| r.map(|_| ())).boxed()),
            (
                "ProxyProfile",
                profile_stream.map(|r| r.map(|_| ())).boxed(),
            ),
            ("Node", node_stream.map(|r| r.map(|_| ())).boxed()),
        ] {
            tokio::spawn(stream.for_each(move |result| async move {
                if let Err(e) = result {
                    tracing::warn!(kind, error = %e, "watch error; retrying with backoff");
                }
            }));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let source = Arc::new(Self {
            revision: revision.to_owned(),
            meshes,
            profiles,
            nodes,
            ready,
        });
        let waiting = Arc::clone(&source);
        tokio::spawn(async move {
            let synced = futures::future::try_join3(
                waiting.meshes.wait_until_ready(),
                waiting.profiles.wait_until_ready(),
                waiting.nodes.wait_until_ready(),
            )
            .await;
            if synced.is_ok() {
                tracing::info!("Mesh, ProxyProfile and Node watches synced");
                waiting.ready.store(true, Ordering::Release);
            }
        });
        source
    }
}

impl ConfigSource for ClusterSource {
    fn view(&self, namespace: &str, node: Option<&str>) -> View {
        let mut meshes: Vec<Arc<Mesh>> = self
            .meshes
            .state()
            .into_iter()
            .filter(|m| m.spec.revision == self.revision)
            .collect();
        meshes.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .cmp(&b.metadata.creation_timestamp)
        });
        let (mesh, warning) = match meshes.first() {
            Some(mesh) => (Arc::new(mesh.spec.clone()), None),
            None => {
                let spec = MeshSpec {
                    revision: self.revision.clone(),
                    ..MeshSpec::default()
                };
                let note = format!(
                    "no Mesh serves revision {}; Mesh defaults apply",
                    self.revision
                );
                (Arc::new(spec), Some(note))
            }
        };
        let profiles = self
            .profiles
            .state()
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
            .map(|p| (*p).clone())
            .collect();
        let nodes = self.nodes.state();
        let native_sidecars_supported = match node {
            Some(name) => nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(name))
                .is_none_or(|n| node_supports(n)),
            None => nodes.iter().all(|n| node_supports(n)),
        };
        View {
            mesh,
            profiles,
            native_sidecars_supported,
            warning,
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kubelet_versions() {
        assert!(kubelet_supports_native_sidecars("v1.33.0"));
        assert!(kubelet_supports_native_sidecars("v1.36.3-eks.1"));
        assert!(kubelet_supports_native_sidecars("v2.0.0"));
        assert!(!kubelet_supports_native_sidecars("v1.32.9"));
        assert!(!kubelet_supports_native_sidecars("garbage"));
    }

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
        let view = source.view("shop", None);
        assert_eq!(view.mesh.revision, "canary");
        assert_eq!(view.profiles.len(), 1);
        assert!(source.view("other", None).profiles.is_empty());
        assert!(!view.native_sidecars_supported);
        std::fs::remove_dir_all(dir).ok();
    }
}
