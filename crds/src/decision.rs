//! Whether a pod gets a sidecar, and why: the injector's decision, here so
//! that the webhook, the CLI and the operator (which reports pods that should
//! have been injected and are not) all take it from one place.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

use crate::istio::{INJECT, SYSTEM_NAMESPACES};
use crate::mesh::{InjectionPolicy, InjectionSettings};

/// The annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_POD: &str = "kubernetes.io/config.mirror";

/// Why a pod is, or is not, injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The pod uses the host's network.
    HostNetwork,
    /// The pod is in a system namespace.
    SystemNamespace(String),
    /// The pod is a kubelet mirror pod.
    MirrorPod,
    /// The pod's `sidecar.istio.io/inject` label.
    PodLabel(String),
    /// The pod's `sidecar.istio.io/inject` annotation.
    PodAnnotation(String),
    /// The Mesh's `neverInjectSelector` entry at this index matched.
    NeverInjectSelector(usize),
    /// The Mesh's `alwaysInjectSelector` entry at this index matched.
    AlwaysInjectSelector(usize),
    /// The Mesh's `injection.policy`.
    Policy(InjectionPolicy),
}

impl Reason {
    /// A short, stable value for metric labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::HostNetwork => "host_network",
            Self::SystemNamespace(_) => "system_namespace",
            Self::MirrorPod => "mirror_pod",
            Self::PodLabel(_) => "pod_label",
            Self::PodAnnotation(_) => "pod_annotation",
            Self::NeverInjectSelector(_) => "never_inject_selector",
            Self::AlwaysInjectSelector(_) => "always_inject_selector",
            Self::Policy(_) => "policy",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HostNetwork => f.write_str("pod uses hostNetwork"),
            Self::SystemNamespace(ns) => write!(f, "namespace {ns} is never injected"),
            Self::MirrorPod => f.write_str("mirror pods are never mutated"),
            Self::PodLabel(v) => write!(f, "pod label {INJECT}={v}"),
            Self::PodAnnotation(v) => write!(f, "pod annotation {INJECT}={v}"),
            Self::NeverInjectSelector(i) => write!(
                f,
                "Mesh injection.neverInjectSelector[{i}] matches the pod's labels"
            ),
            Self::AlwaysInjectSelector(i) => {
                write!(
                    f,
                    "Mesh injection.alwaysInjectSelector[{i}] matches the pod's labels"
                )
            }
            Self::Policy(InjectionPolicy::Enabled) => {
                f.write_str("Mesh injection.policy is Enabled")
            }
            Self::Policy(InjectionPolicy::Disabled) => {
                f.write_str("Mesh injection.policy is Disabled")
            }
        }
    }
}

/// The outcome of the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Inject or skip.
    pub inject: bool,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    fn inject(reason: Reason) -> Self {
        Self {
            inject: true,
            reason,
        }
    }

    fn skip(reason: Reason) -> Self {
        Self {
            inject: false,
            reason,
        }
    }
}

/// Decides whether `pod`, created in `namespace`, is injected. Warnings for
/// values that count as no choice are pushed to `warnings`.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    settings: &InjectionSettings,
    warnings: &mut Vec<String>,
) -> Decision {
    let meta = &pod.metadata;
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        // Istio's offline injector says so too: iptables rules in a pod on
        // the host's network would change the node's routing.
        warnings.push(
            "skipping injection: the pod has host networking enabled (hostNetwork: true), \
             and capturing its traffic would change the node's routing"
                .to_owned(),
        );
        return Decision::skip(Reason::HostNetwork);
    }
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Decision::skip(Reason::SystemNamespace(namespace.to_owned()));
    }
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD))
    {
        return Decision::skip(Reason::MirrorPod);
    }
    let label = meta.labels.as_ref().and_then(|l| l.get(INJECT));
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(INJECT));
    let choice = match (label, annotation) {
        (Some(v), _) => Some((v, Reason::PodLabel(v.clone()), "label")),
        (None, Some(v)) => Some((v, Reason::PodAnnotation(v.clone()), "annotation")),
        (None, None) => None,
    };
    if let Some((value, reason, kind)) = choice {
        match value.as_str() {
            "true" => return Decision::inject(reason),
            "false" => return Decision::skip(reason),
            other => warnings.push(format!(
                "pod {kind} {INJECT}={other:?} is neither \"true\" nor \"false\" and counts as no choice"
            )),
        }
    }
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    if let Some(i) = first_match(
        &settings.never_inject_selector,
        labels,
        warnings,
        "neverInjectSelector",
    ) {
        return Decision::skip(Reason::NeverInjectSelector(i));
    }
    if let Some(i) = first_match(
        &settings.always_inject_selector,
        labels,
        warnings,
        "alwaysInjectSelector",
    ) {
        return Decision::inject(Reason::AlwaysInjectSelector(i));
    }
    match settings.policy {
        InjectionPolicy::Enabled => Decision::inject(Reason::Policy(InjectionPolicy::Enabled)),
        InjectionPolicy::Disabled => Decision::skip(Reason::Policy(InjectionPolicy::Disabled)),
    }
}

/// Whether a label selector matches labels; an empty selector matches nothing
/// here (as in Istio's injection selectors), an invalid one never matches.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let empty = selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty);
    if empty {
        return Ok(false);
    }
    let selector = Selector::try_from(selector.clone()).map_err(|e| e.to_string())?;
    Ok(selector.matches(labels))
}

fn first_match(
    selectors: &[LabelSelector],
    labels: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
    field: &str,
) -> Option<usize> {
    selectors
        .iter()
        .position(|selector| match selector_matches(selector, labels) {
            Ok(matched) => matched,
            Err(e) => {
                warnings.push(format!(
                    "Mesh injection.{field} has an invalid selector and is ignored: {e}"
                ));
                false
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            })
        };
        Pod {
            metadata: ObjectMeta {
                labels: map(labels),
                annotations: map(annotations),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            ..Default::default()
        }
    }

    fn selector(kv: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn run(pod: &Pod, namespace: &str, settings: &InjectionSettings) -> (Decision, Vec<String>) {
        let mut warnings = Vec::new();
        (decide(pod, namespace, settings, &mut warnings), warnings)
    }

    #[test]
    fn skips_host_network_pods() {
        let mut p = pod(&[(INJECT, "true")], &[]);
        p.spec.as_mut().expect("spec").host_network = Some(true);
        let (decision, warnings) = run(&p, "app", &InjectionSettings::default());
        assert_eq!(decision, Decision::skip(Reason::HostNetwork));
        assert!(
            warnings.iter().any(|w| w.contains("host networking")),
            "{warnings:?}"
        );
    }

    #[test]
    fn skips_system_namespaces_even_when_the_pod_opts_in() {
        for ns in SYSTEM_NAMESPACES {
            let decision = run(
                &pod(&[(INJECT, "true")], &[]),
                ns,
                &InjectionSettings::default(),
            )
            .0;
            assert!(!decision.inject, "{ns}");
        }
    }

    #[test]
    fn never_mutates_mirror_pods() {
        let decision = run(
            &pod(&[], &[(MIRROR_POD, "abc")]),
            "app",
            &InjectionSettings::default(),
        )
        .0;
        assert_eq!(decision, Decision::skip(Reason::MirrorPod));
    }

    #[test]
    fn label_wins_over_annotation_even_when_empty() {
        let (decision, warnings) = run(
            &pod(&[(INJECT, "")], &[(INJECT, "false")]),
            "app",
            &InjectionSettings::default(),
        );
        assert_eq!(
            decision,
            Decision::inject(Reason::Policy(InjectionPolicy::Enabled))
        );
        assert_eq!(
            warnings.len(),
            1,
            "an empty label counts as no choice, with a warning"
        );
    }

    #[test]
    fn exact_true_and_false_are_case_sensitive() {
        let disabled = InjectionSettings {
            policy: InjectionPolicy::Disabled,
            ..Default::default()
        };
        assert!(
            run(&pod(&[], &[(INJECT, "true")]), "app", &disabled)
                .0
                .inject
        );
        let (decision, warnings) = run(&pod(&[], &[(INJECT, "True")]), "app", &disabled);
        assert!(!decision.inject);
        assert!(warnings[0].contains("\"True\""));
        assert!(
            !run(
                &pod(&[(INJECT, "false")], &[]),
                "app",
                &InjectionSettings::default()
            )
            .0
            .inject
        );
    }

    #[test]
    fn never_selector_wins_over_always_selector() {
        let settings = InjectionSettings {
            policy: InjectionPolicy::Disabled,
            never_inject_selector: vec![selector(&[("app", "db")])],
            always_inject_selector: vec![
                LabelSelector::default(),
                selector(&[("app", "db")]),
                selector(&[("app", "web")]),
            ],
            ..Default::default()
        };
        assert_eq!(
            run(&pod(&[("app", "db")], &[]), "app", &settings).0,
            Decision::skip(Reason::NeverInjectSelector(0))
        );
        assert_eq!(
            run(&pod(&[("app", "web")], &[]), "app", &settings).0,
            Decision::inject(Reason::AlwaysInjectSelector(2))
        );
        assert_eq!(
            run(&pod(&[("app", "other")], &[]), "app", &settings).0,
            Decision::skip(Reason::Policy(InjectionPolicy::Disabled))
        );
    }

    #[test]
    fn explains_decisions_in_user_words() {
        assert_eq!(
            Reason::PodLabel("false".into()).to_string(),
            "pod label sidecar.istio.io/inject=false"
        );
        assert_eq!(
            Reason::Policy(InjectionPolicy::Enabled).to_string(),
            "Mesh injection.policy is Enabled"
        );
    }
}
