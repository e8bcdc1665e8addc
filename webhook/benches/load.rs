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

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A typical Deployment pod's AdmissionReview.
fn review_body() -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "d6b4e9a2-load", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo", "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "reviews-v1-5d4f8c7b9-", "namespace": "bookinfo",
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
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(port: u16) -> Server {
    let dir = std::env::temp_dir().join(format!("ferrimesh-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &ca).expect("leaf");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("cert");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("key");
    std::fs::write(
        dir.join("mesh.yaml"),
        "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n",
    )
    .expect("mesh");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ferrimesh-webhook"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{}", port + 1),
        ])
        .arg("--tls-cert-file")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("tls.key"))
        .arg("--mesh-file")
        .arg(dir.join("mesh.yaml"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("webhook binary");
    Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ca_pem: ca.pem(),
        _dir: tempdir::Dir(dir),
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
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
        let request = Request::post("/inject")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let Ok(request) = request else { return false };
        match self.0.send_request(request).await {
            Ok(response) => {
                response.status().is_success() && response.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        }
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
    let server = start_server(port);
    let body = Bytes::from(review_body());
    let tls = tls_config(&server.ca_pem);
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut probe) = Connection::open(server.addr, Arc::clone(&tls)).await
                && probe.post(&body).await
            {
                break;
            }
            assert!(Instant::now() < deadline, "the webhook did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "ferrimesh-webhook load test: {} cores, {connections} keep-alive connections, {seconds} s per run",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let pool = open_all(server.addr, &tls, connections).await;
        let (server_before, generator_before) = (cpu_time(server.child.id()), cpu_time(std::process::id()));
        let (ok, failed) = closed_loop(pool, &body, seconds).await;
        let server_cpu = (cpu_time(server.child.id()) - server_before).as_secs_f64();
        let generator_cpu = (cpu_time(std::process::id()) - generator_before).as_secs_f64();
        println!(
            "max throughput: {:.0} admissions/s ({ok} ok, {failed} failed); the server used {:.2} cores, {:.0} admissions per CPU-second; the generator {:.2} cores",
            ok as f64 / seconds as f64,
            server_cpu / seconds as f64,
            ok as f64 / server_cpu.max(0.001),
            generator_cpu / seconds as f64
        );
        for rate in [1000, 2000] {
            let pool = open_all(server.addr, &tls, OPEN_LOOP_CONNECTIONS).await;
            let (latencies, failed, lag) = open_loop(pool, &body, rate, seconds).await;
            println!(
                "{rate} rps: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} ok, {failed} failed; worst send lag {:.2} ms)",
                percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                latencies.len(),
                lag.as_secs_f64() * 1e3
            );
        }
    });
    println!(
        "server peak RSS: {:.1} MiB",
        peak_rss_kib(server.child.id()) as f64 / 1024.0
    );
}
