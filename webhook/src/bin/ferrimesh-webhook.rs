//! `ferrimesh-webhook`: the sidecar-injecting admission webhook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ferrimesh_webhook::config::{ClusterSource, ConfigSource, FileSource};
use ferrimesh_webhook::server::{self, Settings, tls};
use tokio::signal::unix::{SignalKind, signal};

// Injection allocates many small JSON nodes; mimalloc does that about twice
// as fast as the system allocator (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Istio-compatible sidecar injection webhook.
///
/// Serves AdmissionReviews on HTTPS `/inject` (and Istio's
/// `/inject/cluster/<id>/net/<network>` form), with `/metrics`, `/healthz`
/// and `/readyz` on a plain-HTTP admin port. Mesh configuration comes from
/// the cluster (Mesh, ProxyProfile and Node watches) or, with `--mesh-file`,
/// from files.
#[derive(Parser, Debug)]
#[command(name = "ferrimesh-webhook", version, about, long_about)]
struct Args {
    /// Address of the HTTPS admission server.
    #[arg(long, env = "FERRIMESH_LISTEN", default_value = "0.0.0.0:15017")]
    listen: SocketAddr,
    /// PEM certificate (chain) served to the API server; re-read when it changes.
    #[arg(
        long,
        env = "FERRIMESH_TLS_CERT_FILE",
        default_value = "/var/run/secrets/ferrimesh/tls/tls.crt"
    )]
    tls_cert_file: PathBuf,
    /// PEM private key of the certificate; re-read when it changes.
    #[arg(
        long,
        env = "FERRIMESH_TLS_KEY_FILE",
        default_value = "/var/run/secrets/ferrimesh/tls/tls.key"
    )]
    tls_key_file: PathBuf,
    /// PEM CA bundle: when given, clients must present a certificate it signed.
    #[arg(long, env = "FERRIMESH_CLIENT_CA_FILE")]
    client_ca_file: Option<PathBuf>,
    /// Address of the plain-HTTP admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "FERRIMESH_ADMIN_LISTEN", default_value = "0.0.0.0:15014")]
    admin_listen: SocketAddr,
    /// Serve the Mesh in this file instead of watching the cluster; the file
    /// is re-read when it changes.
    #[arg(long, env = "FERRIMESH_MESH_FILE")]
    mesh_file: Option<PathBuf>,
    /// With --mesh-file: files of ProxyProfiles (repeatable).
    #[arg(
        long = "profile-file",
        env = "FERRIMESH_PROFILE_FILES",
        value_delimiter = ',',
        requires = "mesh_file"
    )]
    profile_files: Vec<PathBuf>,
    /// With --mesh-file: what `nativeSidecars: Auto` resolves to.
    #[arg(long, env = "FERRIMESH_NATIVE_SIDECARS_SUPPORTED", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecars_supported: bool,
    /// The revision (the Mesh's `spec.revision`) this webhook serves.
    #[arg(long, env = "FERRIMESH_REVISION", default_value = "default")]
    revision: String,
    /// Reviews waiting for a worker or running; more wait for a place until
    /// the request deadline (then 503 with Retry-After).
    #[arg(long, env = "FERRIMESH_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Reviews running at once, each on its own blocking thread (default:
    /// the number of CPUs, at most 4).
    #[arg(long, env = "FERRIMESH_REVIEW_WORKERS")]
    review_workers: Option<usize>,
    /// MiB of request bodies buffered at once, all requests together; past
    /// it, 503 with Retry-After (the last quarter is kept for bodies up to
    /// 256 KiB).
    #[arg(long, env = "FERRIMESH_MAX_BUFFERED_BODY_MIB", default_value_t = 24)]
    max_buffered_body_mib: usize,
    /// Connections open at once (in their TLS handshake or established);
    /// past it, a new connection is closed as soon as it is accepted, while
    /// those already open are served.
    #[arg(long, env = "FERRIMESH_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Threads computing TLS handshakes (key exchange and signature), one
    /// handshake each at a time: new connections wait for them, requests on
    /// established connections never do.
    #[arg(long, env = "FERRIMESH_TLS_HANDSHAKE_THREADS", default_value_t = 1)]
    tls_handshake_threads: usize,
    /// Seconds allowed for the TLS handshake and a request's headers.
    #[arg(long, env = "FERRIMESH_HEADER_TIMEOUT_SECONDS", default_value_t = 10)]
    header_timeout_seconds: u64,
    /// Seconds allowed for a request's body after its headers (408 past it).
    #[arg(long, env = "FERRIMESH_BODY_TIMEOUT_SECONDS", default_value_t = 5)]
    body_timeout_seconds: u64,
    /// Seconds allowed for a request after its headers: body, wait and
    /// review (503 past it); keep it under the Mesh's webhook.timeoutSeconds.
    #[arg(long, env = "FERRIMESH_REQUEST_TIMEOUT_SECONDS", default_value_t = 9)]
    request_timeout_seconds: u64,
    /// Seconds after SIGTERM during which /readyz is 503 but requests are
    /// still accepted and served, so endpoints drop the replica first.
    #[arg(long, env = "FERRIMESH_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    shutdown_delay_seconds: u64,
    /// Seconds in-flight requests get to finish after the shutdown delay.
    #[arg(long, env = "FERRIMESH_SHUTDOWN_GRACE_SECONDS", default_value_t = 25)]
    shutdown_grace_seconds: u64,
    /// Log format.
    #[arg(long, env = "FERRIMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How logs are written (levels come from `RUST_LOG`, default `info`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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

async fn config_source(args: &Args) -> anyhow::Result<Arc<dyn ConfigSource>> {
    match &args.mesh_file {
        Some(mesh_file) => {
            let source = FileSource::load(
                mesh_file.clone(),
                args.profile_files.clone(),
                args.native_sidecars_supported,
            )?;
            source.watch(Duration::from_secs(1));
            Ok(source)
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes configuration (in-cluster or kubeconfig); use --mesh-file to run without a cluster")?;
            Ok(ClusterSource::start(client, &args.revision))
        }
    }
}

/// One review worker per CPU, at most 4: reviews are CPU-bound, and each
/// holds a pod's worth of memory while it runs.
fn default_review_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // One process-wide provider, for kube's client as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certificate = Arc::new(tls::ReloadingCertificate::load(
        args.tls_cert_file.clone(),
        args.tls_key_file.clone(),
        Arc::clone(&provider),
    )?);
    let tls = tls::server_config(provider, certificate, args.client_ca_file.as_deref())?;
    let settings = Settings {
        listen: args.listen,
        admin_listen: args.admin_listen,
        tls: Arc::new(tls),
        max_connections: args.max_connections.max(1),
        handshake_threads: args.tls_handshake_threads.max(1),
        source: config_source(&args).await?,
        max_concurrent_requests: args.max_concurrent_requests.max(1),
        review_workers: args.review_workers.unwrap_or_else(default_review_workers),
        max_buffered_body_bytes: args.max_buffered_body_mib.saturating_mul(1024 * 1024),
        header_timeout: Duration::from_secs(args.header_timeout_seconds),
        body_timeout: Duration::from_secs(args.body_timeout_seconds),
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
        shutdown_delay: Duration::from_secs(args.shutdown_delay_seconds),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
    };
    let running = server::start(settings).await?;

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    // A second signal aborts at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferrimesh-webhook: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
