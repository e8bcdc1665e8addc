//! Running the operator: the caches, the controllers fed by them, and the
//! lease that decides which replica runs them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrimesh_crds::{Mesh, WorkloadEntry};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, mpsc};

use crate::cluster::certificate_store::{CA_SECRET, SERVING_SECRET};
use crate::mesh::{self as mesh_controller, CertificateIssuer, WebhookTarget};
use crate::runtime::admin::{self, Metrics};
use crate::runtime::lease::{self, LeaderElection};
use crate::runtime::reduced::reduce;
use crate::runtime::synced::{self, synced};
use crate::runtime::triggers::{every, notified, received, throttle};
use crate::workloads::controller::{self as workload_controller, INJECTED_PODS};
use crate::workloads::injected_pod::InjectedPod;
use crate::workloads::registered_entry::RegisteredEntry;
use crate::workloads::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::{Error, Result};

/// How the operator runs (`ferrimesh-operator`'s flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// The operator's own namespace: never labelled, holds the certificate
    /// Secrets and the Lease.
    pub namespace: String,
    /// Where the API server reaches the webhook.
    pub webhook: WebhookTarget,
    /// Who issues the webhook's serving certificate.
    pub issuer: CertificateIssuer,
    /// Time between sweeps for WorkloadEntries whose pod is gone.
    pub sweep_interval: Duration,
    /// Time between resyncs of every injected pod against its cached entry.
    pub resync_interval: Duration,
    /// Pods reconciled at once.
    pub workload_concurrency: u16,
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// The Lease that elects the replica that reconciles; `None` for a
    /// single replica that always does.
    pub leader_election: Option<LeaderElection>,
    /// This replica's name (the pod's): the Lease holder's identity and the
    /// instance of the Events it publishes.
    pub instance: Option<String>,
}

/// Runs the operator until SIGTERM or SIGINT: serves the admin endpoints,
/// and reconciles while holding the lease (always, without leader
/// election); the lease is released on the way out.
pub async fn run(config: Config) -> Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    admin::serve(config.admin_listen, &metrics, Arc::clone(&ready))
        .await
        .map_err(|e| Error::Admin(e.to_string()))?;

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let Some(election) = &config.leader_election else {
        tokio::select! {
            () = controllers(&config, client, metrics, ready) => {},
            () = &mut shutdown => {},
        }
        tracing::info!("stopped");
        return Ok(());
    };

    let identity = config
        .instance
        .clone()
        .unwrap_or_else(|| format!("ferrimesh-operator-{}", std::process::id()));
    let term = || controllers(&config, client.clone(), metrics.clone(), Arc::clone(&ready));
    lease::lead(
        client.clone(),
        &config.namespace,
        election,
        &identity,
        &ready,
        shutdown,
        term,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Runs the controllers until they stop (or the future is dropped).
///
/// One watch per kind, each feeding a cache: injected pods (pruned to what
/// a WorkloadEntry needs before they are stored), our WorkloadEntries,
/// Namespaces, Nodes (metadata only), Meshes, and the two certificate
/// Secrets of the operator's namespace (each by name). Namespace and WorkloadEntry changes reconcile the
/// Meshes at most twice a second, however busy the cluster is.
pub(crate) async fn controllers(
    config: &Config,
    client: Client,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) {
    let watch_config = watcher::Config::default();

    // Every cache is filled by a watch driven here and marked synced when
    // its first list ends. A controller starts only once the caches it reads
    // are synced: a pod reconciled before the Meshes are known would lose
    // its entry, and one reconciled before the Nodes would get no locality.
    // Namespace changes relabel namespaces, entry changes only move the
    // Meshes' registeredWorkloads counts: each has its own throttle.
    let changed = Arc::new(Notify::new());
    let entries_changed = Arc::new(Notify::new());
    let (meshes, mesh_writer) = reflector::store();
    let (mark_meshes, meshes_synced) = synced();
    let mesh_events = watcher(Api::<Mesh>::all(client.clone()), watch_config.clone())
        .default_backoff()
        .reflect(mesh_writer)
        .inspect(move |event| mark_meshes.observe(event))
        .touched_objects()
        // Not on its own status writes: each reconcile wrote a new
        // registeredWorkloads while entries came, and so triggered the next.
        // The finalizers count: the first reconcile only adds its own and
        // relies on seeing it (deletion bumps the generation).
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            PredicateConfig::default(),
        );

    let (entries, entry_writer) = reflector::store();
    let (mark_entries, entries_synced) = synced();
    let (deleted_entries_tx, deleted_entries_rx) = mpsc::unbounded_channel();
    let entry_cache = {
        let changed = Arc::clone(&entries_changed);
        watcher(
            Api::<WorkloadEntry>::all(client.clone()),
            watch_config
                .clone()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        .default_backoff()
        .map_ok(reduce::<WorkloadEntry, RegisteredEntry>)
        .reflect(entry_writer)
        .for_each(move |event| {
            mark_entries.observe(&event);
            match event {
                Ok(watcher::Event::Delete(entry)) => {
                    let _ = deleted_entries_tx.send(Ok(entry));
                }
                Err(e) => tracing::warn!(error = %e, "WorkloadEntry watch failed; retrying"),
                Ok(_) => {}
            }
            changed.notify_one();
            async {}
        })
    };

    let (namespaces, namespace_writer) = reflector::store();
    let (mark_namespaces, namespaces_synced) = synced();
    let namespace_cache = {
        let changed = Arc::clone(&changed);
        watcher(Api::<Namespace>::all(client.clone()), watch_config.clone())
            .default_backoff()
            .reflect(namespace_writer)
            .for_each(move |event| {
                mark_namespaces.observe(&event);
                if let Err(e) = event {
                    tracing::warn!(error = %e, "Namespace watch failed; retrying");
                }
                changed.notify_one();
                async {}
            })
    };

    let (nodes, node_writer) = reflector::store();
    let (mark_nodes, nodes_synced) = synced();
    let node_cache = watcher(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        watch_config.clone(),
    )
    .default_backoff()
    .reflect(node_writer)
    .for_each(move |event| {
        mark_nodes.observe(&event);
        if let Err(e) = event {
            tracing::warn!(error = %e, "Node watch failed; retrying");
        }
        async {}
    });

    // Pods go into the cache reduced to what their entries are made of; a
    // deleted pod's entry goes at once.
    let (pods, pod_writer) = reflector::store();
    let (mark_pods, pods_synced) = synced();
    let (deleted_pods_tx, deleted_pods_rx) = mpsc::unbounded_channel();
    let pod_events = watcher(
        Api::<Pod>::all(client.clone()),
        // Small pages: a page of pods is parsed whole before it is reduced.
        watcher::Config::default()
            .labels(INJECTED_PODS)
            .page_size(100),
    )
    .default_backoff()
    .map_ok(reduce::<Pod, InjectedPod>)
    .reflect(pod_writer)
    .inspect(move |event| {
        mark_pods.observe(event);
        if let Ok(watcher::Event::Delete(pod)) = event {
            let _ = deleted_pods_tx.send(pod.clone());
        }
    })
    .touched_objects();

    let cluster_changes = futures::stream::select(
        throttle(notified(changed), Duration::from_millis(500)),
        throttle(notified(entries_changed), Duration::from_secs(5)),
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferrimesh-operator".into(),
            instance: config.instance.clone(),
        },
    );
    let mesh_context = Arc::new(mesh_controller::Context {
        client: client.clone(),
        namespace: config.namespace.clone(),
        webhook: config.webhook.clone(),
        issuer: config.issuer,
        meshes: meshes.clone(),
        namespaces,
        entries: entries.clone(),
        recorder: recorder.clone(),
    });
    let every_mesh = {
        let meshes = meshes.clone();
        move |_: Secret| {
            meshes
                .state()
                .iter()
                .map(|m| ObjectRef::from_obj(&**m))
                .collect::<Vec<_>>()
        }
    };
    let mesh_loop = {
        let (metrics, client) = (metrics.clone(), client.clone());
        let caches = (namespaces_synced.clone(), entries_synced.clone());
        let (meshes, secrets_namespace) = (meshes.clone(), config.namespace.clone());
        async move {
            if !synced::all(&[&caches.0, &caches.1]).await {
                return;
            }
            Controller::for_stream(mesh_events, meshes)
                .owns(
                    Api::<MutatingWebhookConfiguration>::all(client.clone()),
                    watcher::Config::default(),
                )
                // Each Secret by name: the operator's Role lets it read
                // these two and no other Secret of its namespace.
                .watches(
                    Api::<Secret>::namespaced(client.clone(), &secrets_namespace),
                    watcher::Config::default().fields(&format!("metadata.name={SERVING_SECRET}")),
                    every_mesh.clone(),
                )
                .watches(
                    Api::<Secret>::namespaced(client, &secrets_namespace),
                    watcher::Config::default().fields(&format!("metadata.name={CA_SECRET}")),
                    every_mesh,
                )
                .reconcile_all_on(cluster_changes)
                .run(
                    mesh_controller::reconcile,
                    mesh_controller::error_policy,
                    mesh_context,
                )
                .for_each(move |result| {
                    metrics.count("mesh", result.is_ok());
                    async {}
                })
                .await;
        }
    };

    let workload_context = Arc::new(workload_controller::Context {
        client: client.clone(),
        meshes,
        entries: entries.clone(),
        nodes,
        recorder,
    });
    let workload_loop = {
        let concurrency = config.workload_concurrency.max(1);
        let caches = (
            meshes_synced.clone(),
            entries_synced.clone(),
            nodes_synced.clone(),
        );
        let pods = pods.clone();
        // Every resync interval each pod is checked against its cached
        // entry (no API call when it matches): an entry someone else edited
        // is written back. A deleted one comes back at once. Not more
        // often: a pod whose write the cache has not seen yet is written
        // again (to no effect but the API server's work).
        let resync = every(config.resync_interval.max(Duration::from_secs(1)));
        async move {
            if !synced::all(&[&caches.0, &caches.1, &caches.2]).await {
                return;
            }
            Controller::for_stream(pod_events, pods)
                .owns_stream(received(deleted_entries_rx))
                .reconcile_all_on(resync)
                .with_config(controller::Config::default().concurrency(concurrency))
                .run(
                    workload_controller::reconcile,
                    workload_controller::error_policy,
                    workload_context,
                )
                .for_each(move |result| {
                    metrics.count("workload", result.is_ok());
                    async {}
                })
                .await;
        }
    };
    let deletions = {
        let client = client.clone();
        received(deleted_pods_rx).for_each_concurrent(16, move |pod| {
            let client = client.clone();
            async move {
                if let Err(e) = workload_controller::on_pod_deleted(&client, &pod).await {
                    tracing::warn!(error = %e, "deleting a WorkloadEntry failed; the sweep will retry");
                }
            }
        })
    };
    let sweep = {
        let client = client.clone();
        let interval = config.sweep_interval.max(Duration::from_secs(1));
        let caches = (pods_synced.clone(), entries_synced.clone());
        async move {
            if !synced::all(&[&caches.0, &caches.1]).await {
                return;
            }
            loop {
                match workload_controller::sweep_orphans(&client, &pods, &entries).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(deleted = n, "removed WorkloadEntries whose pods are gone")
                    }
                    Err(e) => tracing::warn!(error = %e, "sweep failed"),
                }
                tokio::time::sleep(interval).await;
            }
        }
    };
    // Ready once every cache is synced, the controllers with them.
    let ready_when_synced = async move {
        let caches = [
            &meshes_synced,
            &namespaces_synced,
            &entries_synced,
            &nodes_synced,
            &pods_synced,
        ];
        if synced::all(&caches).await {
            ready.store(true, Ordering::Release);
        }
    };
    tracing::info!(namespace = %config.namespace, "reconciling");
    futures::join!(
        mesh_loop,
        workload_loop,
        entry_cache,
        namespace_cache,
        node_cache,
        deletions,
        sweep,
        ready_when_synced
    );
}
