//! Differential injection against the real thing: the same AdmissionReview
//! goes to istiod's own `/inject` (built from the `istio.io/istio` module,
//! configured from its own chart for the same mesh) and to
//! `ferrimesh-webhook`; each JSONPatch is applied to the pod and the two pods
//! are compared field by field. Inputs: every input of
//! `webhook/testdata/inject/`, `DIFF_PODS` generated pods per scenario
//! (default 500; `DIFF_SEED` repeats a run, the seed is printed), and
//! istiod's own output for a share of them, injected again (as is, and
//! for classic results with native sidecars asked for). Every
//! difference fails the test unless `e2e/differential/deviations.yaml`
//! excuses it. `DIFF_SHOW=<input>` prints that input and both results.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferrimesh_crds::settings::CniProvider;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::differential::{Deviations, Difference, compare};
use ferrimesh_e2e::fixtures::namespace;
use ferrimesh_e2e::fixtures::start_webhook_with;
use ferrimesh_e2e::generated_pods::generate;
use ferrimesh_e2e::istiod::{Istiod, post_review};
use ferrimesh_e2e::{ControlPlane, ServingCertificate, free_port, repo_root};
use k8s_openapi::api::core::v1::{Pod, SeccompProfile};
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The namespace the reviews claim to come from.
const NAMESPACE: &str = "shop";

/// One input: a name to report it under and the pod.
struct Input {
    name: String,
    pod: Value,
}

/// The answer of one injector: allowed or not, and the resulting pod.
#[derive(Debug)]
struct Outcome {
    allowed: bool,
    pod: Value,
}

/// The pod as the API server hands it to mutating admission: created with
/// `dryRun=All` (no webhook is registered), so it comes back defaulted and
/// serialised by the API server itself; then the fields the API server only
/// fills in after admission (name from `generateName`, uid, timestamps) are
/// taken off again.
async fn as_admitted(client: &Client, input: &Input) -> anyhow::Result<Value> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &ApiResource::erase::<Pod>(&()));
    let mut object: DynamicObject = serde_json::from_value(input.pod.clone())?;
    object.metadata.namespace = Some(NAMESPACE.to_owned());
    // What the ServiceAccount admission plugin (off in the test control
    // plane) does for a pod that names no account.
    let spec = object.data["spec"]
        .as_object_mut()
        .context("a pod with no spec")?;
    spec.entry("serviceAccountName").or_insert(json!("default"));
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let created = api
        .create(&params, &object)
        .await
        .with_context(|| format!("{}: the API server refuses the input pod", input.name))?;
    let mut pod = serde_json::to_value(created)?;
    let metadata = pod["metadata"]
        .as_object_mut()
        .context("a pod with no metadata")?;
    for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
        metadata.remove(field);
    }
    if metadata.contains_key("generateName") {
        metadata.remove("name");
    }
    Ok(pod)
}

/// Whether the API server accepts `pod` (a dry-run create): an injector
/// must never turn a valid pod into one the API server refuses.
async fn accepted(client: &Client, pod: &Value) -> anyhow::Result<bool> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &ApiResource::erase::<Pod>(&()));
    let object: DynamicObject = serde_json::from_value(pod.clone())?;
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    Ok(api.create(&params, &object).await.is_ok())
}

fn review(pod: &Value, uid: usize) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("00000000-0000-0000-0000-{uid:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {"username": "e2e"},
            "object": pod,
        }
    })
}

fn outcome(pod: &Value, answer: &Value) -> anyhow::Result<Outcome> {
    let response = &answer["response"];
    let allowed = response["allowed"].as_bool().unwrap_or(false);
    let mut pod = pod.clone();
    if let Some(patch) = response["patch"].as_str() {
        let bytes = STANDARD.decode(patch).context("patch is not base64")?;
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).context("patch is not a JSONPatch")?;
        json_patch::patch(&mut pod, &patch).context("the patch does not apply")?;
    }
    Ok(Outcome { allowed, pod })
}

/// The pods of a manifest document: a Pod itself, or the pod template of a
/// workload (named after the workload), or those of a List's items.
fn pods_of(document: &Value) -> Vec<Value> {
    let template = match document["kind"].as_str() {
        Some("Pod") => return vec![document.clone()],
        Some("List") => {
            return document["items"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(pods_of)
                .collect();
        }
        Some("CronJob") => &document["spec"]["jobTemplate"]["spec"]["template"],
        _ => &document["spec"]["template"],
    };
    if !template.is_object() {
        return Vec::new();
    }
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]});
    if !pod["metadata"].is_object() {
        pod["metadata"] = json!({});
    }
    pod["metadata"]["name"] = document["metadata"]["name"].clone();
    vec![pod]
}

/// Every input of `webhook/testdata/inject` (errors included), as pods.
fn testdata_inputs() -> anyhow::Result<Vec<Input>> {
    let dir = repo_root().join("webhook/testdata/inject");
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in [dir.clone(), dir.join("errors")] {
        for entry in std::fs::read_dir(&sub)? {
            let path = entry?.path();
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
            let is_input = name.ends_with(".yaml")
                && ![".golden.yaml", ".mesh.yaml", ".profile.yaml"]
                    .iter()
                    .any(|s| name.ends_with(s));
            if is_input {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut inputs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let label = file
            .strip_prefix(&dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let document: Value = serde::Deserialize::deserialize(document)
                .with_context(|| format!("{label}: document {index}"))?;
            for (n, pod) in pods_of(&document).into_iter().enumerate() {
                inputs.push(Input {
                    name: format!("{label}#{index}.{n}"),
                    pod,
                });
            }
        }
    }
    Ok(inputs)
}

/// Whether `pod` was injected by the sidecar template in the classic
/// layout (its status lists `istio-proxy` among the containers).
fn classic(pod: &Value) -> bool {
    let annotations = &pod["metadata"]["annotations"];
    let sidecar = annotations["inject.istio.io/templates"]
        .as_str()
        .is_none_or(|t| t.starts_with("sidecar"));
    let status: Value = annotations["sidecar.istio.io/status"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    sidecar
        && status["containers"]
            .as_array()
            .is_some_and(|c| c.iter().any(|n| n == "istio-proxy"))
}

fn env_number(name: &str, default: u64) -> anyhow::Result<u64> {
    std::env::var(name).map_or(Ok(default), |v| {
        v.parse()
            .with_context(|| format!("{name}={v}: not a number"))
    })
}

/// Compares every input through both injectors; returns the differences no
/// deviation excuses, each with its input's name.
async fn differential(scenario: &str, mesh: &MeshSpec, mesh_file: &Path) -> anyhow::Result<()> {
    let deviations = Deviations::load(&repo_root().join("e2e/differential/deviations.yaml"))?;
    let plane = ControlPlane::start().await?;
    let istiod = Istiod::start(&plane, mesh).await?;
    let client = plane.client().await?;
    namespace(&client, NAMESPACE, &[]).await?;
    let certificate = ServingCertificate::issue(&plane.scratch().path(""))?;
    let port = free_port()?;
    let mesh_file = mesh_file
        .to_str()
        .context("the Mesh file's path is not UTF-8")?;
    let _webhook = start_webhook_with(
        &plane,
        &plane.kubeconfig,
        port,
        (&certificate.cert, &certificate.key),
        &["--mesh-file", mesh_file],
    )
    .await?;
    let ours_url = format!("https://127.0.0.1:{port}/inject");

    let seed = match std::env::var("DIFF_SEED") {
        Ok(seed) => seed.parse().context("DIFF_SEED")?,
        Err(_) => fastrand::u64(..),
    };
    let count = usize::try_from(env_number("DIFF_PODS", 500)?)?;
    println!(
        "[{scenario}] istio {} | seed {seed} (DIFF_SEED={seed} repeats this run) | {count} generated pods",
        istiod.config.revision
    );
    let mut inputs = testdata_inputs()?;
    inputs.extend(generate(seed, count).into_iter().map(|g| Input {
        name: g.name,
        pod: g.pod,
    }));

    let mut failures: Vec<(String, Difference)> = Vec::new();
    let mut excused = std::collections::BTreeMap::<String, usize>::new();
    let mut compared = 0usize;
    let mut reinjected = Vec::new();
    let mut index = 0usize;
    let mut queue: Vec<Input> = inputs;
    while !queue.is_empty() {
        for input in std::mem::take(&mut queue) {
            index += 1;
            let pod = as_admitted(&client, &input).await?;
            let request = review(&pod, index);
            let ours = outcome(&pod, &post_review(&ours_url, &request).await?)
                .with_context(|| format!("{}: ferrimesh's answer", input.name))?;
            let theirs = outcome(&pod, &istiod.inject("", &request).await?)
                .with_context(|| format!("{}: istiod's answer", input.name))?;
            compared += 1;
            if std::env::var("DIFF_SHOW").is_ok_and(|show| show == input.name) {
                println!(
                    "{}: input {pod:#}\n---- ferrimesh ({}) {:#}\n---- istiod ({}) {:#}",
                    input.name, ours.allowed, ours.pod, theirs.allowed, theirs.pod
                );
            }
            let mut differences = compare(&ours.pod, &theirs.pod);
            let mut theirs_valid = false;
            if ours.allowed && theirs.allowed {
                let ours_valid = accepted(&client, &ours.pod).await?;
                theirs_valid = accepted(&client, &theirs.pod).await?;
                // ferrimesh must never turn a valid pod into an invalid one;
                // where istiod's result is the invalid one, the fields that
                // differ are reported (or excused) on their own.
                if !ours_valid {
                    differences.push(Difference {
                        path: "apiServer.accepts".to_owned(),
                        ours: Some(json!(ours_valid)),
                        theirs: Some(json!(theirs_valid)),
                    });
                }
            }
            if ours.allowed != theirs.allowed {
                differences.push(Difference {
                    path: "response.allowed".to_owned(),
                    ours: Some(json!(ours.allowed)),
                    theirs: Some(json!(theirs.allowed)),
                });
            }
            for difference in differences {
                match deviations.excuse(scenario, &input.name, &pod, &difference) {
                    Some(deviation) => *excused.entry(deviation.name.clone()).or_default() += 1,
                    None => failures.push((input.name.clone(), difference)),
                }
            }
            // Re-injection: istiod's own output, sent again to both.
            let injected = theirs.pod["metadata"]["annotations"]
                .get("sidecar.istio.io/status")
                .is_some();
            let first_time = !input.name.contains('/');
            if theirs_valid && injected && first_time && index % 4 == 2 && classic(&theirs.pod) {
                // The layout change of deviation
                // `reinjection-after-layout-change`: istiod's classic result
                // injected again with native sidecars asked for, and a new
                // proxy log level (with unchanged settings the old proxy and
                // the new one are the same).
                let mut pod = theirs.pod.clone();
                let annotations = &mut pod["metadata"]["annotations"];
                annotations["sidecar.istio.io/nativeSidecar"] = json!("true");
                annotations["sidecar.istio.io/logLevel"] = json!("critical");
                reinjected.push(Input {
                    name: format!("{}/native", input.name),
                    pod,
                });
            }
            if theirs_valid && injected && first_time && index.is_multiple_of(4) {
                reinjected.push(Input {
                    name: format!("{}/again", input.name),
                    pod: theirs.pod,
                });
            }
        }
        queue = std::mem::take(&mut reinjected);
    }
    println!("[{scenario}] {compared} inputs compared; excused by deviation: {excused:?}");
    if !failures.is_empty() {
        let mut report = String::new();
        for (input, difference) in failures.iter().take(60) {
            report.push_str(&format!("{input}: {difference}\n"));
        }
        anyhow::bail!(
            "[{scenario}] {} differences outside e2e/differential/deviations.yaml (seed {seed}; first 60):\n{report}",
            failures.len()
        );
    }
    Ok(())
}

#[tokio::test]
async fn ferrimesh_injects_what_istiod_injects_with_the_default_mesh() -> anyhow::Result<()> {
    let scratch = ferrimesh_e2e::Scratch::new("differential-default")?;
    let mesh = Mesh::new("default", MeshSpec::default());
    let file = scratch.path("mesh.yaml");
    std::fs::write(&file, serde_yaml::to_string(&mesh)?)?;
    differential("default", &mesh.spec, &file).await
}

#[tokio::test]
async fn ferrimesh_injects_what_istiod_injects_with_every_mesh_option() -> anyhow::Result<()> {
    let file = repo_root().join("webhook/testdata/inject/mesh-options.mesh.yaml");
    let mesh: Mesh = serde_yaml::from_str(&std::fs::read_to_string(&file)?)?;
    differential("mesh-options", &mesh.spec, &file).await
}

/// `mesh` with Istio CNI mode on, written to a file for the webhook.
fn with_cni(
    scratch: &ferrimesh_e2e::Scratch,
    mut mesh: Mesh,
    provider: CniProvider,
) -> anyhow::Result<(Mesh, PathBuf)> {
    mesh.spec.traffic.cni.enabled = true;
    mesh.spec.traffic.cni.provider = provider;
    let file = scratch.path("mesh.yaml");
    std::fs::write(&file, serde_yaml::to_string(&mesh)?)?;
    Ok((mesh, file))
}

#[tokio::test]
async fn ferrimesh_injects_what_istiod_injects_in_cni_mode() -> anyhow::Result<()> {
    let scratch = ferrimesh_e2e::Scratch::new("differential-cni")?;
    let mut mesh = Mesh::new("default", MeshSpec::default());
    mesh.spec.proxy.seccomp_profile = Some(SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    });
    let (mesh, file) = with_cni(&scratch, mesh, CniProvider::Default)?;
    differential("cni", &mesh.spec, &file).await
}

#[tokio::test]
async fn ferrimesh_injects_what_istiod_injects_in_cni_mode_with_multus_and_every_mesh_option()
-> anyhow::Result<()> {
    let scratch = ferrimesh_e2e::Scratch::new("differential-cni-multus")?;
    let options = repo_root().join("webhook/testdata/inject/mesh-options.mesh.yaml");
    let mesh: Mesh = serde_yaml::from_str(&std::fs::read_to_string(&options)?)?;
    let (mesh, file) = with_cni(&scratch, mesh, CniProvider::Multus)?;
    differential("cni-multus", &mesh.spec, &file).await
}
