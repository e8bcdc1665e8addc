//! What the operator keeps of an injected pod: exactly what its
//! WorkloadEntry is made of, and nothing else.
//!
//! The workload controller caches every injected pod in the cluster. As the
//! API server serves them, ten thousand pods take hundreds of megabytes in
//! memory (a `Pod` value is 2.4 KB before any of its strings, each
//! `Container` 2.1 KB more); as [`InjectedPod`]s they take a few. Small maps
//! are kept as sorted lists: a `BTreeMap` of strings takes a half-kilobyte
//! tree node for its first entry.

use std::collections::BTreeMap;

use ferrimesh_crds::istio::{REVISION, SIDECAR_STATUS, SidecarStatus, TLS_MODE};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use serde::{Deserialize, Serialize};

use crate::runtime::reduced::reduced_resource;

/// An injected pod as the operator sees it. A [`kube::Resource`] of kind `Pod`,
/// so that a reflector and a controller can hold it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InjectedPod {
    /// Name, namespace, uid, resourceVersion and deletion timestamp (no
    /// labels, annotations, owners or managed fields).
    pub metadata: ObjectMeta,
    /// Whether the pod carries the injector's status annotation.
    pub injected: bool,
    /// The revision that injected it (`istio.io/rev`), when named.
    pub revision: Option<String>,
    /// The named ports of the containers the injection did not add, in
    /// name order (the last of a name counts).
    pub ports: Vec<(String, i32)>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `status.podIP`.
    pub ip: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// The status of the pod's `Ready` condition (`True`, `False`,
    /// `Unknown`), when it has one.
    pub ready: Option<String>,
    /// When the `Ready` condition last changed.
    pub ready_since: Option<Time>,
}

impl InjectedPod {
    /// Whether the pod has finished (succeeded or failed) or is being
    /// deleted: its entry must go.
    pub fn is_gone(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
            || matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// Whether the workload controller registers `pod`: it carries the
/// injector's `security.istio.io/tlsMode: istio` label.
pub fn is_injected(pod: &Pod) -> bool {
    pod.labels().get(TLS_MODE).map(String::as_str) == Some("istio")
}

/// One event of a watch of every pod, as a watch of the injected pods alone
/// (label selector `security.istio.io/tlsMode=istio`) would deliver it:
/// other pods are left out, and a pod that loses the label is deleted when
/// `known` says it was delivered before. One watch then feeds both the
/// lifecycle's cache of every pod and the workload controller, and no pod is
/// sent and parsed twice.
pub fn injected_only(event: Event<Pod>, known: impl Fn(&Pod) -> bool) -> Option<Event<Pod>> {
    match event {
        Event::Apply(pod) if !is_injected(&pod) => known(&pod).then_some(Event::Delete(pod)),
        Event::InitApply(pod) if !is_injected(&pod) => None,
        Event::Delete(pod) if !is_injected(&pod) && !known(&pod) => None,
        event => Some(event),
    }
}

/// The containers the injection added, as its status annotation lists them.
fn injected_containers(status: Option<&String>) -> Vec<String> {
    status
        .and_then(|s| serde_json::from_str::<SidecarStatus>(s).ok())
        .map(|s| s.container_names().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl From<Pod> for InjectedPod {
    fn from(pod: Pod) -> Self {
        let Pod {
            metadata,
            spec,
            status,
        } = pod;
        let annotations = metadata.annotations.unwrap_or_default();
        let added = injected_containers(annotations.get(SIDECAR_STATUS));
        let (ports, service_account, node_name) = match spec {
            Some(spec) => (
                spec.containers
                    .into_iter()
                    .filter(|c| !added.contains(&c.name))
                    .flat_map(|c| c.ports.into_iter().flatten())
                    .filter_map(|p| Some((p.name?, p.container_port)))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect(),
                spec.service_account_name,
                spec.node_name,
            ),
            None => (Vec::new(), None, None),
        };
        let (ip, phase, ready) = match status {
            Some(status) => (
                status.pod_ip.filter(|ip| !ip.is_empty()),
                status.phase,
                status
                    .conditions
                    .into_iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready"),
            ),
            None => (None, None, None),
        };
        Self {
            metadata: ObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                uid: metadata.uid,
                resource_version: metadata.resource_version,
                deletion_timestamp: metadata.deletion_timestamp,
                ..ObjectMeta::default()
            },
            injected: annotations.contains_key(SIDECAR_STATUS),
            revision: annotations.get(REVISION).cloned(),
            ports,
            service_account,
            node_name,
            ip,
            phase,
            ready_since: ready.as_ref().and_then(|c| c.last_transition_time.clone()),
            ready: ready.map(|c| c.status),
        }
    }
}

reduced_resource!(InjectedPod, Pod);

#[cfg(test)]
mod tests {
    use kube::Resource;
    use kube::runtime::watcher;
    use serde_json::json;

    use super::*;
    use crate::runtime::reduced::reduce;

    fn rich_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "pod-uid-1", "resourceVersion": "42",
                         "labels": {"app": "web"},
                         "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null}",
                                         "istio.io/rev": "canary", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs"}]},
            "spec": {"serviceAccountName": "web", "nodeName": "n1",
                     "containers": [{"name": "web", "image": "web:1", "env": [{"name": "A", "value": "b"}],
                                     "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9999}]}],
                     "initContainers": [{"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"],
                                         "ports": [{"name": "http-envoy-prom", "containerPort": 15090}]}],
                     "volumes": [{"name": "istio-envoy", "emptyDir": {}}]},
            "status": {"podIP": "10.1.2.3", "phase": "Running", "hostIP": "192.168.0.1",
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                       "containerStatuses": [{"name": "web", "image": "web:1", "imageID": "x", "ready": true, "restartCount": 0}]}
        }))
        .expect("pod")
    }

    #[test]
    fn keeps_what_an_entry_is_made_of_and_nothing_else() {
        let pod = InjectedPod::from(rich_pod());
        let expected: InjectedPod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "pod-uid-1", "resourceVersion": "42"},
            "injected": true,
            "revision": "canary",
            "ports": [["http", 8080]],
            "service_account": "web",
            "node_name": "n1",
            "ip": "10.1.2.3",
            "phase": "Running",
            "ready": "False",
            "ready_since": "2026-01-01T00:00:00Z"
        }))
        .expect("expected");
        assert_eq!(pod, expected);
        assert!(!pod.is_gone());
    }

    #[test]
    fn a_pod_without_spec_status_or_annotations_is_not_injected() {
        let pod = InjectedPod::from(Pod {
            metadata: ObjectMeta {
                name: Some("bare".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        });
        assert!(!pod.injected && pod.ports.is_empty() && pod.ip.is_none() && pod.ready.is_none());
    }

    #[test]
    fn finished_and_deleted_pods_are_gone() {
        let mut pod = InjectedPod::from(rich_pod());
        pod.phase = Some("Succeeded".into());
        assert!(pod.is_gone());
        let mut pod = InjectedPod::from(rich_pod());
        pod.metadata.deletion_timestamp = pod.ready_since.clone();
        assert!(pod.is_gone());
    }

    #[test]
    fn is_a_pod_to_the_api() {
        assert_eq!(
            InjectedPod::url_path(&(), Some("shop")),
            "/api/v1/namespaces/shop/pods"
        );
        assert_eq!(InjectedPod::kind(&()), "Pod");
    }

    fn labelled(name: &str, tls_mode: Option<&str>) -> Pod {
        let labels = tls_mode.map(|mode| json!({"security.istio.io/tlsMode": mode}));
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "shop", "labels": labels}}),
        )
        .expect("pod")
    }

    fn name(event: Option<watcher::Event<Pod>>) -> Option<(&'static str, String)> {
        match event? {
            watcher::Event::Apply(pod) => Some(("apply", pod.name_any())),
            watcher::Event::InitApply(pod) => Some(("init-apply", pod.name_any())),
            watcher::Event::Delete(pod) => Some(("delete", pod.name_any())),
            watcher::Event::Init => Some(("init", String::new())),
            watcher::Event::InitDone => Some(("init-done", String::new())),
        }
    }

    #[test]
    fn a_watch_of_every_pod_gives_the_events_of_the_injected_ones_alone() {
        let injected = || labelled("web", Some("istio"));
        let plain = || labelled("db", None);
        let cases = [
            (
                watcher::Event::Apply(injected()),
                false,
                Some(("apply", "web")),
            ),
            (
                watcher::Event::InitApply(injected()),
                false,
                Some(("init-apply", "web")),
            ),
            (
                watcher::Event::Delete(injected()),
                false,
                Some(("delete", "web")),
            ),
            (watcher::Event::Apply(plain()), false, None),
            (watcher::Event::InitApply(plain()), true, None),
            (watcher::Event::Delete(plain()), false, None),
            (
                watcher::Event::Apply(labelled("db", Some("disabled"))),
                false,
                None,
            ),
            (watcher::Event::Init, false, Some(("init", ""))),
            (watcher::Event::InitDone, false, Some(("init-done", ""))),
        ];
        for (event, known, expected) in cases {
            let expected = expected.map(|(kind, n)| (kind, n.to_owned()));
            assert_eq!(
                name(injected_only(event.clone(), |_| known)),
                expected,
                "{event:?}"
            );
        }
    }

    #[test]
    fn a_pod_that_loses_the_label_is_deleted_once_it_was_delivered() {
        let unlabelled = labelled("web", None);
        assert_eq!(
            name(injected_only(
                watcher::Event::Apply(unlabelled.clone()),
                |_| true
            )),
            Some(("delete", "web".to_owned()))
        );
        assert_eq!(
            name(injected_only(watcher::Event::Delete(unlabelled), |_| true)),
            Some(("delete", "web".to_owned()))
        );
    }

    #[test]
    fn watch_events_carry_the_reduced_pod() {
        match reduce::<_, InjectedPod>(watcher::Event::Apply(rich_pod())) {
            watcher::Event::Apply(pod) => assert_eq!(pod.ip.as_deref(), Some("10.1.2.3")),
            other => panic!("not an Apply: {other:?}"),
        }
        assert!(matches!(
            reduce::<Pod, InjectedPod>(watcher::Event::InitDone),
            watcher::Event::InitDone
        ));
    }
}
