//! The workloads a rollout restarts (Deployments, StatefulSets,
//! DaemonSets), reduced to what the rollout reads: whether their last
//! rollout is done, and what ferrimesh restarted them for and when.

use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::RESTARTED_FOR;

/// `kubectl rollout restart`'s pod template annotation.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// The kinds a rollout restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` DaemonSet.
    DaemonSet,
}

impl Kind {
    /// The kind named `kind` (of `apps/v1`), if a rollout restarts it.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("apps/v1", "Deployment") => Some(Self::Deployment),
            ("apps/v1", "StatefulSet") => Some(Self::StatefulSet),
            ("apps/v1", "DaemonSet") => Some(Self::DaemonSet),
            _ => None,
        }
    }

    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workload as the rollout sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// `metadata.generation`.
    pub generation: i64,
    /// `status.observedGeneration`.
    pub observed_generation: i64,
    /// The replicas wanted (a DaemonSet's: the nodes it should run on).
    pub desired: i32,
    /// Replicas of the current template.
    pub updated: i32,
    /// Available replicas.
    pub available: i32,
    /// `metadata.resourceVersion`: a restart is written only over the
    /// version it was planned on.
    pub resource_version: Option<Box<str>>,
    /// What ferrimesh last restarted it for: `ferrimesh.io/restarted-for`
    /// (`<target>@<generation>`) without the generation.
    pub restarted_for: Option<Box<str>>,
    /// The generation that restart gave it (`None` for a value written
    /// without one).
    pub restarted_generation: Option<i64>,
    /// The pod template's `kubectl.kubernetes.io/restartedAt`.
    pub restarted_at: Option<Box<str>>,
}

impl Workload {
    /// Whether the rollout under way is the one ferrimesh's restart
    /// started: restarted by ferrimesh, not rolled out, and its spec not
    /// changed since (a later change is someone else's rollout, which the
    /// Mesh's rollout neither waits for nor blames). A value without a
    /// generation counts as ferrimesh's.
    pub fn restarting_for_us(&self) -> bool {
        self.restarted_for.is_some()
            && !self.rolled_out()
            && self
                .restarted_generation
                .is_none_or(|g| g == self.generation)
    }

    /// The value of `ferrimesh.io/restarted-for` a restart for `target`
    /// writes: the restart changes the pod template, so the workload's
    /// generation moves by one (the write is conditional on
    /// [`Workload::resource_version`], so nothing else came between).
    pub fn restart_record(&self, target: &str) -> String {
        format!("{target}@{}", self.generation + 1)
    }

    /// Whether its last rollout is done: the controller has seen the
    /// current spec, and every wanted replica is updated and available.
    pub fn rolled_out(&self) -> bool {
        self.observed_generation >= self.generation
            && self.updated == self.desired
            && self.available == self.desired
    }

    fn new(meta: &ObjectMeta, template: Option<&ObjectMeta>) -> Self {
        let record = meta.annotations.as_ref().and_then(|a| a.get(RESTARTED_FOR));
        let (restarted_for, restarted_generation) = match record.map(|r| r.split_once('@')) {
            Some(Some((target, generation))) => (Some(target), generation.parse().ok()),
            Some(None) => (record.map(String::as_str), None),
            None => (None, None),
        };
        Self {
            generation: meta.generation.unwrap_or_default(),
            resource_version: meta.resource_version.as_deref().map(Into::into),
            restarted_for: restarted_for.map(Into::into),
            restarted_generation,
            restarted_at: template
                .and_then(|t| t.annotations.as_ref())
                .and_then(|a| a.get(RESTARTED_AT))
                .map(|v| v.as_str().into()),
            ..Self::default()
        }
    }
}

impl From<&Deployment> for Workload {
    fn from(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        let status = d.status.as_ref();
        Self {
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            ..Self::new(&d.metadata, spec.and_then(|s| s.template.metadata.as_ref()))
        }
    }
}

impl From<&StatefulSet> for Workload {
    fn from(s: &StatefulSet) -> Self {
        let spec = s.spec.as_ref();
        let status = s.status.as_ref();
        Self {
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            ..Self::new(&s.metadata, spec.and_then(|s| s.template.metadata.as_ref()))
        }
    }
}

impl From<&DaemonSet> for Workload {
    fn from(d: &DaemonSet) -> Self {
        let spec = d.spec.as_ref();
        let status = d.status.as_ref();
        Self {
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: status.map_or(0, |s| s.desired_number_scheduled),
            updated: status.and_then(|s| s.updated_number_scheduled).unwrap_or(0),
            available: status.and_then(|s| s.number_available).unwrap_or(0),
            ..Self::new(&d.metadata, spec.and_then(|s| s.template.metadata.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "generation": 2,
                         "annotations": {"ferrimesh.io/restarted-for": "abc"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-02T10:00:00Z"}},
                                  "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
            "status": status,
        }))
        .expect("deployment")
    }

    #[test]
    fn a_deployment_is_rolled_out_once_every_replica_is_updated_and_available() {
        let rolling = Workload::from(&deployment(
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 1}),
        ));
        assert!(!rolling.rolled_out());
        assert_eq!(rolling.restarted_for.as_deref(), Some("abc"));
        assert_eq!(
            rolling.restarted_at.as_deref(),
            Some("2026-12-02T10:00:00Z")
        );
        let unseen = Workload::from(&deployment(
            json!({"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2}),
        ));
        assert!(
            !unseen.rolled_out(),
            "the controller has not seen the restart"
        );
        let done = Workload::from(&deployment(
            json!({"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2}),
        ));
        assert!(done.rolled_out());
    }

    #[test]
    fn a_restart_is_ours_until_someone_else_changes_the_spec() {
        let rolling =
            json!({"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 1});
        let mut recorded = deployment(rolling.clone());
        recorded
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(RESTARTED_FOR.to_owned(), "abc@2".to_owned());
        let ours = Workload::from(&recorded);
        assert_eq!(ours.restarted_for.as_deref(), Some("abc"));
        assert_eq!(ours.restarted_generation, Some(2));
        assert!(ours.restarting_for_us());
        let mut later = ours.clone();
        later.generation = 3;
        assert!(
            !later.restarting_for_us(),
            "a later spec change is the user's rollout"
        );
        let legacy = Workload::from(&deployment(rolling));
        assert_eq!(legacy.restarted_for.as_deref(), Some("abc"));
        assert!(legacy.restarting_for_us(), "no generation recorded");
        let mut done = ours.clone();
        done.updated = 2;
        done.available = 2;
        assert!(!done.restarting_for_us());
        assert_eq!(ours.restart_record("def"), "def@3");
    }

    #[test]
    fn a_daemon_set_counts_the_nodes_it_should_run_on() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent", "generation": 1},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "currentNumberScheduled": 3,
                       "numberMisscheduled": 0, "numberReady": 3, "updatedNumberScheduled": 3, "numberAvailable": 2}
        }))
        .expect("daemon set");
        assert!(!Workload::from(&ds).rolled_out());
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "db", "generation": 1},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
        }))
        .expect("stateful set");
        assert!(Workload::from(&sts).rolled_out(), "one replica by default");
        assert_eq!(Kind::of("apps/v1", "StatefulSet"), Some(Kind::StatefulSet));
        assert_eq!(Kind::of("batch/v1", "Job"), None);
    }
}
