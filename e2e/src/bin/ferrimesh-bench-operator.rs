//! `make bench-operator`: the operator at cluster scale on the local control
//! plane (docs/benchmarks.md).
//!
//! 1. Baseline: a plain client writes the `BENCH_PODS` WorkloadEntries the
//!    operator would write for the benchmark's pods (the same content, made
//!    by the operator's own `desired_entry`; created, then the `Healthy`
//!    status merge-patched, as the operator writes them) with
//!    `BENCH_CONCURRENCY` requests in flight, the operator's
//!    `--workload-concurrency` in the other phases; timed, as every phase,
//!    until the bench's watch has seen them all correct.
//! 2. Registration: with the operator running, as many injected pods over
//!    `BENCH_NAMESPACES` namespaces are created and given IPs (the kubelet's
//!    part, same concurrency); timed until every WorkloadEntry exists with
//!    the right address and `Healthy`.
//! 3. Deletion: 20% of the pods deleted; timed until their entries are gone.
//! 4. Restart: the operator is killed (SIGKILL); while it is down 5% more
//!    pods go and as many new ones come; a new operator starts; timed until
//!    the entries are exactly the live pods: no orphan, no duplicate, none
//!    missing.
//! 5. Cold registration: the operator stopped (SIGTERM: it gives up its
//!    lease) and every entry of its deleted; the baseline is run again for
//!    the live pods (its first entries deleted), in the cluster as the new
//!    operator will find it; then a new operator starts with the live
//!    pods all there; timed until every entry is back and correct. This
//!    is the operator's own registration rate, set against both baselines
//!    (in 2. the operator can go no faster than the pods are created).
//!
//! Both baselines, the registration and the cold registration also report
//! what the API server served (its `apiserver_request_total`): the writes
//! on WorkloadEntries per entry (two, spec then status, is the least; more
//! means writes the caches could have spared) and the most frequent
//! requests.
//! The same phases report the CPU time the API server, etcd, the operator
//! and the bench itself used, and per entry.
//! The operator's peak RSS (VmHWM) is read from /proc. Defaults:
//! 10,000 pods, 100 namespaces, concurrency 32.
//!
//! With `BENCH_TARGET=1` the entries go into a config cluster
//! (`workloadRegistration.target`): a second control plane, where the
//! operator has only the rights of config/components/registration-target
//! in one namespace and reaches it with the kubeconfig of its Secret. The
//! baselines write the same pushed entries there (into a namespace of
//! their own, with the same rights and identity), and every phase is timed
//! until the bench's watch of the config cluster has seen the entries
//! correct; CPU and requests are reported for both clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrimesh_crds::mesh::RegistrationTarget;
use ferrimesh_crds::{Mesh, MeshSpec, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    grant_target_rights, namespace, start_operator_with, target_secret, wait_for_crds,
};
use ferrimesh_e2e::metrics::{Metrics, REQUESTS};
use ferrimesh_e2e::{ControlPlane, Process, client_for, free_port, repo_root};
use ferrimesh_operator::workloads::entry::{desired_entry, pushed_entry, pushed_name};
use ferrimesh_operator::workloads::injected_pod::InjectedPod;
use ferrimesh_operator::workloads::{MANAGED_BY, MANAGED_BY_LABEL};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256)
}

/// The managed-by label's value on the baseline's entries.
const BASELINE: &str = "ferrimesh-baseline";

/// Target mode: the config cluster's namespace of the operator's entries.
const TARGET_NS: &str = "cluster-a";
/// Target mode: the config cluster's namespace of the baseline's entries.
const BASELINE_NS: &str = "baseline";
/// Target mode: the workload cluster's ID, the prefix of its entries' names.
const CLUSTER: &str = "east";

/// Deletes the entries labelled managed by `manager` in `namespaces`, and
/// waits until `seen` (the bench's watch) has none.
async fn delete_entries(
    client: &Client,
    namespaces: &[String],
    manager: &str,
    seen: &Store<WorkloadEntry>,
) -> anyhow::Result<()> {
    let selector = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={manager}"));
    for namespace in namespaces {
        Api::<WorkloadEntry>::namespaced(client.clone(), namespace)
            .delete_collection(&DeleteParams::default(), &selector)
            .await?;
    }
    let what = format!("{manager} entries deleted");
    wait_converged(&what, seen, &BTreeMap::new(), Instant::now(), None).await?;
    Ok(())
}

/// Injected pod `i` as the benchmark creates it.
fn bench_pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"),
                     "labels": {"app": format!("app-{}", i % 50), "security.istio.io/tlsMode": "istio"},
                     "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null}"}},
        "spec": {"serviceAccountName": "default", "containers": [
            {"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
    .expect("a valid pod")
}

/// The status the benchmark gives pod `i`: its IP, running and ready.
fn pod_status(i: usize) -> serde_json::Value {
    json!({"podIP": ip(i), "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]})
}

struct Run {
    /// The workload cluster's admin client: pods.
    client: Client,
    /// The baseline's client, in the cluster the entries go to: the
    /// operator's own ServiceAccount, so that the API server's priority
    /// and fairness treats both alike (the admin client is exempt from it).
    baseline: Client,
    namespaces: usize,
    concurrency: usize,
    /// The Mesh's spec, as the operator reads it.
    mesh: MeshSpec,
    /// Target mode: the config cluster the entries are pushed into.
    target: Option<RegistrationTarget>,
}

impl Run {
    fn namespace(&self, prefix: &str, i: usize) -> String {
        format!("{prefix}-{}", i % self.namespaces)
    }

    /// The name of pod `i`'s entry, the operator's and the baseline's.
    fn entry_name(&self, i: usize) -> String {
        let pod = format!("p{i}");
        match self.target {
            Some(_) => pushed_name(&self.mesh.cluster_id, &pod),
            None => pod,
        }
    }

    /// The entries that should be there for the `live` pods: name, address.
    fn expected(&self, live: &BTreeSet<usize>) -> BTreeMap<String, String> {
        live.iter().map(|&i| (self.entry_name(i), ip(i))).collect()
    }

    /// The namespaces of the operator's entries.
    fn entry_namespaces(&self) -> Vec<String> {
        match self.target {
            Some(_) => vec![TARGET_NS.to_owned()],
            None => (0..self.namespaces).map(|n| format!("bench-{n}")).collect(),
        }
    }

    /// The namespaces of the baseline's entries.
    fn baseline_namespaces(&self) -> Vec<String> {
        match self.target {
            Some(_) => vec![BASELINE_NS.to_owned()],
            None => (0..self.namespaces).map(|n| format!("base-{n}")).collect(),
        }
    }

    /// Runs `op` for every index, `concurrency` at a time; fails on the first error.
    async fn each<F, Fut>(&self, indices: Vec<usize>, op: F) -> anyhow::Result<Duration>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let started = Instant::now();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(indices)
            .map(op)
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(started.elapsed())
    }

    /// Writes the entry the operator would write for pod `i` (the same
    /// content, as [`desired_entry`] or, in target mode, [`pushed_entry`]
    /// makes it, in a namespace of its own), as the operator writes it:
    /// created, then its status merge-patched. Only the managed-by label's
    /// value differs (same length), so that the operator leaves these
    /// entries alone.
    async fn baseline_entry(&self, i: usize) -> anyhow::Result<()> {
        let mut pod = bench_pod(i);
        pod.metadata.namespace = Some(match self.target {
            Some(_) => self.namespace("bench", i),
            None => self.namespace("base", i),
        });
        pod.metadata.uid = Some(format!("00000000-0000-4000-8000-{i:012}"));
        pod.status = Some(serde_json::from_value(pod_status(i))?);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let pod = InjectedPod::from(pod);
        let mut entry = match &self.target {
            Some(target) => pushed_entry(&pod, labels, &self.mesh, target, None),
            None => desired_entry(&pod, &self.mesh, None),
        }
        .ok_or_else(|| anyhow::anyhow!("no entry for pod {i}"))?;
        if self.target.is_some() {
            entry.metadata.namespace = Some(BASELINE_NS.to_owned());
        }
        let namespace = entry.namespace().unwrap_or_default();
        entry
            .labels_mut()
            .insert(MANAGED_BY_LABEL.to_owned(), BASELINE.to_owned());
        let status = entry.status.take();
        let api: Api<WorkloadEntry> = Api::namespaced(self.baseline.clone(), &namespace);
        api.create(&PostParams::default(), &entry).await?;
        api.patch_status(
            &entry.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
        Ok(())
    }

    async fn pod(&self, i: usize) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace("bench", i));
        api.create(&PostParams::default(), &bench_pod(i)).await?;
        let status = json!({ "status": pod_status(i) });
        api.patch_status(
            &format!("p{i}"),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
        Ok(())
    }

    async fn delete_pod(&self, i: usize) -> anyhow::Result<()> {
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace("bench", i))
            .delete(&format!("p{i}"), &DeleteParams::default().grace_period(0))
            .await?;
        Ok(())
    }
}

/// Whether the entries are exactly those of `live` pods, each correct.
fn converged(entries: &Store<WorkloadEntry>, live: &BTreeMap<String, String>) -> (usize, bool) {
    let state = entries.state();
    let correct = state
        .iter()
        .filter(|e| {
            let healthy = e.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Healthy" && c.status == "True")
            });
            live.get(&e.name_any()) == e.spec.address.as_ref() && healthy
        })
        .count();
    (correct, correct == live.len() && state.len() == live.len())
}

async fn wait_converged(
    what: &str,
    entries: &Store<WorkloadEntry>,
    live: &BTreeMap<String, String>,
    since: Instant,
    mut operator: Option<&mut Process>,
) -> anyhow::Result<Duration> {
    let mut last_report = Instant::now();
    loop {
        let (correct, done) = converged(entries, live);
        if done {
            let took = since.elapsed();
            println!("    {what}: converged in {:.1} s", took.as_secs_f64());
            return Ok(took);
        }
        if let Some(operator) = operator.as_deref_mut() {
            operator.check_running()?;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "    {what}: {correct}/{} correct, {} entries",
                live.len(),
                entries.state().len()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(1800),
            "{what}: not converged in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
/// A control plane of the benchmark and its admin client.
struct Cluster {
    /// How the reports name it: nothing when it is the only one.
    label: &'static str,
    plane: ControlPlane,
    client: Client,
}

impl Cluster {
    async fn start(label: &'static str) -> anyhow::Result<Self> {
        let plane = ControlPlane::start().await?;
        let client = plane.client().await?;
        Ok(Self {
            label,
            plane,
            client,
        })
    }

    /// `what` of this cluster, as the reports say it.
    fn of(&self, what: &str) -> String {
        if self.label.is_empty() {
            what.to_owned()
        } else {
            format!("{what} ({})", self.label)
        }
    }
}

/// The requests each cluster's API server has served so far, by resource
/// and verb (server-side apply counts as `APPLY`; a watch counts when it
/// starts).
type Served = Vec<BTreeMap<Vec<String>, f64>>;

async fn served(clusters: &[&Cluster]) -> anyhow::Result<Served> {
    let mut served = Vec::new();
    for cluster in clusters {
        served.push(
            Metrics::scrape(&cluster.client)
                .await?
                .counters_by(REQUESTS, &["resource", "verb"]),
        );
    }
    Ok(served)
}

/// Prints what each API server served since `before`: the writes on
/// WorkloadEntries per entry, and the most frequent requests. Returns the
/// writes on WorkloadEntries per entry, in all clusters.
async fn report_requests(
    clusters: &[&Cluster],
    what: &str,
    before: &Served,
    entries: usize,
) -> anyhow::Result<f64> {
    let now = served(clusters).await?;
    let mut all_writes = 0.0;
    for ((cluster, now), before) in clusters.iter().zip(&now).zip(before) {
        let mut since: Vec<(f64, &[String])> = Vec::new();
        for (key, n) in now {
            let n = n - before.get(key).copied().unwrap_or(0.0);
            if n > 0.0 {
                since.push((n, key));
            }
        }
        let writes: f64 = since
            .iter()
            .filter(|(_, key)| {
                key[0] == "workloadentries"
                    && ["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&key[1].as_str())
            })
            .fold(0.0, |sum, (n, _)| sum + n);
        all_writes += writes;
        since.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<String> = since
            .iter()
            .take(8)
            .map(|(n, key)| format!("{} {n:.0}", key.join(" ")))
            .collect();
        let what = cluster.of(what);
        println!(
            "    {what}: {writes:.0} writes on WorkloadEntries, {:.2} per entry",
            writes / entries.max(1) as f64
        );
        println!(
            "    {what}: API requests by resource and verb: {}",
            top.join(", ")
        );
    }
    Ok(all_writes / entries.max(1) as f64)
}

/// CPU seconds used so far by each process of the benchmark.
struct Cpu {
    /// Each cluster's API server and etcd.
    planes: Vec<(f64, f64)>,
    operator: f64,
    bench: f64,
}

impl Cpu {
    /// Now, for the control planes, the operator if one runs, and the bench
    /// (the load generator and its watches).
    fn now(clusters: &[&Cluster], operator: Option<&Process>) -> Self {
        Self {
            planes: clusters.iter().map(|c| c.plane.cpu_seconds()).collect(),
            operator: operator.map_or(0.0, Process::cpu_seconds),
            bench: ferrimesh_e2e::cpu_seconds(std::process::id()),
        }
    }

    /// Prints what each process used since `before`, also per entry.
    fn report(&self, clusters: &[&Cluster], phase: &str, before: &Cpu, entries: usize) {
        let per_entry = |used: f64| 1000.0 * used / entries as f64;
        let mut used = Vec::new();
        for ((cluster, now), before) in clusters.iter().zip(&self.planes).zip(&before.planes) {
            used.push((cluster.of("API server"), now.0 - before.0));
            used.push((cluster.of("etcd"), now.1 - before.1));
        }
        used.push(("operator".to_owned(), self.operator - before.operator));
        used.push(("bench".to_owned(), self.bench - before.bench));
        let parts: Vec<String> = used
            .iter()
            .map(|(name, s)| format!("{name} {s:.1} s ({:.2} ms/entry)", per_entry(*s)))
            .collect();
        println!("    {phase}: CPU {}", parts.join(", "));
    }
}

/// Prints the Events the operator has published so far in `cluster`, by
/// reason and kind of object (the registration should post none but the
/// lifecycle's, which these pods, with no owner, do not earn).
async fn report_events(client: &Client, phase: &str) -> anyhow::Result<()> {
    let events = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut by_reason: BTreeMap<(String, String), usize> = BTreeMap::new();
    for event in events {
        if event.reporting_controller.as_deref() != Some("ferrimesh-operator") {
            continue;
        }
        let reason = event.reason.unwrap_or_default();
        let kind = event.regarding.and_then(|r| r.kind).unwrap_or_default();
        *by_reason.entry((reason, kind)).or_default() += 1;
    }
    let parts: Vec<String> = by_reason
        .iter()
        .map(|((reason, kind), n)| format!("{reason} on {kind}: {n}"))
        .collect();
    println!(
        "    {phase}: Events published by the operator: {}",
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    );
    Ok(())
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferrimesh_e2e::until_terminated(run()).await
}

/// Target mode: the config cluster, with the WorkloadEntry CRD, a
/// namespace for the operator's entries and one for the baseline's, each
/// with the rights of config/components/registration-target for the
/// operator's ServiceAccount there; the workload cluster's Secret holds
/// that ServiceAccount's kubeconfig. Returns the Mesh's target.
async fn config_cluster(
    workload: &Cluster,
    config: &Cluster,
) -> anyhow::Result<RegistrationTarget> {
    config.plane.apply_files(
        &repo_root().join("config/istio-crds/workloadentries.networking.istio.io.yaml"),
    )?;
    for ns in [TARGET_NS, BASELINE_NS] {
        namespace(&config.client, ns, &[]).await?;
        grant_target_rights(&config.plane, ns)?;
    }
    let kubeconfig = std::fs::read_to_string(config.plane.kubeconfig_for("ferrimesh-operator")?)?;
    target_secret(&workload.client, &kubeconfig).await?;
    Ok(RegistrationTarget {
        namespace: Some(TARGET_NS.into()),
        ..RegistrationTarget::default()
    })
}

async fn run() -> anyhow::Result<()> {
    let pods = setting("BENCH_PODS", 10_000);
    let namespaces = setting("BENCH_NAMESPACES", 100);
    let concurrency = setting("BENCH_CONCURRENCY", 32);
    let target_mode = setting("BENCH_TARGET", 0) != 0;
    println!(
        "==> operator benchmark: {pods} pods, {namespaces} namespaces, concurrency {concurrency}, entries {}",
        if target_mode {
            "pushed into a config cluster (BENCH_TARGET=1)"
        } else {
            "beside the pods"
        }
    );
    println!("    machine: {}", ferrimesh_e2e::machine());
    let workload = Cluster::start(if target_mode { "workload cluster" } else { "" }).await?;
    let client = workload.client.clone();
    workload
        .plane
        .apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let config = if target_mode {
        Some(Cluster::start("config cluster").await?)
    } else {
        None
    };
    let mut mesh = MeshSpec::default();
    if let Some(config) = &config {
        mesh.cluster_id = CLUSTER.into();
        mesh.workload_registration.target = Some(config_cluster(&workload, config).await?);
    }
    Api::<Mesh>::all(client.clone())
        .create(&PostParams::default(), &Mesh::new("default", mesh.clone()))
        .await?;
    // Where the entries go: the cluster the bench watches, deletes in and
    // whose operator's ServiceAccount writes the baseline.
    let entries_cluster = config.as_ref().unwrap_or(&workload);
    let clusters: Vec<&Cluster> = [Some(&workload), config.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let identity = workload.plane.kubeconfig_for("ferrimesh-operator")?;
    let run = Arc::new(Run {
        client: client.clone(),
        baseline: client_for(&entries_cluster.plane.kubeconfig_for("ferrimesh-operator")?).await?,
        namespaces,
        concurrency,
        target: mesh.workload_registration.target.clone(),
        mesh,
    });
    for n in 0..namespaces {
        namespace(&client, &format!("bench-{n}"), &[]).await?;
    }
    if !target_mode {
        for ns in run.baseline_namespaces() {
            namespace(&client, &ns, &[]).await?;
        }
    }

    // The bench's view of the entries, kept by watches: the baseline's and
    // the operator's. Both phases are timed until the watch has seen every
    // entry correct, so each pays for the same watch.
    let watch_entries = |selector: &str| {
        let (store, writer) = reflector::store();
        tokio::spawn(
            watcher(
                Api::<WorkloadEntry>::all(entries_cluster.client.clone()),
                watcher::Config::default().labels(selector),
            )
            .default_backoff()
            .reflect(writer)
            .for_each(|_| async {}),
        );
        store
    };
    let baseline_entries = watch_entries(&format!("{MANAGED_BY_LABEL}={BASELINE}"));
    let entries = watch_entries(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    baseline_entries.wait_until_ready().await?;
    entries.wait_until_ready().await?;

    println!("==> 1. baseline: a plain client creates {pods} WorkloadEntries (spec, then status)");
    let mut live: BTreeSet<usize> = (0..pods).collect();
    let expected = run.expected(&live);
    let before = served(&clusters).await?;
    let cpu_before = Cpu::now(&clusters, None);
    let started = Instant::now();
    let written = run
        .each((0..pods).collect(), |i| {
            let run = Arc::clone(&run);
            async move { run.baseline_entry(i).await }
        })
        .await?;
    println!("    written in {:.1} s", written.as_secs_f64());
    let baseline = wait_converged("baseline", &baseline_entries, &expected, started, None).await?;
    println!(
        "    {:.1} s, {:.0} entries/s",
        baseline.as_secs_f64(),
        rate(pods, baseline)
    );
    Cpu::now(&clusters, None).report(&clusters, "baseline", &cpu_before, pods);
    report_requests(&clusters, "baseline", &before, pods).await?;

    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    // The operator reconciles as many pods at once as the baseline writes entries.
    let concurrency_flag = concurrency.to_string();
    let same_concurrency = ["--workload-concurrency", concurrency_flag.as_str()];
    let start_operator =
        |name: &str| start_operator_with(&workload.plane, &identity, name, &url, &same_concurrency);
    let mut operator = start_operator("operator-1")?;
    println!(
        "==> 2. registration: {pods} injected pods created and given IPs, the operator running"
    );
    let before = served(&clusters).await?;
    let cpu_before = Cpu::now(&clusters, Some(&operator));
    let started = Instant::now();
    let created = run
        .each((0..pods).collect(), |i| {
            let run = Arc::clone(&run);
            async move { run.pod(i).await }
        })
        .await?;
    println!(
        "    pods created with IPs in {:.1} s",
        created.as_secs_f64()
    );
    let registered = wait_converged(
        "registration",
        &entries,
        &run.expected(&live),
        started,
        Some(&mut operator),
    )
    .await?;
    Cpu::now(&clusters, Some(&operator)).report(&clusters, "registration", &cpu_before, pods);
    let writes_registration = report_requests(&clusters, "registration", &before, pods).await?;
    let rss_registration = operator.peak_rss_mib();
    report_events(&client, "registration").await?;

    println!("==> 3. deletion: 20% of the pods deleted");
    let deleted: Vec<usize> = (0..pods).filter(|i| i % 5 == 0).collect();
    for i in &deleted {
        live.remove(i);
    }
    let started = Instant::now();
    run.each(deleted.clone(), |i| {
        let run = Arc::clone(&run);
        async move { run.delete_pod(i).await }
    })
    .await?;
    let deletion = wait_converged(
        "deletion",
        &entries,
        &run.expected(&live),
        started,
        Some(&mut operator),
    )
    .await?;
    let rss_first = operator.peak_rss_mib();

    println!(
        "==> 4. restart: the operator killed; 5% of the pods go and as many come while it is down"
    );
    drop(operator);
    let gone: Vec<usize> = (0..pods).filter(|i| i % 20 == 1).collect();
    let new: Vec<usize> = (pods..pods + gone.len()).collect();
    for i in &gone {
        live.remove(i);
    }
    live.extend(&new);
    run.each(gone, |i| {
        let run = Arc::clone(&run);
        async move { run.delete_pod(i).await }
    })
    .await?;
    run.each(new, |i| {
        let run = Arc::clone(&run);
        async move { run.pod(i).await }
    })
    .await?;
    let expected = run.expected(&live);
    let started = Instant::now();
    let mut operator = start_operator("operator-2")?;
    let restart =
        wait_converged("restart", &entries, &expected, started, Some(&mut operator)).await?;
    let rss_second = operator.peak_rss_mib();

    println!(
        "==> 5. cold registration: the operator stopped, every entry deleted, a new operator registers the live pods"
    );
    // Stopped as a rollout stops it (SIGTERM): it gives up its lease, so
    // the new one does not wait it out, which would be timed here as
    // registration.
    operator.stop(Duration::from_secs(10))?;
    let entries_client = &entries_cluster.client;
    delete_entries(
        entries_client,
        &run.entry_namespaces(),
        MANAGED_BY,
        &entries,
    )
    .await?;
    // The baseline again, in the cluster as the new operator finds it (the
    // live pods there, no operator running): the same entries for the same
    // pods, written by the plain client.
    delete_entries(
        entries_client,
        &run.baseline_namespaces(),
        BASELINE,
        &baseline_entries,
    )
    .await?;
    let before = served(&clusters).await?;
    let cpu_before = Cpu::now(&clusters, None);
    let started = Instant::now();
    run.each(live.iter().copied().collect(), |i| {
        let run = Arc::clone(&run);
        async move { run.baseline_entry(i).await }
    })
    .await?;
    let late_baseline = wait_converged(
        "baseline before the cold registration",
        &baseline_entries,
        &expected,
        started,
        None,
    )
    .await?;
    Cpu::now(&clusters, None).report(
        &clusters,
        "baseline before the cold registration",
        &cpu_before,
        live.len(),
    );
    report_requests(
        &clusters,
        "baseline before the cold registration",
        &before,
        live.len(),
    )
    .await?;

    let before = served(&clusters).await?;
    let cpu_before = Cpu::now(&clusters, None);
    let started = Instant::now();
    let mut operator = start_operator("operator-3")?;
    let cold = wait_converged(
        "cold registration",
        &entries,
        &expected,
        started,
        Some(&mut operator),
    )
    .await?;
    Cpu::now(&clusters, Some(&operator)).report(
        &clusters,
        "cold registration",
        &cpu_before,
        live.len(),
    );
    let writes_cold = report_requests(&clusters, "cold registration", &before, live.len()).await?;
    let rss_cold = operator.peak_rss_mib();

    println!("\n| measure | result |\n|---|---|");
    println!("| machine | {} |", ferrimesh_e2e::machine());
    if target_mode {
        println!(
            "| entries | pushed into a config cluster (a second control plane), namespace {TARGET_NS} |"
        );
    }
    println!(
        "| baseline: plain client, {pods} entries | {:.1} s ({:.0}/s) |",
        baseline.as_secs_f64(),
        rate(pods, baseline)
    );
    println!(
        "| registration: {pods} pods created with IPs until all entries correct | {:.1} s ({:.0}/s, {:.0}% of baseline; pod creation alone {:.1} s) |",
        registered.as_secs_f64(),
        rate(pods, registered),
        100.0 * rate(pods, registered) / rate(pods, baseline),
        created.as_secs_f64()
    );
    println!(
        "| deletion: {} pods deleted until their entries are gone | {:.1} s |",
        deleted.len(),
        deletion.as_secs_f64()
    );
    println!(
        "| restart: until entries == live pods ({} entries) | {:.1} s |",
        live.len(),
        restart.as_secs_f64()
    );
    println!(
        "| baseline again before the cold registration: plain client, {} entries, the live pods there | {:.1} s ({:.0}/s) |",
        live.len(),
        late_baseline.as_secs_f64(),
        rate(live.len(), late_baseline)
    );
    println!(
        "| cold registration: a new operator, {} pods, no entries | {:.1} s ({:.0}/s, {:.0}% of the first baseline, {:.0}% of the one before it) |",
        live.len(),
        cold.as_secs_f64(),
        rate(live.len(), cold),
        100.0 * rate(live.len(), cold) / rate(pods, baseline),
        100.0 * rate(live.len(), cold) / rate(live.len(), late_baseline)
    );
    println!(
        "| writes on WorkloadEntries per entry (2 at least) | {writes_registration:.2} in registration, {writes_cold:.2} in cold registration |"
    );
    println!(
        "| operator peak RSS | {rss_registration:.1} MiB after registration, {rss_first:.1} MiB after deletion, {rss_second:.1} MiB after restart, {rss_cold:.1} MiB after cold registration |"
    );
    Ok(())
}
