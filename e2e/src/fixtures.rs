//! Objects and processes the end-to-end tests share: CRDs, namespaces, the
//! operator and the webhook as local processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferrimesh_crds::{Mesh, WorkloadEntry};
use ferrimesh_crds::{istio_crds, mesh_crds};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::webhook_process::{loopback, webhook_command};
use crate::{
    ControlPlane, Process, eventually, free_port, http_get, repo_root, workspace_binary,
    write_private,
};

/// How long the tests wait for the cluster to converge.
pub const WAIT: Duration = Duration::from_secs(30);

/// Waits until every CRD of the project is established.
pub async fn wait_for_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in mesh_crds().into_iter().chain(istio_crds()) {
        let name = crd.name_any();
        eventually(&format!("CRD {name} established"), WAIT, || {
            let (crds, name) = (crds.clone(), name.clone());
            async move {
                let crd = crds.get_opt(&name).await?;
                let conditions = crd
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .unwrap_or_default();
                Ok(conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

/// Creates a namespace with labels.
pub async fn namespace(client: &Client, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// The value of a namespace label.
pub async fn namespace_label(
    client: &Client,
    name: &str,
    key: &str,
) -> anyhow::Result<Option<String>> {
    let ns = Api::<Namespace>::all(client.clone()).get(name).await?;
    Ok(ns.labels().get(key).cloned())
}

/// `ferrimesh-operator` as a local process; `kubeconfig` picks its identity.
pub fn start_operator(
    plane: &ControlPlane,
    kubeconfig: &Path,
    name: &str,
    webhook_url: &str,
) -> anyhow::Result<Process> {
    start_operator_with(plane, kubeconfig, name, webhook_url, &[])
}

/// heaptrack's allocation tracer, as Debian installs it.
const HEAPTRACK_PRELOAD: &str = "/usr/lib/heaptrack/libheaptrack_preload.so";

/// [`start_operator`] with extra flags.
pub fn start_operator_with(
    plane: &ControlPlane,
    kubeconfig: &Path,
    name: &str,
    webhook_url: &str,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let mut command = Command::new(workspace_binary("ferrimesh-operator")?);
    // A heap profile of each operator, for heaptrack (Debian's package):
    // `<dir>/<name>.raw`, to be read with heaptrack_interpret
    // (docs/benchmarks.md).
    if let Some(dir) = std::env::var_os("FERRIMESH_E2E_HEAPTRACK") {
        let raw = Path::new(&dir).join(format!("{name}.raw"));
        command
            .env("LD_PRELOAD", HEAPTRACK_PRELOAD)
            .env("DUMP_HEAPTRACK_OUTPUT", raw);
    }
    Process::spawn(
        name,
        command
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .args([
                "--webhook-url",
                webhook_url,
                "--admin-listen",
                &format!("127.0.0.1:{}", free_port()?),
            ])
            .args([
                "--lease-duration-seconds",
                "6",
                "--sweep-interval-seconds",
                "2",
            ])
            .args(extra),
        &plane.scratch().path(&format!("{name}.log")),
    )
}

/// `ferrimesh-webhook` as a local process on `port`, serving `cert`/`key`;
/// returns once `/readyz` says so.
pub async fn start_webhook(
    plane: &ControlPlane,
    kubeconfig: &Path,
    port: u16,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Process> {
    start_webhook_with(plane, kubeconfig, port, (cert, key), &[]).await
}

/// [`start_webhook`] with extra flags; `tls` is the certificate and key files.
pub async fn start_webhook_with(
    plane: &ControlPlane,
    kubeconfig: &Path,
    port: u16,
    tls: (&Path, &Path),
    extra: &[&str],
) -> anyhow::Result<Process> {
    start_webhook_named(
        plane,
        "webhook",
        kubeconfig,
        (port, free_port()?),
        tls,
        extra,
    )
    .await
}

/// [`start_webhook_with`] for one of several webhooks: `name` names its log
/// (`<name>.log` in the control plane's scratch directory), `ports` are its
/// serving and admin ports.
pub async fn start_webhook_named(
    plane: &ControlPlane,
    name: &str,
    kubeconfig: &Path,
    (port, admin): (u16, u16),
    tls: (&Path, &Path),
    extra: &[&str],
) -> anyhow::Result<Process> {
    let log = format!("{name}.log");
    let mut process = Process::spawn(
        name,
        webhook_command(
            &workspace_binary("ferrimesh-webhook")?,
            tls,
            loopback(port),
            loopback(admin),
        )
        .env("KUBECONFIG", kubeconfig)
        .args(extra),
        &plane.scratch().path(&log),
    )?;
    let deadline = std::time::Instant::now() + WAIT;
    while http_get(&format!("http://127.0.0.1:{admin}/readyz"), None)
        .await
        .is_none()
    {
        process.check_running()?;
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{name} not ready; {}",
            plane.log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(process)
}

/// The operator and the webhook running against a control plane where
/// `config/overlays/local` is applied, each as its own ServiceAccount.
pub struct Installed {
    /// The operator process.
    pub operator: Process,
    /// The webhook process.
    pub webhook: Process,
    /// The URL the API server calls.
    pub webhook_url: String,
}

/// Starts the operator (pointing the API server at a loopback webhook URL),
/// waits for the certificate it issues, writes it to files as a Secret
/// volume would, and starts the webhook with them.
pub async fn start_operator_and_webhook(
    plane: &ControlPlane,
    client: &Client,
) -> anyhow::Result<Installed> {
    start_operator_and_webhook_with(plane, client, free_port()?, &[]).await
}

/// [`start_operator_and_webhook`] with the webhook on `webhook_port` and
/// extra webhook flags.
pub async fn start_operator_and_webhook_with(
    plane: &ControlPlane,
    client: &Client,
    webhook_port: u16,
    webhook_flags: &[&str],
) -> anyhow::Result<Installed> {
    let webhook_url = format!("https://127.0.0.1:{webhook_port}/inject");
    let operator = start_operator_with(
        plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &webhook_url,
        &["--resync-interval-seconds", "2"],
    )?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "ferrimesh-system");
    let tls = eventually("the webhook's certificate from the operator", WAIT, || {
        let secrets = secrets.clone();
        async move { Ok(secrets.get_opt("ferrimesh-webhook-tls").await?) }
    })
    .await?;
    let data = tls.data.unwrap_or_default();
    for key in ["tls.crt", "tls.key"] {
        let value = data
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("certificate Secret has no {key}"))?;
        write_private(&plane.scratch().path(key), &value.0)?;
    }
    let webhook = start_webhook_with(
        plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        webhook_port,
        (
            &plane.scratch().path("tls.crt"),
            &plane.scratch().path("tls.key"),
        ),
        webhook_flags,
    )
    .await?;
    Ok(Installed {
        operator,
        webhook,
        webhook_url,
    })
}

/// A pod as the webhook leaves it (label and status annotation), created
/// directly, then given an IP and Ready as a kubelet would.
pub async fn injected_pod(client: &Client, ns: &str, name: &str, ip: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name, "security.istio.io/tlsMode": "istio"},
                     "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null}"}},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let status = json!({"status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// Creates `pod` until it comes back injected (the API server may call the
/// webhook before its configuration or certificate has settled); a pod
/// created uninjected meanwhile is deleted again.
pub async fn create_until_injected(pods: &Api<Pod>, pod: &Pod) -> anyhow::Result<Pod> {
    eventually("an injected pod", WAIT, || async {
        let created = pods.create(&PostParams::default(), pod).await?;
        if created
            .annotations()
            .contains_key("sidecar.istio.io/status")
        {
            return Ok(Some(created));
        }
        pods.delete(
            &created.name_any(),
            &kube::api::DeleteParams::default().grace_period(0),
        )
        .await?;
        Ok(None)
    })
    .await
}

/// Whether the WorkloadEntry `ns/name` exists.
pub async fn entry_exists(client: &Client, ns: &str, name: &str) -> anyhow::Result<bool> {
    Ok(Api::<WorkloadEntry>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .is_some())
}

/// Creates the ProxyProfile `<app>-debug` in `ns`, raising the proxy log
/// level of the pods labelled `app=<app>`.
pub async fn debug_profile(client: &Client, ns: &str, app: &str) -> anyhow::Result<()> {
    let profile: ferrimesh_crds::ProxyProfile = serde_json::from_value(json!({
        "apiVersion": "mesh.ferrimesh.io/v1alpha1",
        "kind": "ProxyProfile",
        "metadata": {"name": format!("{app}-debug"), "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": app}}, "proxy": {"logLevel": "debug"}},
    }))?;
    Api::<ferrimesh_crds::ProxyProfile>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &profile)
        .await?;
    Ok(())
}

/// Merge-patches `spec` into the spec of the Mesh `default`.
pub async fn patch_default_mesh(client: &Client, spec: serde_json::Value) -> anyhow::Result<()> {
    Api::<ferrimesh_crds::Mesh>::all(client.clone())
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(())
}

/// Creates the Mesh `default` selecting namespaces labelled `mesh=on`.
pub async fn mesh_selecting_mesh_on(client: &Client) -> anyhow::Result<()> {
    let spec = ferrimesh_crds::MeshSpec {
        namespace_selector: Some(serde_json::from_value(
            json!({"matchLabels": {"mesh": "on"}}),
        )?),
        ..ferrimesh_crds::MeshSpec::default()
    };
    Api::<ferrimesh_crds::Mesh>::all(client.clone())
        .create(
            &PostParams::default(),
            &ferrimesh_crds::Mesh::new("default", spec),
        )
        .await?;
    Ok(())
}

/// Plays the kubelet's part for the webhook's Secret volume until `until`:
/// copies `Secret/ferrimesh-webhook-tls` into `tls.crt`/`tls.key` in `dir`
/// whenever the certificate changes (key first, each swapped atomically).
/// Returns when each distinct certificate was written.
pub async fn sync_webhook_secret(
    secrets: Api<Secret>,
    dir: PathBuf,
    until: Instant,
) -> anyhow::Result<Vec<Instant>> {
    let (mut seen, mut written) = (Vec::new(), Vec::new());
    while Instant::now() < until {
        if let Some(secret) = secrets.get_opt("ferrimesh-webhook-tls").await? {
            let data = secret.data.unwrap_or_default();
            if let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key"))
                && !seen.contains(&cert.0)
            {
                for (name, bytes) in [("tls.key", &key.0), ("tls.crt", &cert.0)] {
                    let tmp = dir.join(format!("{name}.tmp"));
                    write_private(&tmp, bytes)?;
                    std::fs::rename(&tmp, dir.join(name))?;
                }
                seen.push(cert.0.clone());
                written.push(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(written)
}

/// The webhook on `port`, serving the operator's certificate from files
/// that follow `Secret/ferrimesh-webhook-tls` until `until`
/// ([`sync_webhook_secret`]); returns once it is ready, with the syncer's
/// handle (when each certificate was written).
pub async fn start_webhook_on_secret(
    plane: &ControlPlane,
    client: &Client,
    port: u16,
    until: Instant,
) -> anyhow::Result<(
    Process,
    tokio::task::JoinHandle<anyhow::Result<Vec<Instant>>>,
)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ferrimesh-system");
    let syncer = tokio::spawn(sync_webhook_secret(
        secrets,
        plane.scratch().path(""),
        until,
    ));
    eventually("the certificate files", WAIT, || async {
        Ok(plane.scratch().path("tls.crt").exists().then_some(()))
    })
    .await?;
    let webhook = start_webhook(
        plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &plane.scratch().path("tls.crt"),
        &plane.scratch().path("tls.key"),
    )
    .await?;
    Ok((webhook, syncer))
}

/// The leaf certificate (DER) that 127.0.0.1:`port` serves in a new TLS
/// handshake, as a client sees it (any certificate accepted).
pub async fn served_certificate(port: u16) -> anyhow::Result<Vec<u8>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()?;
    let response = client
        .get(format!("https://127.0.0.1:{port}/healthz"))
        .send()
        .await?;
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|tls| tls.peer_certificate())
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow::anyhow!("no certificate from 127.0.0.1:{port}"))
}

/// Whether a new TLS connection to 127.0.0.1:`port` that trusts exactly
/// the CAs of `bundle` (PEM), as the API server does with a `caBundle`,
/// is accepted.
pub async fn trusted_by_bundle(port: u16, bundle: &str) -> anyhow::Result<bool> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2));
    for ca in reqwest::Certificate::from_pem_bundle(bundle.as_bytes())? {
        builder = builder.add_root_certificate(ca);
    }
    let client = builder.build()?;
    Ok(client
        .get(format!("https://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_ok())
}

/// The `caBundle` of the first webhook of `ferrimesh-sidecar-injector`, the
/// MutatingWebhookConfiguration the operator writes for the Mesh `default`.
pub async fn ca_bundle(client: &Client) -> anyhow::Result<Option<String>> {
    let config = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt("ferrimesh-sidecar-injector")
        .await?;
    Ok(config
        .and_then(|c| c.webhooks)
        .and_then(|w| w.into_iter().next())
        .and_then(|w| w.client_config.ca_bundle)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned()))
}

/// The `(status, reason, message)` of the condition `type_` of the Mesh
/// `mesh`, if it has one.
pub async fn mesh_condition(
    client: &Client,
    mesh: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let mesh = Api::<Mesh>::all(client.clone()).get(mesh).await?;
    Ok(mesh
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
}

/// The Events in `namespace` with `reason` about the object `name` of
/// `kind`.
pub async fn events_about(
    client: &Client,
    namespace: &str,
    reason: &str,
    kind: &str,
    name: &str,
) -> anyhow::Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)
                })
        })
        .collect())
}

/// The Secret of the operator's namespace holding the config cluster's
/// kubeconfig (`workloadRegistration.target`'s default `secretName`).
pub const TARGET_SECRET: &str = "ferrimesh-registration-target";

/// Writes the workload cluster's [`TARGET_SECRET`] holding `kubeconfig`
/// (created, or replaced: a rotation).
pub async fn target_secret(client: &Client, kubeconfig: &str) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": TARGET_SECRET, "namespace": "ferrimesh-system"},
        "stringData": {"kubeconfig": kubeconfig}
    }))?;
    Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
        .patch(
            TARGET_SECRET,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(())
}

/// Applies config/components/registration-target into the config
/// cluster's `namespace`, as the component's own comment says: from an
/// overlay naming the namespace.
pub fn grant_target_rights(plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let overlay = plane
        .scratch()
        .path(&format!("registration-overlay-{namespace}"));
    std::fs::create_dir_all(&overlay)?;
    let component = repo_root().join("config/components/registration-target");
    let relative = relative_path(&overlay, &component);
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\ncomponents: [{relative}]\n"
        ),
    )?;
    let overlay = overlay.to_str().context("a UTF-8 scratch path")?;
    plane.apply_kustomization(overlay)?; // an absolute path stays itself
    Ok(())
}

/// `to` relative to `from` (kustomize refuses absolute component paths).
fn relative_path(from: &Path, to: &Path) -> String {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let ups = std::iter::repeat_n("..".to_owned(), from.len() - common);
    let downs = to[common..]
        .iter()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    ups.chain(downs).collect::<Vec<_>>().join("/")
}
