//! One admission review: read it, run the engine, answer with the same
//! `uid` and API version, a JSONPatch and warnings (docs/injection.md, section 10).
//!
//! This is plain code over bytes, tested without a server; `server::mod`
//! only moves bytes in and out over HTTPS.

use std::collections::BTreeMap;
use std::time::Instant;

use ferrimesh_crds::mesh::MeshSpec;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, Operation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::metrics::Metrics;
use crate::config::ConfigSource;
use crate::inject::{Environment, Request, inject_with};
use crate::patch;

/// An HTTP-level failure: the review could not even be read, or the
/// server would not take it on.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an injection path.
    NotFound,
    /// An injection path asked with another method than POST.
    MethodNotAllowed,
    /// The body is not JSON.
    UnsupportedMediaType(String),
    /// Empty, malformed, or without a request and uid.
    BadRequest(String),
    /// The body is over the limit (in bytes).
    TooLarge(usize),
    /// The body did not arrive in time.
    Timeout,
    /// The buffered-body budget or the review queue is full.
    Overloaded,
    /// The review was not done in time.
    ReviewTimeout,
    /// The review could not run.
    Internal(String),
}

impl Refusal {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::UnsupportedMediaType(_) => 415,
            Self::BadRequest(_) => 400,
            Self::TooLarge(_) => 413,
            Self::Timeout => 408,
            Self::Overloaded | Self::ReviewTimeout => 503,
            Self::Internal(_) => 500,
        }
    }

    /// The message for the response body.
    pub fn message(&self) -> String {
        match self {
            Self::NotFound => "not found: POST AdmissionReviews to /inject".to_owned(),
            Self::MethodNotAllowed => "method not allowed: POST AdmissionReviews".to_owned(),
            Self::UnsupportedMediaType(got) => {
                format!("unsupported content type {got:?}: send application/json")
            }
            Self::BadRequest(why) | Self::Internal(why) => why.clone(),
            Self::TooLarge(max) => format!("request body over the limit of {max} bytes"),
            Self::Timeout => "request body not received in time".to_owned(),
            Self::Overloaded => "too many requests in progress: retry shortly".to_owned(),
            Self::ReviewTimeout => "the review did not finish in time: retry shortly".to_owned(),
        }
    }

    /// The `type` label of `sidecar_injection_failure_total` it counts under.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotFound
            | Self::MethodNotAllowed
            | Self::UnsupportedMediaType(_)
            | Self::BadRequest(_) => "invalid_request",
            Self::TooLarge(_) => "body_too_large",
            Self::Timeout => "body_timeout",
            Self::Overloaded => "overloaded",
            Self::ReviewTimeout => "review_timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// Seconds a client should wait before trying again (the
    /// `Retry-After` header), for refusals that are about load.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(self, Self::Overloaded | Self::ReviewTimeout).then_some(1)
    }
}

/// What the review came to, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pod was injected.
    Injected,
    /// Not injected, with the reason's metric label.
    Skipped(&'static str),
    /// Not a Pod CREATE: allowed untouched.
    Ignored,
    /// The pod was refused (a bad annotation or setting).
    Rejected,
}

/// The serialised AdmissionReview response.
#[derive(Debug)]
pub struct Answer {
    /// JSON body.
    pub body: Vec<u8>,
    /// What happened.
    pub outcome: Outcome,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(borrow, default)]
    request: Option<&'a RawValue>,
}

/// The response half of an AdmissionReview. Written here rather than with
/// kube's `AdmissionResponse`, which serialises the patch as a JSON array of
/// bytes, about 3.5 times the size of the base64 string the API server reads
/// just as well.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct StatusOut {
    status: &'static str,
    message: String,
    reason: &'static str,
    code: u16,
}

/// Whether a Content-Type header names JSON.
fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case("application/json")
}

/// Reads and answers one review posted to `path`.
pub fn review(
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    source: &dyn ConfigSource,
    metrics: &Metrics,
) -> Result<Answer, Refusal> {
    let started = Instant::now();
    metrics.requests.inc();
    let result = answer(path, content_type, body, source);
    metrics.time.observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(answer) => match answer.outcome {
            Outcome::Injected => {
                metrics.success.inc();
            }
            Outcome::Skipped(reason) => metrics.skip(reason),
            Outcome::Ignored => metrics.skip("not_a_pod_create"),
            Outcome::Rejected => metrics.fail("rejected"),
        },
        Err(refusal) => metrics.fail(refusal.metric_label()),
    }
    result
}

fn answer(
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    source: &dyn ConfigSource,
) -> Result<Answer, Refusal> {
    let environment = Environment::from_path(path).ok_or(Refusal::NotFound)?;
    let content_type = content_type.unwrap_or_default();
    if !is_json(content_type) {
        return Err(Refusal::UnsupportedMediaType(content_type.to_owned()));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Refusal::BadRequest(
            "empty body: expected an AdmissionReview".to_owned(),
        ));
    }
    // JSON is UTF-8 throughout, also in the strings the envelope skips.
    let body = std::str::from_utf8(body).map_err(|e| {
        Refusal::BadRequest(format!("malformed AdmissionReview: body is not UTF-8: {e}"))
    })?;
    let envelope: Envelope<'_> = serde_json::from_str(body)
        .map_err(|e| Refusal::BadRequest(format!("malformed AdmissionReview: {e}")))?;
    let api_version = envelope
        .api_version
        .as_deref()
        .unwrap_or("admission.k8s.io/v1");
    if !matches!(
        api_version,
        "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
    ) {
        return Err(Refusal::BadRequest(format!(
            "unsupported AdmissionReview apiVersion {api_version:?}: want admission.k8s.io/v1 or v1beta1"
        )));
    }
    let raw = envelope
        .request
        .ok_or_else(|| Refusal::BadRequest("AdmissionReview has no request".to_owned()))?;
    if let Ok(shape) = serde_json::from_str::<shape::Request>(raw.get())
        && let Some(too_large) = shape.too_large()
    {
        check_uid(&shape.uid)?;
        return Ok(respond(
            api_version,
            &shape.uid,
            Verdict::Deny(format!("ferrimesh sidecar injector: {too_large}")),
            Vec::new(),
            Outcome::Rejected,
        ));
    }
    let request: AdmissionRequest<Pod> = match serde_json::from_str(raw.get()) {
        Ok(request) => request,
        Err(pod_error) => {
            // Not readable as a Pod review: answer by uid when there is one.
            let generic: AdmissionRequest<DynamicObject> = serde_json::from_str(raw.get())
                .map_err(|e| {
                    Refusal::BadRequest(format!("malformed AdmissionReview request: {e}"))
                })?;
            check_uid(&generic.uid)?;
            return if generic.kind.kind == "Pod" && generic.kind.group.is_empty() {
                let message = format!("pod cannot be read: {pod_error}");
                Ok(respond(
                    api_version,
                    &generic.uid,
                    Verdict::Deny(message),
                    Vec::new(),
                    Outcome::Rejected,
                ))
            } else {
                Ok(respond(
                    api_version,
                    &generic.uid,
                    Verdict::Allow(None),
                    Vec::new(),
                    Outcome::Ignored,
                ))
            };
        }
    };
    check_uid(&request.uid)?;
    let is_pod_create = request.kind.kind == "Pod"
        && request.kind.group.is_empty()
        && matches!(request.operation, Operation::Create)
        && request.sub_resource.is_none();
    let Some(mut pod) = request.object.filter(|_| is_pod_create) else {
        return Ok(respond(
            api_version,
            &request.uid,
            Verdict::Allow(None),
            Vec::new(),
            Outcome::Ignored,
        ));
    };
    pod.metadata.managed_fields = None;
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let no_labels = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
    let view = source.view(&namespace, node, pod_labels);
    let environment = Environment {
        native_sidecars_supported: view.native_sidecars_supported,
        ..environment
    };
    let mesh: &MeshSpec = &view.mesh;
    let engine_request = Request {
        pod: &pod,
        namespace: &namespace,
        mesh,
        profiles: &view.profiles,
        environment: &environment,
        workload: None,
    };
    let mut warnings: Vec<String> = view.warning.iter().cloned().collect();
    let log_pod = |decision: &str, detail: &str| {
        tracing::info!(
            namespace = %namespace,
            name = pod.metadata.name.as_deref().unwrap_or_default(),
            generate_name = pod.metadata.generate_name.as_deref().unwrap_or_default(),
            dry_run = request.dry_run,
            decision,
            detail,
            "admission"
        );
    };
    match inject_with(&engine_request, view.mesh_settings.as_deref()) {
        Err(e) => {
            log_pod("rejected", &e.to_string());
            let message = format!("ferrimesh sidecar injector: {e}");
            Ok(respond(
                api_version,
                &request.uid,
                Verdict::Deny(message),
                warnings,
                Outcome::Rejected,
            ))
        }
        Ok(injection) => {
            warnings.extend(injection.warnings);
            if let Some(privileges) = &injection.pod_security {
                warnings.extend(crate::inject::cni::pod_security_warnings(
                    privileges,
                    &view.pod_security_labels,
                ));
            }
            let reason = injection.decision.reason.to_string();
            match injection.pod {
                None => {
                    log_pod("skipped", &reason);
                    let outcome = Outcome::Skipped(injection.decision.reason.metric_label());
                    Ok(respond(
                        api_version,
                        &request.uid,
                        Verdict::Allow(None),
                        warnings,
                        outcome,
                    ))
                }
                Some(injected) => {
                    log_pod("injected", &reason);
                    let (verdict, outcome) = match patch_between(&pod, &injected) {
                        Ok(patch) => (Verdict::Allow(patch), Outcome::Injected),
                        Err(e) => (
                            Verdict::Deny(format!(
                                "ferrimesh sidecar injector: internal error: {e}"
                            )),
                            Outcome::Rejected,
                        ),
                    };
                    Ok(respond(
                        api_version,
                        &request.uid,
                        verdict,
                        warnings,
                        outcome,
                    ))
                }
            }
        }
    }
}

/// The response's `patch` from `pod` to `injected`: the JSON string of the
/// patch's base64 form (SIMD-encoded), kept raw so that writing the response
/// copies it rather than scanning each of its bytes for characters to
/// escape (base64 has none). None when re-injecting an injected pod changes
/// nothing.
fn patch_between(pod: &Pod, injected: &Pod) -> serde_json::Result<Option<Box<RawValue>>> {
    let Some(json) = patch::between(pod, injected)? else {
        return Ok(None);
    };
    let mut quoted = String::with_capacity(json.len().div_ceil(3) * 4 + 2);
    quoted.push('"');
    base64_simd::STANDARD.encode_append(&json, &mut quoted);
    quoted.push('"');
    RawValue::from_string(quoted).map(Some)
}

/// How many list items a pod may have: the typed pod holds each
/// container in about 2 KiB and each volume in about 3 KiB whatever their
/// JSON size, so a 3 MiB pod of tiny entries would take hundreds of MiB to
/// review. A pod past a limit is refused before it is read.
pub mod shape {
    use serde::Deserialize;
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// Containers, init containers and ephemeral containers together.
    pub const MAX_CONTAINERS: usize = 1000;
    /// Volumes.
    pub const MAX_VOLUMES: usize = 1000;
    /// Env vars, volume mounts and ports of all containers together.
    pub const MAX_CONTAINER_ENTRIES: usize = 20_000;

    /// The number of elements of a JSON array (0 for anything else).
    #[derive(Debug, Default)]
    pub struct Count(pub usize);

    struct CountVisitor;

    impl<'de> Visitor<'de> for CountVisitor {
        type Value = Count;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
            let mut n = 0;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(Count(n))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Count(0))
        }

        fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
            Ok(Count(0))
        }

        fn visit_i64<E>(self, _: i64) -> Result<Count, E> {
            Ok(Count(0))
        }

        fn visit_u64<E>(self, _: u64) -> Result<Count, E> {
            Ok(Count(0))
        }

        fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
            Ok(Count(0))
        }

        fn visit_str<E>(self, _: &str) -> Result<Count, E> {
            Ok(Count(0))
        }

        fn visit_unit<E>(self) -> Result<Count, E> {
            Ok(Count(0))
        }
    }

    impl<'de> Deserialize<'de> for Count {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(CountVisitor)
        }
    }

    /// An AdmissionReview request, as far as its size goes.
    #[derive(Debug, Default, Deserialize)]
    pub struct Request {
        /// The request's uid.
        #[serde(default)]
        pub uid: String,
        #[serde(default)]
        object: Option<Object>,
    }

    #[derive(Debug, Default, Deserialize)]
    struct Object {
        #[serde(default)]
        spec: Option<Spec>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        #[serde(default)]
        containers: Option<Vec<Container>>,
        #[serde(default)]
        init_containers: Option<Vec<Container>>,
        #[serde(default)]
        ephemeral_containers: Option<Vec<Container>>,
        #[serde(default)]
        volumes: Count,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Container {
        #[serde(default)]
        env: Count,
        #[serde(default)]
        volume_mounts: Count,
        #[serde(default)]
        ports: Count,
    }

    impl Request {
        /// Why the pod is too large to review, if it is.
        pub fn too_large(&self) -> Option<String> {
            let spec = self.object.as_ref()?.spec.as_ref()?;
            let all = || {
                [
                    &spec.containers,
                    &spec.init_containers,
                    &spec.ephemeral_containers,
                ]
                .into_iter()
                .flatten()
                .flatten()
            };
            let containers = all().count();
            if containers > MAX_CONTAINERS {
                return Some(format!(
                    "pod too large to review: {containers} containers (init and ephemeral included), the limit is {MAX_CONTAINERS}"
                ));
            }
            if spec.volumes.0 > MAX_VOLUMES {
                return Some(format!(
                    "pod too large to review: {} volumes, the limit is {MAX_VOLUMES}",
                    spec.volumes.0
                ));
            }
            let entries: usize = all().map(|c| c.env.0 + c.volume_mounts.0 + c.ports.0).sum();
            (entries > MAX_CONTAINER_ENTRIES).then(|| {
                format!(
                    "pod too large to review: {entries} env vars, volume mounts and ports in its containers, the limit is {MAX_CONTAINER_ENTRIES}"
                )
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn too_large(request: serde_json::Value) -> Option<String> {
            serde_json::from_value::<Request>(request)
                .ok()
                .and_then(|r| r.too_large())
        }

        #[test]
        fn refuses_pods_past_the_list_limits_and_names_the_limit() {
            let containers = |n: usize| -> Vec<serde_json::Value> {
                (0..n)
                    .map(|i| serde_json::json!({"name": format!("c{i}")}))
                    .collect()
            };
            let pod =
                |spec: serde_json::Value| serde_json::json!({"uid": "u", "object": {"spec": spec}});
            assert_eq!(
                too_large(pod(serde_json::json!({"containers": containers(10)}))),
                None
            );
            let message = too_large(pod(serde_json::json!({
                "containers": containers(600), "initContainers": containers(401)
            })))
            .expect("too many containers");
            assert!(message.contains("1001 containers"), "{message}");
            let volumes: Vec<_> = (0..1001)
                .map(|i| serde_json::json!({"name": format!("v{i}")}))
                .collect();
            let message =
                too_large(pod(serde_json::json!({"volumes": volumes}))).expect("too many volumes");
            assert!(message.contains("1001 volumes"), "{message}");
            let env: Vec<_> = (0..20_001)
                .map(|i| serde_json::json!({"name": format!("E{i}")}))
                .collect();
            let message = too_large(pod(
                serde_json::json!({"containers": [{"name": "a", "env": env}]}),
            ))
            .expect("too many env vars");
            assert!(message.contains("20001 env vars"), "{message}");
            assert_eq!(
                too_large(pod(
                    serde_json::json!({"containers": [{"name": "a", "env": "not a list"}], "volumes": null})
                )),
                None,
                "what is not a list is left for the typed parse to refuse"
            );
        }
    }
}

fn check_uid(uid: &str) -> Result<(), Refusal> {
    if uid.is_empty() {
        return Err(Refusal::BadRequest(
            "AdmissionReview request has no uid".to_owned(),
        ));
    }
    Ok(())
}

enum Verdict {
    /// Allowed, with the base64 JSONPatch (see [`patch_between`]) when the
    /// pod changes.
    Allow(Option<Box<RawValue>>),
    /// Refused with a message for the user.
    Deny(String),
}

fn respond(
    api_version: &str,
    uid: &str,
    verdict: Verdict,
    warnings: Vec<String>,
    outcome: Outcome,
) -> Answer {
    let (allowed, status, patch) = match verdict {
        Verdict::Allow(patch) => (true, None, patch),
        Verdict::Deny(message) => (
            false,
            Some(StatusOut {
                status: "Failure",
                message,
                reason: "BadRequest",
                code: 400,
            }),
            None,
        ),
    };
    let review = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed,
            status,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings,
        },
    };
    let patch_len = review.response.patch.as_ref().map_or(0, |p| p.get().len());
    let mut body = Vec::with_capacity(patch_len + 512);
    // Writing to a Vec fails only for a serialiser error, and every field
    // here is a plain string, number or bool: there is none to expect.
    let _ = serde_json::to_writer(&mut body, &review);
    Answer { body, outcome }
}
