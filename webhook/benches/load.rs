//! Load test of the release `ferrimesh-webhook` binary over TLS keep-alive
//! on loopback (`make bench-webhook`; not part of CI).
//!
//! 1. Closed loop: `LOAD_CONNECTIONS` connections send back to back for
//!    `LOAD_SECONDS`: the maximum admissions per second.
//! 2. Open loop at fixed rates (1,000 and 2,000 per second): requests are
//!    sent on a schedule whatever the answers do (a slow server cannot slow
//!    the senders down and hide its queueing); latency runs from each send.
//!
//! Then the server's peak RSS (VmHWM). The load generator runs on the same
//! machine and shares its cores: the figures are a floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    url: String,
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
        url: format!("https://127.0.0.1:{port}/inject"),
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

fn client(ca_pem: &str, connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .http1_only()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    connections: usize,
    seconds: u64,
) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_owned(), body.to_vec());
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    let success = match sent {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if success {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Sends `rate` requests per second for `seconds`; returns the sorted
/// latencies (from the moment each request was sent), the failures, and the
/// worst lag of a send behind its schedule (tokio's timer ticks in
/// milliseconds, so some lag is the generator's, not the server's; a lag
/// that grows would mean the generator fell behind).
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    rate: u64,
    seconds: u64,
) -> (Vec<Duration>, u64, Duration) {
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let total = rate * seconds;
    let mut tasks = Vec::with_capacity(total as usize);
    let mut worst_lag = Duration::ZERO;
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        worst_lag = worst_lag.max(scheduled.elapsed());
        let (client, url, body) = (client.clone(), url.to_owned(), body.to_vec());
        tasks.push(tokio::spawn(async move {
            let sent_at = Instant::now();
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let ok = match sent {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (sent_at.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok((latency, true)) => latencies.push(latency),
            _ => failed += 1,
        }
    }
    latencies.sort();
    (latencies, failed, worst_lag)
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
    let server = start_server(port);
    let body = review_body();
    runtime.block_on(async {
        let client = client(&server.ca_pem, connections);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.post(&server.url).header("content-type", "application/json").body(body.clone()).send().await.is_err() {
            assert!(Instant::now() < deadline, "the webhook did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("ferrimesh-webhook load test: {} cores, {connections} keep-alive connections, {seconds} s per run", std::thread::available_parallelism().map_or(0, |n| n.get()));
        let cpu_before = cpu_time(server.child.id());
        let (ok, failed) = closed_loop(&client, &server.url, &body, connections, seconds).await;
        let server_cpu = (cpu_time(server.child.id()) - cpu_before).as_secs_f64();
        println!(
            "max throughput: {:.0} admissions/s ({ok} ok, {failed} failed); the server used {:.2} cores, {:.0} admissions per CPU-second",
            ok as f64 / seconds as f64,
            server_cpu / seconds as f64,
            ok as f64 / server_cpu.max(0.001)
        );
        for rate in [1000, 2000] {
            let (latencies, failed, lag) = open_loop(&client, &server.url, &body, rate, seconds).await;
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
