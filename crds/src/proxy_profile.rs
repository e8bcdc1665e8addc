//! `ProxyProfile`: per-namespace or per-workload overrides of a Mesh's proxy
//! and traffic settings.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
}
