//! The sidecar lifecycle (docs/operator.md, "Sidecar lifecycle"): pods that
//! should have a sidecar and have none, pods whose sidecar is not what
//! today's Meshes and ProxyProfiles would inject, pods injected by a
//! revision no Mesh serves; counted on each Mesh's status, announced once
//! per change with a `NeedsRestart` Event on the object to restart, and,
//! with `rollout.policy: Automatic`, restarted workload by workload.
//!
//! One loop, run after changes of pods, namespaces, Meshes, ProxyProfiles
//! and workloads (at most every [`PERIOD`] through a throttle) and every
//! [`RESYNC`]: each pass classifies every cached pod
//! ([`survey`]), publishes the counts and rollout conditions to the Mesh
//! reconciler (the one writer of a Mesh's status), publishes the Events,
//! and restarts what the rollout plans ([`rollout`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use ferrimesh_crds::drift::{Configuration, namespace_mesh};
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::mesh::RolloutPolicy;
use ferrimesh_crds::{Mesh, ProxyProfile};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::runtime::admin::Metrics;
use crate::runtime::profiles;
use crate::{FIELD_MANAGER, Result};

pub mod cache;
pub mod pod;
pub mod rollout;
pub mod survey;
pub mod workload;

use cache::{Cache, Interner};
use pod::{DriftPod, Owner, PodShape};
use rollout::{Candidate, Progress, Restarting, WorkloadRef};
use survey::{Counts, Finding, Survey, World};
use workload::{Kind, RESTARTED_AT, Workload};

/// Annotation on a workload the rollout restarted: what it was restarted
/// for (the injection stamp its pods get, or `none`), written in the same
/// patch as `kubectl.kubernetes.io/restartedAt`.
pub const RESTARTED_FOR: &str = "ferrimesh.io/restarted-for";
/// The reason of the Event on an owner whose pods need a restart.
pub const NEEDS_RESTART: &str = "NeedsRestart";
/// The reason of the Event on a workload the rollout restarted.
pub const RESTARTED: &str = "RolloutRestarted";

/// The shortest time between two passes while changes keep coming.
pub const PERIOD: Duration = Duration::from_secs(2);
/// The longest time between two passes.
pub const RESYNC: Duration = Duration::from_secs(15);
/// `NeedsRestart` Events published at once at most; then one a second.
const EVENT_BURST: f64 = 30.0;
/// How long a restart the cache has not shown yet counts as restarting.
const PENDING_FOR: Duration = Duration::from_secs(60);

/// The caches the lifecycle reads, fed by the watches `run.rs` opens.
#[derive(Clone, Debug, Default)]
pub struct Caches {
    /// Every live pod, reduced.
    pub pods: Cache<DriftPod>,
    /// The pods' shared shapes.
    pub shapes: Interner<PodShape>,
    /// Each ReplicaSet's controller (metadata only).
    pub replica_sets: Cache<Option<Owner>>,
    /// Deployments, reduced.
    pub deployments: Cache<Workload>,
    /// StatefulSets, reduced.
    pub stateful_sets: Cache<Workload>,
    /// DaemonSets, reduced.
    pub daemon_sets: Cache<Workload>,
}

impl Caches {
    /// The cache of `kind`.
    pub fn workloads(&self, kind: Kind) -> &Cache<Workload> {
        match kind {
            Kind::Deployment => &self.deployments,
            Kind::StatefulSet => &self.stateful_sets,
            Kind::DaemonSet => &self.daemon_sets,
        }
    }

    /// Reduces a pod into the pod cache's value (`None` when it is not kept).
    pub fn reduce_pod(&self, pod: &Pod) -> Option<DriftPod> {
        DriftPod::reduce(pod, &self.shapes)
    }
}

/// What the lifecycle loop needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes the Events.
    pub recorder: Recorder,
    /// The operator's own namespace, which no webhook entry selects.
    pub namespace: String,
    /// Every Mesh.
    pub meshes: Store<Mesh>,
    /// Every Namespace.
    pub namespaces: Store<Namespace>,
    /// Every ProxyProfile.
    pub profiles: Store<ProxyProfile>,
    /// Pods, ReplicaSets and workloads.
    pub caches: Caches,
}

/// What the last pass found, for the Meshes' status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Counts per revision.
    pub counts: BTreeMap<String, Counts>,
    /// Pods injected by a revision no Mesh serves.
    pub orphaned: i32,
    /// The rollout condition of each Mesh with an automatic rollout, by name.
    pub rollouts: BTreeMap<String, Progress>,
}

/// One Mesh's part of a [`Report`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshDrift {
    /// Pods it would inject that have no sidecar.
    pub uninjected: i32,
    /// Pods whose sidecar is not what it would inject today.
    pub outdated: i32,
    /// Pods, cluster-wide, injected by a revision no Mesh serves.
    pub orphaned: i32,
    /// Its `RolloutProgressing` condition (automatic rollout only).
    pub rollout: Option<Progress>,
}

impl Report {
    /// `mesh`'s part.
    pub fn for_mesh(&self, mesh: &Mesh) -> MeshDrift {
        let counts = self
            .counts
            .get(&mesh.spec.revision)
            .copied()
            .unwrap_or_default();
        MeshDrift {
            uninjected: counts.uninjected,
            outdated: counts.outdated,
            orphaned: self.orphaned,
            rollout: self.rollouts.get(&mesh.name_any()).cloned(),
        }
    }
}

/// A restart written and not yet seen in the cache.
#[derive(Debug)]
struct Pending {
    mesh: String,
    target: String,
    at: jiff::Timestamp,
    written: Instant,
}

/// What the loop remembers between passes (and loses at a restart: the
/// Events are then published once more, the rollout reads its state from
/// the cluster).
#[derive(Debug)]
struct Memory {
    /// The findings announced with an Event.
    announced: HashSet<u64>,
    /// Events that may be published now.
    tokens: f64,
    refilled: Instant,
    pending: HashMap<WorkloadRef, Pending>,
}

impl Memory {
    fn new() -> Self {
        Self {
            announced: HashSet::new(),
            tokens: EVENT_BURST,
            refilled: Instant::now(),
            pending: HashMap::new(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let seconds = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + seconds).min(EVENT_BURST);
        self.refilled = now;
    }
}

/// Runs a pass per trigger until `triggers` ends, publishing each pass's
/// report to the Mesh reconciler.
pub async fn run(
    ctx: Context,
    triggers: impl Stream<Item = ()>,
    publish: watch::Sender<Report>,
    metrics: Metrics,
) {
    let mut memory = Memory::new();
    tokio::pin!(triggers);
    while triggers.next().await.is_some() {
        let report = pass(&ctx, &mut memory).await;
        metrics.count("lifecycle", report.is_ok());
        match report {
            Ok(report) => {
                publish.send_if_modified(|last| {
                    let changed = *last != report;
                    *last = report;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "lifecycle pass failed; retrying"),
        }
    }
}

/// The revision serving a namespace's pods (a pod with no labels of its
/// own), if any.
fn namespace_revision(namespace: &str, world: &World<'_>) -> Option<String> {
    let empty = BTreeMap::new();
    let labels = world.namespaces.get(namespace).unwrap_or(&empty);
    namespace_mesh(namespace, labels, world.config).map(|m| m.spec.revision.clone())
}

async fn pass(ctx: &Context, memory: &mut Memory) -> Result<Report> {
    let meshes: Vec<Mesh> = ctx
        .meshes
        .state()
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .map(|m| (**m).clone())
        .collect();
    let namespaces: HashMap<String, BTreeMap<String, String>> = ctx
        .namespaces
        .state()
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    let profiles = profiles::by_namespace(&ctx.profiles);
    let mut excluded: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    excluded.push(&ctx.namespace);
    let world = World {
        config: Configuration {
            meshes: &meshes,
            excluded_namespaces: &excluded,
        },
        namespaces: &namespaces,
        profiles: &profiles,
    };
    memory.refill();
    // Whole tokens only: the fraction stays for the next pass.
    let budget = memory.tokens.floor() as usize;
    let survey = ctx.caches.pods.read(|pods| {
        ctx.caches
            .replica_sets
            .read(|rs| survey::survey(&world, pods, rs, &memory.announced, budget))
    });
    ctx.caches.shapes.collect();
    tracing::debug!(
        shapes = ctx.caches.shapes.len(),
        findings = survey.keys.len(),
        "lifecycle pass"
    );
    // An owner that recovers and drifts again is announced again.
    memory.announced.retain(|k| survey.keys.contains(k));
    for (key, finding) in &survey.fresh {
        memory.tokens -= 1.0;
        if announce(&ctx.recorder, finding).await {
            memory.announced.insert(*key);
        }
    }
    let mut rollouts = BTreeMap::new();
    for mesh in meshes
        .iter()
        .filter(|m| m.spec.rollout.policy == RolloutPolicy::Automatic)
    {
        let progress = roll_out(ctx, memory, mesh, &survey, &world).await;
        rollouts.insert(mesh.name_any(), progress);
    }
    Ok(Report {
        counts: survey.counts,
        orphaned: survey.orphaned,
        rollouts,
    })
}

/// Publishes `finding`'s `NeedsRestart` Event; whether it was published.
async fn announce(recorder: &Recorder, finding: &Finding) -> bool {
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: NEEDS_RESTART.to_owned(),
        note: Some(format!(
            "pods of {} {} need a restart: {} (restart target {})",
            finding.owner.kind, finding.owner.name, finding.reason, finding.target
        )),
        action: "CheckSidecar".to_owned(),
        secondary: None,
    };
    match recorder.publish(&event, &finding.reference()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not publish an Event");
            false
        }
    }
}

/// The workloads of `mesh`'s rollout: its candidates (by workload, their
/// targets joined) in the namespaces its rollout selects.
fn candidates(
    mesh: &Mesh,
    survey: &Survey,
    world: &World<'_>,
    caches: &Caches,
) -> std::result::Result<Vec<Candidate>, Progress> {
    let selector = match mesh.spec.rollout.namespace_selector.clone() {
        Some(selector) => Some(Selector::try_from(selector).map_err(|e| Progress {
            progressing: false,
            reason: "InvalidNamespaceSelector".to_owned(),
            message: format!("spec.rollout.namespaceSelector selects nothing: {e}"),
        })?),
        None => None,
    };
    let empty = BTreeMap::new();
    let mut targets: BTreeMap<WorkloadRef, BTreeSet<&str>> = BTreeMap::new();
    for finding in &survey.workloads {
        let (Some(kind), Some(revision)) = (finding.workload(), &finding.revision) else {
            continue;
        };
        let labels = world.namespaces.get(&finding.namespace).unwrap_or(&empty);
        if *revision != mesh.spec.revision || selector.as_ref().is_some_and(|s| !s.matches(labels))
        {
            continue;
        }
        let workload = WorkloadRef {
            kind,
            namespace: finding.namespace.clone(),
            name: finding.owner.name.to_string(),
        };
        targets.entry(workload).or_default().insert(&finding.target);
    }
    Ok(targets
        .into_iter()
        .filter_map(|(workload, targets)| {
            let current = caches
                .workloads(workload.kind)
                .get(&workload.namespace, &workload.name)?;
            let target = targets.into_iter().collect::<Vec<_>>().join(",");
            Some(Candidate {
                workload,
                target,
                current,
            })
        })
        .collect())
}

/// The workloads of `mesh` that ferrimesh restarted and that have not
/// rolled out yet, from the caches and the restarts written since.
fn restarting(
    mesh: &Mesh,
    candidates: &[Candidate],
    world: &World<'_>,
    caches: &Caches,
    pending: &HashMap<WorkloadRef, Pending>,
) -> Vec<Restarting> {
    let mut served: HashMap<String, bool> = HashMap::new();
    let mut out: Vec<Restarting> = Vec::new();
    for kind in [Kind::Deployment, Kind::StatefulSet, Kind::DaemonSet] {
        caches.workloads(kind).read(|items| {
            for (key, workload) in items {
                if !workload.restarting_for_us() {
                    continue;
                }
                let reference = WorkloadRef {
                    kind,
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                };
                let ours = *served
                    .entry(reference.namespace.clone())
                    .or_insert_with(|| {
                        namespace_revision(&reference.namespace, world).as_ref()
                            == Some(&mesh.spec.revision)
                    })
                    || candidates.iter().any(|c| c.workload == reference);
                if ours {
                    let since = workload
                        .restarted_at
                        .as_deref()
                        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
                    out.push(Restarting {
                        workload: reference,
                        since,
                    });
                }
            }
        });
    }
    for (workload, pending) in pending {
        if pending.mesh == mesh.name_any() && !out.iter().any(|r| r.workload == *workload) {
            out.push(Restarting {
                workload: workload.clone(),
                since: Some(pending.at),
            });
        }
    }
    out
}

/// Plans and starts `mesh`'s restarts; returns its rollout condition.
async fn roll_out(
    ctx: &Context,
    memory: &mut Memory,
    mesh: &Mesh,
    survey: &Survey,
    world: &World<'_>,
) -> Progress {
    // A restart the cache has shown (or that is long gone from it) is no
    // longer pending.
    memory.pending.retain(|workload, pending| {
        let seen = ctx
            .caches
            .workloads(workload.kind)
            .get(&workload.namespace, &workload.name)
            .is_some_and(|w| w.restarted_for.as_deref() == Some(pending.target.as_str()));
        !seen && pending.written.elapsed() < PENDING_FOR
    });
    let candidates = match candidates(mesh, survey, world, &ctx.caches) {
        Ok(candidates) => candidates,
        Err(progress) => return progress,
    };
    let restarting = restarting(mesh, &candidates, world, &ctx.caches, &memory.pending);
    let now = jiff::Timestamp::now();
    let plan = rollout::plan(&mesh.spec.rollout, &candidates, &restarting, now);
    for candidate in plan.restart {
        // The time as kubectl writes it: RFC 3339, whole seconds.
        let at = jiff::Timestamp::from_second(now.as_second()).unwrap_or(now);
        memory.pending.insert(
            candidate.workload.clone(),
            Pending {
                mesh: mesh.name_any(),
                target: candidate.target.clone(),
                at,
                written: Instant::now(),
            },
        );
        match restart(&ctx.client, &candidate, at).await {
            Ok(reference) => {
                tracing::info!(workload = %candidate.workload, target = %candidate.target, "restarted");
                let event = KubeEvent {
                    type_: EventType::Normal,
                    reason: RESTARTED.to_owned(),
                    note: Some(format!(
                        "restarted by Mesh {} for its sidecar ({RESTARTED_FOR}: {})",
                        mesh.name_any(),
                        candidate.target
                    )),
                    action: "Restart".to_owned(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                    tracing::warn!(error = %e, "could not publish an Event");
                }
            }
            Err(e) => {
                tracing::warn!(workload = %candidate.workload, error = %e, "restart failed; retrying");
                memory.pending.remove(&candidate.workload);
            }
        }
    }
    plan.progress
}

/// Server-side applies `patch` to `namespace/name` of kind `K`; returns
/// its uid.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<Option<String>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = Api::<K>::namespaced(client.clone(), namespace)
        .patch(name, &params, &Patch::Apply(patch))
        .await?;
    Ok(applied.meta().uid.clone())
}

/// Restarts a workload as `kubectl rollout restart` does, recording the
/// target in the same server-side apply; returns the reference of the
/// workload for its Event.
async fn restart(
    client: &Client,
    candidate: &Candidate,
    at: jiff::Timestamp,
) -> Result<ObjectReference> {
    let WorkloadRef {
        kind,
        namespace,
        name,
    } = &candidate.workload;
    let record = candidate.current.restart_record(&candidate.target);
    let mut patch = json!({
        "apiVersion": "apps/v1",
        "kind": kind.as_str(),
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {RESTARTED_FOR: record}},
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at.to_string()}}}},
    });
    // Only over the version planned on: the record's generation holds.
    if let Some(version) = &candidate.current.resource_version {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    let uid = match kind {
        Kind::Deployment => apply::<Deployment>(client, namespace, name, &patch).await?,
        Kind::StatefulSet => apply::<StatefulSet>(client, namespace, name, &patch).await?,
        Kind::DaemonSet => apply::<DaemonSet>(client, namespace, name, &patch).await?,
    };
    Ok(ObjectReference {
        api_version: Some("apps/v1".to_owned()),
        kind: Some(kind.as_str().to_owned()),
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        uid,
        ..ObjectReference::default()
    })
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use serde_json::json;

    use super::*;
    use crate::test_api::{self, answer};

    #[tokio::test]
    async fn a_restart_is_one_apply_of_both_annotations_as_the_operator() {
        let (client, mut handle) = test_api::client();
        let candidate = Candidate {
            workload: WorkloadRef {
                kind: Kind::StatefulSet,
                namespace: "shop".into(),
                name: "db".into(),
            },
            target: "86b80008e0348c92".into(),
            current: Workload {
                generation: 4,
                resource_version: Some("77".into()),
                ..Workload::default()
            },
        };
        let at = jiff::Timestamp::from_second(1_800_000_000).expect("time");
        let restarting = tokio::spawn(async move { restart(&client, &candidate, at).await });
        let stored = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                            "metadata": {"name": "db", "namespace": "shop", "uid": "db-uid"}});
        let sent = test_api::within(answer(
            &mut handle,
            "PATCH",
            "/apis/apps/v1/namespaces/shop/statefulsets/db",
            StatusCode::OK,
            stored,
        ))
        .await;
        assert_eq!(
            sent,
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                   "metadata": {"name": "db", "namespace": "shop", "resourceVersion": "77",
                                "annotations": {RESTARTED_FOR: "86b80008e0348c92@5"}},
                   "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: "2027-01-15T08:00:00Z"}}}}})
        );
        let reference = restarting.await.expect("task").expect("restarted");
        assert_eq!(reference.uid.as_deref(), Some("db-uid"));
        assert_eq!(reference.kind.as_deref(), Some("StatefulSet"));
    }

    #[test]
    fn a_mesh_reads_its_revision_counts_the_orphans_and_its_own_rollout() {
        let mesh = Mesh::new(
            "canary-mesh",
            ferrimesh_crds::MeshSpec {
                revision: "canary".into(),
                ..Default::default()
            },
        );
        let progress = Progress {
            progressing: true,
            reason: "RolloutComplete".into(),
            message: "no workload needs a restart".into(),
        };
        let report = Report {
            counts: BTreeMap::from([
                (
                    "canary".into(),
                    Counts {
                        uninjected: 2,
                        outdated: 1,
                    },
                ),
                (
                    "default".into(),
                    Counts {
                        uninjected: 5,
                        outdated: 5,
                    },
                ),
            ]),
            orphaned: 4,
            rollouts: BTreeMap::from([("canary-mesh".into(), progress.clone())]),
        };
        assert_eq!(
            report.for_mesh(&mesh),
            MeshDrift {
                uninjected: 2,
                outdated: 1,
                orphaned: 4,
                rollout: Some(progress),
            }
        );
    }
}
