//! `make bench-abuse`: the release `ferrimesh-webhook` binary under each
//! attack of a hostile client or pod, with a well-behaved client alongside
//! (not part of CI). Loopback only; every attack runs for `ABUSE_SECONDS`
//! (default 20) with a bounded number of connections.
//!
//! For each attack a fresh webhook is started with `--mesh-file`; the
//! well-behaved client sends a typical pod's review 20 times a second over
//! a keep-alive connection, as the API server does. Printed per attack: the
//! client's p50 and p99 latency and failures, what the attacker got back,
//! the webhook's peak RSS (VmHWM) and the CPU time it used. Exits non-zero
//! when a bound is broken: p99 under 50 ms, no failure, peak RSS under the
//! Deployment's memory limit (128 MiB). `ABUSE_ATTACKS` picks attacks by
//! name (`none,slow-bodies,tiny-records,stalled-bodies,alias-bomb,
//! many-containers,all`); `none` measures the client against an idle
//! webhook: the machine's own noise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrimesh_e2e::Scratch;
use ferrimesh_e2e::tls::Authority;
use ferrimesh_e2e::webhook_process::{bound_addresses, loopback, webhook_command};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The Deployment's memory limit (config/webhook/webhook.yaml).
const RSS_LIMIT_KIB: u64 = 128 * 1024;
/// The well-behaved client's bound on its p99 latency.
const P99_LIMIT: Duration = Duration::from_millis(50);
/// Requests per second of the well-behaved client.
const CLIENT_RATE: u64 = 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An AdmissionReview of a pod with these annotations and containers.
fn review(uid: &str, annotations: Value, containers: Vec<Value>) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "reviews-v1-5d4f8c7b9-", "namespace": "bookinfo",
                    "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d4f8c7b9"},
                    "annotations": annotations,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-5d4f8c7b9", "uid": "8f1a2b3c", "controller": true}]
                },
                "spec": {"containers": containers}
            }
        }
    })
    .to_string()
    .into_bytes()
}

fn app_container(name: &str) -> Value {
    json!({
        "name": name, "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
        "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": 9080}}
    })
}

fn typical_review() -> Vec<u8> {
    review(
        "well-behaved",
        json!({"prometheus.io/scrape": "true"}),
        vec![app_container("reviews")],
    )
}

/// `proxy.istio.io/config`: one anchor of `k` scalars aliased `k` times.
fn alias_bomb(k: usize) -> Vec<u8> {
    let scalars = vec!["x"; k].join(", ");
    let aliases = vec!["*a"; k].join(", ");
    let config = format!("a: &a [{scalars}]\nb: [{aliases}]\n");
    review(
        "alias-bomb",
        json!({"proxy.istio.io/config": config}),
        vec![app_container("reviews")],
    )
}

/// A pod of `n` small containers.
fn many_containers(n: usize) -> Vec<u8> {
    let containers = (0..n)
        .map(|i| {
            json!({
                "name": format!("c-{i:05}"), "image": "registry.example.com/team/app:1.0.0",
                "imagePullPolicy": "IfNotPresent", "ports": [{"containerPort": 8080, "protocol": "TCP"}]
            })
        })
        .collect();
    review("many-containers", json!({}), containers)
}

struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    _scratch: Scratch,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the webhook on a free loopback port and waits for it to listen.
fn start_server(authority: &Authority, name: &str) -> Server {
    let scratch = Scratch::new(&format!("abuse-{name}")).expect("scratch dir");
    let (cert, key) = (scratch.path("tls.crt"), scratch.path("tls.key"));
    authority.write_loopback(&cert, &key).expect("certificate");
    std::fs::write(
        scratch.path("mesh.yaml"),
        "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n",
    )
    .expect("mesh");
    let binary = Path::new(env!("CARGO_BIN_EXE_ferrimesh-webhook"));
    let mut child = webhook_command(binary, (&cert, &key), loopback(0), loopback(0))
        .arg("--mesh-file")
        .arg(scratch.path("mesh.yaml"))
        // As the Deployment sets it (config/webhook/webhook.yaml).
        .env("MIMALLOC_PURGE_DELAY", "0")
        .env(
            "RUST_LOG",
            "warn,ferrimesh_webhook::server=info,ferrimesh_webhook::server::admission=warn",
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("webhook binary");
    let (addr, _) = bound_addresses(&mut child).expect("the webhook logs its address");
    Server {
        child,
        addr,
        _scratch: scratch,
    }
}

/// CPU seconds (user + system) the process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<u64> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(fields.iter().sum())
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
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

async fn tls(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Option<TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    tcp.set_nodelay(true).ok()?;
    let name = ServerName::try_from("localhost").ok()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(Arc::clone(config)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()
}

/// A keep-alive HTTP/1.1 connection through hyper's connection-level client.
struct Connection(SendRequest<Full<Bytes>>);

impl Connection {
    async fn open(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Option<Self> {
        let stream = tls(addr, config).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        Some(Self(sender))
    }

    /// Posts `body`; the status when an answer came back whole.
    async fn post(&mut self, body: &Bytes) -> Option<u16> {
        self.send(body).await.ok()
    }

    /// Posts `body`; the status when an answer came back whole, else why not.
    async fn send(&mut self, body: &Bytes) -> Result<u16, String> {
        let request = Request::post("/inject")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(15), self.0.send_request(request))
            .await
            .map_err(|_| "no answer in 15 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }
}

/// What the well-behaved client saw.
struct ClientStats {
    latencies: Vec<Duration>,
    failures: u64,
    first_failure: Option<String>,
}

/// Sends a typical review at `CLIENT_RATE` per second until `until`; a
/// failure is anything but a 200 answer.
async fn well_behaved(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    until: Instant,
) -> ClientStats {
    let body = Bytes::from(typical_review());
    let mut stats = ClientStats {
        latencies: Vec::new(),
        failures: 0,
        first_failure: None,
    };
    let mut connection: Option<Connection> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / CLIENT_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < until {
        tick.tick().await;
        let started = Instant::now();
        if connection.is_none() {
            connection = Connection::open(addr, &config).await;
        }
        let status = match connection.as_mut() {
            Some(c) => c.send(&body).await,
            None => Err("cannot connect".to_owned()),
        };
        stats.latencies.push(started.elapsed());
        if status != Ok(200) {
            stats.failures += 1;
            stats
                .first_failure
                .get_or_insert_with(|| format!("{status:?}"));
            connection = None;
        }
    }
    stats
}

/// How the attacker's own requests were answered, by status (0: no answer).
#[derive(Default)]
struct Tally(std::sync::Mutex<BTreeMap<u16, u64>>);

impl Tally {
    fn add(&self, status: u16) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(status).or_default() += 1;
        }
    }

    fn summary(&self) -> String {
        let map = self.0.lock().map(|m| m.clone()).unwrap_or_default();
        map.iter()
            .map(|(status, n)| format!("{status}:{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn head(length: usize) -> String {
    format!(
        "POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

/// The status of the response on `stream`, if one arrives within `wait`.
async fn status_of(stream: &mut TlsStream<tokio::net::TcpStream>, wait: Duration) -> u16 {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n >= 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// `connections` connections each send a body `chunk` bytes at a time
/// every `pause`, reconnecting when cut off, until `until`.
async fn trickle(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    until: Instant,
    connections: usize,
    declared: usize,
    pause: Duration,
    tally: Arc<Tally>,
) {
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (config, tally) = (Arc::clone(&config), Arc::clone(&tally));
            tokio::spawn(async move {
                while Instant::now() < until {
                    let Some(mut stream) = tls(addr, &config).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if stream.write_all(head(declared).as_bytes()).await.is_err() {
                        continue;
                    }
                    let mut sent = 0;
                    while Instant::now() < until && sent < declared {
                        let write = async {
                            stream.write_all(b" ").await?;
                            stream.flush().await
                        };
                        if write.await.is_err() {
                            break;
                        }
                        sent += 1;
                        // Waiting for an answer paces the writes.
                        let status = status_of(&mut stream, pause).await;
                        if status != 0 {
                            tally.add(status);
                            break;
                        }
                    }
                    // Cut off: come back a second later with a new connection.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// `connections` connections each send `body_len` bytes of a body
/// announced one byte longer, then stall until cut off, over and over.
async fn stall_large(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    until: Instant,
    connections: usize,
    body_len: usize,
    tally: Arc<Tally>,
) {
    let chunk = vec![b' '; 64 * 1024];
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (config, tally, chunk) = (Arc::clone(&config), Arc::clone(&tally), chunk.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let Some(mut stream) = tls(addr, &config).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if stream
                        .write_all(head(body_len + 1).as_bytes())
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    let mut sent = 0;
                    while sent < body_len {
                        let n = chunk.len().min(body_len - sent);
                        if stream.write_all(&chunk[..n]).await.is_err() {
                            break;
                        }
                        sent += n;
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    let status = status_of(&mut stream, left).await;
                    tally.add(status);
                    // Cut off: come back a second later with a new connection.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// `clients` keep-alive clients post `body` back to back until `until`.
async fn flood(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    until: Instant,
    clients: usize,
    body: Bytes,
    tally: Arc<Tally>,
) {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (config, tally, body) = (Arc::clone(&config), Arc::clone(&tally), body.clone());
            tokio::spawn(async move {
                let mut connection = None;
                while Instant::now() < until {
                    if connection.is_none() {
                        connection = Connection::open(addr, &config).await;
                    }
                    let status = match connection.as_mut() {
                        Some(c) => c.post(&body).await,
                        None => None,
                    };
                    tally.add(status.unwrap_or(0));
                    if status.is_none() {
                        connection = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    None,
    SlowBodies,
    TinyRecords,
    StalledLargeBodies,
    AliasBomb,
    ManyContainers,
    All,
}

impl Attack {
    const EVERY: [Self; 7] = [
        Self::None,
        Self::SlowBodies,
        Self::TinyRecords,
        Self::StalledLargeBodies,
        Self::AliasBomb,
        Self::ManyContainers,
        Self::All,
    ];

    /// The attacks named in `ABUSE_ATTACKS` (comma-separated, as in
    /// `slow-bodies,all`), or every one.
    fn chosen() -> Vec<Self> {
        let Ok(names) = std::env::var("ABUSE_ATTACKS") else {
            return Self::EVERY.to_vec();
        };
        Self::EVERY
            .into_iter()
            .filter(|kind| names.split(',').any(|n| n.trim() == kind.key()))
            .collect()
    }

    fn key(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::SlowBodies => "slow-bodies",
            Self::TinyRecords => "tiny-records",
            Self::StalledLargeBodies => "stalled-bodies",
            Self::AliasBomb => "alias-bomb",
            Self::ManyContainers => "many-containers",
            Self::All => "all",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "no attack (the machine's own noise)",
            Self::SlowBodies => "600 slow bodies (1 byte/s)",
            Self::TinyRecords => "10 bodies in 1-byte TLS records",
            Self::StalledLargeBodies => "100 stalled ~3 MiB bodies",
            Self::AliasBomb => "4 clients: proxy.istio.io/config alias bomb",
            Self::ManyContainers => "3 clients: 20,000-container pods",
            Self::All => "all of the above at once",
        }
    }
}

async fn attack(
    kind: Attack,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    until: Instant,
    tally: Arc<Tally>,
) {
    let slow = trickle(
        addr,
        Arc::clone(&config),
        until,
        600,
        4096,
        Duration::from_secs(1),
        Arc::clone(&tally),
    );
    let tiny = trickle(
        addr,
        Arc::clone(&config),
        until,
        10,
        64 * 1024,
        Duration::from_millis(5),
        Arc::clone(&tally),
    );
    let stalled = stall_large(
        addr,
        Arc::clone(&config),
        until,
        100,
        3 * 1024 * 1024 - 1024,
        Arc::clone(&tally),
    );
    let bomb = flood(
        addr,
        Arc::clone(&config),
        until,
        4,
        Bytes::from(alias_bomb(1500)),
        Arc::clone(&tally),
    );
    let big = flood(
        addr,
        Arc::clone(&config),
        until,
        3,
        Bytes::from(many_containers(20_000)),
        Arc::clone(&tally),
    );
    match kind {
        Attack::None => tokio::time::sleep_until(until.into()).await,
        Attack::SlowBodies => slow.await,
        Attack::TinyRecords => tiny.await,
        Attack::StalledLargeBodies => stalled.await,
        Attack::AliasBomb => bomb.await,
        Attack::ManyContainers => big.await,
        Attack::All => {
            tokio::join!(slow, tiny, stalled, bomb, big);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seconds = env_or("ABUSE_SECONDS", 20).clamp(5, 300);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let authority = Authority::new().expect("test CA");
    let config = tls_config(authority.ca_pem());
    println!(
        "each attack {seconds} s against a fresh release webhook; client: {CLIENT_RATE} typical reviews/s; bounds: p99 < {} ms, 0 failures, peak RSS < {} MiB",
        P99_LIMIT.as_millis(),
        RSS_LIMIT_KIB / 1024
    );
    println!(
        "{:<46} {:>8} {:>8} {:>6} {:>9} {:>7}  attacker's answers (status:count)",
        "attack", "p50 ms", "p99 ms", "fail", "RSS MiB", "CPU s"
    );
    let mut broken = false;
    for kind in Attack::chosen() {
        let server = start_server(&authority, &format!("{kind:?}"));
        let until = Instant::now() + Duration::from_secs(seconds);
        let tally = Arc::new(Tally::default());
        let stats = runtime.block_on(async {
            let attacker = tokio::spawn(attack(
                kind,
                server.addr,
                Arc::clone(&config),
                until,
                Arc::clone(&tally),
            ));
            // Let the attack take hold before measuring. The client has a
            // thread and runtime of its own, so the attack's work in this
            // process does not delay it.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (addr, client_config) = (server.addr, Arc::clone(&config));
            let client = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("client runtime")
                    .block_on(well_behaved(addr, client_config, until))
            });
            let stats = tokio::task::spawn_blocking(move || client.join())
                .await
                .expect("join")
                .expect("the client thread");
            let _ = tokio::time::timeout(Duration::from_secs(30), attacker).await;
            stats
        });
        let rss = peak_rss_kib(server.child.id());
        let cpu = cpu_seconds(server.child.id());
        let mut latencies = stats.latencies;
        latencies.sort();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let ok =
            p99 < P99_LIMIT && stats.failures == 0 && rss < RSS_LIMIT_KIB && !latencies.is_empty();
        broken |= !ok;
        println!(
            "{:<46} {:>8.1} {:>8.1} {:>6} {:>9.1} {:>7.2}  {}{}",
            kind.name(),
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            stats.failures,
            rss as f64 / 1024.0,
            cpu,
            tally.summary(),
            if ok { "" } else { "  <- bound broken" }
        );
        if let Some(why) = &stats.first_failure {
            println!("    first failure of the client: {why}");
        }
        drop(server);
    }
    if broken {
        println!("FAILED: a bound was broken");
        std::process::ExitCode::FAILURE
    } else {
        println!("ok: every bound held");
        std::process::ExitCode::SUCCESS
    }
}
