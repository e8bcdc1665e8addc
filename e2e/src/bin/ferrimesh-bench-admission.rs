//! `make bench-admission`: the webhook as the API server sees it, under a
//! steady stream of pods, with its certificate rotated in the middle
//! (docs/benchmarks.md).
//!
//! The local control plane runs the operator and the release webhook as in
//! the e2e suite. Pods are created through the API server at `BENCH_RATE`
//! per second for `BENCH_SECONDS` in `BENCH_NAMESPACES` namespaces the Mesh
//! selects. The operator issues certificates that renew at half time (the
//! serving certificate and the CA both), and the webhook's files are kept in
//! step with the Secret as the kubelet does for a Secret volume.
//!
//! Reported: pods that failed or came back uninjected (the run fails unless
//! both are zero), the API server's own admission latency for the webhook
//! (`apiserver_admission_webhook_admission_duration_seconds`, the run's
//! observations only), its webhook calls by HTTP code and its rejections,
//! the client's create latency, and the webhook's peak RSS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use ferrimesh_e2e::fixtures::{self, WAIT, namespace, start_operator_with, wait_for_crds};
use ferrimesh_e2e::metrics::{ADMISSION_DURATION, Metrics, WEBHOOK_REJECTIONS, WEBHOOK_REQUESTS};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Semaphore;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pod(name: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {
            "serviceAccountName": "default",
            "containers": [{
                "name": "app", "image": "registry.example/app:1",
                "ports": [{"containerPort": 8080, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}
            }]
        }
    }))?)
}

/// What one create through the API server came to.
enum Outcome {
    Injected(Duration),
    NotInjected(String),
    Failed(String),
}

async fn create(pods: Api<Pod>, name: String) -> Outcome {
    let started = Instant::now();
    let result = match pod(&name) {
        Ok(pod) => pods.create(&PostParams::default(), &pod).await,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match result {
        Ok(p) if p.annotations().contains_key("sidecar.istio.io/status") => {
            Outcome::Injected(started.elapsed())
        }
        Ok(p) => Outcome::NotInjected(p.name_any()),
        Err(e) => Outcome::Failed(format!("{name}: {e}")),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(index).copied().unwrap_or_default()
}

fn ms(seconds: Option<f64>) -> String {
    seconds.map_or("-".into(), |s| format!("{:.1} ms", s * 1000.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferrimesh_e2e::until_terminated(run()).await
}

async fn run() -> anyhow::Result<()> {
    let rate = setting("BENCH_RATE", 20).max(1);
    let seconds = setting("BENCH_SECONDS", 300).max(20);
    let namespaces = setting("BENCH_NAMESPACES", 10).max(1);
    println!(
        "==> admission benchmark: {rate} pods/s for {seconds} s over {namespaces} namespaces, certificates rotating at half time"
    );
    println!("    machine: {}", ferrimesh_e2e::machine());

    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    fixtures::mesh_selecting_mesh_on(&client).await?;
    for i in 0..namespaces {
        namespace(&client, &format!("bench-{i}"), &[("mesh", "on")]).await?;
    }

    // Both certificates renew after two thirds of their lifetime: at half
    // of the run, counting from their issue just before it.
    let lifetime = (seconds * 3 / 4).to_string();
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}/inject");
    let lifetimes = [
        "--cert-lifetime-seconds",
        &lifetime,
        "--ca-lifetime-seconds",
        &lifetime,
    ];
    let _operator = start_operator_with(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
        &lifetimes,
    )?;
    let sync_until = Instant::now() + Duration::from_secs(seconds + 60);
    let (webhook, syncer) =
        fixtures::start_webhook_on_secret(&plane, &client, port, sync_until).await?;
    let warm_up: Api<Pod> = Api::namespaced(client.clone(), "bench-0");
    eventually("injection working", WAIT, || {
        let warm_up = warm_up.clone();
        async move {
            let name = format!("warm-up-{}", free_port()?);
            Ok(match create(warm_up, name).await {
                Outcome::Injected(_) => Some(()),
                _ => None,
            })
        }
    })
    .await?;

    let before = Metrics::scrape(&client).await?;
    println!("==> creating {} pods", rate * seconds);
    let started = Instant::now();
    let in_flight = Arc::new(Semaphore::new(512));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut creates = Vec::new();
    for i in 0..rate * seconds {
        ticks.tick().await;
        let permit = Arc::clone(&in_flight).acquire_owned().await?;
        let pods = Api::namespaced(client.clone(), &format!("bench-{}", i % namespaces));
        creates.push(tokio::spawn(async move {
            let outcome = create(pods, format!("pod-{i}")).await;
            drop(permit);
            outcome
        }));
        if (i + 1) % (rate * 30) == 0 {
            println!("    {} s: {} pods", started.elapsed().as_secs(), i + 1);
        }
    }
    let (mut latencies, mut not_injected, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for create in creates {
        match create.await? {
            Outcome::Injected(took) => latencies.push(took),
            Outcome::NotInjected(name) => not_injected.push(name),
            Outcome::Failed(error) => failed.push(error),
        }
    }
    let took = started.elapsed();
    let after = Metrics::scrape(&client).await?;
    let webhook_rss = webhook.peak_rss_mib();
    drop(webhook);
    let rotations: Vec<u64> = syncer
        .await??
        .iter()
        .filter(|at| **at > started)
        .map(|at| at.duration_since(started).as_secs())
        .collect();

    let admit = [("operation", "CREATE"), ("type", "admit")];
    let seen_by_apiserver = after
        .histogram(ADMISSION_DURATION, &admit)
        .since(&before.histogram(ADMISSION_DURATION, &admit));
    let calls = |code: &str| {
        after.counter(WEBHOOK_REQUESTS, &[("code", code)])
            - before.counter(WEBHOOK_REQUESTS, &[("code", code)])
    };
    let all_calls = after.counter(WEBHOOK_REQUESTS, &[]) - before.counter(WEBHOOK_REQUESTS, &[]);
    let rejections =
        after.counter(WEBHOOK_REJECTIONS, &[]) - before.counter(WEBHOOK_REJECTIONS, &[]);
    latencies.sort();
    let created = latencies.len() + not_injected.len() + failed.len();

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| machine | {} |", ferrimesh_e2e::machine());
    println!(
        "| pods created | {created} in {:.1} s ({:.1}/s asked {rate}/s) |",
        took.as_secs_f64(),
        created as f64 / took.as_secs_f64()
    );
    println!(
        "| failed / not injected | {} / {} |",
        failed.len(),
        not_injected.len()
    );
    println!("| certificate rotations seen by the webhook | at {rotations:?} s into the run |");
    println!(
        "| API server: webhook calls | {all_calls} ({} with 200), {rejections} rejections |",
        calls("200")
    );
    println!(
        "| API server: admission latency p50 / p99 (interpolated) | {} / {} |",
        ms(seen_by_apiserver.quantile(0.5)),
        ms(seen_by_apiserver.quantile(0.99))
    );
    println!(
        "| API server: p99 bucket | <= {} ({} observations) |",
        ms(seen_by_apiserver.bucket_bound(0.99)),
        seen_by_apiserver.count()
    );
    println!(
        "| client: pod create p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        quantile(&latencies, 0.5).as_secs_f64() * 1000.0,
        quantile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    println!("| webhook peak RSS | {webhook_rss:.1} MiB |");

    ensure!(
        failed.is_empty() && not_injected.is_empty(),
        "{} admissions failed and {} pods were not injected: {:?}",
        failed.len(),
        not_injected.len(),
        failed
            .iter()
            .chain(&not_injected)
            .take(5)
            .collect::<Vec<_>>()
    );
    ensure!(
        rejections == 0.0,
        "the API server counted {rejections} rejected webhook calls"
    );
    ensure!(
        !rotations.is_empty(),
        "no certificate rotation happened during the run"
    );
    ensure!(
        seen_by_apiserver.count() >= created as f64,
        "the API server observed {} admissions for {created} pods",
        seen_by_apiserver.count()
    );
    Ok(())
}
