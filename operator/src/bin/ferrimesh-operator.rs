//! `ferrimesh-operator`: reconciles Meshes (webhook configuration,
//! certificate, namespace labels, status) and registers injected pods as
//! WorkloadEntries. The arguments, then [`ferrimesh_operator::run`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ferrimesh_operator::cluster::CertificateIssuer;
use ferrimesh_operator::cluster::certificate_store::Lifetimes;
use ferrimesh_operator::mesh::WebhookTarget;
use ferrimesh_operator::{Config, LeaderElection};

// jemalloc, not the C library's malloc: every pod arrives whole and is
// reduced to a few small objects that live on; glibc's malloc left those
// scattered over pages the freed pods filled (at 10,000 pods: a 28 MB heap
// in 60 MiB of anonymous memory). docs/benchmarks.md has the figures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

impl Args {
    /// The operator's configuration; `instance` is this replica's name.
    fn config(self, instance: Option<String>) -> Config {
        let webhook = match self.webhook_url {
            Some(url) => WebhookTarget::Url(url),
            None => WebhookTarget::Service {
                name: self.webhook_service,
                namespace: self.namespace.clone(),
                port: self.webhook_service_port,
            },
        };
        Config {
            namespace: self.namespace,
            webhook,
            issuer: match self.certificate_issuer {
                Issuer::Operator => CertificateIssuer::Operator(Lifetimes {
                    ca: self.ca_lifetime_seconds,
                    serving: self.cert_lifetime_seconds,
                }),
                Issuer::CertManager => CertificateIssuer::CertManager,
            },
            sweep_interval: Duration::from_secs(self.sweep_interval_seconds),
            resync_interval: Duration::from_secs(self.resync_interval_seconds),
            workload_concurrency: self.workload_concurrency,
            admin_listen: self.admin_listen,
            leader_election: self.leader_election.then(|| LeaderElection {
                lease_name: self.lease_name,
                lease_duration: Duration::from_secs(self.lease_duration_seconds),
            }),
            instance,
        }
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ferrimesh_operator::run(args.config(std::env::var("POD_NAME").ok())).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferrimesh-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
