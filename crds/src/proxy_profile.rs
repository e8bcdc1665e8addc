//! `ProxyProfile`: per-namespace or per-workload overrides of a Mesh's proxy
//! and traffic settings.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::decision::selector_matches;
use crate::settings::{ProxySettingsOverride, TrafficSettingsOverride};

/// Overrides for the pods of one namespace, or the pods its selector matches.
///
/// Precedence, lowest first: Mesh < namespace-wide profile (no selector) <
/// workload profile (selector matches) < the pod's annotations; each level
/// overrides field by field.
// Each `printcolumn(...)` repeats the same keys, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.ferrimesh.io",
    version = "v1alpha1",
    kind = "ProxyProfile",
    namespaced,
    shortname = "pp",
    doc = "A ProxyProfile overrides Mesh proxy and traffic settings for a namespace or workload.",
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".spec.selector.matchLabels"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProfileSpec {
    /// Pods this profile applies to; unset or empty means every pod in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Any subset of the Mesh's `proxy` settings.
    #[serde(default)]
    pub proxy: ProxySettingsOverride,
    /// Any subset of the Mesh's `traffic` settings.
    #[serde(default)]
    pub traffic: TrafficSettingsOverride,
}

impl ProxyProfile {
    /// Whether this profile applies to a whole namespace (no selector, or an
    /// empty one) rather than to selected workloads.
    pub fn is_namespace_wide(&self) -> bool {
        self.spec.selector.as_ref().is_none_or(|s| {
            s.match_labels.as_ref().is_none_or(|m| m.is_empty())
                && s.match_expressions.as_ref().is_none_or(|e| e.is_empty())
        })
    }

    /// `namespace/name`, as messages name a profile.
    pub fn display_name(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

/// The profiles of a pod's namespace that apply to a pod with `labels`,
/// lowest precedence first: the namespace-wide one, then the workload one.
/// When several of one level apply, the oldest (creationTimestamp, then
/// name) wins and a warning names the others; a profile with an invalid
/// selector is ignored with a warning.
pub fn select<'p>(
    labels: &BTreeMap<String, String>,
    profiles: &'p [ProxyProfile],
    warnings: &mut Vec<String>,
) -> Vec<&'p ProxyProfile> {
    let oldest_first = |a: &&ProxyProfile, b: &&ProxyProfile| -> Ordering {
        let created = |p: &ProxyProfile| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    };
    let mut namespace_wide: Vec<_> = profiles.iter().filter(|p| p.is_namespace_wide()).collect();
    let mut workload: Vec<_> = profiles
        .iter()
        .filter(|p| !p.is_namespace_wide())
        .filter(|p| {
            match p
                .spec
                .selector
                .as_ref()
                .map(|s| selector_matches(s, labels))
            {
                Some(Ok(matched)) => matched,
                Some(Err(e)) => {
                    warnings.push(format!(
                        "ProxyProfile {} has an invalid selector and is ignored: {e}",
                        p.display_name()
                    ));
                    false
                }
                None => false,
            }
        })
        .collect();
    let mut chosen = Vec::new();
    for (level, candidates) in [
        ("namespace-wide", &mut namespace_wide),
        ("workload", &mut workload),
    ] {
        candidates.sort_by(oldest_first);
        if let Some((first, rest)) = candidates.split_first() {
            if !rest.is_empty() {
                let others: Vec<_> = rest.iter().map(|p| p.display_name()).collect();
                warnings.push(format!(
                    "several {level} ProxyProfiles select this pod; the oldest, {}, applies and {} are ignored",
                    first.display_name(),
                    others.join(", ")
                ));
            }
            chosen.push(*first);
        }
    }
    chosen
}
