//! `ferrimesh`: offline sidecar injection with the webhook's own engine, and
//! the drift report of a cluster (`ferrimesh status`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ferrimesh_webhook::manifests::{self, MeshConfig, Run};
use ferrimesh_webhook::mesh_file;

// Injection allocates many small JSON nodes; mimalloc does that about twice
// as fast as the system allocator (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Istio-compatible sidecar injection, offline, and the sidecar drift of a cluster.
#[derive(Parser, Debug)]
#[command(name = "ferrimesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inject the sidecar into the pod templates of Kubernetes manifests and
    /// print them (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
    /// ReplicationController, Job, CronJob, List; other kinds pass through).
    Inject {
        #[command(flatten)]
        input: Input,
    },
    /// Tell, for every pod (template), whether it would be injected and why.
    CheckInject {
        #[command(flatten)]
        input: Input,
        /// Labels of the target namespace (`k=v,k2=v2`); with them, the
        /// webhook's namespace and object selectors are checked too.
        #[arg(long, value_name = "K=V,...")]
        namespace_labels: Option<String>,
    },
    /// Print ferrimesh's CRDs (Mesh, ProxyProfile) and Istio's WorkloadEntry CRD.
    Crds,
    /// Report, per namespace, the revision that injects its pods and how
    /// many pods are up to date, outdated (injected from other settings than
    /// today's Meshes and ProxyProfiles) or uninjected (created before their
    /// namespace was enabled, or while the webhook was down), read from the
    /// cluster of the current kubeconfig context.
    Status(StatusArgs),
}

/// How `ferrimesh status` reaches the cluster and what it prints.
#[derive(Args, Debug)]
struct StatusArgs {
    /// The kubeconfig file; default: `KUBECONFIG`, else `~/.kube/config`.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; default: the current context.
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
    /// List every pod counted, with its state and the reason.
    #[arg(long)]
    pods: bool,
    /// The operator's namespace, which no webhook entry selects.
    #[arg(long, default_value = "ferrimesh-system", value_name = "NAMESPACE")]
    operator_namespace: String,
}

/// Output formats of `ferrimesh status`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document: `{"namespaces": [...]}`.
    Json,
}

async fn status(args: StatusArgs) -> Result<String> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    }
    .context("loading the kubeconfig")?;
    let client = kube::Client::try_from(config).context("building the API client")?;
    let snapshot = ferrimesh_webhook::status::Snapshot::fetch(&client)
        .await
        .context("reading namespaces, pods, Meshes and ProxyProfiles")?;
    let mut excluded: Vec<&str> = ferrimesh_crds::istio::SYSTEM_NAMESPACES.to_vec();
    excluded.push(&args.operator_namespace);
    let report = ferrimesh_webhook::status::report(&snapshot, &excluded, args.pods);
    Ok(match args.output {
        Output::Table => ferrimesh_webhook::status::to_table(&report),
        Output::Json => {
            let mut json =
                serde_json::to_string_pretty(&serde_json::json!({"namespaces": report}))?;
            json.push('\n');
            json
        }
    })
}

#[derive(Args, Debug)]
struct Input {
    /// Manifest file, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: PathBuf,
    /// A file with one Mesh; Mesh defaults apply without it.
    #[arg(long, value_name = "MESH.yaml")]
    mesh: Option<PathBuf>,
    /// A file with ProxyProfiles (repeatable); each applies to pods of its own
    /// namespace (`default` when it names none).
    #[arg(long = "profile", value_name = "PROFILE.yaml")]
    profiles: Vec<PathBuf>,
}

fn read(path: &PathBuf) -> Result<(String, String)> {
    let name = path.display().to_string();
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
    }
    Ok((name, text))
}

/// The manifest input, read as a stream: one document at a time is held.
fn open(path: &PathBuf) -> Result<(String, Box<dyn BufRead>)> {
    let name = path.display().to_string();
    if name == "-" {
        return Ok((name, Box::new(BufReader::new(std::io::stdin()))));
    }
    let file = std::fs::File::open(path).with_context(|| format!("reading {name}"))?;
    Ok((name, Box::new(BufReader::new(file))))
}

impl Input {
    fn config(&self) -> Result<MeshConfig> {
        let mut config = MeshConfig::default();
        if let Some(path) = &self.mesh {
            let (name, text) = read(path)?;
            config.mesh = mesh_file::read_mesh(&name, &text)?;
        }
        for path in &self.profiles {
            let (name, text) = read(path)?;
            config
                .profiles
                .extend(mesh_file::read_profiles(&name, &text)?);
        }
        Ok(config)
    }
}

fn parse_labels(raw: &str) -> Result<BTreeMap<String, String>> {
    raw.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--namespace-labels: {kv:?} is not key=value"),
        })
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    match cli.command {
        Command::Inject { input } => {
            let config = input.config()?;
            let (name, reader) = open(&input.file)?;
            let run = Run {
                config: &config,
                namespace_labels: None,
            };
            for part in manifests::process_reader(&name, reader, run) {
                let part = part?;
                for pod in &part.pods {
                    for warning in &pod.warnings {
                        eprintln!("{}: warning: {warning}", pod.location);
                    }
                }
                part.write_yaml(&mut stdout)?;
            }
        }
        Command::CheckInject {
            input,
            namespace_labels,
        } => {
            let config = input.config()?;
            let labels = namespace_labels.as_deref().map(parse_labels).transpose()?;
            let (name, reader) = open(&input.file)?;
            let run = Run {
                config: &config,
                namespace_labels: labels.as_ref(),
            };
            let mut pods = 0;
            for part in manifests::process_reader(&name, reader, run) {
                for pod in &part?.pods {
                    pods += 1;
                    let verdict = match (&pod.not_selected, pod.decision.inject) {
                        (Some(why), _) => format!("not injected: {why}"),
                        (None, true) => format!("injected: {}", pod.decision.reason),
                        (None, false) => format!("not injected: {}", pod.decision.reason),
                    };
                    writeln!(stdout, "{}: {verdict}", pod.location)?;
                    for warning in &pod.warnings {
                        writeln!(stdout, "  warning: {warning}")?;
                    }
                }
            }
            if pods == 0 {
                writeln!(stdout, "{name}: no pods or pod templates found")?;
            }
        }
        Command::Status(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            stdout.write_all(runtime.block_on(status(args))?.as_bytes())?;
        }
        Command::Crds => {
            let all: Vec<_> = ferrimesh_crds::mesh_crds()
                .into_iter()
                .chain(ferrimesh_crds::istio_crds())
                .collect();
            stdout.write_all(ferrimesh_crds::to_yaml(&all)?.as_bytes())?;
        }
    }
    stdout.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferrimesh: {err:#}");
            ExitCode::FAILURE
        }
    }
}
