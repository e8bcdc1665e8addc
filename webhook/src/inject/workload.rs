//! The workload a pod belongs to, from its own metadata only (no API lookups).

use k8s_openapi::api::core::v1::Pod;

use super::annotations::WORKLOAD_NAME_LABEL;

/// A workload: what `ISTIO_META_WORKLOAD_NAME` and `ISTIO_META_OWNER` name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The workload's name (may be empty for a nameless bare pod).
    pub name: String,
    /// `apps/v1`, `batch/v1`, `v1`...
    pub api_version: String,
    /// `Deployment`, `CronJob`, `Pod`...
    pub kind: String,
}

impl Workload {
    /// A workload of the given kind.
    pub fn new(api_version: &str, kind: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        }
    }

    /// Works out the workload of `pod` as Istio does: the controller owner
    /// of a generated pod, with Deployments and CronJobs recognised from
    /// their ReplicaSet and Job names; otherwise the pod itself.
    pub fn of(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let pod_name = meta.name.clone().unwrap_or_default();
        let mut workload = Self::new("v1", "Pod", &pod_name);
        let generated = meta.generate_name.as_ref().is_some_and(|g| !g.is_empty());
        let controller = meta
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller.unwrap_or(false))
            .filter(|_| generated);
        if let Some(owner) = controller {
            workload = Self::new(&owner.api_version, &owner.kind, &owner.name);
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .filter(|h| !h.is_empty());
            if owner.kind == "ReplicaSet" {
                if let Some(deployment) = hash.and_then(|h| owner.name.strip_suffix(h.as_str())) {
                    workload = Self::new(
                        "apps/v1",
                        "Deployment",
                        deployment.strip_suffix('-').unwrap_or(deployment),
                    );
                }
            } else if owner.kind == "Job"
                && let Some(cron) = cron_job_name(&owner.name)
            {
                workload = Self::new("batch/v1", "CronJob", cron);
            }
        }
        if workload.name.is_empty() {
            workload.name = pod_name;
        }
        workload
    }

    /// `ISTIO_META_WORKLOAD_NAME`: the pod label
    /// `service.istio.io/workload-name` when set, else the workload's name.
    pub fn display_name<'a>(&'a self, pod: &'a Pod) -> &'a str {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(WORKLOAD_NAME_LABEL))
            .filter(|n| !n.is_empty())
            .map_or(self.name.as_str(), String::as_str)
    }

    /// `kubernetes://apis/<apiVersion>/namespaces/<ns>/<kind>s/<name>`.
    pub fn owner(&self, namespace: &str) -> String {
        format!(
            "kubernetes://apis/{}/namespaces/{namespace}/{}s/{}",
            self.api_version,
            self.kind.to_lowercase(),
            self.name
        )
    }
}

/// `<cron>-<8 to 10 digits>` -> `<cron>`.
fn cron_job_name(job: &str) -> Option<&str> {
    let (cron, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !cron.is_empty()).then_some(cron)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn owned_pod(kind: &str, owner: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{owner}-")),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                owner_references: Some(vec![
                    OwnerReference {
                        kind: "Other".into(),
                        name: "not-controller".into(),
                        ..Default::default()
                    },
                    OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: kind.into(),
                        name: owner.into(),
                        controller: Some(true),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn recognises_deployments_from_replica_set_and_hash() {
        let w = Workload::of(&owned_pod(
            "ReplicaSet",
            "hello-5d4f8c7b9",
            &[("pod-template-hash", "5d4f8c7b9")],
        ));
        assert_eq!(w, Workload::new("apps/v1", "Deployment", "hello"));
        assert_eq!(
            w.owner("ns"),
            "kubernetes://apis/apps/v1/namespaces/ns/deployments/hello"
        );
    }

    #[test]
    fn keeps_replica_sets_without_matching_hash() {
        let w = Workload::of(&owned_pod(
            "ReplicaSet",
            "hello-abc",
            &[("pod-template-hash", "zzz")],
        ));
        assert_eq!(w, Workload::new("apps/v1", "ReplicaSet", "hello-abc"));
    }

    #[test]
    fn recognises_cron_jobs_from_job_names() {
        let w = Workload::of(&owned_pod("Job", "backup-28391234", &[]));
        assert_eq!(w, Workload::new("batch/v1", "CronJob", "backup"));
        let plain = Workload::of(&owned_pod("Job", "backup-1234567", &[]));
        assert_eq!(plain.kind, "Job");
    }

    #[test]
    fn bare_pods_are_their_own_workload_and_label_wins() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("solo".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            Workload::of(&pod).owner("ns"),
            "kubernetes://apis/v1/namespaces/ns/pods/solo"
        );
        let labelled = owned_pod("StatefulSet", "db", &[(WORKLOAD_NAME_LABEL, "database")]);
        let workload = Workload::of(&labelled);
        assert_eq!(workload.display_name(&labelled), "database");
        assert_eq!(
            workload.owner("ns"),
            "kubernetes://apis/apps/v1/namespaces/ns/statefulsets/db"
        );
    }
}
