//! Offline injection of workload manifests (`ferrimesh inject -f`,
//! `ferrimesh check-inject`): multi-document YAML in, every document out in
//! input order, pod templates run through the very same engine as the
//! webhook.
//!
//! Input is read one document at a time ([`process_reader`]), so memory
//! follows the largest document, not the whole stream; YAML anchors and
//! aliases are refused (expanding them multiplies the input). A document is
//! held once as JSON (read straight from the YAML, no YAML tree), its pod
//! template once as the typed pod and once injected; a document injection
//! leaves unchanged is written back from its text as the user wrote it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::sync::Arc;

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::ambient::{ambient_request, injected_ambient_warning};
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::mesh::MeshSpec;
use ferrimesh_crds::selection::selecting_entry;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::inject::decision::Decision;
use crate::inject::workload::Workload;
use crate::inject::{Environment, Request, inject};
use crate::mesh_file::{object_name, typed};
use crate::patch;

/// Where in the input a problem is: file, document index and object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file name as given (`-` for stdin).
    pub file: String,
    /// Index of the YAML document, from 0.
    pub document: usize,
    /// `Kind/name` of the object, when known.
    pub object: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// A manifest that cannot be processed, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ManifestError {
    /// Where.
    pub location: Location,
    /// Why, naming the field where there is one.
    pub message: String,
}

/// The mesh configuration offline injection runs with.
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    /// The Mesh (defaults when no `--mesh` file is given).
    pub mesh: MeshSpec,
    /// ProxyProfiles from `--profile` files.
    pub profiles: Vec<ProxyProfile>,
    /// Cluster facts; offline, `nativeSidecars: Auto` means enabled.
    pub environment: Environment,
}

/// One input document: its index in the stream, as JSON, and what it was
/// read from.
struct Parsed {
    index: usize,
    json: Value,
    source: Source,
}

/// What a document was read from, to write it back as the user wrote it
/// (key order and scalars) when injection changes nothing.
#[derive(Clone, Debug)]
enum Source {
    /// The `nth` YAML document of `text` (one text as [`DocumentTexts`]
    /// cuts it); it is read again and written as it is read, without a tree.
    Text { text: Arc<String>, nth: usize },
    /// A document JSON cannot hold as it is (a YAML tag, a key that is not
    /// a string), kept as YAML.
    Yaml(serde_yaml::Value),
}

impl Source {
    fn write_yaml<W: Write>(&self, out: W) -> Result<(), serde_yaml::Error> {
        let mut serializer = serde_yaml::Serializer::new(out);
        match self {
            Self::Text { text, nth } => {
                let Some(document) = serde_yaml::Deserializer::from_str(text).nth(*nth) else {
                    return Err(serde::ser::Error::custom(
                        "the document is gone from its text",
                    ));
                };
                serde_transcode::transcode(document, &mut serializer)
            }
            Self::Yaml(value) => value.serialize(&mut serializer),
        }
    }
}

/// The text of the documents of a YAML stream, one at a time, read line by
/// line: a document starts at a line beginning with `---` (alone or
/// followed by a blank) or with `%` (a directive), which YAML forbids
/// inside a document's content.
pub struct DocumentTexts<R> {
    reader: R,
    pending: Option<String>,
    done: bool,
}

impl<R: BufRead> DocumentTexts<R> {
    /// The documents of `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            pending: None,
            done: false,
        }
    }
}

fn starts_document(line: &str) -> bool {
    line.starts_with('%')
        || line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

impl<R: BufRead> Iterator for DocumentTexts<R> {
    type Item = std::io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut text = self.pending.take().unwrap_or_default();
        // Whether `text` has a `---` or content: a directive line then
        // belongs to the next document, and so does a second `---`.
        let mut started = text.starts_with("---");
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(0) => {
                    self.done = true;
                    return (!text.is_empty()).then_some(Ok(text));
                }
                Ok(_) => {}
            }
            if starts_document(&line) {
                if started {
                    self.pending = Some(line);
                    return Some(Ok(text));
                }
                started = line.starts_with("---");
            } else {
                let trimmed = line.trim_start();
                started |= !(trimmed.is_empty() || trimmed.starts_with('#'));
            }
            text.push_str(&line);
        }
    }
}

/// The non-empty YAML documents of `text` (one document's text, as
/// [`DocumentTexts`] cuts it), numbered from `first_index`; returns the
/// index after the last.
fn parse_documents(
    file: &str,
    text: String,
    first_index: usize,
    out: &mut Vec<Parsed>,
) -> Result<usize, ManifestError> {
    let location = |index| Location {
        file: file.to_owned(),
        document: index,
        object: None,
    };
    // A scan error is left for the YAML parser below to report.
    if crate::inject::annotations::has_yaml_aliases(&text).unwrap_or(false) {
        return Err(ManifestError {
            location: location(first_index),
            message:
                "YAML anchors and aliases are not accepted (expanding them multiplies the input)"
                    .to_owned(),
        });
    }
    let text = Arc::new(text);
    let mut index = first_index;
    for (nth, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let parsed = match Value::deserialize(document) {
            Ok(json) => Ok((
                json,
                Source::Text {
                    text: Arc::clone(&text),
                    nth,
                },
            )),
            Err(_) => yaml_document(&text, nth),
        };
        let (json, source) = parsed.map_err(|message| ManifestError {
            location: location(index),
            message,
        })?;
        index += 1;
        if json.is_null() {
            continue;
        }
        out.push(Parsed {
            index: index - 1,
            json,
            source,
        });
    }
    Ok(index)
}

/// The `nth` document of `text` read the long way, through a YAML tree:
/// for what JSON cannot hold as it is (a tagged value is held as a map
/// from the tag to the value).
fn yaml_document(text: &str, nth: usize) -> Result<(Value, Source), String> {
    let Some(document) = serde_yaml::Deserializer::from_str(text).nth(nth) else {
        return Err("invalid YAML: the document is gone from its text".to_owned());
    };
    let value =
        serde_yaml::Value::deserialize(document).map_err(|e| format!("invalid YAML: {e}"))?;
    let json =
        serde_json::to_value(&value).map_err(|e| format!("not a JSON-compatible document: {e}"))?;
    Ok((json, Source::Yaml(value)))
}

/// The JSON pointer of the pod template of a workload kind; `Some("")` for
/// a Pod itself, `None` for kinds without a pod template.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        // OpenShift's apps.openshift.io/v1, as `istioctl kube-inject` knows it.
        | "DeploymentConfig"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to one pod (template) of the input.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReport {
    /// Where it is.
    pub location: Location,
    /// Whether the API server would send it to the injector at all (only
    /// known when namespace labels were given); the reason when it would not.
    pub not_selected: Option<String>,
    /// The engine's decision.
    pub decision: Decision,
    /// Warnings the webhook would return.
    pub warnings: Vec<String>,
}

/// One output document.
#[derive(Clone, Debug)]
pub struct Document {
    /// The document as JSON, injected where it had pod templates to inject.
    pub json: Value,
    /// What the document was read from, echoed when injection changed
    /// nothing (so its key order and scalars stay exactly as the user wrote
    /// them).
    original: Option<Source>,
}

/// The result of processing a manifest stream.
#[derive(Clone, Debug, Default)]
pub struct Processed {
    /// The output documents, in input order.
    pub documents: Vec<Document>,
    /// One report per pod (template).
    pub pods: Vec<PodReport>,
}

impl Processed {
    /// Writes the documents as YAML, each followed by `---`.
    pub fn write_yaml<W: Write>(&self, mut out: W) -> Result<(), serde_yaml::Error> {
        for doc in &self.documents {
            doc.write_yaml(&mut out)?;
        }
        Ok(())
    }

    /// The documents as YAML, each followed by `---`.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = Vec::new();
        self.write_yaml(&mut out)?;
        String::from_utf8(out).map_err(serde::ser::Error::custom)
    }
}

impl Document {
    /// Writes the document as YAML, followed by `---`, without building
    /// the text first.
    pub fn write_yaml<W: Write>(&self, mut out: W) -> Result<(), serde_yaml::Error> {
        match &self.original {
            Some(original) => original.write_yaml(&mut out)?,
            None => serde_yaml::to_writer(&mut out, &self.json)?,
        }
        out.write_all(b"---\n").map_err(serde::ser::Error::custom)
    }

    /// The document as YAML, followed by `---`.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = Vec::new();
        self.write_yaml(&mut out)?;
        String::from_utf8(out).map_err(serde::ser::Error::custom)
    }
}

/// Options of one run.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a> {
    /// Mesh, profiles, environment.
    pub config: &'a MeshConfig,
    /// Labels of the namespace the objects go to, when known (check-inject):
    /// then the webhook's selectors are evaluated first.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
}

/// Why the API server would not send a pod to the injector of `revision`
/// (or of one of its revision `tags`), or `None` when one of the webhook's
/// entries selects it.
fn not_selected_reason(
    (revision, tags): (&str, &[String]),
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Option<String> {
    use ferrimesh_crds::istio::{
        INJECT as INJECT_LABEL, INJECTION_LABEL, REVISION as REVISION_LABEL,
    };
    use ferrimesh_crds::selection::NAMESPACE_NAME_LABEL;
    let mut ns_labels = namespace_labels.clone();
    ns_labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
    let selected = std::iter::once(revision)
        .chain(tags.iter().map(String::as_str))
        .any(|r| selecting_entry(r, &SYSTEM_NAMESPACES, &ns_labels, pod_labels).is_some());
    if selected {
        return None;
    }
    let ns = |key: &str| ns_labels.get(key).map(String::as_str);
    let reason = if pod_labels.get(INJECT_LABEL).is_some_and(|v| v == "false") {
        format!("pod label {INJECT_LABEL}=false")
    } else if SYSTEM_NAMESPACES.contains(&namespace) {
        format!("namespace {namespace} is never injected")
    } else if let Some(value) = ns(INJECTION_LABEL).filter(|v| *v != "enabled") {
        format!("namespace label {INJECTION_LABEL}={value}")
    } else if let Some(other) = ns(REVISION_LABEL).filter(|r| *r != revision) {
        format!("namespace label {REVISION_LABEL}={other} selects another revision than {revision}")
    } else if ns(INJECTION_LABEL).is_some() && revision != ferrimesh_crds::mesh::DEFAULT_REVISION {
        format!(
            "namespace label {INJECTION_LABEL}=enabled selects revision default, not {revision}"
        )
    } else {
        format!(
            "the namespace is not enabled for revision {revision} (label it {INJECTION_LABEL}=enabled or \
             {REVISION_LABEL}={revision}) and the pod does not opt in"
        )
    };
    Some(reason)
}

/// Injects the pod templates of every document of `input`.
pub fn process(file: &str, input: &str, run: Run<'_>) -> Result<Processed, ManifestError> {
    let mut processed = Processed::default();
    for part in process_reader(file, input.as_bytes(), run) {
        let part = part?;
        processed.documents.extend(part.documents);
        processed.pods.extend(part.pods);
    }
    Ok(processed)
}

/// Injects the pod templates of the documents read from `reader`, one
/// document's text at a time: each item is what one of them came to, so a
/// caller that writes it out before taking the next holds one document in
/// memory, not the stream.
pub fn process_reader<'r, R: BufRead + 'r>(
    file: &'r str,
    reader: R,
    run: Run<'r>,
) -> impl Iterator<Item = Result<Processed, ManifestError>> + 'r {
    let mut index = 0;
    DocumentTexts::new(reader).map(move |text| {
        let text = text.map_err(|e| ManifestError {
            location: Location {
                file: file.to_owned(),
                document: index,
                object: None,
            },
            message: format!("reading: {e}"),
        })?;
        let mut parsed = Vec::new();
        index = parse_documents(file, text, index, &mut parsed)?;
        let mut processed = Processed::default();
        for Parsed {
            index,
            mut json,
            source,
        } in parsed
        {
            let location = Location {
                file: file.to_owned(),
                document: index,
                object: object_name(&json),
            };
            let changed = process_object(&mut json, &location, run, &mut processed.pods)?;
            processed.documents.push(Document {
                json,
                original: (!changed).then_some(source),
            });
        }
        Ok(processed)
    })
}

/// The parts of a pod template the engine reads; the others stay in the
/// JSON as they are.
#[derive(Deserialize)]
struct PodTemplate {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<PodSpec>,
}

/// Injects the pod templates of `doc` in place; true when it changed.
fn process_object(
    doc: &mut Value,
    location: &Location,
    run: Run<'_>,
    reports: &mut Vec<PodReport>,
) -> Result<bool, ManifestError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind == "List" || kind.ends_with("List") {
        let mut changed = false;
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items.iter_mut() {
                let location = Location {
                    object: object_name(item),
                    ..location.clone()
                };
                changed |= process_object(item, &location, run, reports)?;
            }
        }
        return Ok(changed);
    }
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(false);
    };
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let workload = (kind != "Pod").then(|| {
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Workload::new(api_version, &kind, name)
    });
    let fail = |message: String| ManifestError {
        location: location.clone(),
        message,
    };
    let Some(template) = doc.pointer_mut(pointer) else {
        return Err(fail(format!(
            "field {}: missing pod template",
            pointer.trim_start_matches('/').replace('/', ".")
        )));
    };
    let prefix = if pointer.is_empty() {
        String::new()
    } else {
        format!("{}.", pointer.trim_start_matches('/').replace('/', "."))
    };
    // managedFields are neither read nor patched: set aside while the pod
    // is read from the template (by reference, not from a copy).
    let managed_fields = template
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .and_then(|metadata| metadata.remove("managedFields"));
    let read = typed::<PodTemplate>(&*template);
    if let Some(managed_fields) = managed_fields
        && let Some(metadata) = template.get_mut("metadata").and_then(Value::as_object_mut)
    {
        metadata.insert("managedFields".to_owned(), managed_fields);
    }
    let PodTemplate { metadata, spec } = read.map_err(|e| match e.strip_prefix("field ") {
        Some(rest) => fail(format!("field {prefix}{rest}")),
        None => fail(e),
    })?;
    let mut pod = Pod {
        metadata,
        spec,
        status: None,
    };

    let empty = BTreeMap::new();
    let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let not_selected = run.namespace_labels.and_then(|ns_labels| {
        let mesh = &run.config.mesh;
        let revision = (mesh.revision.as_str(), mesh.revision_tags.as_slice());
        not_selected_reason(revision, &namespace, ns_labels, pod_labels)
    });
    let profiles: Vec<ProxyProfile> = run
        .config
        .profiles
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .cloned()
        .collect();
    // The engine sees the pod in its namespace; the patch is made against
    // the template as written.
    let written_namespace = pod.metadata.namespace.clone();
    pod.metadata
        .namespace
        .get_or_insert_with(|| namespace.clone());
    let request = Request {
        pod: &pod,
        namespace: &namespace,
        mesh: &run.config.mesh,
        profiles: &profiles,
        environment: &run.config.environment,
        workload: workload.as_ref(),
    };
    let mut injection = inject(&request).map_err(|e| fail(e.to_string()))?;
    if injection.decision.inject
        && not_selected.is_none()
        && let Some(source @ "namespace label") = ambient_request(
            Some(pod_labels),
            pod.metadata.annotations.as_ref(),
            run.namespace_labels,
        )
    {
        injection.warnings.push(injected_ambient_warning(source));
    }
    let mut changed = false;
    if let (Some(mut injected), None) = (injection.pod, &not_selected) {
        injected.metadata.namespace.clone_from(&written_namespace);
        pod.metadata.namespace = written_namespace;
        let patch = patch::between(&pod, &injected).map_err(|e| fail(e.to_string()))?;
        drop((pod, injected));
        if let Some(patch) = patch {
            let patch: json_patch::Patch = serde_json::from_slice(&patch)
                .map_err(|e| fail(format!("internal error reading patch: {e}")))?;
            json_patch::patch(template, &patch.0)
                .map_err(|e| fail(format!("internal error applying patch: {e}")))?;
            changed = true;
        }
    }
    let mut warnings = injection.warnings;
    if let (Some(labels), Some(privileges), None) =
        (run.namespace_labels, &injection.pod_security, &not_selected)
    {
        warnings.extend(crate::inject::cni::pod_security_warnings(
            privileges, labels,
        ));
    }
    reports.push(PodReport {
        location: location.clone(),
        not_selected,
        decision: injection.decision,
        warnings,
    });
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: web}]\n";

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn explains_why_the_webhook_would_not_be_called() {
        let reason = |ns: &[(&str, &str)], pod: &[(&str, &str)]| {
            not_selected_reason(("default", &[]), "shop", &labels(ns), &labels(pod))
        };
        assert_eq!(reason(&[("istio-injection", "enabled")], &[]), None);
        assert_eq!(
            reason(
                &[("istio-injection", "enabled")],
                &[("sidecar.istio.io/inject", "false")]
            )
            .as_deref(),
            Some("pod label sidecar.istio.io/inject=false")
        );
        assert_eq!(
            reason(&[("istio-injection", "disabled")], &[]).as_deref(),
            Some("namespace label istio-injection=disabled")
        );
        assert!(
            reason(&[("istio.io/rev", "canary")], &[])
                .is_some_and(|r| r.contains("another revision"))
        );
        assert!(reason(&[], &[]).is_some_and(|r| r.contains("not enabled")));
        assert_eq!(reason(&[], &[("sidecar.istio.io/inject", "true")]), None);
        let tags = ["stable".to_owned()];
        let tagged = not_selected_reason(
            ("canary", &tags),
            "shop",
            &labels(&[("istio.io/rev", "stable")]),
            &labels(&[]),
        );
        assert_eq!(tagged, None, "a revision tag of the Mesh selects it");
    }

    #[test]
    fn reports_file_document_object_and_field_of_a_bad_template() {
        let input = "kind: ConfigMap\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: [{name: 7, image: x}]\n";
        let config = MeshConfig::default();
        let err = process(
            "app.yaml",
            input,
            Run {
                config: &config,
                namespace_labels: None,
            },
        )
        .expect_err("bad");
        let message = err.to_string();
        assert!(
            message.starts_with(
                "app.yaml: document 1 (Deployment/web): field spec.template.spec.containers[0].name"
            ),
            "{message}"
        );
    }

    #[test]
    fn check_inject_warns_about_an_ambient_namespace() {
        let config = MeshConfig::default();
        let check = |ns: &[(&str, &str)], input: &str| {
            let labels = labels(ns);
            let run = Run {
                config: &config,
                namespace_labels: Some(&labels),
            };
            process("app.yaml", input, run).expect("ok").pods[0]
                .warnings
                .clone()
        };
        let ambient = [
            ("istio-injection", "enabled"),
            ("istio.io/dataplane-mode", "ambient"),
        ];
        let warnings = check(&ambient, DEPLOYMENT);
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("the namespace label istio.io/dataplane-mode=ambient")),
            "{warnings:?}"
        );
        let opted_out = DEPLOYMENT.replace(
            "labels: {app: web}",
            "labels: {app: web, istio.io/dataplane-mode: none}",
        );
        assert!(check(&ambient, &opted_out).is_empty());
        assert!(check(&[("istio-injection", "enabled")], DEPLOYMENT).is_empty());
    }

    #[test]
    fn injects_an_openshift_deployment_config() {
        let input = DEPLOYMENT
            .replace("apps/v1", "apps.openshift.io/v1")
            .replace("kind: Deployment", "kind: DeploymentConfig");
        let config = MeshConfig::default();
        let out = process(
            "dc.yaml",
            &input,
            Run {
                config: &config,
                namespace_labels: None,
            },
        )
        .expect("ok");
        let template = &out.documents[0].json["spec"]["template"];
        assert!(
            template
                .pointer("/metadata/annotations/sidecar.istio.io~1status")
                .is_some(),
            "{template}"
        );
    }

    #[test]
    fn passes_other_kinds_through_and_keeps_unknown_template_fields() {
        let input = format!(
            "{DEPLOYMENT}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: 80}}]}}\n"
        );
        let input = input.replace(
            "containers: [{name: web, image: web}]",
            "futureField: kept\n      containers: [{name: web, image: web}]",
        );
        let config = MeshConfig::default();
        let out = process(
            "app.yaml",
            &input,
            Run {
                config: &config,
                namespace_labels: None,
            },
        )
        .expect("ok");
        assert_eq!(out.documents.len(), 2);
        assert_eq!(
            out.documents[0]
                .json
                .pointer("/spec/template/spec/futureField")
                .and_then(Value::as_str),
            Some("kept")
        );
        assert!(
            out.documents[0]
                .json
                .pointer("/spec/template/metadata/annotations/sidecar.istio.io~1status")
                .is_some()
        );
        assert_eq!(
            out.documents[1]
                .json
                .pointer("/spec/ports/0/port")
                .and_then(Value::as_i64),
            Some(80)
        );
        assert!(out.to_yaml().expect("yaml").matches("---\n").count() == 2);
    }

    fn texts(input: &str) -> Vec<String> {
        DocumentTexts::new(input.as_bytes())
            .map(|t| t.expect("read"))
            .collect()
    }

    #[test]
    fn cuts_a_stream_into_documents_at_markers_only() {
        assert_eq!(texts("a: 1\n---\nb: 2\n"), ["a: 1\n", "---\nb: 2\n"]);
        assert_eq!(
            texts("# head\n---\na: 1\n--- \nb: |\n  --- not a marker\n---x: 3\n"),
            [
                "# head\n---\na: 1\n",
                "--- \nb: |\n  --- not a marker\n---x: 3\n"
            ]
        );
        assert_eq!(
            texts("a: 1\n...\n%YAML 1.2\n---\nb: 2\n---\n---\n"),
            ["a: 1\n...\n", "%YAML 1.2\n---\nb: 2\n", "---\n", "---\n"]
        );
        assert!(texts("").is_empty());
    }

    #[test]
    fn check_inject_warns_when_the_namespace_pod_security_level_refuses_the_sidecar() {
        let restricted = labels(&[
            ("istio-injection", "enabled"),
            ("pod-security.kubernetes.io/enforce", "restricted"),
        ]);
        let mut config = MeshConfig::default();
        let warnings = |config: &MeshConfig| {
            let run = Run {
                config,
                namespace_labels: Some(&restricted),
            };
            let out = process("f.yaml", DEPLOYMENT, run).expect("ok");
            out.pods[0].warnings.clone()
        };
        let iptables = warnings(&config);
        assert!(
            iptables
                .iter()
                .any(|w| w.contains("istio-init") && w.contains("traffic.cni.enabled")),
            "{iptables:?}"
        );
        config.mesh.traffic.cni.enabled = true;
        config.mesh.proxy.seccomp_profile = Some(k8s_openapi::api::core::v1::SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        });
        assert_eq!(warnings(&config), Vec::<String>::new());
    }

    #[test]
    fn numbers_documents_as_the_whole_stream_does() {
        let config = MeshConfig::default();
        let run = Run {
            config: &config,
            namespace_labels: None,
        };
        let input = "kind: A\n---\n---\nkind: B\n---\n# only a comment\n---\nkind: C\n";
        let out = process("f.yaml", input, run).expect("ok");
        let kinds: Vec<_> = out
            .documents
            .iter()
            .map(|d| d.json["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(kinds, ["A", "B", "C"]);
        let err = process("f.yaml", "kind: A\n---\n---\nkind: [\n", run).expect_err("bad");
        assert_eq!(err.location.document, 2, "{err}");
    }

    /// A reader of `documents` copies of `document`, counting what was read.
    struct Counted {
        document: Vec<u8>,
        left: usize,
        at: usize,
        read: std::rc::Rc<std::cell::Cell<usize>>,
    }

    impl std::io::Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Ok(0);
            }
            let n = buf.len().min(self.document.len() - self.at);
            buf[..n].copy_from_slice(&self.document[self.at..self.at + n]);
            self.at += n;
            if self.at == self.document.len() {
                (self.at, self.left) = (0, self.left - 1);
            }
            self.read.set(self.read.get() + n);
            Ok(n)
        }
    }

    #[test]
    fn answers_each_document_before_reading_the_rest_of_the_stream() {
        let document = format!("---\n{DEPLOYMENT}").into_bytes();
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let reader = std::io::BufReader::with_capacity(
            64,
            Counted {
                document: document.clone(),
                left: 10_000,
                at: 0,
                read: std::rc::Rc::clone(&read),
            },
        );
        let config = MeshConfig::default();
        let run = Run {
            config: &config,
            namespace_labels: None,
        };
        let mut stream = process_reader("big.yaml", reader, run);
        for expected in 0..3 {
            let part = stream.next().expect("a document").expect("processed");
            assert_eq!(part.pods.len(), 1);
            assert_eq!(part.pods[0].location.document, expected);
            assert!(
                read.get() <= (expected + 2) * document.len(),
                "read {} bytes for {} documents",
                read.get(),
                expected + 1
            );
        }
    }

    #[test]
    fn rejects_yaml_aliases_naming_file_and_document() {
        let config = MeshConfig::default();
        let run = Run {
            config: &config,
            namespace_labels: None,
        };
        let input = format!("{DEPLOYMENT}---\nkind: ConfigMap\ndata: &d {{a: b}}\nmore: *d\n");
        let err = process("app.yaml", &input, run).expect_err("aliases");
        let message = err.to_string();
        assert!(
            message.starts_with("app.yaml: document 1: YAML anchors and aliases are not accepted"),
            "{message}"
        );
    }
}
