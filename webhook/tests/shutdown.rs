//! The `ferrimesh-webhook` binary under SIGTERM: a request in flight
//! finishes, readiness turns off at once, new connections are refused, and
//! the process exits cleanly.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use support::{Authority, MESH, Scratch, pod, review};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Webhook {
    child: Child,
    addr: String,
    admin: String,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on free loopback ports and reads its bound addresses
/// from its JSON log.
fn spawn(scratch: &Scratch) -> Webhook {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrimesh-webhook"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--tls-cert-file")
        .arg(scratch.path("tls.crt"))
        .arg("--tls-key-file")
        .arg(scratch.path("tls.key"))
        .arg("--mesh-file")
        .arg(scratch.path("mesh.yaml"))
        .args(["--shutdown-grace-seconds", "10"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("webhook starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .find(|log| log["message"] == "serving admission reviews")
        .expect("the webhook logs its addresses");
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Webhook {
        child,
        addr: started["addr"].as_str().expect("addr").to_owned(),
        admin: started["admin_addr"]
            .as_str()
            .expect("admin addr")
            .to_owned(),
    }
}

async fn tls_stream(
    authority: &Authority,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca_certs(&authority.ca_pem()) {
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

fn ca_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.expect("pem"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_then_exits() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scratch = Scratch::new("sigterm");
    let authority = Authority::new();
    let leaf = authority.leaf();
    std::fs::write(scratch.path("tls.crt"), &leaf.cert_pem).expect("cert");
    std::fs::write(scratch.path("tls.key"), &leaf.key_pem).expect("key");
    std::fs::write(scratch.path("mesh.yaml"), MESH).expect("mesh");
    let mut webhook = spawn(&scratch);
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", webhook.admin);
    assert_eq!(
        http.get(&readyz)
            .send()
            .await
            .expect("readyz")
            .status()
            .as_u16(),
        200
    );

    // Half a request on the wire...
    let body = review("in-flight", pod(json!({}))).to_string();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut stream = tls_stream(&authority, &webhook.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(first).await.expect("first half");
    stream.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // ...when SIGTERM arrives.
    let pid = webhook.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unready = http
        .get(&readyz)
        .send()
        .await
        .expect("readyz during shutdown");
    assert_eq!(
        unready.status().as_u16(),
        503,
        "readiness turns off at once"
    );
    assert!(
        tls_stream(&authority, &webhook.addr).await.is_err(),
        "no new connections while draining"
    );

    stream.write_all(rest).await.expect("second half");
    stream.flush().await.expect("flush");
    let mut response = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&response).contains("\"uid\":\"in-flight\"")
        && Instant::now() < deadline
    {
        let mut buf = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("reading the response: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"uid\":\"in-flight\"") && text.contains("\"patch\""),
        "{text}"
    );
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = webhook.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit, got {status}");
}
