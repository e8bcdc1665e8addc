//! What the lifecycle controller keeps of a pod: what the drift
//! classification (`ferrimesh_crds::drift::classify`) reads, and who owns
//! the pod, nothing else.
//!
//! The classification reads a pod's labels, its injection annotations (the
//! settings ones, the injection choice, the stamp, the mirror-pod mark),
//! the revision that injected it, `hostNetwork` and the image of its
//! `istio-proxy`. Pods of one ReplicaSet agree on all of it, so that part
//! is a [`PodShape`], interned: the pod itself is its name (the cache's
//! key), the shared shape, and its uid when it has no controller (the
//! Event then goes on the pod).

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrimesh_crds::decision::MIRROR_POD;
use ferrimesh_crds::drift::{injected_revision, proxy_image};
use ferrimesh_crds::istio::{INJECT, PROXY_CONTAINER, SIDECAR_STATUS};
use ferrimesh_crds::stamp::{INJECTION_HASH, is_settings_annotation};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::cache::Interner;

/// A string pair list, sorted by key: smaller than a map.
type Pairs = Box<[(Box<str>, Box<str>)]>;

/// An object that owns others (a pod's controller, or a ReplicaSet's).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// `apiVersion`.
    pub api_version: Box<str>,
    /// `kind`.
    pub kind: Box<str>,
    /// `name`.
    pub name: Box<str>,
    /// `uid`.
    pub uid: Box<str>,
}

impl Owner {
    /// The controller among `owners`, if any.
    pub fn controller(owners: Option<&[OwnerReference]>) -> Option<Self> {
        owners?
            .iter()
            .find(|o| o.controller == Some(true))
            .map(|o| Self {
                api_version: o.api_version.as_str().into(),
                kind: o.kind.as_str().into(),
                name: o.name.as_str().into(),
                uid: o.uid.as_str().into(),
            })
    }
}

/// What pods that look alike to the classification share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodShape {
    labels: Pairs,
    /// The annotations the classification reads, but the status.
    annotations: Pairs,
    /// The revision that injected the pod (empty when its status names
    /// none), `None` when it is not injected.
    injected: Option<Box<str>>,
    proxy_image: Option<Box<str>>,
    host_network: bool,
    /// The pod's controller.
    pub owner: Option<Owner>,
}

/// A live pod as the lifecycle cache keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriftPod {
    /// What the classification reads, shared with the pods alike.
    pub shape: Arc<PodShape>,
    /// The pod's uid, kept only when it has no controller.
    pub uid: Option<Box<str>>,
}

/// Whether the classification reads annotation `key`.
fn classified(key: &str) -> bool {
    is_settings_annotation(key) || [INJECT, MIRROR_POD, INJECTION_HASH].contains(&key)
}

fn pairs<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> Pairs {
    entries
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect()
}

impl DriftPod {
    /// Reduces `pod`, its shape shared through `shapes`; `None` for a pod
    /// that has finished or is being deleted (not counted).
    pub fn reduce(pod: &Pod, shapes: &Interner<PodShape>) -> Option<Self> {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded" | "Failed"))
        {
            return None;
        }
        let meta = &pod.metadata;
        let owner = Owner::controller(meta.owner_references.as_deref());
        let empty = BTreeMap::new();
        let annotations = meta.annotations.as_ref().unwrap_or(&empty);
        let spec = pod.spec.as_ref();
        let shape = PodShape {
            labels: pairs(meta.labels.iter().flatten()),
            annotations: pairs(annotations.iter().filter(|(k, _)| classified(k))),
            injected: injected_revision(pod).map(Into::into),
            proxy_image: proxy_image(pod).map(Into::into),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            owner,
        };
        Some(Self {
            uid: match shape.owner {
                Some(_) => None,
                None => meta.uid.as_deref().map(Into::into),
            },
            shape: shapes.intern(shape),
        })
    }
}

impl PodShape {
    /// A pod in `namespace` that the classification sees as the original.
    pub fn to_pod(&self, namespace: &str) -> Pod {
        let map = |pairs: &Pairs| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut annotations = map(&self.annotations);
        if let Some(revision) = &self.injected {
            let status = serde_json::json!({ "revision": revision });
            annotations.insert(SIDECAR_STATUS.to_owned(), status.to_string());
        }
        Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                labels: Some(map(&self.labels)),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                host_network: self.host_network.then_some(true),
                containers: self
                    .proxy_image
                    .iter()
                    .map(|image| Container {
                        name: PROXY_CONTAINER.to_owned(),
                        image: Some(image.to_string()),
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::drift::{Configuration, classify};
    use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
    use ferrimesh_crds::{Mesh, MeshSpec, ProxyProfile};
    use serde_json::{Value, json};

    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    /// Pods in every state the classification knows, as the API server
    /// serves them (with what the classification does not read).
    fn pods() -> Vec<Pod> {
        let status = |rev: &str| {
            format!(
                r#"{{"initContainers":["istio-init","istio-proxy"],"containers":null,"revision":"{rev}"}}"#
            )
        };
        let proxy = json!({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.28.0",
                           "args": ["proxy", "sidecar"], "env": [{"name": "A", "value": "b"}]});
        vec![
            pod(
                json!({"metadata": {"name": "plain", "namespace": "shop", "labels": {"app": "web"},
                                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}]}}),
            ),
            pod(
                json!({"metadata": {"name": "opted-out", "namespace": "shop",
                                    "annotations": {"sidecar.istio.io/inject": "false"}},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}]}}),
            ),
            pod(json!({"metadata": {"name": "host", "namespace": "shop"},
                       "spec": {"hostNetwork": true, "containers": [{"name": "web", "image": "web:1"}]}})),
            pod(
                json!({"metadata": {"name": "stamped", "namespace": "shop", "labels": {"app": "api", "security.istio.io/tlsMode": "istio"},
                                    "annotations": {"sidecar.istio.io/status": status("default"),
                                                    "ferrimesh.io/injection-hash": "86b80008e0348c92",
                                                    "prometheus.io/port": "15020"}},
                       "spec": {"initContainers": [proxy.clone()], "containers": [{"name": "web", "image": "web:1"}]}}),
            ),
            pod(json!({"metadata": {"name": "pinned", "namespace": "shop",
                                    "annotations": {"sidecar.istio.io/status": status("default"),
                                                    "sidecar.istio.io/proxyImage": "example.com/own:1",
                                                    "sidecar.istio.io/logLevel": "debug"}},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}, proxy.clone()]}})),
            pod(
                json!({"metadata": {"name": "canary", "namespace": "shop", "labels": {"istio.io/rev": "canary"},
                                    "annotations": {"sidecar.istio.io/status": status("canary")}},
                       "spec": {"initContainers": [proxy.clone()], "containers": []}}),
            ),
            pod(json!({"metadata": {"name": "unnamed", "namespace": "shop",
                                    "annotations": {"sidecar.istio.io/status": "{}", "istio.io/rev": "canary"}},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}]}})),
            pod(json!({"metadata": {"name": "mirror", "namespace": "shop",
                                    "annotations": {"kubernetes.io/config.mirror": "x"}},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}]}})),
        ]
    }

    #[test]
    fn the_classification_sees_the_reduced_pod_as_the_original() {
        let mut image = MeshSpec::default();
        image.proxy.image = "example.com/proxyv2:1.29.0".into();
        let canary = MeshSpec {
            revision: "canary".into(),
            ..MeshSpec::default()
        };
        let profile: ProxyProfile = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "proxy": {"logLevel": "debug"}}}))
        .expect("profile");
        let shapes = Interner::default();
        let configurations = [
            vec![Mesh::new("default", MeshSpec::default())],
            vec![Mesh::new("default", image)],
            vec![
                Mesh::new("default", MeshSpec::default()),
                Mesh::new("canary", canary),
            ],
        ];
        let namespace_labels = [
            BTreeMap::new(),
            BTreeMap::from([("istio-injection".to_owned(), "enabled".to_owned())]),
        ];
        for meshes in &configurations {
            let config = Configuration {
                meshes,
                excluded_namespaces: &SYSTEM_NAMESPACES,
            };
            for labels in &namespace_labels {
                for profiles in [&[][..], std::slice::from_ref(&profile)] {
                    for pod in pods() {
                        let reduced = DriftPod::reduce(&pod, &shapes).expect("live");
                        assert_eq!(
                            classify(&reduced.shape.to_pod("shop"), labels, profiles, config),
                            classify(&pod, labels, profiles, config),
                            "{:?}",
                            pod.metadata.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pods_alike_share_a_shape_and_only_bare_pods_keep_their_uid() {
        let replica = |name: &str| {
            pod(
                json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                                    "labels": {"app": "web", "pod-template-hash": "5d8f"},
                                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                         "name": "web-5d8f", "uid": "rs-uid", "controller": true}]},
                       "spec": {"containers": [{"name": "web", "image": "web:1"}]},
                       "status": {"podIP": format!("10.0.0.{}", name.len()), "phase": "Running"}}),
            )
        };
        let shapes = Interner::default();
        let one = DriftPod::reduce(&replica("web-a"), &shapes).expect("live");
        let two = DriftPod::reduce(&replica("web-bb"), &shapes).expect("live");
        assert!(Arc::ptr_eq(&one.shape, &two.shape));
        assert_eq!(one.uid, None);
        assert_eq!(
            one.shape.owner.as_ref().map(|o| (&*o.kind, &*o.name)),
            Some(("ReplicaSet", "web-5d8f"))
        );
        let bare = DriftPod::reduce(&pods()[0], &shapes).expect("live");
        assert_eq!(bare.uid, None, "no uid in the fixture");
        let mut with_uid = pods()[0].clone();
        with_uid.metadata.uid = Some("bare-uid".into());
        assert_eq!(
            DriftPod::reduce(&with_uid, &shapes)
                .expect("live")
                .uid
                .as_deref(),
            Some("bare-uid")
        );
    }

    #[test]
    fn finished_and_terminating_pods_are_not_kept() {
        let shapes = Interner::default();
        let mut done = pods()[0].clone();
        done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).expect("status"));
        assert_eq!(DriftPod::reduce(&done, &shapes), None);
        let mut leaving = pods()[0].clone();
        leaving.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).expect("time"));
        assert_eq!(DriftPod::reduce(&leaving, &shapes), None);
    }

    /// What the cache holds per pod, beyond the shapes pods share: printed
    /// for the record (docs/operator.md quotes it), checked against a bound.
    #[test]
    fn a_cached_pod_costs_about_a_hundred_bytes() {
        let entry = std::mem::size_of::<(super::super::cache::Key, DriftPod)>();
        // Heap: the name (a 24-byte malloc chunk for up to 24 bytes), and a
        // uid (36 bytes: a 40-byte chunk) for pods without a controller;
        // the table's control byte and its spare capacity (a hashbrown
        // table is at least 1/8 empty, at most 1/2 after growing).
        let owned = entry + 24;
        let bare = owned + 40;
        println!(
            "per pod: {entry} bytes in the table, {owned} with its name, {bare} without a controller"
        );
        assert!(entry <= 64, "{entry}");
        assert!(bare * 2 <= 256, "{bare}");
    }
}
