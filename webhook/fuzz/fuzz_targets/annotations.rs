//! Arbitrary values (and keys) for the annotations and labels the injector
//! reads, on a Deployment-style pod, through the whole review.

#![no_main]

use arbitrary::Arbitrary;
use ferrimesh_webhook::inject::annotations as a;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const KEYS: &[&str] = &[
    a::INJECT,
    a::STATUS,
    a::NATIVE_SIDECAR,
    a::PROXY_IMAGE,
    a::LOG_LEVEL,
    a::COMPONENT_LOG_LEVEL,
    a::AGENT_LOG_LEVEL,
    a::PROXY_CPU,
    a::PROXY_MEMORY,
    a::PROXY_CPU_LIMIT,
    a::PROXY_MEMORY_LIMIT,
    a::INTERCEPTION_MODE,
    a::USER_VOLUME,
    a::USER_VOLUME_MOUNT,
    a::REWRITE_APP_PROBES,
    a::STATUS_PORT,
    a::READINESS_INITIAL_DELAY,
    a::READINESS_PERIOD,
    a::READINESS_FAILURE_THRESHOLD,
    a::INCLUDE_OUTBOUND_IP_RANGES,
    a::EXCLUDE_OUTBOUND_IP_RANGES,
    a::INCLUDE_INBOUND_PORTS,
    a::EXCLUDE_INBOUND_PORTS,
    a::INCLUDE_OUTBOUND_PORTS,
    a::EXCLUDE_OUTBOUND_PORTS,
    a::EXCLUDE_INTERFACES,
    a::KUBEVIRT_INTERFACES,
    a::REROUTE_VIRTUAL_INTERFACES,
    a::PROXY_CONFIG,
    a::PROXY_OVERRIDES,
    a::MERGE_METRICS,
    a::SCRAPE_TARGETS,
    a::SECURE_PORT,
    a::REVISION,
    a::DEFAULT_CONTAINER,
    a::DEFAULT_LOGS_CONTAINER,
    a::TLS_MODE_LABEL,
    a::CANONICAL_NAME_LABEL,
    a::CANONICAL_REVISION_LABEL,
    a::WORKLOAD_NAME_LABEL,
    a::NETWORK_LABEL,
    a::TUNNEL_LABEL,
    "prometheus.io/scrape",
    "prometheus.io/port",
    "prometheus.io/path",
    "app",
    "version",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

impl Key {
    fn name(&self) -> String {
        match self {
            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_owned(),
            Key::Other(name) => name.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(Key, String)>,
    labels: Vec<(Key, String)>,
    /// Give the app container probes (rewritten to the agent's port).
    probes: bool,
    /// Start with a user-given `istio-proxy` container (overridden).
    own_proxy: Option<String>,
}

fn map(entries: &[(Key, String)]) -> Value {
    let map: Map<String, Value> = entries
        .iter()
        .map(|(k, v)| (k.name(), Value::String(v.clone())))
        .collect();
    Value::Object(map)
}

fuzz_target!(|input: Input| {
    let mut containers = vec![json!({
        "name": "web", "image": "web:1",
        "ports": [{"containerPort": 8080, "name": "http"}]
    })];
    if input.probes {
        containers[0]["readinessProbe"] = json!({"httpGet": {"path": "/ready", "port": 8080}});
        containers[0]["livenessProbe"] = json!({"httpGet": {"path": "/live", "port": "http"}});
    }
    if let Some(image) = &input.own_proxy {
        containers.push(json!({"name": "istio-proxy", "image": image}));
    }
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "fuzz",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "fuzz"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "web-7c9f-",
                    "namespace": "shop",
                    "labels": map(&input.labels),
                    "annotations": map(&input.annotations),
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                         "name": "web-7c9f", "uid": "u1", "controller": true}]
                },
                "spec": {"containers": containers}
            }
        }
    });
    let body = serde_json::to_vec(&body).expect("JSON");
    ferrimesh_webhook_fuzz::check::admission_review(&body);
});
