//! `ferrimesh-webhook` as a child process: the one command line that the
//! e2e suite, the webhook's process tests and the benches start it with,
//! and the addresses it reports once it listens.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};

use anyhow::Context;
use serde_json::Value;

/// The webhook at `binary`, serving `cert` and `key` on `listen`, its admin
/// endpoints on `admin_listen` (port 0 for any free port: see
/// [`bound_addresses`]), logging JSON; add the configuration source
/// (`--mesh-file`, or `KUBECONFIG` for cluster mode) and any other flag.
pub fn webhook_command(
    binary: &Path,
    (cert, key): (&Path, &Path),
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin-listen")
        .arg(admin_listen.to_string())
        .args(["--log-format", "json"])
        .arg("--tls-cert-file")
        .arg(cert)
        .arg("--tls-key-file")
        .arg(key);
    command
}

/// A loopback address on `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Where a webhook started with piped stderr listens: the serving and admin
/// addresses from its "serving admission reviews" log line. The rest of the
/// log is drained on a thread, so the child never blocks on a full pipe.
pub fn bound_addresses(child: &mut Child) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let stderr = child
        .stderr
        .take()
        .context("the webhook's stderr is not piped")?;
    let mut lines = BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .take(100)
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .find(|log| log["message"] == "serving admission reviews")
        .context("the webhook did not log its addresses")?;
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    let address = |field: &str| -> anyhow::Result<SocketAddr> {
        started[field]
            .as_str()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no {field} in {started}"))
    };
    Ok((address("addr")?, address("admin_addr")?))
}
