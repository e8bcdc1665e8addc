//! The webhook under hostile clients, over real HTTPS on loopback: slow and
//! stalled bodies do not hold up other clients' reviews, the buffered-body
//! budget refuses with 503 and `Retry-After`, every refusal has a JSON body
//! and is counted.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{MESH, TestServer, pod, request_head, review, tls_stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a connection, sends `head` and `body_start`, and keeps it open.
async fn stalled(
    server: &TestServer,
    head: &str,
    body_start: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = server.running.as_ref().expect("running").addr.to_string();
    let mut stream = tls_stream(&server.authority, &addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(body_start).await.expect("body start");
    stream.flush().await.expect("flush");
    stream
}

/// Reads one response from `stream` (until the peer closes or 10 s pass).
async fn response_of<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut response = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                response.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&response);
                if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// The status and JSON body of a response.
async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn metrics(server: &TestServer) -> String {
    reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_do_not_hold_up_another_clients_review() {
    let server = TestServer::start_configured("slow-body", MESH, false, |settings| {
        settings.max_concurrent_requests = 2;
        settings.review_workers = 1;
        settings.body_timeout = Duration::from_secs(60);
        settings.request_timeout = Duration::from_secs(60);
    })
    .await;
    let body = review("slow", pod(json!({}))).to_string();
    let mut attackers = Vec::new();
    for _ in 0..8 {
        attackers.push(stalled(&server, &request_head("/inject", body.len()), b"{").await);
    }
    let client = server.client.clone();
    let answer = client
        .post(server.url("/inject"))
        .json(&review("well-behaved", pod(json!({}))))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("answered while 8 bodies stall");
    assert_eq!(answer.status().as_u16(), 200);
    let answer: Value = answer.json().await.expect("json");
    assert_eq!(answer["response"]["uid"], "well-behaved");
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_budget_answers_503_with_retry_after_and_keeps_room_for_small_bodies() {
    let server = TestServer::start_configured("budget", MESH, false, |settings| {
        settings.max_buffered_body_bytes = 1 << 20;
    })
    .await;
    // A large body announced and stalled holds 700 KiB of the 768 KiB that
    // large bodies may use.
    let _holder = stalled(&server, &request_head("/inject", 700 << 10), b"{").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut refused = stalled(&server, &request_head("/inject", 300 << 10), b"").await;
    let text = response_of(&mut refused).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let error: Value = serde_json::from_str(body).expect("a JSON body");
    assert!(
        error["error"].as_str().is_some_and(|e| e.contains("retry")),
        "{error}"
    );

    let (status, answer) = server
        .post("/inject", &review("small", pod(json!({}))))
        .await;
    assert_eq!(status, 200, "small bodies still fit: {answer}");
    assert!(
        metrics(&server)
            .await
            .lines()
            .any(|l| l == "sidecar_injection_failure_total{type=\"overloaded\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_408_413_405_have_json_bodies_and_are_counted() {
    let server = TestServer::start_configured("refusals", MESH, false, |settings| {
        settings.body_timeout = Duration::from_millis(300);
    })
    .await;

    let mut slow = stalled(&server, &request_head("/inject", 1000), b"{").await;
    let text = response_of(&mut slow).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let error: Value = serde_json::from_str(body).expect("a JSON 408 body");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("not received in time")),
        "{error}"
    );

    let mut huge = stalled(&server, &request_head("/inject", 3 * 1024 * 1024 + 1), b"").await;
    let text = response_of(&mut huge).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let error: Value = serde_json::from_str(body).expect("a JSON 413 body");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("3145728 bytes")),
        "{error}"
    );

    let response = server
        .client
        .get(server.url("/inject"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let (status, error) = error_of(response).await;
    assert_eq!(status, 405);
    assert!(
        error["error"].as_str().is_some_and(|e| e.contains("POST")),
        "{error}"
    );

    let text = metrics(&server).await;
    for line in [
        "sidecar_injection_failure_total{type=\"body_timeout\"} 1",
        "sidecar_injection_failure_total{type=\"body_too_large\"} 1",
        "sidecar_injection_failure_total{type=\"invalid_request\"} 1",
        "sidecar_injection_requests_total 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_20000_containers_is_refused_naming_the_limit() {
    let server = TestServer::start("huge-pod", MESH).await;
    let mut huge = pod(json!({}));
    huge["spec"]["containers"] = (0..20_000)
        .map(|i| json!({"name": format!("c{i}"), "image": "app:1"}))
        .collect();
    let (status, answer) = server.post("/inject", &review("huge", huge)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["uid"], "huge");
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("20000 containers") && message.contains("limit is 1000"),
        "{message}"
    );
}
