//! The patch between two typed pods, compared field by field: what is
//! equal is skipped without being turned into JSON, what differs is written
//! straight from the typed value, and only a field that changed in place
//! (an annotation map, a probe) is compared as JSON ([`super::json`]).
//!
//! Every field of the structs walked here is listed by name: the listing
//! destructures the struct without `..`, so a field k8s-openapi adds fails
//! to compile until it is listed, and a test checks each listed JSON name
//! against the field's serialised form.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use json_patch::jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::array::{self, Element};
use super::writer::Writer;

/// Writes the patch from `before` to `after`.
pub(super) fn diff(before: &Pod, after: &Pod, out: &mut Writer) {
    pod(before, after, &mut PointerBuf::new(), out);
}

/// A struct field as it is serialised: present or absent.
trait Field {
    type Value: Serialize;
    fn get(&self) -> Option<&Self::Value>;
}

impl<T: Serialize> Field for Option<T> {
    type Value = T;
    fn get(&self) -> Option<&T> {
        self.as_ref()
    }
}

/// Required fields, always serialised.
macro_rules! required_fields {
    ($($t:ty),*) => {$(
        impl Field for $t {
            type Value = Self;
            fn get(&self) -> Option<&Self> {
                Some(self)
            }
        }
    )*};
}
required_fields!(String, Vec<Container>, ObjectMeta);

/// Writes the patch for one field named `name` in JSON: set when it
/// appears, removed when it goes, and compared by `strategy` when both
/// sides have it and they differ.
fn field<F, S>(
    name: &str,
    before: &F,
    after: &F,
    path: &mut PointerBuf,
    out: &mut Writer,
    strategy: S,
) where
    F: Field + PartialEq,
    S: FnOnce(&F::Value, &F::Value, &mut PointerBuf, &mut Writer),
{
    if before == after {
        return;
    }
    path.push_back(name);
    match (before.get(), after.get()) {
        (Some(old), Some(new)) => strategy(old, new, path, out),
        (None, Some(new)) => out.add(path, new),
        (Some(_), None) => out.remove(path),
        (None, None) => {}
    }
    path.pop_back();
}

/// A function that writes the patch for each differing field of a struct,
/// as its listed strategy says; and, for tests, a setter per field.
macro_rules! struct_diff {
    ($(#[$doc:meta])* fn $name:ident($Type:ident) { $($field:ident: $json:literal => $strategy:expr),* $(,)? }) => {
        $(#[$doc])*
        fn $name(before: &$Type, after: &$Type, path: &mut PointerBuf, out: &mut Writer) {
            // Exhaustive: a field k8s-openapi adds must be listed.
            let $Type { $($field: _),* } = before;
            $( field($json, &before.$field, &after.$field, path, out, $strategy); )*
        }

        #[cfg(test)]
        impl tests::Listed for $Type {
            fn setters() -> Vec<(&'static str, tests::Setter<Self>)> {
                vec![$(($json, |value: &mut Self| value.$field = tests::Sample::sample())),*]
            }
        }
    };
}

struct_diff! {
    /// A pod: its metadata and spec field by field, its status as JSON.
    fn pod(Pod) {
        metadata: "metadata" => object_meta,
        spec: "spec" => pod_spec,
        status: "status" => json,
    }
}

/// Metadata field by field; set whole when the object sent had none (the
/// typed pod reads a missing `metadata` as an empty one).
fn object_meta(before: &ObjectMeta, after: &ObjectMeta, path: &mut PointerBuf, out: &mut Writer) {
    if *before == ObjectMeta::default() {
        out.add(path, after);
    } else {
        object_meta_fields(before, after, path, out);
    }
}

struct_diff! {
    /// Metadata: labels and annotations compared key by key.
    fn object_meta_fields(ObjectMeta) {
        annotations: "annotations" => string_map,
        creation_timestamp: "creationTimestamp" => json,
        deletion_grace_period_seconds: "deletionGracePeriodSeconds" => json,
        deletion_timestamp: "deletionTimestamp" => json,
        finalizers: "finalizers" => json,
        generate_name: "generateName" => json,
        generation: "generation" => json,
        labels: "labels" => string_map,
        managed_fields: "managedFields" => json,
        name: "name" => json,
        namespace: "namespace" => json,
        owner_references: "ownerReferences" => json,
        resource_version: "resourceVersion" => json,
        self_link: "selfLink" => json,
        uid: "uid" => json,
    }
}

struct_diff! {
    /// A pod spec: containers and volumes aligned by name, each container
    /// field by field.
    fn pod_spec(PodSpec) {
        active_deadline_seconds: "activeDeadlineSeconds" => json,
        affinity: "affinity" => json,
        automount_service_account_token: "automountServiceAccountToken" => json,
        containers: "containers" => named_list,
        dns_config: "dnsConfig" => json,
        dns_policy: "dnsPolicy" => json,
        enable_service_links: "enableServiceLinks" => json,
        ephemeral_containers: "ephemeralContainers" => json,
        host_aliases: "hostAliases" => json,
        host_ipc: "hostIPC" => json,
        host_network: "hostNetwork" => json,
        host_pid: "hostPID" => json,
        host_users: "hostUsers" => json,
        hostname: "hostname" => json,
        hostname_override: "hostnameOverride" => json,
        image_pull_secrets: "imagePullSecrets" => json,
        init_containers: "initContainers" => named_list,
        node_name: "nodeName" => json,
        node_selector: "nodeSelector" => json,
        os: "os" => json,
        overhead: "overhead" => json,
        preemption_policy: "preemptionPolicy" => json,
        priority: "priority" => json,
        priority_class_name: "priorityClassName" => json,
        readiness_gates: "readinessGates" => json,
        resource_claims: "resourceClaims" => json,
        resources: "resources" => json,
        restart_policy: "restartPolicy" => json,
        runtime_class_name: "runtimeClassName" => json,
        scheduler_name: "schedulerName" => json,
        scheduling_gates: "schedulingGates" => json,
        scheduling_group: "schedulingGroup" => json,
        security_context: "securityContext" => json,
        service_account: "serviceAccount" => json,
        service_account_name: "serviceAccountName" => json,
        set_hostname_as_fqdn: "setHostnameAsFQDN" => json,
        share_process_namespace: "shareProcessNamespace" => json,
        subdomain: "subdomain" => json,
        termination_grace_period_seconds: "terminationGracePeriodSeconds" => json,
        tolerations: "tolerations" => json,
        topology_spread_constraints: "topologySpreadConstraints" => json,
        volumes: "volumes" => named_list,
    }
}

struct_diff! {
    /// A container, field by field.
    fn container(Container) {
        args: "args" => json,
        command: "command" => json,
        env: "env" => json,
        env_from: "envFrom" => json,
        image: "image" => json,
        image_pull_policy: "imagePullPolicy" => json,
        lifecycle: "lifecycle" => json,
        liveness_probe: "livenessProbe" => json,
        name: "name" => json,
        ports: "ports" => json,
        readiness_probe: "readinessProbe" => json,
        resize_policy: "resizePolicy" => json,
        resources: "resources" => json,
        restart_policy: "restartPolicy" => json,
        restart_policy_rules: "restartPolicyRules" => json,
        security_context: "securityContext" => json,
        startup_probe: "startupProbe" => json,
        stdin: "stdin" => json,
        stdin_once: "stdinOnce" => json,
        termination_message_path: "terminationMessagePath" => json,
        termination_message_policy: "terminationMessagePolicy" => json,
        tty: "tty" => json,
        volume_devices: "volumeDevices" => json,
        volume_mounts: "volumeMounts" => json,
        working_dir: "workingDir" => json,
    }
}

/// Both sides as JSON, compared by [`super::json::diff`].
fn json<T: Serialize>(before: &T, after: &T, path: &mut PointerBuf, out: &mut Writer) {
    json_element(before, after, path, out, true);
}

fn json_element<T: Serialize>(
    before: &T,
    after: &T,
    path: &mut PointerBuf,
    out: &mut Writer,
    member: bool,
) {
    match (serde_json::to_value(before), serde_json::to_value(after)) {
        (Ok(before), Ok(after)) => super::json::diff(&before, &after, path, out, member),
        (Err(e), _) | (_, Err(e)) => out.fail(e),
    }
}

/// A map of strings (labels, annotations) key by key; set whole when the
/// object sent had an empty one, as [`super::json::diff`] does.
fn string_map(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    path: &mut PointerBuf,
    out: &mut Writer,
) {
    if before.is_empty() {
        out.add(path, after);
        return;
    }
    for key in before.keys().filter(|key| !after.contains_key(*key)) {
        path.push_back(key.as_str());
        out.remove(path);
        path.pop_back();
    }
    for (key, value) in after {
        if before.get(key) != Some(value) {
            path.push_back(key.as_str());
            out.add(path, value);
            path.pop_back();
        }
    }
}

/// A list of named items aligned by name ([`array::diff`]); set whole when
/// the object sent had an empty one, as [`super::json::diff`] does.
#[expect(
    clippy::ptr_arg,
    reason = "a field strategy takes the field's own type"
)]
fn named_list<T: Element>(
    before: &Vec<T>,
    after: &Vec<T>,
    path: &mut PointerBuf,
    out: &mut Writer,
) {
    if before.is_empty() {
        out.add(path, after);
    } else {
        array::diff(before, after, path, out);
    }
}

fn name_identity(name: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

impl Element for Container {
    fn identity(&self) -> Option<u64> {
        Some(name_identity(&self.name))
    }

    fn diff(&self, after: &Self, path: &mut PointerBuf, out: &mut Writer) {
        container(self, after, path, out);
    }
}

impl Element for Volume {
    fn identity(&self) -> Option<u64> {
        Some(name_identity(&self.name))
    }

    fn diff(&self, after: &Self, path: &mut PointerBuf, out: &mut Writer) {
        json_element(self, after, path, out, false);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Sets one field of a `T`.
    pub(super) type Setter<T> = fn(&mut T);

    /// A struct whose fields [`struct_diff`] lists.
    pub(super) trait Listed: Default + Serialize + Sized {
        /// Each listed JSON name, with a function that sets its field.
        fn setters() -> Vec<(&'static str, Setter<Self>)>;
    }

    /// A value that is present when serialised, unlike the default.
    pub(super) trait Sample {
        fn sample() -> Self;
    }

    /// The first of a few small JSON values the field's type reads.
    impl<T: serde::de::DeserializeOwned> Sample for Option<T> {
        fn sample() -> Self {
            let candidates = [
                json!({}),
                json!([]),
                json!("2026-01-01T00:00:00Z"),
                json!(0),
                json!(false),
            ];
            candidates
                .into_iter()
                .find_map(|candidate| serde_json::from_value(candidate).ok())
        }
    }

    impl<T: Default> Sample for Vec<T> {
        fn sample() -> Self {
            vec![T::default()]
        }
    }

    impl Sample for String {
        fn sample() -> Self {
            "sample".to_owned()
        }
    }

    impl Sample for ObjectMeta {
        fn sample() -> Self {
            ObjectMeta {
                name: Some("sample".to_owned()),
                ..ObjectMeta::default()
            }
        }
    }

    /// Setting each listed field alone gives a patch under that field's
    /// JSON name that turns the default into the changed value.
    fn check_listed_names<T: Listed>(diff: fn(&T, &T, &mut PointerBuf, &mut Writer)) {
        let base = T::default();
        let base_json = serde_json::to_value(&base).expect("serialises");
        for (name, set) in T::setters() {
            let mut changed = T::default();
            set(&mut changed);
            let mut out = Writer::with_capacity(0);
            diff(&base, &changed, &mut PointerBuf::new(), &mut out);
            let json = out
                .finish()
                .expect("serialises")
                .unwrap_or_else(|| panic!("{name}: no sample value, or no patch"));
            let patch: json_patch::Patch = serde_json::from_slice(&json).expect("JSONPatch");
            let prefix = format!("/{name}");
            for op in &patch.0 {
                assert!(op.path().as_str().starts_with(&prefix), "{name}: {op:?}");
            }
            let mut patched = base_json.clone();
            json_patch::patch(&mut patched, &patch.0).expect("applies");
            let expected: Value = serde_json::to_value(&changed).expect("serialises");
            assert_eq!(patched, expected, "{name}");
        }
    }

    #[test]
    fn every_listed_name_is_the_fields_json_name() {
        check_listed_names::<Pod>(pod);
        check_listed_names::<ObjectMeta>(object_meta_fields);
        check_listed_names::<PodSpec>(pod_spec);
        check_listed_names::<Container>(container);
    }
}
