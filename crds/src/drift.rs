//! Sidecar drift: whether a running pod has the sidecar today's Meshes and
//! ProxyProfiles would give it. A pure function of the pod, its namespace's
//! labels and the current configuration, shared by `ferrimesh status` and
//! the operator.
//!
//! Which Mesh serves a pod is decided as the API server and the webhook
//! decide it: the first Mesh one of whose webhook entries, of its revision
//! or of a revision tag it holds, selects the pod (`tags`), then that
//! Mesh's injection decision (`decision`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use crate::decision::decide;
use crate::istio::{PROXY_CONTAINER, REVISION, SIDECAR_STATUS, SidecarStatus};
use crate::mesh::{DEFAULT_REVISION, Mesh};
use crate::selection::NAMESPACE_NAME_LABEL;
use crate::stamp::{INJECTION_HASH, expected_proxy_image, injection_hash, layered_mesh};
use crate::{ProxyProfile, proxy_profile};

/// Why an injected pod is not what today's settings would inject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum OutdatedReason {
    /// Another revision than the one that serves the pod today injected it.
    Revision {
        /// The revision that injected the pod.
        injected: String,
        /// The revision serving it today.
        expected: String,
    },
    /// The proxy runs another image than today's.
    Image {
        /// The image of the running `istio-proxy` (empty when it has none).
        running: String,
        /// Today's image.
        expected: String,
    },
    /// The settings it was injected from differ from today's (or it carries
    /// no stamp: injected before ferrimesh stamped pods, or by another
    /// injector).
    Hash {
        /// The pod's `ferrimesh.io/injection-hash`, if any.
        stamped: Option<String>,
        /// The hash today's settings give.
        expected: String,
    },
    /// Injected, but today no webhook entry selects it or its Mesh's
    /// injection decision skips it: recreated, it would get no sidecar.
    NoLongerSelected,
}

impl fmt::Display for OutdatedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Revision { injected, expected } => {
                write!(f, "injected by revision {injected}, served by {expected}")
            }
            Self::Image { running, expected } => {
                write!(f, "proxy image {running}, expected {expected}")
            }
            Self::Hash {
                stamped: Some(stamped),
                expected,
            } => write!(
                f,
                "injected from other settings ({INJECTION_HASH} {stamped}, expected {expected})"
            ),
            Self::Hash {
                stamped: None,
                expected,
            } => write!(f, "no {INJECTION_HASH} (expected {expected})"),
            Self::NoLongerSelected => f.write_str("injected, but no longer selected for injection"),
        }
    }
}

/// A pod's sidecar against today's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Drift {
    /// Injected from today's settings.
    UpToDate {
        /// The revision serving it.
        revision: String,
    },
    /// Injected, from other settings than today's.
    Outdated {
        /// The revision that injected it.
        revision: String,
        /// What differs.
        reason: OutdatedReason,
    },
    /// Not injected, though created today it would be.
    Uninjected {
        /// The revision that would inject it.
        revision: String,
    },
    /// Injected by a revision no Mesh serves.
    OrphanRevision {
        /// That revision.
        revision: String,
    },
    /// Not injected, and not meant to be.
    NotSelected,
}

impl Drift {
    /// A short name of the state: `up-to-date`, `outdated`, `uninjected`,
    /// `orphan-revision`, `not-selected`.
    pub fn state(&self) -> &'static str {
        match self {
            Self::UpToDate { .. } => "up-to-date",
            Self::Outdated { .. } => "outdated",
            Self::Uninjected { .. } => "uninjected",
            Self::OrphanRevision { .. } => "orphan-revision",
            Self::NotSelected => "not-selected",
        }
    }

    /// The revision concerned, when there is one.
    pub fn revision(&self) -> Option<&str> {
        match self {
            Self::UpToDate { revision }
            | Self::Outdated { revision, .. }
            | Self::Uninjected { revision }
            | Self::OrphanRevision { revision } => Some(revision),
            Self::NotSelected => None,
        }
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UpToDate { revision } => write!(f, "up to date (revision {revision})"),
            Self::Outdated { revision, reason } => {
                write!(f, "outdated (revision {revision}): {reason}")
            }
            Self::Uninjected { revision } => write!(
                f,
                "uninjected: revision {revision} would inject it; restart it to get the sidecar"
            ),
            Self::OrphanRevision { revision } => {
                write!(f, "injected by revision {revision}, which no Mesh serves")
            }
            Self::NotSelected => f.write_str("not selected for injection"),
        }
    }
}

/// Today's configuration, as the classification reads it.
#[derive(Clone, Copy, Debug)]
pub struct Configuration<'a> {
    /// Every Mesh.
    pub meshes: &'a [Mesh],
    /// Namespaces no webhook entry selects (the system ones and the
    /// operator's own).
    pub excluded_namespaces: &'a [&'a str],
}

/// The revision that injected `pod`, when it is injected: the status
/// annotation's, else the pod's `istio.io/rev` annotation, else `default`
/// (Istio's injector writes the revision it serves, `default` when it has
/// none; a status without one is an older or hand-written stamp, not a
/// revision of its own).
pub fn injected_revision(pod: &Pod) -> Option<String> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let status = annotations.get(SIDECAR_STATUS)?;
    let from_status = serde_json::from_str::<SidecarStatus>(status)
        .ok()
        .map(|s| s.revision)
        .filter(|r| !r.is_empty());
    Some(
        from_status
            .or_else(|| annotations.get(REVISION).cloned().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| DEFAULT_REVISION.to_owned()),
    )
}

/// The Mesh that would inject `pod` if it were created now, in a namespace
/// with `namespace_labels`: the first whose webhook selects it and whose
/// decision is to inject.
pub fn serving_mesh<'m>(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    config: Configuration<'m>,
) -> Option<&'m Mesh> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let mut ns_labels = namespace_labels.clone();
    ns_labels
        .entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| namespace.to_owned());
    let empty = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let selected = crate::tags::selecting_mesh(
        config.meshes,
        config.excluded_namespaces,
        &ns_labels,
        pod_labels,
    )?;
    decide(pod, namespace, &selected.spec.injection, &mut Vec::new())
        .inject
        .then_some(selected)
}

/// The Mesh that would inject a pod of `namespace` (labelled
/// `namespace_labels`) created now with no labels or annotations of its own.
pub fn namespace_mesh<'m>(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    config: Configuration<'m>,
) -> Option<&'m Mesh> {
    let probe = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(Default::default()),
        ..Pod::default()
    };
    serving_mesh(&probe, namespace_labels, config)
}

/// Classifies `pod` (in a namespace with `namespace_labels`) against today's
/// configuration; `profiles` are the ProxyProfiles of the pod's namespace.
pub fn classify(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    profiles: &[ProxyProfile],
    config: Configuration<'_>,
) -> Drift {
    let serving = serving_mesh(pod, namespace_labels, config);
    let Some(injected) = injected_revision(pod) else {
        return match serving {
            Some(mesh) => Drift::Uninjected {
                revision: mesh.spec.revision.clone(),
            },
            None => Drift::NotSelected,
        };
    };
    if !config.meshes.iter().any(|m| m.spec.revision == injected) {
        return Drift::OrphanRevision { revision: injected };
    }
    let outdated = |reason| Drift::Outdated {
        revision: injected.clone(),
        reason,
    };
    let Some(mesh) = serving else {
        return outdated(OutdatedReason::NoLongerSelected);
    };
    if mesh.spec.revision != injected {
        return outdated(OutdatedReason::Revision {
            injected: injected.clone(),
            expected: mesh.spec.revision.clone(),
        });
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let selected = proxy_profile::select(labels, profiles, &mut Vec::new());
    let layered = layered_mesh(&mesh.spec, &selected);
    let expected_image = expected_proxy_image(&layered, annotations);
    let running_image = proxy_image(pod).unwrap_or_default();
    if running_image != expected_image {
        return outdated(OutdatedReason::Image {
            running: running_image.to_owned(),
            expected: expected_image.to_owned(),
        });
    }
    let expected = injection_hash(&mesh.spec, &selected, annotations);
    let stamped = annotations.get(INJECTION_HASH);
    if stamped != Some(&expected) {
        return outdated(OutdatedReason::Hash {
            stamped: stamped.cloned(),
            expected,
        });
    }
    Drift::UpToDate { revision: injected }
}

/// The image of the pod's `istio-proxy` (a container or a native sidecar).
pub fn proxy_image(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == PROXY_CONTAINER)?
        .image
        .as_deref()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    use super::*;
    use crate::istio::{INJECT as INJECT_LABEL, INJECTION_LABEL, SYSTEM_NAMESPACES};
    use crate::mesh::{InjectionPolicy, MeshSpec};

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn mesh(revision: &str) -> Mesh {
        Mesh::new(
            revision,
            MeshSpec {
                revision: revision.into(),
                ..MeshSpec::default()
            },
        )
    }

    fn app_pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                labels: Some(map(labels)),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "web".into(),
                    image: Some("web:1".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// `pod` as `mesh` (through `profiles`) would have injected it, reduced
    /// to what the classification reads.
    fn injected_by(mut pod: Pod, mesh: &Mesh, profiles: &[ProxyProfile]) -> Pod {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let selected = proxy_profile::select(&labels, profiles, &mut Vec::new());
        let layered = layered_mesh(&mesh.spec, &selected);
        let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
        let image = expected_proxy_image(&layered, annotations).to_owned();
        annotations.insert(
            SIDECAR_STATUS.into(),
            json!({"revision": mesh.spec.revision}).to_string(),
        );
        let hash = injection_hash(&mesh.spec, &selected, annotations);
        annotations.insert(INJECTION_HASH.into(), hash);
        if let Some(spec) = pod.spec.as_mut() {
            spec.init_containers = Some(vec![Container {
                name: PROXY_CONTAINER.into(),
                image: Some(image),
                ..Container::default()
            }]);
        }
        pod
    }

    fn classify_in(
        pod: &Pod,
        ns: &[(&str, &str)],
        meshes: &[Mesh],
        profiles: &[ProxyProfile],
    ) -> Drift {
        let config = Configuration {
            meshes,
            excluded_namespaces: &SYSTEM_NAMESPACES,
        };
        classify(pod, &map(ns), profiles, config)
    }

    const ENABLED: (&str, &str) = (INJECTION_LABEL, "enabled");

    #[test]
    fn a_pod_injected_from_todays_settings_is_up_to_date() {
        let meshes = [mesh("default")];
        let pod = injected_by(app_pod(&[]), &meshes[0], &[]);
        assert_eq!(
            classify_in(&pod, &[ENABLED], &meshes, &[]),
            Drift::UpToDate {
                revision: "default".into()
            }
        );
    }

    #[test]
    fn a_pod_created_before_its_namespace_was_enabled_is_uninjected() {
        let meshes = [mesh("default")];
        let pod = app_pod(&[]);
        assert_eq!(
            classify_in(&pod, &[], &meshes, &[]),
            Drift::NotSelected,
            "unlabelled namespace"
        );
        assert_eq!(
            classify_in(&pod, &[ENABLED], &meshes, &[]),
            Drift::Uninjected {
                revision: "default".into()
            }
        );
        let opted_out = app_pod(&[(INJECT_LABEL, "false")]);
        assert_eq!(
            classify_in(&opted_out, &[ENABLED], &meshes, &[]),
            Drift::NotSelected
        );
    }

    #[test]
    fn uninjected_follows_the_engine_decision_too() {
        let mut disabled = mesh("default");
        disabled.spec.injection.policy = InjectionPolicy::Disabled;
        let meshes = [disabled];
        assert_eq!(
            classify_in(&app_pod(&[]), &[ENABLED], &meshes, &[]),
            Drift::NotSelected,
            "policy Disabled and no opt-in"
        );
        let mut host = app_pod(&[]);
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        assert_eq!(
            classify_in(&host, &[ENABLED], &[mesh("default")], &[]),
            Drift::NotSelected
        );
    }

    #[test]
    fn a_mesh_image_change_makes_its_pods_outdated_by_image() {
        let old = mesh("default");
        let pod = injected_by(app_pod(&[]), &old, &[]);
        let mut new = old.clone();
        new.spec.proxy.image = "example.com/proxyv2:1.29.0".into();
        assert_eq!(
            classify_in(&pod, &[ENABLED], &[new], &[]),
            Drift::Outdated {
                revision: "default".into(),
                reason: OutdatedReason::Image {
                    running: crate::settings::DEFAULT_PROXY_IMAGE.into(),
                    expected: "example.com/proxyv2:1.29.0".into(),
                },
            }
        );
    }

    #[test]
    fn a_settings_change_makes_its_pods_outdated_by_hash() {
        let old = mesh("default");
        let pod = injected_by(app_pod(&[]), &old, &[]);
        let mut new = old.clone();
        new.spec.proxy.log_level = "debug".into();
        let drift = classify_in(&pod, &[ENABLED], &[new], &[]);
        assert!(
            matches!(
                &drift,
                Drift::Outdated {
                    reason: OutdatedReason::Hash {
                        stamped: Some(_),
                        ..
                    },
                    ..
                }
            ),
            "{drift:?}"
        );
        let mut unstamped = injected_by(app_pod(&[]), &old, &[]);
        if let Some(a) = unstamped.metadata.annotations.as_mut() {
            a.remove(INJECTION_HASH);
        }
        assert!(matches!(
            classify_in(&unstamped, &[ENABLED], &[old], &[]),
            Drift::Outdated {
                reason: OutdatedReason::Hash { stamped: None, .. },
                ..
            }
        ));
    }

    #[test]
    fn a_profile_change_concerns_only_the_pods_it_selects() {
        let meshes = [mesh("default")];
        let api = injected_by(app_pod(&[("app", "api")]), &meshes[0], &[]);
        let web = injected_by(app_pod(&[("app", "web")]), &meshes[0], &[]);
        let mut profile: ProxyProfile = serde_json::from_value(json!({
            "apiVersion": "mesh.ferrimesh.io/v1alpha1",
            "kind": "ProxyProfile",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "proxy": {"logLevel": "debug"}},
        }))
        .expect("profile");
        let profiles = [profile.clone()];
        assert_eq!(
            classify_in(&api, &[ENABLED], &meshes, &profiles).state(),
            "outdated"
        );
        assert_eq!(
            classify_in(&web, &[ENABLED], &meshes, &profiles).state(),
            "up-to-date"
        );
        profile.spec.proxy.log_level = None;
        assert_eq!(
            classify_in(&api, &[ENABLED], &meshes, &[profile]).state(),
            "up-to-date",
            "a profile that changes nothing leaves the pod up to date"
        );
    }

    #[test]
    fn a_revision_tag_resolves_to_the_mesh_holding_it() {
        let default = mesh("default");
        let mut canary = mesh("canary");
        canary.spec.revision_tags = vec!["stable".into()];
        let meshes = [default.clone(), canary.clone()];
        let stable = (REVISION, "stable");
        assert_eq!(
            classify_in(&app_pod(&[]), &[stable], &meshes, &[]),
            Drift::Uninjected {
                revision: "canary".into()
            }
        );
        let by_canary = injected_by(app_pod(&[]), &canary, &[]);
        assert_eq!(
            classify_in(&by_canary, &[stable], &meshes, &[]),
            Drift::UpToDate {
                revision: "canary".into()
            }
        );
        // The tag moved to the default Mesh: the pod is the other revision's.
        let mut moved = [default, canary];
        moved[0].spec.revision_tags = vec!["stable".into()];
        moved[1].spec.revision_tags.clear();
        assert_eq!(
            classify_in(&by_canary, &[stable], &moved, &[]),
            Drift::Outdated {
                revision: "canary".into(),
                reason: OutdatedReason::Revision {
                    injected: "canary".into(),
                    expected: "default".into()
                },
            }
        );
    }

    #[test]
    fn a_status_without_a_revision_counts_as_the_default_revision() {
        let default = mesh("default");
        let mut pod = injected_by(app_pod(&[]), &default, &[]);
        let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(SIDECAR_STATUS.into(), json!({}).to_string());
        assert_eq!(injected_revision(&pod).as_deref(), Some("default"));
        assert_eq!(
            classify_in(&pod, &[ENABLED], std::slice::from_ref(&default), &[]).state(),
            "up-to-date"
        );
    }

    #[test]
    fn revisions_orphans_and_deselected_pods() {
        let default = mesh("default");
        let canary = mesh("canary");
        let by_canary = injected_by(app_pod(&[]), &canary, &[]);
        assert_eq!(
            classify_in(&by_canary, &[ENABLED], std::slice::from_ref(&default), &[]),
            Drift::OrphanRevision {
                revision: "canary".into()
            }
        );
        assert_eq!(
            classify_in(
                &by_canary,
                &[ENABLED],
                &[default.clone(), canary.clone()],
                &[]
            ),
            Drift::Outdated {
                revision: "canary".into(),
                reason: OutdatedReason::Revision {
                    injected: "canary".into(),
                    expected: "default".into()
                },
            }
        );
        assert_eq!(
            classify_in(&by_canary, &[], &[default, canary], &[]),
            Drift::Outdated {
                revision: "canary".into(),
                reason: OutdatedReason::NoLongerSelected,
            }
        );
    }

    #[test]
    fn explains_each_state_in_one_line() {
        let drift = Drift::Outdated {
            revision: "default".into(),
            reason: OutdatedReason::Image {
                running: "a/b:1".into(),
                expected: "a/b:2".into(),
            },
        };
        assert_eq!(
            drift.to_string(),
            "outdated (revision default): proxy image a/b:1, expected a/b:2"
        );
        assert_eq!(
            serde_json::to_value(&drift).expect("json"),
            json!({"state": "outdated", "revision": "default",
                   "reason": {"kind": "image", "running": "a/b:1", "expected": "a/b:2"}})
        );
    }
}
