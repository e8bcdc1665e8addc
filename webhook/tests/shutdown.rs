//! The `ferrimesh-webhook` binary under SIGTERM: readiness turns off at
//! once, new connections are still accepted and served during the shutdown
//! delay, a request in flight finishes, then new connections are refused
//! and the process exits cleanly.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrimesh_e2e::Scratch;
use ferrimesh_e2e::tls::Authority;
use ferrimesh_e2e::webhook_process::{bound_addresses, loopback, webhook_command};
use serde_json::json;
use support::{MESH, pod, request_head, review, tls_stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let binary = Path::new(env!("CARGO_BIN_EXE_ferrimesh-webhook"));
    let tls = (scratch.path("tls.crt"), scratch.path("tls.key"));
    let mut child = webhook_command(binary, (&tls.0, &tls.1), loopback(0), loopback(0))
        .arg("--mesh-file")
        .arg(scratch.path("mesh.yaml"))
        .args(["--shutdown-grace-seconds", "10"])
        .args(["--shutdown-delay-seconds", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("webhook starts");
    let (addr, admin) = bound_addresses(&mut child).expect("the webhook logs its addresses");
    Webhook {
        child,
        addr: addr.to_string(),
        admin: admin.to_string(),
    }
}

/// Reads from `stream` until the answer for `uid` is in, the peer closes,
/// or 10 s pass.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, uid: &str) -> String {
    let mut response = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!("\"uid\":\"{uid}\"");
    while !String::from_utf8_lossy(&response).contains(&needle) && Instant::now() < deadline {
        let mut buf = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("reading the response: {e}"),
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_serving_during_the_delay_then_drains_and_exits() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scratch = Scratch::new("sigterm").expect("scratch dir");
    let authority = Authority::new().expect("test CA");
    let leaf = authority.loopback().expect("serving certificate");
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
    stream
        .write_all(request_head("/inject", body.len()).as_bytes())
        .await
        .expect("head");
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

    // During the delay a new connection is still served, and told to close.
    let late = review("during-delay", pod(json!({}))).to_string();
    let mut newcomer = tls_stream(&authority, &webhook.addr)
        .await
        .expect("new connections are accepted during the delay");
    newcomer
        .write_all(format!("{}{late}", request_head("/inject", late.len())).as_bytes())
        .await
        .expect("request");
    newcomer.flush().await.expect("flush");
    let text = read_answer(&mut newcomer, "during-delay").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "the client is asked to reconnect elsewhere: {text}"
    );
    drop(newcomer);

    // Once the delay is over, new connections are refused while the
    // request in flight is still served.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_stream(&authority, &webhook.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "new connections still accepted 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.write_all(rest).await.expect("second half");
    stream.flush().await.expect("flush");
    let text = read_answer(&mut stream, "in-flight").await;
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
