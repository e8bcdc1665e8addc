//! `Mesh.spec.rollout.policy: Automatic`: which workloads to restart now,
//! as a pure function of the candidates, the workloads restarting and the
//! Mesh's settings.
//!
//! One workload per namespace at a time, at most `maxConcurrent` for the
//! Mesh; a workload already restarted for the same target is not
//! restarted again (its `ferrimesh.io/restarted-for` says so, in the
//! cluster, so a new operator knows it too); a restart not done within
//! [`ROLLOUT_TIMEOUT`] stops the rollout.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ferrimesh_crds::mesh::RolloutSettings;

use super::workload::{Kind, Workload};

/// How long a restarted workload may take to roll out before the rollout
/// stops (as a Deployment's default `progressDeadlineSeconds`).
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);

/// A workload, by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadRef {
    /// Its kind.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A workload whose pods need a restart, and what the restart is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The workload.
    pub workload: WorkloadRef,
    /// The value of `ferrimesh.io/restarted-for` its restart writes.
    pub target: String,
    /// The workload as cached.
    pub current: Workload,
}

/// A workload restarted by ferrimesh whose rollout is not done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restarting {
    /// The workload.
    pub workload: WorkloadRef,
    /// When it was restarted (`kubectl.kubernetes.io/restartedAt`).
    pub since: Option<jiff::Timestamp>,
}

/// The `RolloutProgressing` condition of a Mesh with an automatic rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The condition's status.
    pub progressing: bool,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
}

impl Progress {
    fn new(progressing: bool, reason: &str, message: String) -> Self {
        Self {
            progressing,
            reason: reason.to_owned(),
            message,
        }
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The workloads to restart.
    pub restart: Vec<Candidate>,
    /// The Mesh's condition.
    pub progress: Progress,
}

/// Plans the next restarts of a Mesh's rollout at `now`.
pub fn plan(
    settings: &RolloutSettings,
    candidates: &[Candidate],
    restarting: &[Restarting],
    now: jiff::Timestamp,
) -> Plan {
    let stop = |progress| Plan {
        restart: Vec::new(),
        progress,
    };
    let timeout = jiff::SignedDuration::try_from(ROLLOUT_TIMEOUT).unwrap_or_default();
    if let Some(stalled) = restarting.iter().find(|r| {
        r.since
            .is_some_and(|since| now.duration_since(since) > timeout)
    }) {
        return stop(Progress::new(
            false,
            "RolloutStalled",
            format!(
                "{} was restarted and has not rolled out within {} s; no other workload is restarted until it has",
                stalled.workload,
                ROLLOUT_TIMEOUT.as_secs()
            ),
        ));
    }
    let busy: BTreeSet<&WorkloadRef> = restarting.iter().map(|r| &r.workload).collect();
    let todo: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !busy.contains(&c.workload))
        .filter(|c| c.current.restarted_for.as_deref() != Some(c.target.as_str()))
        .collect();
    let waiting = |n: usize| match n {
        1 => "1 workload waits".to_owned(),
        n => format!("{n} workloads wait"),
    };
    if todo.is_empty() && restarting.is_empty() {
        return stop(Progress::new(
            true,
            "RolloutComplete",
            "no workload needs a restart".to_owned(),
        ));
    }
    if settings.paused {
        return stop(Progress::new(
            false,
            "RolloutPaused",
            format!(
                "paused: {} for a restart, {} restarting",
                waiting(todo.len()),
                restarting.len()
            ),
        ));
    }
    let max = usize::try_from(settings.max_concurrent.max(1)).unwrap_or(1);
    let mut namespaces: BTreeSet<&str> = busy.iter().map(|w| w.namespace.as_str()).collect();
    let mut capacity = max.saturating_sub(restarting.len());
    let mut by_name: BTreeMap<&WorkloadRef, &Candidate> = BTreeMap::new();
    for candidate in &todo {
        by_name.insert(&candidate.workload, candidate);
    }
    let mut restart = Vec::new();
    for (workload, candidate) in by_name {
        if capacity == 0 {
            break;
        }
        if namespaces.insert(workload.namespace.as_str()) {
            restart.push((*candidate).clone());
            capacity -= 1;
        }
    }
    let mut names: Vec<String> = restarting
        .iter()
        .map(|r| r.workload.to_string())
        .chain(restart.iter().map(|c| c.workload.to_string()))
        .collect();
    names.sort();
    let message = format!(
        "restarting {}; {} for a restart",
        names.join(", "),
        waiting(todo.len() - restart.len())
    );
    Plan {
        restart,
        progress: Progress::new(true, "RollingOut", message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(namespace: &str, name: &str) -> WorkloadRef {
        WorkloadRef {
            kind: Kind::Deployment,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn candidate(namespace: &str, name: &str, restarted_for: Option<&str>) -> Candidate {
        Candidate {
            workload: workload(namespace, name),
            target: "t1".into(),
            current: Workload {
                restarted_for: restarted_for.map(Into::into),
                ..Workload::default()
            },
        }
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000).expect("time")
    }

    fn settings(max_concurrent: i32) -> RolloutSettings {
        RolloutSettings {
            max_concurrent,
            ..RolloutSettings::default()
        }
    }

    fn names(plan: &Plan) -> Vec<String> {
        plan.restart
            .iter()
            .map(|c| c.workload.to_string())
            .collect()
    }

    #[test]
    fn restarts_one_workload_per_namespace_up_to_max_concurrent() {
        let candidates = [
            candidate("a", "one", None),
            candidate("a", "two", None),
            candidate("b", "three", None),
            candidate("c", "four", None),
        ];
        let plan = plan(&settings(2), &candidates, &[], now());
        assert_eq!(
            names(&plan),
            ["Deployment a/one", "Deployment b/three"],
            "a/two waits for a/one"
        );
        assert_eq!(plan.progress.reason, "RollingOut");
        assert!(
            plan.progress
                .message
                .ends_with("2 workloads wait for a restart")
        );
    }

    #[test]
    fn waits_for_the_workloads_restarting() {
        let candidates = [candidate("a", "two", None), candidate("b", "three", None)];
        let restarting = [Restarting {
            workload: workload("a", "one"),
            since: Some(now()),
        }];
        let plan = plan(&settings(1), &candidates, &restarting, now());
        assert!(plan.restart.is_empty(), "max 1, one restarting");
        let plan = super::plan(&settings(2), &candidates, &restarting, now());
        assert_eq!(names(&plan), ["Deployment b/three"], "not a/two: a is busy");
    }

    #[test]
    fn never_restarts_a_workload_twice_for_the_same_target() {
        let candidates = [candidate("a", "one", Some("t1"))];
        let plan = plan(&settings(1), &candidates, &[], now());
        assert!(plan.restart.is_empty());
        assert_eq!(plan.progress.reason, "RolloutComplete");
        let mut retarget = candidates[0].clone();
        retarget.target = "t2".into();
        assert_eq!(
            names(&super::plan(&settings(1), &[retarget], &[], now())),
            ["Deployment a/one"],
            "a new target is a new restart"
        );
    }

    #[test]
    fn paused_starts_nothing() {
        let paused = RolloutSettings {
            paused: true,
            ..settings(3)
        };
        let plan = plan(&paused, &[candidate("a", "one", None)], &[], now());
        assert!(plan.restart.is_empty());
        assert_eq!(
            (plan.progress.progressing, plan.progress.reason.as_str()),
            (false, "RolloutPaused")
        );
    }

    #[test]
    fn a_restart_not_rolled_out_in_time_stops_the_rollout_naming_it() {
        let restarting = [Restarting {
            workload: workload("a", "slow"),
            since: Some(now() - jiff::SignedDuration::from_secs(601)),
        }];
        let plan = plan(
            &settings(5),
            &[candidate("b", "next", None)],
            &restarting,
            now(),
        );
        assert!(plan.restart.is_empty());
        assert_eq!(
            (plan.progress.progressing, plan.progress.reason.as_str()),
            (false, "RolloutStalled")
        );
        assert!(
            plan.progress.message.contains("Deployment a/slow"),
            "{}",
            plan.progress.message
        );
    }
}
