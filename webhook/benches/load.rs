//! Load test of the release `ferrimesh-webhook` binary over TLS keep-alive
//! on loopback (`make bench-webhook`; not part of CI). The requests go out
//! through hyper's connection-level HTTP/1.1 client, the leanest there is.
//!
//! 1. Closed loop: `LOAD_CONNECTIONS` connections send back to back for
//!    `LOAD_SECONDS`: the maximum admissions per second.
//! 2. Open loop at fixed rates (1,000 and 2,000 per second): requests are
//!    due on a schedule whatever the answers do, spread over 64 connections
//!    (a slow server cannot slow the senders down and hide its queueing);
//!    latency runs from the moment the schedule released each request.
//!
//! Then the server's peak RSS (VmHWM). The load generator runs on the same
//! machine and shares its cores (its CPU time is printed): the figures are
//! a floor.
//!
//! With `LOAD_CLUSTER=1` (`make bench-webhook-cluster`) the same runs are
//! made twice against the local control plane (kube-apiserver and etcd)
//! holding `LOAD_NODES` Nodes, `LOAD_NAMESPACES` namespaces with two
//! ProxyProfiles each and three Meshes: first the webhook with
//! `--mesh-file` (the same Mesh and the pods' namespace's profiles as
//! files), then the webhook watching the cluster; the figures side by side,
//! and the cluster webhook's RSS once its caches are filled.
//! `LOAD_WEBHOOK_BIN` runs another build of the binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use ferrimesh_e2e::Scratch;
use ferrimesh_e2e::tls::Authority;
use ferrimesh_e2e::webhook_process::{loopback, webhook_command};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A typical Deployment pod's AdmissionReview, created in `namespace`.
fn review_body(namespace: &str) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "d6b4e9a2-load", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "reviews-v1-5d4f8c7b9-", "namespace": namespace,
                    "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d4f8c7b9"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9080"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-5d4f8c7b9", "uid": "8f1a2b3c", "controller": true, "blockOwnerDeletion": true}]
                },
                "spec": {
                    "serviceAccountName": "bookinfo-reviews",
                    "containers": [{
                        "name": "reviews", "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                        "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/health", "port": 9080}},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}]
                }
            },
            "dryRun": false
        }
    })
    .to_string()
    .into_bytes()
}

struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    ca_pem: String,
    _scratch: Scratch,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the webhook under test takes its mesh configuration from.
enum Source<'a> {
    /// `--mesh-file` (the default Mesh) and `--profile-file`s of these
    /// ProxyProfile manifests.
    Files { profiles: &'a [String] },
    /// The cluster of this kubeconfig (revision `default`).
    Cluster { kubeconfig: &'a std::path::Path },
}

/// The webhook binary under test: `LOAD_WEBHOOK_BIN` or this build's.
fn webhook_binary() -> std::path::PathBuf {
    std::env::var_os("LOAD_WEBHOOK_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_ferrimesh-webhook").into(),
        std::path::PathBuf::from,
    )
}

fn start_server(port: u16, source: &Source<'_>) -> Server {
    let scratch = Scratch::new(&format!("load-{port}")).expect("scratch dir");
    let authority = Authority::new().expect("test CA");
    let (cert, key) = (scratch.path("tls.crt"), scratch.path("tls.key"));
    authority.write_loopback(&cert, &key).expect("certificate");
    let mut command = webhook_command(
        &webhook_binary(),
        (&cert, &key),
        loopback(port),
        loopback(port + 1),
    );
    match source {
        Source::Files { profiles } => {
            std::fs::write(scratch.path("mesh.yaml"), MESH).expect("mesh");
            command.arg("--mesh-file").arg(scratch.path("mesh.yaml"));
            for (i, profile) in profiles.iter().enumerate() {
                let path = scratch.path(&format!("profile-{i}.yaml"));
                std::fs::write(&path, profile).expect("profile");
                command.arg("--profile-file").arg(path);
            }
        }
        Source::Cluster { kubeconfig } => {
            command.env("KUBECONFIG", kubeconfig);
        }
    }
    let child = command
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("webhook binary");
    Server {
        child,
        addr: loopback(port),
        ca_pem: authority.ca_pem().to_owned(),
        _scratch: scratch,
    }
}

/// The Mesh of every run: Mesh defaults for revision `default`.
const MESH: &str =
    "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n";

/// A memory figure of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // Linux reports in USER_HZ, 100 per second on every architecture it runs on here.
    Duration::from_millis(ticks * 10)
}

/// One keep-alive HTTP/1.1 connection over TLS, driven by hyper's
/// connection-level client: no pool, no redirects, no per-request set-up
/// beyond the request itself. The generator shares the server's cores, so
/// the less it spends per request, the more of the machine the server gets.
struct Connection(SendRequest<Full<Bytes>>);

impl Connection {
    async fn open(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?;
        let stream = TlsConnector::from(tls).connect(name, tcp).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self(sender))
    }

    /// Posts the review; whether a 2xx answer came back whole.
    async fn post(&mut self, body: &Bytes) -> bool {
        self.answer(body).await.is_some()
    }

    /// Posts the review; the body of a 2xx answer that came back whole.
    async fn answer(&mut self, body: &Bytes) -> Option<Bytes> {
        let request = Request::post("/inject")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .ok()?;
        let response = self.0.send_request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(response.into_body().collect().await.ok()?.to_bytes())
    }
}

fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA certificate")).expect("CA");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn open_all(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>, n: usize) -> Vec<Connection> {
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n {
        connections.push(
            Connection::open(addr, Arc::clone(tls))
                .await
                .expect("connect to the webhook"),
        );
    }
    connections
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Every connection sends back to back until `seconds` have passed;
/// returns the answers that succeeded and those that failed.
async fn closed_loop(connections: Vec<Connection>, body: &Bytes, seconds: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|mut connection| {
            let body = body.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while Instant::now() < deadline {
                    if connection.post(&body).await {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let mut totals = (0, 0);
    for task in tasks {
        let (ok, failed) = task.await.unwrap_or((0, 1));
        totals = (totals.0 + ok, totals.1 + failed);
    }
    totals
}

/// Sends `rate` requests per second for `seconds`, request `i` on
/// connection `i % n`; returns the sorted latencies, each from the moment
/// the schedule released its request (so a request that waits for its
/// connection counts the wait: a slow server cannot hide its queueing), the
/// failures, and the worst lag of a release behind the schedule (tokio's
/// timer ticks in milliseconds: that lag is the generator's, not counted).
async fn open_loop(
    connections: Vec<Connection>,
    body: &Bytes,
    rate: u64,
    seconds: u64,
) -> (Vec<Duration>, u64, Duration) {
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let total = rate * seconds;
    let (queues, workers): (Vec<_>, Vec<_>) = connections
        .into_iter()
        .map(|mut connection| {
            let (queue, mut released) = mpsc::unbounded_channel::<Instant>();
            let body = body.clone();
            let worker = tokio::spawn(async move {
                let mut results = Vec::new();
                while let Some(released_at) = released.recv().await {
                    let ok = connection.post(&body).await;
                    results.push((released_at.elapsed(), ok));
                }
                results
            });
            (queue, worker)
        })
        .unzip();
    let mut worst_lag = Duration::ZERO;
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let released = Instant::now();
        worst_lag = worst_lag.max(released - due);
        let _ = queues[i as usize % queues.len()].send(released);
    }
    drop(queues);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0;
    for worker in workers {
        for (latency, ok) in worker.await.unwrap_or_default() {
            if ok {
                latencies.push(latency);
            } else {
                failed += 1;
            }
        }
    }
    latencies.sort();
    (latencies, failed, worst_lag)
}

/// Connections of the open-loop runs: a pool as an API server keeps one.
const OPEN_LOOP_CONNECTIONS: usize = 64;

/// What one series of runs measured.
struct Figures {
    /// The webhook's answer to the review.
    answer: Bytes,
    throughput: f64,
    cpu_per_admission_us: f64,
    p99_ms: [f64; 2],
}

/// Waits until the webhook answers a review (it is ready: the cluster
/// webhook answers only once its watches have listed); its answer.
async fn wait_answering(
    server: &Server,
    tls: &Arc<rustls::ClientConfig>,
    body: &Bytes,
    wait: Duration,
) -> Bytes {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(mut probe) = Connection::open(server.addr, Arc::clone(tls)).await
            && let Some(answer) = probe.answer(body).await
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "the webhook did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The closed loop and the open loops against `server`, printed.
async fn measure(server: &Server, body: &Bytes, connections: usize, seconds: u64) -> Figures {
    let tls = tls_config(&server.ca_pem);
    let answer = wait_answering(server, &tls, body, Duration::from_secs(120)).await;
    let pool = open_all(server.addr, &tls, connections).await;
    let (server_before, generator_before) =
        (cpu_time(server.child.id()), cpu_time(std::process::id()));
    let (ok, failed) = closed_loop(pool, body, seconds).await;
    let server_cpu = (cpu_time(server.child.id()) - server_before).as_secs_f64();
    let generator_cpu = (cpu_time(std::process::id()) - generator_before).as_secs_f64();
    let throughput = ok as f64 / seconds as f64;
    println!(
        "max throughput: {throughput:.0} admissions/s ({ok} ok, {failed} failed); the server used {:.2} cores, {:.0} admissions per CPU-second; the generator {:.2} cores",
        server_cpu / seconds as f64,
        ok as f64 / server_cpu.max(0.001),
        generator_cpu / seconds as f64
    );
    let mut p99_ms = [0.0; 2];
    for (i, rate) in [1000, 2000].into_iter().enumerate() {
        let pool = open_all(server.addr, &tls, OPEN_LOOP_CONNECTIONS).await;
        let (latencies, failed, lag) = open_loop(pool, body, rate, seconds).await;
        p99_ms[i] = percentile(&latencies, 0.99).as_secs_f64() * 1e3;
        println!(
            "{rate} rps: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} ok, {failed} failed; worst send lag {:.2} ms)",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            p99_ms[i],
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            latencies.len(),
            lag.as_secs_f64() * 1e3
        );
    }
    println!(
        "server peak RSS: {:.1} MiB",
        rss_kib(server.child.id(), "VmHWM:") as f64 / 1024.0
    );
    Figures {
        answer,
        throughput,
        cpu_per_admission_us: server_cpu * 1e6 / (ok.max(1) as f64),
        p99_ms,
    }
}

fn main() {
    // `cargo bench` passes filter arguments; this bench has a single run.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let connections = env_or("LOAD_CONNECTIONS", 16) as usize;
    let seconds = env_or("LOAD_SECONDS", 10);
    let port = env_or("LOAD_PORT", 18_443) as u16;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "ferrimesh-webhook load test: {} cores, {connections} keep-alive connections, {seconds} s per run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if env_or("LOAD_CLUSTER", 0) == 0 {
        let server = start_server(port, &Source::Files { profiles: &[] });
        let body = Bytes::from(review_body("bookinfo"));
        runtime.block_on(measure(&server, &body, connections, seconds));
        return;
    }
    let comparison = ferrimesh_e2e::until_terminated(cluster::compare(port, connections, seconds));
    if let Err(e) = runtime.block_on(comparison) {
        eprintln!("cluster load test failed: {e:#}");
        std::process::exit(1);
    }
}

/// `LOAD_CLUSTER=1`: the `--mesh-file` webhook and the cluster webhook
/// against the same control plane and the same pod.
mod cluster {
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use ferrimesh_crds::{istio_crds, mesh_crds};
    use ferrimesh_e2e::ControlPlane;
    use ferrimesh_e2e::fixtures::wait_for_crds;
    use futures::{StreamExt, TryStreamExt};
    use hyper::body::Bytes;
    use k8s_openapi::api::core::v1::{Namespace, Node};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DynamicObject, PostParams};
    use kube::core::{ApiResource, GroupVersionKind};
    use kube::{Api, Client};
    use serde_json::{Value, json};

    use super::{Figures, Source, env_or, measure, review_body, rss_kib, start_server};

    /// The namespace of the reviewed pods: one of the benchmark's.
    const POD_NAMESPACE: &str = "bench-0042";
    /// Creates in flight while filling the cluster.
    const CONCURRENCY: usize = 32;

    fn namespace_name(i: u64) -> String {
        format!("bench-{i:04}")
    }

    /// A Node as a kubelet of v1.36 registers it (addresses, capacity,
    /// conditions, the images it holds), about 4 KiB of JSON.
    fn node(i: u64) -> Value {
        let images: Vec<Value> = (0..24)
            .map(|n| json!({"names": [format!("registry.example/team-{n}/service@sha256:{:064x}", i * 100 + n),
                                      format!("registry.example/team-{n}/service:v{n}.{i}")],
                             "sizeBytes": 50_000_000 + n * 1_000_000}))
            .collect();
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{i:05}"), "labels": {
                "kubernetes.io/hostname": format!("node-{i:05}"), "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", 64 + i / 256, i % 256)},
            "status": {
                "addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", i / 256, i % 256)},
                              {"type": "Hostname", "address": format!("node-{i:05}")}],
                "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                "allocatable": {"cpu": "7800m", "memory": "31Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": "2026-12-01T00:00:00Z", "lastTransitionTime": "2026-12-01T00:00:00Z"}],
                "images": images,
                "nodeInfo": {"kubeletVersion": "v1.36.3", "kubeProxyVersion": "", "architecture": "amd64",
                    "operatingSystem": "linux", "osImage": "Debian GNU/Linux 13", "kernelVersion": "6.12.0",
                    "containerRuntimeVersion": "containerd://2.1.0", "machineID": format!("{i:032x}"),
                    "systemUUID": format!("{i:032x}"), "bootID": format!("{i:032x}")}
            }
        })
    }

    /// A namespace's two ProxyProfiles: one for the whole namespace, one
    /// for the `reviews` workload (the reviewed pod's).
    fn profiles(namespace: &str) -> [Value; 2] {
        [
            json!({"apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "ProxyProfile",
                   "metadata": {"name": "namespace-defaults", "namespace": namespace},
                   "spec": {"proxy": {"logLevel": "info"}, "traffic": {"excludeOutboundPorts": "9999"}}}),
            json!({"apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "ProxyProfile",
                   "metadata": {"name": "reviews", "namespace": namespace},
                   "spec": {"selector": {"matchLabels": {"app": "reviews"}},
                            "proxy": {"concurrency": 2, "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}}}}}),
        ]
    }

    fn meshes() -> [Value; 3] {
        ["default", "canary", "stable"].map(|revision| {
            let spec = if revision == "default" {
                json!({})
            } else {
                json!({"revision": revision})
            };
            json!({"apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "Mesh",
                   "metadata": {"name": revision}, "spec": spec})
        })
    }

    /// Creates every object, `CONCURRENCY` at a time.
    async fn create_all(api: Api<DynamicObject>, objects: Vec<Value>) -> anyhow::Result<()> {
        futures::stream::iter(objects)
            .map(|object| {
                let api = api.clone();
                async move {
                    let object: DynamicObject = serde_json::from_value(object)?;
                    api.create(&PostParams::default(), &object).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await
    }

    fn api(client: &Client, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        Api::all_with(client.clone(), &resource)
    }

    fn namespaced(client: &Client, kind: &str, namespace: &str) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "mesh.ferrimesh.io",
            "v1alpha1",
            kind,
        ));
        Api::namespaced_with(client.clone(), namespace, &resource)
    }

    async fn fill(client: &Client, nodes: u64, namespaces: u64) -> anyhow::Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in mesh_crds().into_iter().chain(istio_crds()) {
            crds.create(&PostParams::default(), &crd).await?;
        }
        wait_for_crds(client).await?;
        let started = Instant::now();
        create_all(
            api(client, "mesh.ferrimesh.io", "v1alpha1", "Mesh"),
            meshes().into(),
        )
        .await?;
        let names: Vec<String> = (0..namespaces).map(namespace_name).collect();
        let namespace_objects = names
            .iter()
            .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}))
            .collect();
        create_all(api(client, "", "v1", "Namespace"), namespace_objects).await?;
        futures::stream::iter(
            names
                .iter()
                .flat_map(|n| profiles(n).map(|p| (n.clone(), p))),
        )
        .map(|(namespace, profile)| {
            let api = namespaced(client, "ProxyProfile", &namespace);
            async move {
                let profile: DynamicObject = serde_json::from_value(profile)?;
                api.create(&PostParams::default(), &profile).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
        create_all(
            api(client, "", "v1", "Node"),
            (0..nodes).map(node).collect(),
        )
        .await?;
        // Nodes keep their status on create, as a kubelet registers them.
        let one: Node = Api::all(client.clone()).get("node-00000").await?;
        anyhow::ensure!(
            one.status
                .and_then(|s| s.node_info)
                .map(|i| i.kubelet_version)
                .as_deref()
                == Some("v1.36.3"),
            "the Node's status was not kept"
        );
        let listed = Api::<Namespace>::all(client.clone())
            .list(&Default::default())
            .await?
            .items
            .len();
        println!(
            "cluster filled in {:.1} s: {nodes} Nodes, {namespaces} namespaces ({listed} in all), {} ProxyProfiles, 3 Meshes",
            started.elapsed().as_secs_f64(),
            namespaces * 2
        );
        Ok(())
    }

    fn ratio(cluster: f64, file: f64) -> String {
        format!("{:+.1} %", (cluster / file - 1.0) * 100.0)
    }

    pub async fn compare(port: u16, connections: usize, seconds: u64) -> anyhow::Result<()> {
        let nodes = env_or("LOAD_NODES", 5_000);
        let namespaces = env_or("LOAD_NAMESPACES", 1_000).max(43);
        let plane = ControlPlane::start()
            .await
            .context("the local control plane")?;
        let client = plane.client().await?;
        fill(&client, nodes, namespaces).await?;
        let body = Bytes::from(review_body(POD_NAMESPACE));
        let profile_files: Vec<String> = profiles(POD_NAMESPACE)
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;

        println!("== the webhook with --mesh-file and the namespace's ProxyProfiles as files");
        let file = {
            let server = start_server(
                port,
                &Source::Files {
                    profiles: &profile_files,
                },
            );
            measure(&server, &body, connections, seconds).await
        };

        println!("== the webhook watching the cluster");
        let started = Instant::now();
        let server = start_server(
            port + 2,
            &Source::Cluster {
                kubeconfig: &plane.kubeconfig,
            },
        );
        let ready = format!("http://127.0.0.1:{}/readyz", port + 3);
        while ferrimesh_e2e::http_get(&ready, None).await.is_none() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the cluster webhook did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let synced = started.elapsed();
        let cached_rss = rss_kib(server.child.id(), "VmRSS:");
        let synced_peak = rss_kib(server.child.id(), "VmHWM:");
        println!(
            "ready (watches listed) after {:.2} s; RSS {:.1} MiB, peak so far {:.1} MiB",
            synced.as_secs_f64(),
            cached_rss as f64 / 1024.0,
            synced_peak as f64 / 1024.0
        );
        let cluster: Figures = measure(&server, &body, connections, seconds).await;
        anyhow::ensure!(
            cluster.answer == file.answer,
            "the two webhooks answer the review differently:\n{:?}\n{:?}",
            file.answer,
            cluster.answer
        );
        let answer: Value = serde_json::from_slice(&cluster.answer)?;
        anyhow::ensure!(
            answer.pointer("/response/patch").is_some(),
            "the pod was not injected: {answer}"
        );
        println!(
            "cluster against file: throughput {}, server CPU per admission {}, p99 at 1,000 rps {}, at 2,000 rps {}",
            ratio(cluster.throughput, file.throughput),
            ratio(cluster.cpu_per_admission_us, file.cpu_per_admission_us),
            ratio(cluster.p99_ms[0], file.p99_ms[0]),
            ratio(cluster.p99_ms[1], file.p99_ms[1]),
        );
        Ok(())
    }
}
