//! `ferrimesh-operator`: reconciles Meshes (webhook configuration,
//! certificate, namespace labels, status) and registers injected pods as
//! WorkloadEntries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, ValueEnum};
use ferrimesh_crds::{Mesh, WorkloadEntry};
use ferrimesh_operator::certificate_store::{CA_SECRET, Lifetimes, SERVING_SECRET};
use ferrimesh_operator::injected_pod::InjectedPod;
use ferrimesh_operator::mesh_controller::{self, CertificateIssuer, WebhookTarget};
use ferrimesh_operator::reduced::reduce;
use ferrimesh_operator::registered_entry::RegisteredEntry;
use ferrimesh_operator::synced::{self, synced};
use ferrimesh_operator::triggers::throttle;
use ferrimesh_operator::workload_controller::{self, INJECTED_PODS};
use ferrimesh_operator::workloads::{MANAGED_BY, MANAGED_BY_LABEL};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The ferrimesh operator.
///
/// Writes, with server-side apply as `ferrimesh-operator`: the webhook's CA
/// and serving certificate (Secrets in its namespace), one
/// MutatingWebhookConfiguration per Mesh, the injection labels of the
/// namespaces a Mesh selects, each Mesh's status, and a WorkloadEntry per
/// injected pod.
#[derive(Parser, Debug)]
#[command(name = "ferrimesh-operator", version, about, long_about)]
struct Args {
    /// The operator's own namespace: never labelled, holds the certificate Secrets.
    #[arg(long, env = "FERRIMESH_NAMESPACE", default_value = "ferrimesh-system")]
    namespace: String,
    /// Name of the webhook's Service (in the operator's namespace).
    #[arg(
        long,
        env = "FERRIMESH_WEBHOOK_SERVICE",
        default_value = "ferrimesh-webhook"
    )]
    webhook_service: String,
    /// Port of the webhook's Service.
    #[arg(long, env = "FERRIMESH_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    webhook_service_port: i32,
    /// Call the webhook at this URL instead of the Service (local control
    /// planes); its host goes into the serving certificate.
    #[arg(long, env = "FERRIMESH_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Who issues the webhook's serving certificate: the operator itself
    /// (CA and certificate in Secrets of its namespace), or cert-manager
    /// (config/components/cert-manager; the operator publishes its CA only).
    #[arg(long, env = "FERRIMESH_CERTIFICATE_ISSUER", value_enum, default_value_t = Issuer::Operator)]
    certificate_issuer: Issuer,
    /// Lifetime of the serving certificate, seconds (renewed at two thirds).
    #[arg(long, env = "FERRIMESH_CERT_LIFETIME_SECONDS", default_value_t = 90 * 24 * 3600)]
    cert_lifetime_seconds: i64,
    /// Lifetime of the CA, seconds (renewed at two thirds).
    #[arg(long, env = "FERRIMESH_CA_LIFETIME_SECONDS", default_value_t = 5 * 365 * 24 * 3600)]
    ca_lifetime_seconds: i64,
    /// Seconds between sweeps for WorkloadEntries whose pod is gone.
    #[arg(long, env = "FERRIMESH_SWEEP_INTERVAL_SECONDS", default_value_t = 60)]
    sweep_interval_seconds: u64,
    /// Seconds between resyncs: every injected pod checked against its
    /// cached WorkloadEntry, and an entry someone else edited written back.
    #[arg(long, env = "FERRIMESH_RESYNC_INTERVAL_SECONDS", default_value_t = 300)]
    resync_interval_seconds: u64,
    /// Pods reconciled at once (each makes two API calls for a new entry,
    /// four for one that changed).
    #[arg(long, env = "FERRIMESH_WORKLOAD_CONCURRENCY", default_value_t = 128)]
    workload_concurrency: u16,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "FERRIMESH_ADMIN_LISTEN", default_value = "0.0.0.0:15015")]
    admin_listen: SocketAddr,
    /// Elect a leader among replicas with a coordination.k8s.io Lease; only
    /// the holder reconciles. Turn off only for a single replica.
    #[arg(long, env = "FERRIMESH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease (in the operator's namespace; config/rbac grants
    /// it by this name).
    #[arg(
        long,
        env = "FERRIMESH_LEASE_NAME",
        default_value = "ferrimesh-operator"
    )]
    lease_name: String,
    /// Seconds a holder keeps the lease without renewing it; a standby takes
    /// over within this time when the holder dies.
    #[arg(long, env = "FERRIMESH_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Log format.
    #[arg(long, env = "FERRIMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Who issues the webhook's serving certificate.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Issuer {
    /// The operator: its own CA, renewed automatically.
    Operator,
    /// cert-manager, through the Certificate in config/components/cert-manager.
    CertManager,
}

/// How logs are written (levels from `RUST_LOG`, default `info`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

#[derive(Clone)]
struct Admin {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn metrics(State(admin): State<Admin>) -> (StatusCode, String) {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &admin.registry) {
        Ok(()) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readiness(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced\n")
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let reconciles = Family::<ReconcileLabels, Counter>::default();
    registry.register(
        "ferrimesh_operator_reconciles",
        "Reconciles by controller and result",
        reconciles.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin {
        registry: Arc::new(registry),
        ready: Arc::clone(&ready),
    };
    let listener = tokio::net::TcpListener::bind(args.admin_listen).await?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(admin);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    if !args.leader_election {
        tokio::select! {
            () = controllers(&args, client, reconciles, ready) => {},
            () = &mut shutdown => {},
        }
        tracing::info!("stopped");
        return Ok(());
    }

    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("ferrimesh-operator-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration_seconds)
        .with_grace(args.lease_duration_seconds.div_ceil(3))
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    // Standing by is a ready state: the Service should not flap on followers.
    ready.store(true, Ordering::Release);
    'terms: loop {
        while !*leader.borrow_and_update() {
            tracing::info!(%identity, lease = %args.lease_name, "waiting for the lease");
            tokio::select! {
                changed = leader.changed() => changed?,
                () = &mut shutdown => break 'terms,
            }
        }
        tracing::info!(%identity, "holding the lease");
        ready.store(false, Ordering::Release);
        let lost = async {
            while *leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    break;
                }
            }
        };
        // Dropping the controllers when the lease is lost stops every write at once.
        tokio::select! {
            () = controllers(&args, client.clone(), reconciles.clone(), Arc::clone(&ready)) => break 'terms,
            () = lost => tracing::warn!("lost the lease; stopped reconciling"),
            () = &mut shutdown => break 'terms,
        }
        ready.store(true, Ordering::Release);
    }
    drop(leader); // releases the lease
    if let Ok(Err(e)) = lease_task.await {
        tracing::warn!(error = %e, "releasing the lease failed; it expires on its own");
    }
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

/// A stream of the items an unbounded channel receives.
fn received<T>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A stream that yields once every `period`, the first time after one period.
fn every(period: Duration) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(period).await;
        Some(((), ()))
    })
}

/// A stream that yields each time `notify` is notified.
fn notified(notify: Arc<Notify>) -> futures::stream::BoxStream<'static, ()> {
    futures::stream::unfold(notify, |notify| async move {
        notify.notified().await;
        Some(((), notify))
    })
    .boxed()
}

fn count(reconciles: &Family<ReconcileLabels, Counter>, controller: &str, ok: bool) {
    reconciles
        .get_or_create(&ReconcileLabels {
            controller: controller.into(),
            result: if ok { "ok" } else { "error" }.into(),
        })
        .inc();
}

/// Runs the controllers until they stop (or the future is dropped).
///
/// One watch per kind, each feeding a cache: injected pods (pruned to what
/// a WorkloadEntry needs before they are stored), our WorkloadEntries,
/// Namespaces, Nodes (metadata only), Meshes, and the two certificate
/// Secrets of the operator's namespace (each by name). Namespace and WorkloadEntry changes reconcile the
/// Meshes at most twice a second, however busy the cluster is.
async fn controllers(
    args: &Args,
    client: Client,
    reconciles: Family<ReconcileLabels, Counter>,
    ready: Arc<AtomicBool>,
) {
    let webhook = match &args.webhook_url {
        Some(url) => WebhookTarget::Url(url.clone()),
        None => WebhookTarget::Service {
            name: args.webhook_service.clone(),
            namespace: args.namespace.clone(),
            port: args.webhook_service_port,
        },
    };
    let config = watcher::Config::default();

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
    let mesh_events = watcher(Api::<Mesh>::all(client.clone()), config.clone())
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
            config
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
        watcher(Api::<Namespace>::all(client.clone()), config.clone())
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
        config.clone(),
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
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let mesh_context = Arc::new(mesh_controller::Context {
        client: client.clone(),
        namespace: args.namespace.clone(),
        webhook,
        issuer: match args.certificate_issuer {
            Issuer::Operator => CertificateIssuer::Operator(Lifetimes {
                ca: args.ca_lifetime_seconds,
                serving: args.cert_lifetime_seconds,
            }),
            Issuer::CertManager => CertificateIssuer::CertManager,
        },
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
        let (counter, client) = (reconciles.clone(), client.clone());
        let caches = (namespaces_synced.clone(), entries_synced.clone());
        let (meshes, secrets_namespace) = (meshes.clone(), args.namespace.clone());
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
                    count(&counter, "mesh", result.is_ok());
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
        let counter = reconciles;
        let concurrency = args.workload_concurrency.max(1);
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
        let resync = every(Duration::from_secs(args.resync_interval_seconds.max(1)));
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
                    count(&counter, "workload", result.is_ok());
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
        let interval = Duration::from_secs(args.sweep_interval_seconds.max(1));
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
    tracing::info!(namespace = %args.namespace, "reconciling");
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferrimesh-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
