//! Containers laid over containers: the user's own `istio-proxy` /
//! `istio-init` over the injected ones, and a fresh injection over the
//! sidecar an earlier injection left (re-injection).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::cni::VALIDATION;
use super::containers::{INIT, PROXY};
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

/// Kubernetes' strategic merge of a list with a merge key: each entry of
/// `over` is merged into the entry of `base` with the same key (or is new;
/// a key repeated in `over` merges into its first entry), and the result is
/// ordered as the API machinery orders it: the entries only `base` has, in
/// its order, merged with `over`'s, in its order, by their position in
/// `base`, where an entry new to `base` comes first. Linear in the entries
/// (a user's `istio-proxy` may carry thousands of env vars).
fn merge_keyed(base: &mut Vec<Value>, over: &[Value], key: &str) {
    merge_keyed_with(base, over, key, merge_value);
}

/// [`merge_keyed`], merging two entries of the same key with `merge`.
fn merge_keyed_with(
    base: &mut Vec<Value>,
    over: &[Value],
    key: &str,
    merge: fn(&mut Value, &Value),
) {
    let id_of = |item: &Value| item.get(key).map(Value::to_string);
    let mut in_base: HashMap<String, usize> = HashMap::with_capacity(base.len());
    for (at, item) in base.iter().enumerate() {
        if let Some(id) = id_of(item) {
            in_base.entry(id).or_insert(at);
        }
    }
    // (position in base, merged entry), in `over`'s order.
    let mut patch: Vec<(Option<usize>, Value)> = Vec::with_capacity(over.len());
    let mut in_patch: HashMap<String, usize> = HashMap::with_capacity(over.len());
    let mut taken = vec![false; base.len()];
    for item in over {
        let Some(id) = id_of(item) else {
            patch.push((None, item.clone()));
            continue;
        };
        if let Some(&at) = in_patch.get(&id) {
            merge(&mut patch[at].1, item);
            continue;
        }
        in_patch.insert(id.clone(), patch.len());
        match in_base.get(&id) {
            Some(&at) => {
                taken[at] = true;
                let mut merged = base[at].clone();
                merge(&mut merged, item);
                patch.push((Some(at), merged));
            }
            None => patch.push((None, item.clone())),
        }
    }
    let old = std::mem::take(base);
    let mut server_only = old
        .into_iter()
        .enumerate()
        .filter(|(at, _)| !taken[*at])
        .peekable();
    let mut patch = patch.into_iter().peekable();
    loop {
        let take_server = match (server_only.peek(), patch.peek()) {
            (Some((left, _)), Some((right, _))) => right.is_some_and(|right| *left < right),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if take_server {
            server_only.next().map(|(_, item)| item)
        } else {
            patch.next().map(|(_, item)| item)
        };
        base.extend(next);
    }
}

/// Objects merge field by field, recursively; anything else is replaced.
fn merge_value(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => merge_object(b, o, false),
        (slot, value) => *slot = value.clone(),
    }
}

fn merge_object(base: &mut Map<String, Value>, over: &Map<String, Value>, top: bool) {
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
            (Some(slot), value, _) => merge_value(slot, value),
            (None, value, _) => {
                base.insert(field.clone(), value.clone());
            }
        }
    }
}

/// Kubernetes' strategic merge of a pod's list of objects keyed by `name`
/// (volumes, pull secrets), in its order (see [`merge_keyed`]).
pub fn merge_named(base: &mut Vec<Value>, over: &[Value]) {
    merge_keyed(base, over, "name");
}

/// Kubernetes' strategic merge of a pod's list of containers: entries of
/// the same name merged as [`overlay`] merges two containers (without its
/// `image: auto` rule), in the strategic merge's order.
pub fn merge_containers(base: &mut Vec<Value>, over: &[Value]) {
    merge_keyed_with(base, over, "name", |base, over| match (base, over) {
        (Value::Object(b), Value::Object(o)) => merge_object(b, o, true),
        (slot, value) => *slot = value.clone(),
    });
}

/// Merges one JSON object into another as Kubernetes' strategic merge
/// patch does for fields with no merge key: objects recursively, anything
/// else replaced.
pub fn merge_json(base: &mut Value, over: &Value) {
    merge_value(base, over);
}

/// Lays `over` onto `base` as Istio does, with Kubernetes' strategic merge
/// patch: keyed lists (env, volumeMounts, ports) merge entry by entry on
/// their key, new entries after the base's; objects merge recursively;
/// other lists and scalars replace. An `image` of `auto` keeps the base's
/// image.
pub fn overlay(base: &Container, over: &Container) -> Result<Container> {
    let mut base = serde_json::to_value(base)?;
    let mut over = serde_json::to_value(over)?;
    if let Some(o) = over.as_object_mut()
        && o.get("image").and_then(Value::as_str) == Some("auto")
    {
        o.remove("image");
    }
    if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
        merge_object(b, o, true);
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

    /// The same overrides, each under the list its injected container ends
    /// up in: `istio-init` (or `istio-validation`) and, when `native`,
    /// `istio-proxy` under `initContainers` (in that order), a classic
    /// `istio-proxy` under `containers`.
    pub fn placed(self, native: bool) -> Self {
        let is_init = |c: &Container| c.name == INIT || c.name == VALIDATION;
        let in_init = |c: &Container| is_init(c) || (native && c.name == PROXY);
        let (mut init_containers, containers): (Vec<_>, Vec<_>) = self
            .containers
            .into_iter()
            .chain(self.init_containers)
            .partition(in_init);
        init_containers.sort_by_key(|c| !is_init(c));
        Self {
            containers,
            init_containers,
        }
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

    /// Parses the annotation value. The `resources: {}` the annotation
    /// always writes reads back as no resources, as the user wrote them.
    pub fn parse(value: &str) -> Result<Self> {
        let mut overrides: Self = serde_json::from_str(value)?;
        let all = overrides
            .containers
            .iter_mut()
            .chain(&mut overrides.init_containers);
        for container in all {
            if container.resources.as_ref().is_some_and(is_empty_resources) {
                container.resources = None;
            }
        }
        Ok(overrides)
    }
}

fn is_empty_resources(resources: &ResourceRequirements) -> bool {
    *resources == ResourceRequirements::default()
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

/// Go's field order of the structs inside a container that the overrides
/// annotation writes, by the container field holding them (lists: of each
/// item); other nested objects keep serde's (alphabetical) order, which is
/// Go's for them.
const NESTED_FIELD_ORDER: [(&str, &[&str]); 7] = [
    (
        "ports",
        &["name", "hostPort", "containerPort", "protocol", "hostIP"],
    ),
    (
        "securityContext",
        &[
            "capabilities",
            "privileged",
            "seLinuxOptions",
            "windowsOptions",
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "readOnlyRootFilesystem",
            "allowPrivilegeEscalation",
            "procMount",
            "seccompProfile",
            "appArmorProfile",
        ],
    ),
    (
        "volumeMounts",
        &[
            "name",
            "readOnly",
            "recursiveReadOnly",
            "mountPath",
            "subPath",
            "mountPropagation",
            "subPathExpr",
        ],
    ),
    ("livenessProbe", PROBE_FIELD_ORDER),
    ("readinessProbe", PROBE_FIELD_ORDER),
    ("startupProbe", PROBE_FIELD_ORDER),
    ("lifecycle", &["postStart", "preStop", "stopSignal"]),
];

/// Go's field order of the structs nested in those of
/// [`NESTED_FIELD_ORDER`] (a probe's or a hook's handler), by the field
/// holding them.
fn child_order(field: &str) -> Option<&'static [&'static str]> {
    match field {
        "httpGet" => Some(&["path", "port", "host", "scheme", "httpHeaders"]),
        "tcpSocket" => Some(&["port", "host"]),
        "postStart" | "preStop" => Some(&["exec", "httpGet", "tcpSocket", "sleep"]),
        _ => None,
    }
}

const PROBE_FIELD_ORDER: &[&str] = &[
    "exec",
    "httpGet",
    "tcpSocket",
    "grpc",
    "initialDelaySeconds",
    "timeoutSeconds",
    "periodSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
];

/// `value`'s fields in `order`, the rest after them.
fn in_order(value: &Value, order: &[&str]) -> Object {
    let mut ordered = Object::new();
    let Value::Object(fields) = value else {
        return ordered;
    };
    let mut insert = |field: &str, v: &Value| match child_order(field) {
        Some(order) if v.is_object() => ordered.insert(field, &in_order(v, order)),
        _ => ordered.insert(field, v),
    };
    for field in order {
        if let Some(v) = fields.get(*field) {
            insert(field, v);
        }
    }
    for (field, v) in fields.iter().filter(|(f, _)| !order.contains(&f.as_str())) {
        insert(field, v);
    }
    ordered
}

/// A container field as the annotation writes it: nested structs in Go's
/// field order.
fn field_for_annotation(field: &str, value: &Value, ordered: &mut Object) {
    match NESTED_FIELD_ORDER.iter().find(|(f, _)| *f == field) {
        Some((_, order)) => match value {
            Value::Array(items) => {
                let items: Vec<Object> = items.iter().map(|i| in_order(i, order)).collect();
                ordered.insert(field, &items);
            }
            Value::Object(_) => ordered.insert(field, &in_order(value, order)),
            other => ordered.insert(field, other),
        },
        None => ordered.insert(field, value),
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
            field_for_annotation(field, &value, &mut ordered);
        }
    }
    for (field, value) in &fields {
        field_for_annotation(field, value, &mut ordered);
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

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
        let merged = overlay(&injected, &user).expect("merge");
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
    fn reinjection_merges_entries_recursively_as_a_strategic_merge_patch_does() {
        let field = |path: &str, api: Option<&str>| EnvVar {
            name: "POD_NAME".into(),
            value: None,
            value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                    api_version: api.map(str::to_owned),
                    field_path: path.into(),
                }),
                ..Default::default()
            }),
        };
        let old = Container {
            name: "istio-proxy".into(),
            env: Some(vec![
                env("A", "old"),
                field("metadata.name", Some("v1")),
                env("ISTIO_KUBE_APP_PROBERS", "{}"),
            ]),
            resources: limits(&[("cpu", "2"), ("memory", "1Gi")]),
            ..Default::default()
        };
        let fresh = Container {
            name: "istio-proxy".into(),
            env: Some(vec![env("A", "new"), field("metadata.name", None)]),
            resources: limits(&[("cpu", "1")]),
            ..Default::default()
        };
        let merged = overlay(&old, &fresh).expect("merge");
        assert_eq!(
            merged.env,
            Some(vec![
                env("A", "new"),
                field("metadata.name", Some("v1")),
                env("ISTIO_KUBE_APP_PROBERS", "{}")
            ]),
            "the API server's defaults and env the new injection does not produce stay"
        );
        assert_eq!(merged.resources, limits(&[("cpu", "1"), ("memory", "1Gi")]));
    }

    #[test]
    fn keyed_merge_orders_entries_as_a_strategic_merge_patch_does() {
        let entry = |name: &str, value: &str| serde_json::json!({"name": name, "value": value});
        let mut base = vec![entry("A", "1"), entry("B", "2")];
        let over = [
            entry("B", "3"),
            entry("C", "4"),
            serde_json::json!({"value": "no key"}),
            entry("C", "5"),
        ];
        merge_keyed(&mut base, &over, "name");
        assert_eq!(
            base,
            [
                entry("A", "1"),
                entry("B", "3"),
                entry("C", "5"),
                serde_json::json!({"value": "no key"}),
            ],
            "A (base only, before B) first; new entries come before later base entries"
        );
        // The template's new port before the user's own (Istio's gateway).
        let port = |n: i32| serde_json::json!({"containerPort": n});
        let mut user = vec![port(15021), port(8080)];
        merge_keyed(&mut user, &[port(15090)], "containerPort");
        assert_eq!(user, [port(15090), port(15021), port(8080)]);
    }

    #[test]
    fn merge_json_merges_objects_and_replaces_the_rest() {
        let mut base =
            serde_json::json!({"configMap": {"name": "a", "defaultMode": 420}, "list": [1, 2]});
        merge_json(
            &mut base,
            &serde_json::json!({"configMap": {"name": "b"}, "list": [3]}),
        );
        assert_eq!(
            base,
            serde_json::json!({"configMap": {"name": "b", "defaultMode": 420}, "list": [3]})
        );
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

    #[test]
    fn overrides_are_placed_where_the_injected_container_ends_up() {
        let named = |name: &str| Container {
            name: name.to_owned(),
            ..Default::default()
        };
        let written = Overrides {
            containers: vec![named(PROXY)],
            init_containers: vec![named(INIT)],
        };
        let native = written.clone().placed(true);
        assert!(native.containers.is_empty());
        let names: Vec<&str> = native
            .init_containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, [INIT, PROXY]);
        let classic = written.placed(false);
        assert_eq!(classic.containers, [named(PROXY)]);
        assert_eq!(classic.init_containers, [named(INIT)]);
    }
}
