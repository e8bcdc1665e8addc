//! Istio's injection templates beyond one `sidecar`: which templates a pod
//! asks for (`inject.istio.io/templates`, else the Mesh's
//! `defaultTemplates`), the combinations ferrimesh applies, and the
//! templates that are laid over the pod as Istio lays any template:
//! `grpc-simple` and `grpc-agent` (proxyless gRPC, [`grpc`]) and `spire`
//! (the SPIRE agent's socket for the proxy, [`spire`]).
//!
//! Istio renders every template of the list against the pod and merges each
//! onto it in turn (Kubernetes' strategic merge), then lays the user's own
//! containers of the same names over the result again and post-processes
//! it. [`inject_fragment`] does that for a template given as a [`Fragment`].

pub mod grpc;
pub mod spire;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, LocalObjectReference, Pod, PodSpec, Volume};
use serde_json::Value;

use super::annotations::{self as ann, Invalid};
use super::containers::PROXY;
use super::overrides::{Overrides, canonicalize_resources, merge_containers, merge_named, overlay};
use super::settings::Settings;
use super::{Request, merge_volumes, post_process};
use crate::{Error, Result};
use ferrimesh_crds::istio::SidecarStatus;

/// The template that builds what a pod gets: a proxy, or for `grpc-simple`
/// a bootstrap file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Base {
    /// `sidecar`: Istio's sidecar proxy (and `istio-init`).
    #[default]
    Sidecar,
    /// `gateway`: the pod's own `istio-proxy` becomes a proxy router.
    Gateway,
    /// `grpc-agent`: an agent without Envoy serving proxyless gRPC apps.
    GrpcAgent,
    /// `grpc-simple`: a bootstrap file for proxyless gRPC apps, no agent.
    GrpcSimple,
}

impl Base {
    /// The template's name in Istio's chart.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sidecar => "sidecar",
            Self::Gateway => "gateway",
            Self::GrpcAgent => "grpc-agent",
            Self::GrpcSimple => "grpc-simple",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Self::Sidecar,
            Self::Gateway,
            Self::GrpcAgent,
            Self::GrpcSimple,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }
}

/// The name of the `spire` template.
pub const SPIRE: &str = "spire";

/// Every template name ferrimesh applies.
pub const KNOWN: [&str; 5] = ["sidecar", "gateway", "grpc-agent", "grpc-simple", SPIRE];

/// Templates of Istio's chart that are not pod injection: istiod renders
/// them for the Deployments of Gateway API gateways and waypoints, which
/// ferrimesh does not manage.
pub const NOT_FOR_PODS: [&str; 4] = [
    "waypoint",
    "kube-gateway",
    "agentgateway",
    "agentgateway-waypoint",
];

/// A list of templates ferrimesh applies: one base template, and `spire`
/// after `sidecar` or `gateway`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Templates {
    /// The template that builds what the pod gets.
    pub base: Base,
    /// Whether `spire` follows it.
    pub spire: bool,
}

impl Templates {
    /// `inject.istio.io/templates`: comma-separated names, each trimmed.
    pub fn parse(value: &str) -> Result<Self, Invalid> {
        Self::from_names(value.split(',').map(str::trim))
    }

    /// A list of names, in the order they are applied. A name Istio would
    /// not know, a template that is not pod injection, or a combination
    /// ferrimesh does not apply is refused by name.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, Invalid> {
        let names: Vec<&str> = names.into_iter().collect();
        for name in &names {
            if NOT_FOR_PODS.contains(name) {
                return Err(format!(
                    "template {name:?} is for Gateway API deployments, not pods; ferrimesh does not inject it"
                ));
            }
            if !KNOWN.contains(name) {
                return Err(format!(
                    "template {name:?} is not known (known: {})",
                    KNOWN.join(", ")
                ));
            }
        }
        let combination = || {
            format!(
                "templates {:?} are not applied together: ferrimesh applies one of sidecar, gateway, grpc-agent, grpc-simple, optionally followed by spire after sidecar or gateway",
                names.join(",")
            )
        };
        match names.as_slice() {
            [base] => Base::from_name(base)
                .map(|base| Self { base, spire: false })
                .ok_or_else(combination),
            [base @ ("sidecar" | "gateway"), SPIRE] => Base::from_name(base)
                .map(|base| Self { base, spire: true })
                .ok_or_else(combination),
            _ => Err(combination()),
        }
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = vec![self.base.name()];
        if self.spire {
            names.push(SPIRE);
        }
        names
    }
}

/// A rendered template that is merged onto the pod as it stands: what it
/// sets on the pod's metadata and the entries of the pod's lists it merges
/// into (by name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fragment {
    /// Labels set (an existing value replaced).
    pub labels: BTreeMap<String, String>,
    /// Annotations set (an existing value replaced).
    pub annotations: BTreeMap<String, String>,
    /// Init containers merged by name.
    pub init_containers: Vec<Container>,
    /// Containers merged by name.
    pub containers: Vec<Container>,
    /// Volumes merged by name.
    pub volumes: Vec<Volume>,
    /// Pull secrets merged by name.
    pub image_pull_secrets: Vec<String>,
}

/// The pod a template is rendered against, as Istio gives it: on
/// re-injection, without the containers the old status lists, and with the
/// user's recorded overrides put back.
pub fn template_input(pod: &Pod) -> Result<Pod> {
    let mut pod = pod.clone();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(status) = annotations
        .get(ann::STATUS)
        .and_then(|raw| serde_json::from_str::<SidecarStatus>(raw).ok())
    else {
        return Ok(pod);
    };
    let recorded = recorded_overrides(&annotations)?;
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    let injected: BTreeSet<&str> = status
        .containers
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    spec.containers
        .retain(|c| !injected.contains(c.name.as_str()));
    let injected: BTreeSet<&str> = status
        .init_containers
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    init.retain(|c| !injected.contains(c.name.as_str()));
    for container in recorded.containers {
        if !spec.containers.iter().any(|c| c.name == container.name) {
            spec.containers.push(container);
        }
    }
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    for container in recorded.init_containers {
        if !init.iter().any(|c| c.name == container.name) {
            init.push(container);
        }
    }
    if init.is_empty() {
        spec.init_containers = None;
    }
    Ok(pod)
}

fn recorded_overrides(annotations: &BTreeMap<String, String>) -> Result<Overrides> {
    annotations
        .get(ann::PROXY_OVERRIDES)
        .map(|v| Overrides::parse(v))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// Merges `over` into the list `base` by name with `merge`, as the
/// strategic merge does; an empty `over` leaves `base` alone.
fn merge_list<T: serde::Serialize + serde::de::DeserializeOwned>(
    base: &mut Option<Vec<T>>,
    over: &[T],
    merge: fn(&mut Vec<Value>, &[Value]),
) -> Result<()> {
    if over.is_empty() {
        return Ok(());
    }
    let mut merged = serde_json::to_value(base.take().unwrap_or_default())?;
    let over = serde_json::to_value(over)?;
    if let (Value::Array(merged), Value::Array(over)) = (&mut merged, &over) {
        merge(merged, over);
    }
    *base = Some(serde_json::from_value(merged)?);
    Ok(())
}

/// The user's container of `name`, laid over the merged one again as Istio
/// does (its recorded override, else the pod's own container of that name).
fn user_container<'p>(
    name: &str,
    recorded: &'p [Container],
    own: impl IntoIterator<Item = &'p Container>,
) -> Option<Container> {
    recorded
        .iter()
        .find(|c| c.name == name)
        .or_else(|| own.into_iter().find(|c| c.name == name))
        .cloned()
        .map(|mut c| {
            canonicalize_resources(&mut c);
            // Recorded as `"resources":{}` (Go writes the empty struct);
            // laying that over changes nothing but adds the empty object.
            if c.resources
                .as_ref()
                .is_some_and(|r| *r == Default::default())
            {
                c.resources = None;
            }
            c
        })
}

/// Injects `request.pod` with a template given as a fragment, as Istio
/// applies a template: merged onto the pod, the user's own containers of
/// the template's names laid over the result again (recorded in
/// `proxy.istio.io/overrides` on first injection, and laid over again from
/// there on re-injection, where Istio does not), the cluster env on the
/// proxy, the prometheus merge (probes are not rewritten: the gRPC
/// templates turn rewriting off), the status annotation naming what the
/// template holds, and the proxy (if any) moved last, or first when the
/// application waits for it.
pub fn inject_fragment(
    request: &Request<'_>,
    settings: &Settings,
    fragment: &Fragment,
) -> Result<Pod> {
    let original = request.pod;
    let original_annotations = original.metadata.annotations.clone().unwrap_or_default();
    let previous = original_annotations
        .get(ann::STATUS)
        .and_then(|raw| serde_json::from_str::<SidecarStatus>(raw).ok());
    let recorded = recorded_overrides(&original_annotations)?;
    let mut pod = original.clone();
    if !fragment.labels.is_empty() {
        pod.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .extend(fragment.labels.clone());
    }
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(fragment.annotations.clone());
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| Error::InvalidPod("the pod has no spec".into()))?;
    merge_list(
        &mut spec.init_containers,
        &fragment.init_containers,
        merge_containers,
    )?;
    let mut containers = Some(std::mem::take(&mut spec.containers));
    merge_list(&mut containers, &fragment.containers, merge_containers)?;
    spec.containers = containers.unwrap_or_default();
    merge_volumes(spec, fragment.volumes.clone())?;
    let secrets: Vec<LocalObjectReference> = fragment
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();
    merge_list(&mut spec.image_pull_secrets, &secrets, merge_named)?;

    // The user's containers of the template's names, laid over again.
    let own = original.spec.as_ref();
    let was_injected = |list: Option<&Vec<String>>, name: &str| {
        list.is_some_and(|names| names.iter().any(|n| n == name))
    };
    let mut overrides = Overrides::default();
    for fresh in &fragment.containers {
        // Re-injection: the container in the pod is the injected one; only
        // the recorded override is laid over it again.
        let injected = was_injected(
            previous.as_ref().and_then(|s| s.containers.as_ref()),
            &fresh.name,
        );
        let Some(user) = user_container(
            &fresh.name,
            &recorded.containers,
            own.into_iter()
                .flat_map(|s| &s.containers)
                .filter(|_| !injected),
        ) else {
            continue;
        };
        if let Some(merged) = spec.containers.iter_mut().find(|c| c.name == fresh.name) {
            *merged = overlay(merged, &user)?;
        }
        overrides.containers.push(user);
    }
    for fresh in &fragment.init_containers {
        let injected = was_injected(
            previous.as_ref().and_then(|s| s.init_containers.as_ref()),
            &fresh.name,
        );
        let Some(user) = user_container(
            &fresh.name,
            &recorded.init_containers,
            own.into_iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .filter(|_| !injected),
        ) else {
            continue;
        };
        if let Some(merged) = spec
            .init_containers
            .iter_mut()
            .flatten()
            .find(|c| c.name == fresh.name)
        {
            *merged = overlay(merged, &user)?;
        }
        overrides.init_containers.push(user);
    }

    // Post-processing: cluster env, prometheus merge; no probe rewriting.
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if previous.is_none() && !overrides.is_empty() {
        annotations.insert(ann::PROXY_OVERRIDES.to_owned(), overrides.to_annotation()?);
    }
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| Error::InvalidPod("the pod has no spec".into()))?;
    let post = Settings {
        rewrite_probes: false,
        ..settings.clone()
    };
    match spec.containers.iter().position(|c| c.name == PROXY) {
        Some(at) => {
            let mut proxy = spec.containers.remove(at);
            super::containers::set_trailing_env(&mut proxy, &settings.trailing_env);
            post_process(annotations, spec, &mut proxy, &post, None)?;
            if settings.hold_application {
                spec.containers.insert(0, proxy);
            } else {
                spec.containers.push(proxy);
            }
        }
        None => {
            if settings.merge_metrics {
                super::prometheus::merge(annotations, settings.metrics_port)?;
            }
        }
    }
    if let Some(network) = &settings.network {
        pod.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(ann::NETWORK_LABEL.to_owned(), network.clone());
    }
    let names = |list: &[Container]| list.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let status = SidecarStatus::new(
        names(&fragment.init_containers),
        names(&fragment.containers),
        fragment.volumes.iter().map(|v| v.name.clone()).collect(),
        fragment.image_pull_secrets.clone(),
        &settings.revision,
    );
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ann::STATUS.to_owned(), status.to_annotation());
    annotations.extend(
        settings
            .injected_annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_one_base_template_optionally_followed_by_spire() {
        assert_eq!(Templates::parse("sidecar"), Ok(Templates::default()));
        assert_eq!(
            Templates::parse(" gateway , spire"),
            Ok(Templates {
                base: Base::Gateway,
                spire: true
            })
        );
        assert_eq!(
            Templates::parse("grpc-agent").map(|t| t.base),
            Ok(Base::GrpcAgent)
        );
        assert_eq!(
            Templates::parse("grpc-simple").map(|t| t.names()),
            Ok(vec!["grpc-simple"])
        );
        assert_eq!(
            Templates::parse("sidecar,spire").map(|t| t.names()),
            Ok(vec!["sidecar", "spire"])
        );
    }

    #[test]
    fn refuses_unknown_templates_by_name() {
        let error = Templates::parse("sidecar,custom").expect_err("unknown");
        assert!(error.contains("\"custom\" is not known"), "{error}");
        assert!(Templates::parse("").is_err(), "an empty name");
        assert!(Templates::parse("sidecar,").is_err(), "an empty name");
    }

    #[test]
    fn refuses_gateway_api_templates_as_not_for_pods() {
        let error = Templates::parse("waypoint").expect_err("waypoint");
        assert!(error.contains("\"waypoint\" is for Gateway API"), "{error}");
    }

    #[test]
    fn refuses_combinations_it_does_not_apply() {
        for list in [
            "spire",
            "spire,sidecar",
            "sidecar,gateway",
            "grpc-agent,spire",
            "sidecar,sidecar",
            "sidecar,spire,spire",
        ] {
            let error = Templates::parse(list).expect_err(list);
            assert!(error.contains("not applied together"), "{list}: {error}");
        }
    }
}
