//! `ferrimesh status`: per namespace, the revision that injects its pods,
//! how injection is enabled there, and how many of its pods are up to date,
//! outdated or uninjected against today's Meshes and ProxyProfiles (as
//! `istioctl x injector list` reports it), with each pod and its reason on
//! request. The classification is `ferrimesh_crds::drift`, the one the
//! operator uses.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ferrimesh_crds::drift::{Configuration, Drift, classify, namespace_mesh};
use ferrimesh_crds::istio::{INJECTION_LABEL, REVISION as REVISION_LABEL};
use ferrimesh_crds::{Mesh, ProxyProfile};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// What the report is made from: the cluster's namespaces, pods, Meshes and
/// ProxyProfiles at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every namespace.
    pub namespaces: Vec<Namespace>,
    /// Every pod.
    pub pods: Vec<Pod>,
    /// Every Mesh.
    pub meshes: Vec<Mesh>,
    /// Every ProxyProfile.
    pub profiles: Vec<ProxyProfile>,
}

/// Lists every object of a kind, page by page.
async fn list_all<K>(api: Api<K>) -> kube::Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}

impl Snapshot {
    /// Reads the snapshot from the cluster.
    pub async fn fetch(client: &Client) -> kube::Result<Self> {
        Ok(Self {
            namespaces: list_all(Api::all(client.clone())).await?,
            pods: list_all(Api::all(client.clone())).await?,
            meshes: list_all(Api::all(client.clone())).await?,
            profiles: list_all(Api::all(client.clone())).await?,
        })
    }
}

/// One pod and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodStatus {
    /// The pod's name.
    pub name: String,
    /// Its sidecar against today's configuration.
    #[serde(flatten)]
    pub drift: Drift,
}

/// One namespace's line of the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceStatus {
    /// The namespace.
    pub namespace: String,
    /// The revision that injects pods created there with no label of their
    /// own, if any.
    pub revision: Option<String>,
    /// The namespace's injection label (`istio-injection=enabled`,
    /// `istio.io/rev=canary`), or `-`.
    pub injection: String,
    /// Pods injected from today's settings.
    pub up_to_date: usize,
    /// Pods injected from other settings than today's.
    pub outdated: usize,
    /// Pods that should have a sidecar and do not.
    pub uninjected: usize,
    /// Pods injected by a revision no Mesh serves.
    pub orphan_revision: usize,
    /// Every pod counted, with its state (filled when asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodStatus>,
}

/// Whether a pod still runs (or is about to): finished and terminating pods
/// are left out of the counts.
fn is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn injection_label(labels: &BTreeMap<String, String>) -> String {
    [INJECTION_LABEL, REVISION_LABEL]
        .iter()
        .find_map(|key| labels.get(*key).map(|v| format!("{key}={v}")))
        .unwrap_or_else(|| "-".to_owned())
}

/// The report: one entry per namespace that a Mesh serves or that has a
/// pod with a sidecar or wanting one, sorted by name; `with_pods` lists the
/// pods counted. `excluded` are the namespaces no webhook entry selects.
pub fn report(snapshot: &Snapshot, excluded: &[&str], with_pods: bool) -> Vec<NamespaceStatus> {
    let config = Configuration {
        meshes: &snapshot.meshes,
        excluded_namespaces: excluded,
    };
    let mut profiles: BTreeMap<&str, Vec<ProxyProfile>> = BTreeMap::new();
    for profile in &snapshot.profiles {
        let ns = profile.metadata.namespace.as_deref().unwrap_or_default();
        profiles.entry(ns).or_default().push(profile.clone());
    }
    let mut pods: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in snapshot.pods.iter().filter(|p| is_live(p)) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        pods.entry(ns).or_default().push(pod);
    }
    let empty = BTreeMap::new();
    let mut namespaces: Vec<&Namespace> = snapshot.namespaces.iter().collect();
    namespaces.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Vec::new();
    for ns in namespaces {
        let name = ns.metadata.name.as_deref().unwrap_or_default();
        let labels = ns.metadata.labels.as_ref().unwrap_or(&empty);
        let mut status = NamespaceStatus {
            namespace: name.to_owned(),
            revision: namespace_mesh(name, labels, config).map(|m| m.spec.revision.clone()),
            injection: injection_label(labels),
            ..NamespaceStatus::default()
        };
        let ns_profiles = profiles.get(name).map_or(&[][..], Vec::as_slice);
        let mut ns_pods = pods.get(name).cloned().unwrap_or_default();
        ns_pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for pod in ns_pods {
            let drift = classify(pod, labels, ns_profiles, config);
            let count = match drift {
                Drift::UpToDate { .. } => &mut status.up_to_date,
                Drift::Outdated { .. } => &mut status.outdated,
                Drift::Uninjected { .. } => &mut status.uninjected,
                Drift::OrphanRevision { .. } => &mut status.orphan_revision,
                Drift::NotSelected => continue,
            };
            *count += 1;
            if with_pods {
                status.pods.push(PodStatus {
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    drift,
                });
            }
        }
        let counted =
            status.up_to_date + status.outdated + status.uninjected + status.orphan_revision;
        if status.revision.is_some() || counted > 0 {
            out.push(status);
        }
    }
    out
}

/// Lays rows out in columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let mut widths = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                // Writing to a String cannot fail.
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The report as text: the namespace table, then (with pods) one line per pod.
pub fn to_table(report: &[NamespaceStatus]) -> String {
    let mut rows = vec![
        [
            "NAMESPACE",
            "REVISION",
            "INJECTION",
            "UP-TO-DATE",
            "OUTDATED",
            "UNINJECTED",
            "ORPHANED",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for ns in report {
        rows.push(vec![
            ns.namespace.clone(),
            ns.revision.clone().unwrap_or_else(|| "-".to_owned()),
            ns.injection.clone(),
            ns.up_to_date.to_string(),
            ns.outdated.to_string(),
            ns.uninjected.to_string(),
            ns.orphan_revision.to_string(),
        ]);
    }
    let mut out = columns(&rows);
    if report.iter().any(|ns| !ns.pods.is_empty()) {
        let mut pods = vec![
            ["NAMESPACE", "POD", "STATE", "REASON"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for ns in report {
            for pod in &ns.pods {
                pods.push(vec![
                    ns.namespace.clone(),
                    pod.name.clone(),
                    pod.drift.state().to_owned(),
                    pod.drift.to_string(),
                ]);
            }
        }
        out.push('\n');
        out.push_str(&columns(&pods));
    }
    out
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::MeshSpec;
    use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
    use serde_json::json;

    use super::*;

    fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("ns")
    }

    fn pod(ns: &str, name: &str, phase: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            namespaces: vec![
                namespace("shop", json!({"istio-injection": "enabled"})),
                namespace("quiet", json!({})),
                namespace("kube-system", json!({"istio-injection": "enabled"})),
            ],
            pods: vec![
                pod("shop", "b", Some("Running")),
                pod("shop", "a", None),
                pod("shop", "done", Some("Succeeded")),
                pod("quiet", "q", Some("Running")),
            ],
            meshes: vec![Mesh::new("default", MeshSpec::default())],
            profiles: Vec::new(),
        }
    }

    #[test]
    fn counts_live_pods_of_served_namespaces_only() {
        let report = report(&snapshot(), &SYSTEM_NAMESPACES, true);
        assert_eq!(report.len(), 1, "{report:?}");
        let shop = &report[0];
        assert_eq!(shop.namespace, "shop");
        assert_eq!(shop.revision.as_deref(), Some("default"));
        assert_eq!(shop.injection, "istio-injection=enabled");
        assert_eq!(shop.uninjected, 2, "the finished pod is not counted");
        let names: Vec<&str> = shop.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn prints_a_table_and_the_pods_with_their_reason() {
        let table = to_table(&report(&snapshot(), &SYSTEM_NAMESPACES, true));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE  REVISION  INJECTION                UP-TO-DATE  OUTDATED  UNINJECTED  ORPHANED"
        );
        assert_eq!(
            lines[1],
            "shop       default   istio-injection=enabled  0           0         2           0"
        );
        assert!(lines[3].starts_with("NAMESPACE  POD  STATE"), "{table}");
        assert!(
            lines[4].contains("uninjected: revision default would inject it"),
            "{table}"
        );
        let without = to_table(&report(&snapshot(), &SYSTEM_NAMESPACES, false));
        assert_eq!(without.lines().count(), 2);
    }

    #[test]
    fn writes_json_with_camel_case_counts() {
        let report = report(&snapshot(), &SYSTEM_NAMESPACES, false);
        let value = serde_json::to_value(&report).expect("json");
        assert_eq!(value[0]["uninjected"], 2);
        assert_eq!(value[0]["upToDate"], 0);
        assert!(value[0].get("pods").is_none());
    }
}
