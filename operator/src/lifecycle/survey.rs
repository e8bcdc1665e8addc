//! One pass over every cached pod: each is classified with
//! `ferrimesh_crds::drift::classify` against today's Meshes, namespace
//! labels and ProxyProfiles, counted for the Mesh concerned, and the object
//! to restart for it (its Deployment, StatefulSet, DaemonSet, Job, other
//! controller, or the pod itself) found through the ReplicaSet cache.
//!
//! Pods of one shape in one namespace classify alike, so each such pair is
//! classified once. What is found is kept only where it is needed: a key
//! (a hash) per affected owner, the owners not announced yet (up to a
//! budget), and the workloads a rollout may restart.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::drift::{Configuration, Drift, OutdatedReason, classify, serving_mesh};
use ferrimesh_crds::proxy_profile;
use ferrimesh_crds::stamp::injection_hash;
use k8s_openapi::api::core::v1::ObjectReference;

use super::cache::Key;
use super::pod::{DriftPod, Owner, PodShape};
use super::workload::Kind;

/// The value of `ferrimesh.io/restarted-for` for a pod no Mesh would inject.
pub const NO_SIDECAR: &str = "none";

/// Today's configuration and namespaces.
#[derive(Clone, Copy, Debug)]
pub struct World<'a> {
    /// The Meshes and the namespaces no webhook selects.
    pub config: Configuration<'a>,
    /// Each namespace's labels.
    pub namespaces: &'a HashMap<String, BTreeMap<String, String>>,
    /// Each namespace's ProxyProfiles.
    pub profiles: &'a HashMap<String, Vec<ProxyProfile>>,
}

/// Pods counted for one revision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pods it would inject that have no sidecar.
    pub uninjected: i32,
    /// Pods whose sidecar is not what it would inject today.
    pub outdated: i32,
}

/// An owner whose pods need a restart, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The owner's namespace.
    pub namespace: String,
    /// The owner (the pod itself when it has no controller).
    pub owner: Owner,
    /// The pods' state: `uninjected`, `outdated` or `orphan-revision`.
    pub state: &'static str,
    /// The revision whose Mesh counts them (none for an orphan revision).
    pub revision: Option<String>,
    /// What a restart brings: the injection stamp today's settings give
    /// its pods, or [`NO_SIDECAR`].
    pub target: String,
    /// One pod's drift, in words.
    pub reason: String,
}

impl Finding {
    /// The reference a NeedsRestart Event goes on.
    pub fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.owner.api_version.to_string()),
            kind: Some(self.owner.kind.to_string()),
            name: Some(self.owner.name.to_string()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.owner.uid.to_string()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        }
    }

    /// The restartable workload it is, if it is one.
    pub fn workload(&self) -> Option<Kind> {
        Kind::of(&self.owner.api_version, &self.owner.kind)
    }
}

/// The identity of a finding (owner, state, target), as a hash: an owner
/// is announced once per change of it.
fn key(namespace: &str, owner: (&str, &str, &str), state: &str, target: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (namespace, owner, state, target).hash(&mut hasher);
    hasher.finish()
}

/// What one pass found.
#[derive(Debug, Default)]
pub struct Survey {
    /// Per revision.
    pub counts: BTreeMap<String, Counts>,
    /// Pods injected by a revision no Mesh serves.
    pub orphaned: i32,
    /// The key of every finding ([`Survey::fresh`] and the rest).
    pub keys: HashSet<u64>,
    /// Findings not announced before, each with its key, at most the
    /// budget given.
    pub fresh: Vec<(u64, Finding)>,
    /// Findings on Deployments, StatefulSets and DaemonSets.
    pub workloads: Vec<Finding>,
}

/// How the pods of one shape in one namespace classify.
struct Classified {
    state: &'static str,
    revision: Option<String>,
    target: String,
    reason: String,
    /// The controller to restart: a ReplicaSet's Deployment, or the pod's
    /// own controller; `None` for a pod without one.
    owner: Option<Owner>,
}

fn classify_shape(
    shape: &PodShape,
    namespace: &str,
    world: &World<'_>,
    replica_sets: &HashMap<Key, Option<Owner>>,
) -> Option<Classified> {
    let pod = shape.to_pod(namespace);
    let empty = BTreeMap::new();
    let labels = world.namespaces.get(namespace).unwrap_or(&empty);
    let profiles = world.profiles.get(namespace).map_or(&[][..], Vec::as_slice);
    let drift = classify(&pod, labels, profiles, world.config);
    let revision = match &drift {
        Drift::UpToDate { .. } | Drift::NotSelected => return None,
        Drift::Uninjected { revision } => Some(revision.clone()),
        Drift::Outdated {
            reason: OutdatedReason::Revision { expected, .. },
            ..
        } => Some(expected.clone()),
        Drift::Outdated { revision, .. } => Some(revision.clone()),
        Drift::OrphanRevision { .. } => None,
    };
    let target = serving_mesh(&pod, labels, world.config).map_or_else(
        || NO_SIDECAR.to_owned(),
        |mesh| {
            let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
            let selected = proxy_profile::select(&pod_labels, profiles, &mut Vec::new());
            let annotations = pod.metadata.annotations.clone().unwrap_or_default();
            injection_hash(&mesh.spec, &selected, &annotations)
        },
    );
    let owner = shape.owner.as_ref().map(|owner| {
        if &*owner.kind != "ReplicaSet" {
            return owner.clone();
        }
        let key = Key {
            namespace: namespace.into(),
            name: owner.name.clone(),
        };
        // A ReplicaSet's Deployment; a ReplicaSet of its own, or one not
        // seen yet, is restarted (announced) itself.
        replica_sets
            .get(&key)
            .cloned()
            .flatten()
            .unwrap_or_else(|| owner.clone())
    });
    Some(Classified {
        state: drift.state(),
        revision,
        target,
        reason: drift.to_string(),
        owner,
    })
}

/// Classifies every pod of `pods`; findings whose key is in `announced`
/// are not returned as fresh, and at most `budget` fresh ones are.
pub fn survey(
    world: &World<'_>,
    pods: &HashMap<Key, DriftPod>,
    replica_sets: &HashMap<Key, Option<Owner>>,
    announced: &HashSet<u64>,
    budget: usize,
) -> Survey {
    let mut out = Survey::default();
    let mut classified: HashMap<(*const PodShape, Arc<str>), Option<Classified>> = HashMap::new();
    for (pod_key, pod) in pods {
        let memo = (Arc::as_ptr(&pod.shape), Arc::clone(&pod_key.namespace));
        let found = classified
            .entry(memo)
            .or_insert_with(|| classify_shape(&pod.shape, &pod_key.namespace, world, replica_sets));
        let Some(found) = found.as_ref() else {
            continue;
        };
        match (&found.revision, found.state) {
            (Some(revision), "uninjected") => {
                out.counts.entry(revision.clone()).or_default().uninjected += 1;
            }
            (Some(revision), _) => out.counts.entry(revision.clone()).or_default().outdated += 1,
            (None, _) => out.orphaned += 1,
        }
        let namespace = &*pod_key.namespace;
        let (kind, name, uid) = match &found.owner {
            Some(owner) => (&*owner.kind, &*owner.name, &*owner.uid),
            None => (
                "Pod",
                &*pod_key.name,
                pod.uid.as_deref().unwrap_or_default(),
            ),
        };
        let key = key(namespace, (kind, name, uid), found.state, &found.target);
        if !out.keys.insert(key) {
            continue;
        }
        let finding = || Finding {
            namespace: namespace.to_owned(),
            owner: found.owner.clone().unwrap_or_else(|| Owner {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: name.into(),
                uid: uid.into(),
            }),
            state: found.state,
            revision: found.revision.clone(),
            target: found.target.clone(),
            reason: found.reason.clone(),
        };
        if !announced.contains(&key) && out.fresh.len() < budget {
            out.fresh.push((key, finding()));
        }
        if found
            .owner
            .as_ref()
            .is_some_and(|o| Kind::of(&o.api_version, &o.kind).is_some())
        {
            out.workloads.push(finding());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
    use ferrimesh_crds::{Mesh, MeshSpec};
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::Event;
    use serde_json::{Value, json};

    use super::super::cache::{Cache, Interner};
    use super::*;

    fn pod(ns: &str, name: &str, owner: Option<(&str, &str)>, app: &str) -> Pod {
        let owners: Vec<Value> = owner
            .iter()
            .map(|(kind, name)| {
                let api = if *kind == "Job" { "batch/v1" } else { "apps/v1" };
                json!({"apiVersion": api, "kind": kind, "name": name, "uid": format!("{name}-uid"), "controller": true})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("{name}-uid"),
                         "labels": {"app": app}, "ownerReferences": owners},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }))
        .expect("pod")
    }

    struct Cluster {
        pods: Cache<DriftPod>,
        replica_sets: Cache<Option<Owner>>,
        shapes: Interner<PodShape>,
        namespaces: HashMap<String, BTreeMap<String, String>>,
        profiles: HashMap<String, Vec<ProxyProfile>>,
        meshes: Vec<Mesh>,
    }

    impl Cluster {
        fn new() -> Self {
            let replica_sets = Cache::default();
            let rs: ReplicaSet = serde_json::from_value(json!({
                "metadata": {"name": "web-5d8f", "namespace": "shop", "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "web-uid", "controller": true}]}
            }))
            .expect("rs");
            replica_sets.apply(&Event::Apply(rs), |rs: &ReplicaSet| {
                Some(Owner::controller(rs.metadata.owner_references.as_deref()))
            });
            let enabled = BTreeMap::from([("istio-injection".to_owned(), "enabled".to_owned())]);
            Self {
                pods: Cache::default(),
                replica_sets,
                shapes: Interner::default(),
                namespaces: HashMap::from([
                    ("shop".to_owned(), enabled),
                    ("quiet".to_owned(), BTreeMap::new()),
                ]),
                profiles: HashMap::new(),
                meshes: vec![Mesh::new("default", MeshSpec::default())],
            }
        }

        fn add(&self, pod: Pod) {
            let shapes = self.shapes.clone();
            self.pods
                .apply(&Event::Apply(pod), |p: &Pod| DriftPod::reduce(p, &shapes));
        }

        fn survey(&self, announced: &HashSet<u64>, budget: usize) -> Survey {
            let world = World {
                config: Configuration {
                    meshes: &self.meshes,
                    excluded_namespaces: &SYSTEM_NAMESPACES,
                },
                namespaces: &self.namespaces,
                profiles: &self.profiles,
            };
            self.pods.read(|pods| {
                self.replica_sets
                    .read(|rs| survey(&world, pods, rs, announced, budget))
            })
        }
    }

    fn owners(findings: &[Finding]) -> Vec<(String, String, &'static str)> {
        let mut owners: Vec<_> = findings
            .iter()
            .map(|f| (f.owner.kind.to_string(), f.owner.name.to_string(), f.state))
            .collect();
        owners.sort();
        owners
    }

    #[test]
    fn counts_pods_and_finds_their_owners_through_replica_sets() {
        let cluster = Cluster::new();
        cluster.add(pod(
            "shop",
            "web-a",
            Some(("ReplicaSet", "web-5d8f")),
            "web",
        ));
        cluster.add(pod(
            "shop",
            "web-b",
            Some(("ReplicaSet", "web-5d8f")),
            "web",
        ));
        cluster.add(pod("shop", "db-0", Some(("StatefulSet", "db")), "db"));
        cluster.add(pod("shop", "batch-x", Some(("Job", "batch")), "batch"));
        cluster.add(pod("shop", "lonely", None, "lonely"));
        cluster.add(pod("quiet", "q", Some(("ReplicaSet", "q-1")), "q"));
        let survey = cluster.survey(&HashSet::new(), 100);
        assert_eq!(
            survey.counts.get("default"),
            Some(&Counts {
                uninjected: 5,
                outdated: 0
            })
        );
        assert_eq!(survey.orphaned, 0);
        let fresh: Vec<Finding> = survey.fresh.iter().map(|(_, f)| f.clone()).collect();
        assert_eq!(
            owners(&fresh),
            [
                ("Deployment".into(), "web".into(), "uninjected"),
                ("Job".into(), "batch".into(), "uninjected"),
                ("Pod".into(), "lonely".into(), "uninjected"),
                ("StatefulSet".into(), "db".into(), "uninjected"),
            ],
            "one per owner; the unlabelled namespace's pod is not selected"
        );
        assert_eq!(
            owners(&survey.workloads),
            [
                ("Deployment".into(), "web".into(), "uninjected"),
                ("StatefulSet".into(), "db".into(), "uninjected"),
            ]
        );
        let lonely = fresh
            .iter()
            .find(|f| &*f.owner.name == "lonely")
            .expect("lonely");
        assert_eq!(lonely.reference().uid.as_deref(), Some("lonely-uid"));
        assert_eq!(
            lonely.target,
            injection_hash(&MeshSpec::default(), &[], &BTreeMap::new())
        );
    }

    #[test]
    fn an_owner_is_fresh_until_announced_and_again_when_its_target_changes() {
        let mut cluster = Cluster::new();
        cluster.add(pod(
            "shop",
            "web-a",
            Some(("ReplicaSet", "web-5d8f")),
            "web",
        ));
        let first = cluster.survey(&HashSet::new(), 100);
        assert_eq!(first.fresh.len(), 1);
        let announced: HashSet<u64> = first.fresh.iter().map(|(k, _)| *k).collect();
        assert!(cluster.survey(&announced, 100).fresh.is_empty());
        cluster.meshes[0].spec.proxy.log_level = "debug".into();
        let changed = cluster.survey(&announced, 100);
        assert_eq!(changed.fresh.len(), 1, "another target: announced again");
        assert_eq!(changed.keys.len(), 1);
    }

    #[test]
    fn fresh_findings_stay_within_the_budget_and_orphans_count_cluster_wide() {
        let cluster = Cluster::new();
        for i in 0..5 {
            let mut orphan = pod("quiet", &format!("o{i}"), None, "o");
            orphan.metadata.annotations = Some(BTreeMap::from([(
                "sidecar.istio.io/status".to_owned(),
                r#"{"revision":"gone"}"#.to_owned(),
            )]));
            cluster.add(orphan);
        }
        let survey = cluster.survey(&HashSet::new(), 2);
        assert_eq!(survey.orphaned, 5);
        assert!(survey.counts.is_empty());
        assert_eq!(survey.keys.len(), 5);
        assert_eq!(survey.fresh.len(), 2);
        assert!(
            survey
                .fresh
                .iter()
                .all(|(_, f)| f.state == "orphan-revision" && f.revision.is_none())
        );
    }
}
