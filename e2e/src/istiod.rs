//! istiod (`pilot-discovery`, built from the `istio.io/istio` Go module by
//! `e2e/hack/build-istio.sh` and cached by version) as a local process
//! against the suite's API server: the oracle for injection (its own
//! `/inject`) and the consumer of the registry (its debug views).
//!
//! It runs as Istio's chart deploys it, but on loopback ports: Istio's CRDs
//! from the module's `base` chart, the `istio` and `istio-sidecar-injector`
//! ConfigMaps rendered from the module's `istio-discovery` chart for a given
//! `Mesh` ([`crate::istio_config`]), `POD_NAMESPACE=istio-system`, and its
//! own webhook-configuration patching switched off.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrimesh_crds::MeshSpec;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::istio_config::{self, IstioConfig};
use crate::{ControlPlane, Process, cached_build, free_port, http_get};

/// The namespace istiod runs in.
pub const ISTIO_NAMESPACE: &str = "istio-system";

/// The built istiod and the module it was built from.
#[derive(Debug, Clone)]
pub struct IstioBuild {
    dir: PathBuf,
}

impl IstioBuild {
    /// The cached build, built when missing (`FERRIMESH_ISTIO_DIR` names a
    /// ready one instead).
    pub fn get() -> anyhow::Result<Self> {
        Ok(Self {
            dir: cached_build("FERRIMESH_ISTIO_DIR", "build-istio.sh")?,
        })
    }

    /// The `pilot-discovery` binary.
    pub fn pilot_discovery(&self) -> PathBuf {
        self.dir.join("pilot-discovery")
    }

    /// The `istio.io/istio` module version the build comes from.
    pub fn version(&self) -> String {
        std::fs::read_to_string(self.dir.join("version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    }

    /// A path inside the module's `manifests/charts`.
    pub fn chart(&self, path: &str) -> PathBuf {
        self.dir.join("istio/manifests/charts").join(path)
    }

    /// The `istio-discovery` chart.
    pub fn discovery_chart(&self) -> PathBuf {
        self.chart("istio-control/istio-discovery")
    }
}

/// A running istiod.
pub struct Istiod {
    /// `http://127.0.0.1:<port>`: `/ready`, `/debug/...`.
    pub http_url: String,
    /// `https://127.0.0.1:<port>`: `/inject`, `/validate`.
    pub https_url: String,
    /// The configuration it was started with.
    pub config: IstioConfig,
    log: PathBuf,
    process: Process,
}

impl Istiod {
    /// Installs Istio's CRDs and the configuration for `mesh` into `plane`,
    /// starts istiod and waits until it is ready.
    pub async fn start(plane: &ControlPlane, mesh: &MeshSpec) -> anyhow::Result<Self> {
        let build = IstioBuild::get()?;
        let config = istio_config::render(mesh, &build.discovery_chart())?;
        plane
            .apply_files(&build.chart("base/files/crd-all.gen.yaml"))
            .context("applying Istio's CRDs")?;
        let client = plane.client().await?;
        install_config(&client, &config).await?;

        let work = plane.scratch().path(&format!("istiod-{}", config.revision));
        std::fs::create_dir_all(&work)?;
        let log = plane
            .scratch()
            .path(&format!("istiod-{}.log", config.revision));
        let [http, grpc, secure_grpc, https, monitoring, ctrlz] = [
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
        ];
        let loopback = |port: u16| format!("127.0.0.1:{port}");
        let mut command = Command::new(build.pilot_discovery());
        command
            .current_dir(&work)
            .arg("discovery")
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args(["--httpAddr", &loopback(http)])
            .args(["--grpcAddr", &loopback(grpc)])
            .args(["--secureGRPCAddr", &loopback(secure_grpc)])
            .args(["--httpsAddr", &loopback(https)])
            .args(["--monitoringAddr", &loopback(monitoring)])
            .args(["--ctrlz_port", &ctrlz.to_string()])
            .args(["--ctrlz_address", "127.0.0.1"])
            .args(["--domain", "cluster.local"])
            .args(["--log_output_level", "default:info"])
            .env("POD_NAMESPACE", ISTIO_NAMESPACE)
            .env("POD_NAME", format!("istiod-{}", config.revision))
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("PILOT_ENABLE_CONFIG_DISTRIBUTION_TRACKING", "false");
        for (name, value) in &config.env {
            command.env(name, value);
        }
        let process = Process::spawn("istiod", &mut command, &log)?;
        let mut istiod = Self {
            http_url: format!("http://{}", loopback(http)),
            https_url: format!("https://{}", loopback(https)),
            config,
            log,
            process,
        };
        istiod.wait_ready(Duration::from_secs(180)).await?;
        Ok(istiod)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process
                .check_running()
                .with_context(|| self.log_tail())?;
            if http_get(&format!("{}/ready", self.http_url), None)
                .await
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("istiod not ready after {timeout:?}; {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last lines of istiod's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of istiod's log:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// Sends an AdmissionReview to istiod's `/inject` (with `path` appended,
    /// e.g. `/cluster/c1/net/n1`) and returns its answer.
    pub async fn inject(&self, path: &str, review: &Value) -> anyhow::Result<Value> {
        post_review(&format!("{}/inject{path}", self.https_url), review).await
    }

    /// A JSON debug view, e.g. `endpointShardz`.
    pub async fn debug(&self, view: &str) -> anyhow::Result<Value> {
        let url = format!("{}/debug/{view}", self.http_url);
        let body = http_get(&url, None)
            .await
            .with_context(|| format!("GET {url}"))?;
        serde_json::from_str(&body).with_context(|| format!("parsing {url}"))
    }

    /// The process, to stop it early.
    pub fn process(self) -> Process {
        self.process
    }
}

/// POSTs an AdmissionReview to an admission endpoint over HTTPS (any
/// certificate accepted: istiod's and the test webhook's are self-made) and
/// returns the review it answers.
pub async fn post_review(url: &str, review: &Value) -> anyhow::Result<Value> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(review)?)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("POST {url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("POST {url}: answer is not JSON"))
}

/// Creates `istio-system` and writes the two ConfigMaps of `config`.
async fn install_config(client: &Client, config: &IstioConfig) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(ISTIO_NAMESPACE).await?.is_none() {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ISTIO_NAMESPACE}}))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
    }
    let (mesh_name, injector_name) = config.config_map_names();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ISTIO_NAMESPACE);
    let apply = PatchParams::apply("ferrimesh-e2e").force();
    let mesh_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": mesh_name, "namespace": ISTIO_NAMESPACE},
        "data": {"mesh": config.mesh, "meshNetworks": "networks: {}"},
    });
    maps.patch(&mesh_name, &apply, &Patch::Apply(&mesh_map))
        .await
        .context("writing the mesh ConfigMap")?;
    let injector_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": injector_name, "namespace": ISTIO_NAMESPACE},
        "data": {
            "config": config.injector,
            "values": serde_json::to_string_pretty(&config.values)?,
        },
    });
    maps.patch(&injector_name, &apply, &Patch::Apply(&injector_map))
        .await
        .context("writing the injector ConfigMap")?;
    Ok(())
}

/// The endpoints with `ip` that istiod lists for `host` in its
/// `/debug/endpointShardz` view, over all shards (EndpointSlices,
/// ServiceEntry-selected pods, WorkloadEntries).
pub fn endpoints_with<'a>(shardz: &'a Value, host: &str, ip: &str) -> Vec<&'a Value> {
    fn collect<'a>(value: &'a Value, ip: &str, found: &mut Vec<&'a Value>) {
        match value {
            Value::Object(object) => {
                if object
                    .get("Addresses")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|x| x == ip))
                {
                    found.push(value);
                }
                for (key, inner) in object {
                    if key != "Addresses" {
                        collect(inner, ip, found);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, ip, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    if let Some(h) = shardz.get(host) {
        collect(h, ip, &mut found);
    }
    found
}
