//! The injection stamp: `ferrimesh.io/injection-hash`, a short hash of the
//! effective settings an injected pod was built from, written by the webhook
//! beside the revision and recomputed by whoever asks "is this pod's sidecar
//! what today's Mesh and ProxyProfiles would give it?" (the operator,
//! `ferrimesh status`).
//!
//! What is hashed, as one canonical JSON document (object keys sorted at
//! every level, no whitespace, so neither a process nor a serde version can
//! reorder it):
//! - the revision;
//! - the Mesh's settings that shape the injected pod (everything but the
//!   namespace selector, the webhook, registration and rollout settings,
//!   the revision tags and the injection decision's policy and selectors), with `proxy` and `traffic`
//!   resolved through the ProxyProfiles that select the pod (Mesh <
//!   namespace-wide < workload, field by field), written only where they
//!   differ from the Mesh defaults (so a ferrimesh release that adds a
//!   defaulted field does not restamp every pod);
//! - the pod's own settings annotations (`sidecar.istio.io/*`,
//!   `traffic.sidecar.istio.io/*`, the status and readiness ports,
//!   `proxy.istio.io/config`, `inject.istio.io/templates`, ...), read from
//!   the injected pod, so the webhook (which stamps the pod it returns) and a
//!   reader of the running pod hash the same values; a full-image
//!   `sidecar.istio.io/proxyImage` replaces the Mesh's images, so a pod that
//!   pins its own image is not outdated by a Mesh image change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ProxyProfile;
use crate::mesh::{
    InjectionSettings, MeshSpec, RolloutSettings, WebhookSettings, WorkloadRegistration,
};

/// The annotation carrying the stamp.
pub const INJECTION_HASH: &str = "ferrimesh.io/injection-hash";
/// The pod annotation that replaces both injected images when its value is
/// a full image reference (contains `/`).
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";

/// Hex digits kept of the SHA-256 (64 bits).
const HASH_LEN: usize = 16;

/// Annotation prefixes whose keys are per-pod injection settings.
const SETTINGS_PREFIXES: [&str; 4] = [
    "sidecar.istio.io/",
    "traffic.sidecar.istio.io/",
    "status.sidecar.istio.io/",
    "readiness.status.sidecar.istio.io/",
];
/// Single annotations that are per-pod injection settings.
const SETTINGS_ANNOTATIONS: [&str; 4] = [
    "proxy.istio.io/config",
    "inject.istio.io/templates",
    "istio.io/reroute-virtual-interfaces",
    "prometheus.istio.io/merge-metrics",
];
/// Keys under the prefixes that are not settings: the pod's injection
/// choice (it decides, it does not shape) and what the injection records.
const NOT_SETTINGS: [&str; 2] = ["sidecar.istio.io/inject", "sidecar.istio.io/status"];

/// Whether a pod annotation is a per-pod injection setting (and so part of
/// the stamp).
pub fn is_settings_annotation(key: &str) -> bool {
    !NOT_SETTINGS.contains(&key)
        && (SETTINGS_ANNOTATIONS.contains(&key)
            || SETTINGS_PREFIXES.iter().any(|p| key.starts_with(p)))
}

/// The Mesh with `proxy` and `traffic` resolved for a pod through `profiles`
/// (lowest precedence first, as `proxy_profile::select` returns them).
pub fn layered_mesh(mesh: &MeshSpec, profiles: &[&ProxyProfile]) -> MeshSpec {
    let mut layered = mesh.clone();
    for profile in profiles {
        layered.proxy.apply(&profile.spec.proxy);
        layered.traffic.apply(&profile.spec.traffic);
    }
    layered
}

/// The `istio-proxy` image a pod with `annotations` gets from the (layered)
/// Mesh: the pod's `sidecar.istio.io/proxyImage` when it is a full image
/// reference, else the Mesh's.
pub fn expected_proxy_image<'a>(
    layered: &'a MeshSpec,
    annotations: &'a BTreeMap<String, String>,
) -> &'a str {
    annotations
        .get(PROXY_IMAGE)
        .filter(|image| image.contains('/'))
        .map_or(layered.proxy.image.as_str(), String::as_str)
}

/// The stamp of a pod injected by `mesh` through the selected `profiles`,
/// whose annotations (after injection) are `annotations`.
pub fn injection_hash(
    mesh: &MeshSpec,
    profiles: &[&ProxyProfile],
    annotations: &BTreeMap<String, String>,
) -> String {
    let mut shaping = layered_mesh(mesh, profiles);
    if let Some(image) = annotations.get(PROXY_IMAGE).filter(|i| i.contains('/')) {
        shaping.proxy.image.clone_from(image);
        shaping.proxy.init_image.clone_from(image);
    }
    // What decides or is written elsewhere, not what shapes the containers.
    shaping.namespace_selector = None;
    shaping.webhook = WebhookSettings::default();
    shaping.workload_registration = WorkloadRegistration::default();
    shaping.rollout = RolloutSettings::default();
    shaping.revision_tags = Vec::new();
    let defaults = InjectionSettings::default();
    shaping.injection.policy = defaults.policy;
    shaping.injection.always_inject_selector = defaults.always_inject_selector;
    shaping.injection.never_inject_selector = defaults.never_inject_selector;
    let settings = serde_json::to_value(&shaping).unwrap_or(Value::Null);
    let baseline = serde_json::to_value(MeshSpec::default()).unwrap_or(Value::Null);
    let pod_settings: serde_json::Map<String, Value> = annotations
        .iter()
        .filter(|(k, _)| is_settings_annotation(k))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let input = serde_json::json!({
        "revision": mesh.revision,
        "mesh": differences(&settings, &baseline).unwrap_or(Value::Null),
        "annotations": pod_settings,
    });
    let mut canonical = String::new();
    write_canonical(&input, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    let mut hex = String::with_capacity(HASH_LEN);
    for byte in digest.iter().take(HASH_LEN / 2) {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The parts of `value` that differ from `baseline`: objects recursively,
/// anything else whole; `None` when nothing differs.
fn differences(value: &Value, baseline: &Value) -> Option<Value> {
    match (value, baseline) {
        (Value::Object(value), Value::Object(baseline)) => {
            let changed: serde_json::Map<String, Value> = value
                .iter()
                .filter_map(|(k, v)| {
                    let diff = match baseline.get(k) {
                        Some(b) => differences(v, b),
                        None => Some(v.clone()),
                    };
                    diff.map(|d| (k.clone(), d))
                })
                .collect();
            // A key the baseline has and the value lacks (a field gone
            // back to unset) is a difference too.
            let removed = baseline.keys().any(|k| !value.contains_key(k));
            (!changed.is_empty() || removed).then(|| {
                let mut changed = changed;
                for k in baseline.keys().filter(|k| !value.contains_key(*k)) {
                    changed.insert(k.clone(), Value::Null);
                }
                Value::Object(changed)
            })
        }
        _ => (value != baseline).then(|| value.clone()),
    }
}

/// Compact JSON with object keys sorted, whatever order the map keeps them in.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::ProxyProfileSpec;
    use crate::settings::{ProxySettingsOverride, TrafficSettingsOverride};

    fn annotations(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn profile(proxy: ProxySettingsOverride) -> ProxyProfile {
        ProxyProfile {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: ProxyProfileSpec {
                selector: None,
                proxy,
                traffic: TrafficSettingsOverride::default(),
            },
        }
    }

    #[test]
    fn is_short_hex_and_the_same_for_the_same_settings() {
        let mesh = MeshSpec::default();
        let a = injection_hash(&mesh, &[], &BTreeMap::new());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_eq!(a, injection_hash(&mesh.clone(), &[], &BTreeMap::new()));
    }

    #[test]
    fn does_not_depend_on_map_insertion_order() {
        let mut value = serde_json::Map::new();
        value.insert("b".into(), Value::from(1));
        value.insert("a".into(), serde_json::json!({"z": [1, {"y": 2, "x": 3}]}));
        let mut out = String::new();
        write_canonical(&Value::Object(value), &mut out);
        assert_eq!(out, r#"{"a":{"z":[1,{"x":3,"y":2}]},"b":1}"#);
    }

    #[test]
    fn is_pinned_for_the_default_mesh() {
        // A change here restamps every pod in every cluster: only on purpose.
        assert_eq!(
            injection_hash(&MeshSpec::default(), &[], &BTreeMap::new()),
            "86b80008e0348c92"
        );
    }

    #[test]
    fn changes_with_what_shapes_the_containers() {
        let base = MeshSpec::default();
        let stamp = |mesh: &MeshSpec| injection_hash(mesh, &[], &BTreeMap::new());
        let mut image = base.clone();
        image.proxy.image = "example.com/proxyv2:1.29.0".into();
        let mut revision = base.clone();
        revision.revision = "canary".into();
        let mut secrets = base.clone();
        secrets.injection.image_pull_secrets = vec!["pull".into()];
        let mut capture = base.clone();
        capture.traffic.exclude_outbound_ports = "5432".into();
        for changed in [&image, &revision, &secrets, &capture] {
            assert_ne!(stamp(changed), stamp(&base), "{changed:?}");
        }
    }

    #[test]
    fn ignores_what_only_decides_or_configures_the_webhook() {
        let base = MeshSpec::default();
        let mut other = base.clone();
        other.injection.policy = crate::mesh::InjectionPolicy::Disabled;
        other.webhook.timeout_seconds = 3;
        other.workload_registration.enabled = false;
        other.namespace_selector = Some(Default::default());
        other.rollout.paused = true;
        other.revision_tags = vec!["stable".into()];
        assert_eq!(
            injection_hash(&base, &[], &BTreeMap::new()),
            injection_hash(&other, &[], &BTreeMap::new())
        );
    }

    #[test]
    fn a_profile_counts_field_by_field_and_only_when_it_changes_something() {
        let mesh = MeshSpec::default();
        let base = injection_hash(&mesh, &[], &BTreeMap::new());
        let same_image = profile(ProxySettingsOverride {
            image: Some(mesh.proxy.image.clone()),
            ..Default::default()
        });
        assert_eq!(
            injection_hash(&mesh, &[&same_image], &BTreeMap::new()),
            base
        );
        let logs = profile(ProxySettingsOverride {
            log_level: Some("debug".into()),
            ..Default::default()
        });
        assert_ne!(injection_hash(&mesh, &[&logs], &BTreeMap::new()), base);
    }

    #[test]
    fn counts_settings_annotations_only() {
        let mesh = MeshSpec::default();
        let base = injection_hash(&mesh, &[], &BTreeMap::new());
        let unrelated = annotations(&[
            ("prometheus.io/port", "15020"),
            ("sidecar.istio.io/status", "{}"),
            ("sidecar.istio.io/inject", "true"),
            (INJECTION_HASH, "0000000000000000"),
        ]);
        assert_eq!(injection_hash(&mesh, &[], &unrelated), base);
        for key in [
            "sidecar.istio.io/logLevel",
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "proxy.istio.io/config",
            "status.sidecar.istio.io/port",
        ] {
            assert_ne!(
                injection_hash(&mesh, &[], &annotations(&[(key, "1")])),
                base,
                "{key}"
            );
        }
    }

    #[test]
    fn a_pinned_image_hides_mesh_image_changes() {
        let pinned = annotations(&[(PROXY_IMAGE, "example.com/own:1")]);
        let mut newer = MeshSpec::default();
        newer.proxy.image = "example.com/proxyv2:1.29.0".into();
        assert_eq!(
            injection_hash(&MeshSpec::default(), &[], &pinned),
            injection_hash(&newer, &[], &pinned)
        );
        assert_eq!(expected_proxy_image(&newer, &pinned), "example.com/own:1");
        let short = annotations(&[(PROXY_IMAGE, "own:1")]);
        assert_eq!(
            expected_proxy_image(&newer, &short),
            "example.com/proxyv2:1.29.0",
            "a value without '/' is ignored, as the injector ignores it"
        );
    }
}
