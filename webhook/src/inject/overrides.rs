//! Containers laid over containers: the user's own `istio-proxy` /
//! `istio-init` over the injected ones, and a fresh injection over the
//! sidecar an earlier injection left (re-injection).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Container;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::json::Object;
use super::quantity::canonicalize;
use crate::Result;

/// The merge key of each keyed list of a container (Kubernetes' strategic
/// merge keys).
const KEYED_LISTS: [(&str, &str); 3] = [
    ("env", "name"),
    ("volumeMounts", "mountPath"),
    ("ports", "containerPort"),
];

/// Go's field order of `core/v1.Container`, used for the overrides annotation.
const CONTAINER_FIELD_ORDER: [&str; 26] = [
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "ports",
    "envFrom",
    "env",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "restartPolicyRules",
    "volumeMounts",
    "volumeDevices",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
    "stopSignal",
];

/// How `overlay` treats nested objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Objects merge recursively (a user override naming one resource
    /// limit keeps the others).
    Deep,
    /// Each top-level field the overlay sets replaces the base's (a fresh
    /// injection over an old sidecar).
    TopLevel,
}

/// Merges `over` into `base` by `key`: an entry replaces the first base
/// entry with the same key, others are appended. One hash lookup per entry
/// (a user's `istio-proxy` may carry thousands of env vars).
fn merge_keyed(base: &mut Vec<Value>, over: &[Value], key: &str) {
    let id_of = |item: &Value| item.get(key).map(Value::to_string);
    let mut position: HashMap<String, usize> = HashMap::with_capacity(base.len() + over.len());
    for (at, item) in base.iter().enumerate() {
        if let Some(id) = id_of(item) {
            position.entry(id).or_insert(at);
        }
    }
    for item in over {
        match id_of(item) {
            Some(id) => match position.get(&id) {
                Some(&at) => base[at] = item.clone(),
                None => {
                    position.insert(id, base.len());
                    base.push(item.clone());
                }
            },
            None => base.push(item.clone()),
        }
    }
}

fn merge_object(base: &mut Map<String, Value>, over: &Map<String, Value>, depth: Depth, top: bool) {
    for (field, value) in over {
        let keyed = top
            .then(|| {
                KEYED_LISTS
                    .iter()
                    .find(|(f, _)| f == field)
                    .map(|(_, k)| *k)
            })
            .flatten();
        match (base.get_mut(field), value, keyed) {
            (Some(Value::Array(b)), Value::Array(o), Some(key)) => merge_keyed(b, o, key),
            (Some(Value::Object(b)), Value::Object(o), _) if depth == Depth::Deep => {
                merge_object(b, o, depth, false)
            }
            _ => {
                base.insert(field.clone(), value.clone());
            }
        }
    }
}

/// Lays `over` onto `base`: keyed lists (env, volumeMounts, ports) merge by
/// key with new entries after the base's; other lists and scalars replace.
/// An `image` of `auto` keeps the base's image.
pub fn overlay(base: &Container, over: &Container, depth: Depth) -> Result<Container> {
    let mut base = serde_json::to_value(base)?;
    let mut over = serde_json::to_value(over)?;
    if let Some(o) = over.as_object_mut()
        && o.get("image").and_then(Value::as_str) == Some("auto")
    {
        o.remove("image");
    }
    if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
        merge_object(b, o, depth, true);
    }
    Ok(serde_json::from_value(base)?)
}

/// The user's override containers, as recorded in `proxy.istio.io/overrides`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Overrides {
    /// Overrides of regular containers (`istio-proxy` in the classic layout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    /// Overrides of init containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
}

impl Overrides {
    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.init_containers.is_empty()
    }

    /// The override for the container `name`, wherever the user put it.
    pub fn get(&self, name: &str) -> Option<&Container> {
        self.containers
            .iter()
            .chain(&self.init_containers)
            .find(|c| c.name == name)
    }

    /// The annotation value: compact JSON, containers in Kubernetes' field
    /// order, `resources` always present, an `auto` image left out, and
    /// quantities in canonical form.
    pub fn to_annotation(&self) -> Result<String> {
        let render = |list: &[Container]| -> Result<Vec<Object>> {
            list.iter().map(container_for_annotation).collect()
        };
        let mut object = Object::new();
        if !self.containers.is_empty() {
            object.insert("containers", &render(&self.containers)?);
        }
        if !self.init_containers.is_empty() {
            object.insert("initContainers", &render(&self.init_containers)?);
        }
        Ok(object.to_string())
    }

    /// Parses the annotation value.
    pub fn parse(value: &str) -> Result<Self> {
        Ok(serde_json::from_str(value)?)
    }
}

/// Writes the quantities of a container's resources in canonical form, so a
/// user's `2048Mi` and the recorded `2Gi` inject the same pod.
pub fn canonicalize_resources(container: &mut Container) {
    if let Some(resources) = container.resources.as_mut() {
        let maps = [resources.requests.as_mut(), resources.limits.as_mut()];
        for quantity in maps.into_iter().flatten().flat_map(|m| m.values_mut()) {
            if let Ok(canonical) = canonicalize(&quantity.0) {
                quantity.0 = canonical;
            }
        }
    }
}

fn container_for_annotation(container: &Container) -> Result<Object> {
    let mut container = container.clone();
    canonicalize_resources(&mut container);
    let Value::Object(mut fields) = serde_json::to_value(&container)? else {
        return Ok(Object::new());
    };
    if fields.get("image").and_then(Value::as_str) == Some("auto") {
        fields.remove("image");
    }
    fields
        .entry("resources")
        .or_insert_with(|| Value::Object(Map::new()));
    let mut ordered = Object::new();
    for field in CONTAINER_FIELD_ORDER {
        if let Some(value) = fields.remove(field) {
            ordered.insert(field, &value);
        }
    }
    for (field, value) in &fields {
        ordered.insert(field, value);
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    #[test]
    fn keyed_merge_replaces_by_key_and_appends_new_entries_in_order() {
        let mut base = vec![
            serde_json::json!({"name": "A", "value": "1"}),
            serde_json::json!({"name": "B", "value": "2"}),
        ];
        let over = [
            serde_json::json!({"name": "B", "value": "3"}),
            serde_json::json!({"name": "C", "value": "4"}),
            serde_json::json!({"value": "no key"}),
            serde_json::json!({"name": "C", "value": "5"}),
        ];
        merge_keyed(&mut base, &over, "name");
        assert_eq!(
            base,
            [
                serde_json::json!({"name": "A", "value": "1"}),
                serde_json::json!({"name": "B", "value": "3"}),
                serde_json::json!({"name": "C", "value": "5"}),
                serde_json::json!({"value": "no key"}),
            ]
        );
    }

    fn env(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn limits(kv: &[(&str, &str)]) -> Option<ResourceRequirements> {
        Some(ResourceRequirements {
            limits: Some(
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect(),
            ),
            ..Default::default()
        })
    }

    #[test]
    fn user_override_merges_keyed_lists_and_replaces_args() {
        let injected = Container {
            name: "istio-proxy".into(),
            image: Some("proxy:1".into()),
            args: Some(vec!["a".into(), "b".into()]),
            env: Some(vec![env("A", "1"), env("B", "2")]),
            resources: limits(&[("cpu", "2"), ("memory", "1Gi")]),
            ..Default::default()
        };
        let user = Container {
            name: "istio-proxy".into(),
            image: Some("auto".into()),
            args: Some(vec!["c".into()]),
            env: Some(vec![env("B", "user"), env("C", "3")]),
            resources: limits(&[("cpu", "500m")]),
            ..Default::default()
        };
        let merged = overlay(&injected, &user, Depth::Deep).expect("merge");
        assert_eq!(merged.image.as_deref(), Some("proxy:1"));
        assert_eq!(merged.args, Some(vec!["c".to_owned()]));
        assert_eq!(
            merged.env,
            Some(vec![env("A", "1"), env("B", "user"), env("C", "3")])
        );
        assert_eq!(
            merged.resources,
            limits(&[("cpu", "500m"), ("memory", "1Gi")])
        );
    }

    #[test]
    fn top_level_overlay_replaces_whole_fields_and_keeps_unproduced_env() {
        let old = Container {
            name: "istio-proxy".into(),
            env: Some(vec![env("A", "old"), env("ISTIO_KUBE_APP_PROBERS", "{}")]),
            resources: limits(&[("cpu", "2"), ("memory", "1Gi")]),
            ..Default::default()
        };
        let fresh = Container {
            name: "istio-proxy".into(),
            env: Some(vec![env("A", "new")]),
            resources: limits(&[("cpu", "1")]),
            ..Default::default()
        };
        let merged = overlay(&old, &fresh, Depth::TopLevel).expect("merge");
        assert_eq!(
            merged.env,
            Some(vec![env("A", "new"), env("ISTIO_KUBE_APP_PROBERS", "{}")])
        );
        assert_eq!(merged.resources, limits(&[("cpu", "1")]));
    }

    #[test]
    fn overrides_annotation_uses_kubernetes_field_order() {
        let overrides = Overrides {
            containers: vec![Container {
                name: "istio-proxy".into(),
                image: Some("auto".into()),
                env: Some(vec![env("A", "1")]),
                resources: limits(&[("cpu", "2000m")]),
                ..Default::default()
            }],
            init_containers: vec![],
        };
        let text = overrides.to_annotation().expect("render");
        assert_eq!(
            text,
            r#"{"containers":[{"name":"istio-proxy","env":[{"name":"A","value":"1"}],"resources":{"limits":{"cpu":"2"}}}]}"#
        );
        assert_eq!(
            Overrides::parse(&text).expect("parse").containers[0].name,
            "istio-proxy"
        );
        let bare = Overrides {
            init_containers: vec![Container {
                name: "istio-init".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            bare.to_annotation().expect("render"),
            r#"{"initContainers":[{"name":"istio-init","resources":{}}]}"#
        );
    }
}
