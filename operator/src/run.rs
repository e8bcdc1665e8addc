//! Running the operator: the caches, the controllers fed by them, and the
//! lease that decides which replica runs them.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrimesh_crds::{Mesh, ProxyProfile, WorkloadEntry};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};

use crate::cluster::certificate_store::{CA_SECRET, SERVING_SECRET};
use crate::cluster::{self, CertificateIssuer};
use crate::lifecycle::cache::Cache;
use crate::lifecycle::pod::Owner;
use crate::lifecycle::workload::Workload;
use crate::lifecycle::{self, Caches};
use crate::mesh::{self, WebhookTarget};
use crate::runtime::admin::{self, Metrics};
use crate::runtime::lease::{self, LeaderElection};
use crate::runtime::reduced::reduce;
use crate::runtime::synced::{self, MarkSynced, synced};
use crate::runtime::triggers::{changes, every, notified, received, throttle};
use crate::workloads::controller as workload_controller;
use crate::workloads::injected_pod::{InjectedPod, injected_only};
use crate::workloads::registered_entry::RegisteredEntry;
use crate::workloads::target::{self, Targets};
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

/// Fills `cache` from a watch's `events`, each object reduced by `reduce`,
/// marking it synced after its first list and notifying `changed` of
/// every event.
async fn fill<K, V>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    cache: Cache<V>,
    mark: MarkSynced,
    changed: Arc<Notify>,
    reduce: impl Fn(&K) -> Option<V>,
) where
    K: Resource<DynamicType = ()>,
{
    events
        .for_each(move |event| {
            mark.observe(&event);
            match event {
                Ok(event) => cache.apply(&event, &reduce),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying")
                }
            }
            changed.notify_one();
            async {}
        })
        .await;
}

/// Fills a reflector's store from a watch of every `K`, marking it synced
/// after its first list and notifying each of `changed` of every event.
async fn reflect_all<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    mark: MarkSynced,
    changed: Vec<Arc<Notify>>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(move |event| {
            mark.observe(&event);
            if let Err(e) = event {
                tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
            }
            changed.iter().for_each(|c| c.notify_one());
            async {}
        })
        .await;
}

/// Runs the controllers until they stop (or the future is dropped).
///
/// One watch per kind, each feeding its caches: pods (every pod reduced to
/// what the drift classification reads, the injected ones also to what a
/// WorkloadEntry needs), our WorkloadEntries, Namespaces, ProxyProfiles,
/// Nodes (metadata only) and Meshes; the two certificate Secrets of the
/// operator's namespace (each by name) and the webhook configurations are
/// watched, not cached. Three reconcilers read them: the cluster reconciler
/// (certificate, namespace labels) runs at most twice a second whatever the
/// cluster's churn; each Mesh's reconciler runs when the Mesh or its webhook
/// configuration changes, when the cluster reconciler publishes something
/// new, and at most every five seconds for entry changes; the workload
/// reconciler runs per injected pod. The lifecycle loop reads the pods,
/// ProxyProfiles, ReplicaSet owners (metadata only) and the Deployments,
/// StatefulSets and DaemonSets it may restart, and runs after their
/// changes and those of Meshes and Namespaces, at most every
/// [`lifecycle::PERIOD`].
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
    // Mesh, Namespace and certificate Secret changes run the cluster
    // reconciler; entry changes only move the Meshes' registeredWorkloads
    // counts: each has its own throttle.
    let changed = Arc::new(Notify::new());
    let entries_changed = Arc::new(Notify::new());
    // A Mesh's change can move a revision tag between Meshes (or make the
    // default revision yield to the tag `default`): every Mesh looks again.
    let meshes_changed = Arc::new(Notify::new());
    let lifecycle_changed = Arc::new(Notify::new());
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
        )
        .inspect({
            let changed = Arc::clone(&changed);
            let meshes_changed = Arc::clone(&meshes_changed);
            let lifecycle_changed = Arc::clone(&lifecycle_changed);
            move |_| {
                changed.notify_one();
                meshes_changed.notify_one();
                lifecycle_changed.notify_one();
            }
        });

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
    let namespace_cache = reflect_all(
        Api::<Namespace>::all(client.clone()),
        namespace_writer,
        mark_namespaces,
        vec![Arc::clone(&changed), Arc::clone(&lifecycle_changed)],
    );

    // ProxyProfiles: the Pod Security report layers a namespace's over its
    // Mesh; the drift classification reads them too.
    let (profiles, profile_writer) = reflector::store();
    let (mark_profiles, profiles_synced) = synced();
    let profile_cache = reflect_all(
        Api::<ProxyProfile>::all(client.clone()),
        profile_writer,
        mark_profiles,
        vec![Arc::clone(&changed), Arc::clone(&lifecycle_changed)],
    );

    let (nodes, node_writer) = reflector::store();
    let (mark_nodes, nodes_synced) = synced();
    let node_cache = reflect_all(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        node_writer,
        mark_nodes,
        Vec::new(),
    );

    // One watch of every pod, in small pages (a page of pods is parsed
    // whole before it is reduced); each pod arrives once. The lifecycle
    // keeps every pod, reduced to what the drift classification reads; the
    // injected ones go on to the workload controller's cache, reduced to
    // what their entries are made of, and a deleted pod's entry goes at
    // once.
    let caches = Caches::default();
    let (pods, pod_writer) = reflector::store();
    let (mark_pods, pods_synced) = synced();
    let (deleted_pods_tx, deleted_pods_rx) = mpsc::unbounded_channel();
    let pod_events = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().page_size(100),
    )
    .default_backoff()
    .inspect({
        let caches = caches.clone();
        let lifecycle_changed = Arc::clone(&lifecycle_changed);
        move |event| {
            match event {
                Ok(event) => caches.pods.apply(event, |pod| caches.reduce_pod(pod)),
                Err(e) => tracing::warn!(error = %e, "Pod watch failed; retrying"),
            }
            lifecycle_changed.notify_one();
        }
    })
    .try_filter_map({
        let pods = pods.clone();
        move |event| {
            let known = |pod: &Pod| {
                let key = ObjectRef::<InjectedPod>::new(&pod.name_any())
                    .within(&pod.namespace().unwrap_or_default());
                pods.get(&key).is_some()
            };
            std::future::ready(Ok(injected_only(event, known)))
        }
    })
    .map_ok(reduce::<Pod, InjectedPod>)
    .reflect(pod_writer)
    .inspect(move |event| {
        mark_pods.observe(event);
        if let Ok(watcher::Event::Delete(pod)) = event {
            let _ = deleted_pods_tx.send(pod.clone());
        }
    })
    .touched_objects();

    // The lifecycle's other caches: ReplicaSets' owners from their
    // metadata; the workloads a rollout restarts, reduced to their rollout
    // state.
    let (mark_replica_sets, replica_sets_synced) = synced();
    let replica_set_cache = fill(
        watcher(
            Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
            watch_config.clone(),
        )
        .default_backoff(),
        caches.replica_sets.clone(),
        mark_replica_sets,
        Arc::clone(&lifecycle_changed),
        |rs: &PartialObjectMeta<ReplicaSet>| {
            Some(Owner::controller(rs.metadata.owner_references.as_deref()))
        },
    );
    let (mark_deployments, deployments_synced) = synced();
    let deployment_cache = fill(
        watcher(Api::<Deployment>::all(client.clone()), watch_config.clone()).default_backoff(),
        caches.deployments.clone(),
        mark_deployments,
        Arc::clone(&lifecycle_changed),
        |d: &Deployment| Some(Workload::from(d)),
    );
    let (mark_stateful_sets, stateful_sets_synced) = synced();
    let stateful_set_cache = fill(
        watcher(
            Api::<StatefulSet>::all(client.clone()),
            watch_config.clone(),
        )
        .default_backoff(),
        caches.stateful_sets.clone(),
        mark_stateful_sets,
        Arc::clone(&lifecycle_changed),
        |s: &StatefulSet| Some(Workload::from(s)),
    );
    let (mark_daemon_sets, daemon_sets_synced) = synced();
    let daemon_set_cache = fill(
        watcher(Api::<DaemonSet>::all(client.clone()), watch_config.clone()).default_backoff(),
        caches.daemon_sets.clone(),
        mark_daemon_sets,
        Arc::clone(&lifecycle_changed),
        |d: &DaemonSet| Some(Workload::from(d)),
    );

    // Each Secret by name: the operator's Role lets it read these two and
    // no other Secret of its namespace.
    let secret_watch = {
        let changed = Arc::clone(&changed);
        let secrets = Api::<Secret>::namespaced(client.clone(), &config.namespace);
        let by_name = |name: &str| {
            watcher(
                secrets.clone(),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
            )
            .default_backoff()
            .touched_objects()
        };
        futures::stream::select(by_name(SERVING_SECRET), by_name(CA_SECRET)).for_each(
            move |secret| {
                match secret {
                    Ok(_) => changed.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "Secret watch failed; retrying"),
                }
                async {}
            },
        )
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferrimesh-operator".into(),
            instance: config.instance.clone(),
        },
    );

    let (publish, published) = watch::channel(None);
    let (report, reported) = watch::channel(lifecycle::Report::default());
    let lifecycle_loop = {
        let context = lifecycle::Context {
            client: client.clone(),
            recorder: recorder.clone(),
            namespace: config.namespace.clone(),
            meshes: meshes.clone(),
            namespaces: namespaces.clone(),
            profiles: profiles.clone(),
            caches,
        };
        let caches = [
            meshes_synced.clone(),
            namespaces_synced.clone(),
            profiles_synced.clone(),
            pods_synced.clone(),
            replica_sets_synced.clone(),
            deployments_synced.clone(),
            stateful_sets_synced.clone(),
            daemon_sets_synced.clone(),
        ];
        let metrics = metrics.clone();
        async move {
            // Before every list, a pod would look unowned or unselected.
            if !synced::all(&caches.iter().collect::<Vec<_>>()).await {
                return;
            }
            let triggers = futures::stream::select(
                throttle(notified(lifecycle_changed), lifecycle::PERIOD),
                every(lifecycle::RESYNC),
            );
            lifecycle::run(context, triggers, report, metrics).await;
        }
    };
    let cluster_loop = {
        let context = cluster::Context {
            client: client.clone(),
            namespace: config.namespace.clone(),
            webhook: config.webhook.clone(),
            issuer: config.issuer,
            meshes: meshes.clone(),
            namespaces: namespaces.clone(),
            profiles,
            recorder: recorder.clone(),
        };
        let caches = (
            meshes_synced.clone(),
            namespaces_synced.clone(),
            profiles_synced.clone(),
        );
        let metrics = metrics.clone();
        async move {
            // Before both lists, a namespace would look selected by no Mesh;
            // before the profiles, its Pod Security report could be wrong.
            if !synced::all(&[&caches.0, &caches.1, &caches.2]).await {
                return;
            }
            let triggers = throttle(notified(changed), Duration::from_millis(500));
            cluster::run(context, triggers, publish, metrics).await;
        }
    };

    let (targets, registrations) = Targets::new(client.clone(), &config.namespace);
    let mesh_context = Arc::new(mesh::Context {
        client: client.clone(),
        namespace: config.namespace.clone(),
        webhook: config.webhook.clone(),
        entries: entries.clone(),
        meshes: meshes.clone(),
        cluster: published.clone(),
        lifecycle: reported.clone(),
        recorder: recorder.clone(),
        registrations: registrations.clone(),
    });
    let mesh_loop = {
        let (metrics, client) = (metrics.clone(), client.clone());
        let entries_synced = entries_synced.clone();
        let meshes = meshes.clone();
        // Entry changes and the lifecycle's counts only move the status:
        // at most one reconcile of every Mesh per five seconds for both.
        let status_changes =
            futures::stream::select(notified(entries_changed), changes(reported).boxed());
        let triggers = futures::stream::select(
            futures::stream::select(
                futures::stream::select(changes(published), changes(registrations)),
                throttle(notified(meshes_changed), Duration::from_millis(500)),
            ),
            throttle(status_changes, Duration::from_secs(5)),
        );
        async move {
            if !entries_synced.wait().await {
                return;
            }
            Controller::for_stream(mesh_events, meshes)
                .owns(
                    Api::<MutatingWebhookConfiguration>::all(client),
                    watcher::Config::default(),
                )
                .reconcile_all_on(triggers)
                .run(mesh::reconcile, mesh::error_policy, mesh_context)
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
        targets,
    });
    let workload_loop = {
        let workload_context = Arc::clone(&workload_context);
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
        let workload_context = Arc::clone(&workload_context);
        received(deleted_pods_rx).for_each_concurrent(16, move |pod| {
            let workload_context = Arc::clone(&workload_context);
            async move {
                if let Err(e) = workload_controller::on_pod_deleted(&workload_context, &pod).await {
                    tracing::warn!(error = %e, "deleting a WorkloadEntry failed; the sweep will retry");
                }
            }
        })
    };
    let sweep = {
        let client = client.clone();
        let interval = config.sweep_interval.max(Duration::from_secs(1));
        let caches = (
            pods_synced.clone(),
            entries_synced.clone(),
            meshes_synced.clone(),
            namespaces_synced.clone(),
        );
        async move {
            if !synced::all(&[&caches.0, &caches.1, &caches.2, &caches.3]).await {
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
                // The config clusters' entries: swept, counted, the
                // rotated kubeconfigs picked up.
                target::sweep(&workload_context, &pods, &namespaces).await;
                tokio::time::sleep(interval).await;
            }
        }
    };
    // Ready once every cache is synced, the controllers with them.
    let ready_when_synced = async move {
        let caches = [
            &meshes_synced,
            &namespaces_synced,
            &profiles_synced,
            &entries_synced,
            &nodes_synced,
            &pods_synced,
            &replica_sets_synced,
            &deployments_synced,
            &stateful_sets_synced,
            &daemon_sets_synced,
        ];
        if synced::all(&caches).await {
            ready.store(true, Ordering::Release);
        }
    };
    tracing::info!(namespace = %config.namespace, "reconciling");
    futures::join!(
        cluster_loop,
        mesh_loop,
        secret_watch,
        workload_loop,
        entry_cache,
        namespace_cache,
        profile_cache,
        node_cache,
        deletions,
        sweep,
        lifecycle_loop,
        replica_set_cache,
        deployment_cache,
        stateful_set_cache,
        daemon_set_cache,
        ready_when_synced
    );
}

#[cfg(test)]
mod tests {
    //! The wiring against a scripted API server that answers whatever comes:
    //! lists from a fixed cluster, watches held open, writes echoed.

    use std::collections::BTreeSet;

    use http::StatusCode;
    use k8s_openapi::ByteString;
    use serde_json::{Value, json};

    use super::*;
    use crate::cluster::certificate_store::Lifetimes;
    use crate::test_api::{self, failure, respond};

    fn config() -> Config {
        Config {
            namespace: "ferrimesh-system".into(),
            webhook: WebhookTarget::Url("https://127.0.0.1:9443/inject".into()),
            issuer: CertificateIssuer::Operator(Lifetimes {
                ca: 3600,
                serving: 600,
            }),
            sweep_interval: Duration::from_secs(60),
            resync_interval: Duration::from_secs(300),
            workload_concurrency: 4,
            admin_listen: ([127, 0, 0, 1], 0).into(),
            leader_election: None,
            instance: None,
        }
    }

    /// The cluster's objects of the collection at `path`.
    fn items(path: &str) -> Value {
        match path.rsplit('/').next() {
            Some("meshes") => json!([{
                "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "Mesh",
                "metadata": {"name": "default", "uid": "mesh-uid", "generation": 1,
                             "finalizers": [mesh::FINALIZER]},
                "spec": {"namespaceSelector": {"matchLabels": {"mesh": "on"}}}
            }]),
            Some("namespaces") => json!([{
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "apps", "labels": {"mesh": "on"}}
            }]),
            _ => json!([]),
        }
    }

    const COLLECTIONS: [&str; 12] = [
        "meshes",
        "namespaces",
        "proxyprofiles",
        "nodes",
        "pods",
        "workloadentries",
        "secrets",
        "mutatingwebhookconfigurations",
        "replicasets",
        "deployments",
        "statefulsets",
        "daemonsets",
    ];

    #[tokio::test]
    async fn a_mesh_in_the_first_list_gets_one_ca_its_namespace_and_a_webhook_configuration_trusting_it()
     {
        let (client, mut handle) = test_api::client();
        let ready = Arc::new(AtomicBool::new(false));
        let operator = tokio::spawn({
            let ready = Arc::clone(&ready);
            async move { controllers(&config(), client, Metrics::default(), ready).await }
        });
        let mut listed = BTreeSet::new();
        let mut held = Vec::new();
        let mut ca = None;
        let mut labelled = Vec::new();
        let mut stored = std::collections::BTreeMap::new();
        let configured = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (request, send) = handle.next_request().await.expect("a request");
                let method = request.method().as_str().to_owned();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let bytes = request.into_body().collect_bytes().await.expect("body");
                let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let collection = path.rsplit('/').next().is_some_and(|last| COLLECTIONS.contains(&last));
                match method.as_str() {
                    "GET" if query.contains("watch=true") => held.push(send),
                    "GET" if collection => {
                        listed.insert(format!("{path}?{query}").replace("&limit=500", ""));
                        let list = json!({"apiVersion": "v1", "kind": "List",
                                          "metadata": {"resourceVersion": "1"}, "items": items(&path)});
                        respond(send, StatusCode::OK, &list);
                    }
                    "GET" => match stored.get(&path) {
                        Some(object) => respond(send, StatusCode::OK, object),
                        None => respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound")),
                    },
                    "PATCH" if path.ends_with("/mutatingwebhookconfigurations/ferrimesh-sidecar-injector") => {
                        respond(send, StatusCode::OK, &sent);
                        return sent;
                    }
                    "PATCH" if path.ends_with("/secrets/ferrimesh-webhook-ca") => {
                        assert!(ca.is_none(), "one CA");
                        ca = Some(sent["data"]["ca.crt"].clone());
                        respond(send, StatusCode::OK, &sent);
                        stored.insert(path, sent);
                    }
                    "PATCH" if path.starts_with("/api/v1/namespaces/") && !path.contains("/secrets/") => {
                        labelled.push(path.clone());
                        respond(send, StatusCode::OK, &sent);
                    }
                    "POST" => respond(send, StatusCode::CREATED, &sent),
                    _ => {
                        respond(send, StatusCode::OK, &sent);
                        stored.insert(path, sent);
                    }
                }
            }
        })
        .await
        .expect("the webhook configuration applied");
        operator.abort();
        let ca: ByteString = serde_json::from_value(ca.expect("a CA written")).expect("base64");
        let webhooks = configured["webhooks"].as_array().expect("webhooks");
        assert_eq!(webhooks.len(), 4);
        for webhook in webhooks {
            let bundle: ByteString =
                serde_json::from_value(webhook["clientConfig"]["caBundle"].clone())
                    .expect("caBundle");
            assert_eq!(
                bundle, ca,
                "the bundle is the CA the cluster reconciler wrote"
            );
        }
        assert_eq!(
            labelled,
            ["/api/v1/namespaces/apps"],
            "labelled once, though its watch never delivers the change"
        );
        let expected = [
            "/apis/mesh.ferrimesh.io/v1alpha1/meshes?",
            "/api/v1/namespaces?",
            "/apis/mesh.ferrimesh.io/v1alpha1/proxyprofiles?",
            "/api/v1/nodes?",
            "/apis/networking.istio.io/v1/workloadentries?&labelSelector=ferrimesh.io%2Fmanaged-by%3Dferrimesh-operator",
            "/api/v1/namespaces/ferrimesh-system/secrets?&fieldSelector=metadata.name%3Dferrimesh-webhook-tls",
            "/api/v1/namespaces/ferrimesh-system/secrets?&fieldSelector=metadata.name%3Dferrimesh-webhook-ca",
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?",
            "/api/v1/pods?&limit=100",
            "/apis/mesh.ferrimesh.io/v1alpha1/proxyprofiles?",
            "/apis/apps/v1/replicasets?",
            "/apis/apps/v1/deployments?",
            "/apis/apps/v1/statefulsets?",
            "/apis/apps/v1/daemonsets?",
        ];
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(listed, expected, "one watch per kind, each Secret by name");
    }
}
