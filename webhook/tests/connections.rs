//! Connection limits over real TLS on loopback: past the cap on open
//! connections a new one is closed and counted while established ones are
//! still served; a connection that never finishes its TLS handshake holds
//! up no other handshake and is closed and counted at the timeout.

mod support;

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;
use support::{MESH, TestServer, pod, review, tls_stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(server: &TestServer) -> String {
    reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

fn addr(server: &TestServer) -> String {
    server.running.as_ref().expect("running").addr.to_string()
}

/// A keep-alive connection, as the API server keeps one.
async fn keep_alive(server: &TestServer) -> SendRequest<Full<Bytes>> {
    let stream = tls_stream(&server.authority, &addr(server))
        .await
        .expect("connect");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(connection);
    sender
}

/// Posts a review on `connection`; the status.
async fn post(connection: &mut SendRequest<Full<Bytes>>, uid: &str) -> u16 {
    let body = review(uid, pod(json!({}))).to_string();
    let request = hyper::Request::post("/inject")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = connection.send_request(request).await.expect("answered");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("body");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_a_new_connection_is_closed_and_counted_while_established_ones_are_served()
 {
    let server = TestServer::start_configured("connection-limit", MESH, false, |settings| {
        settings.max_connections = 2;
    })
    .await;
    let mut established = keep_alive(&server).await;
    assert_eq!(post(&mut established, "first").await, 200);
    let idle = tls_stream(&server.authority, &addr(&server))
        .await
        .expect("the second connection is within the limit");

    let refused = tls_stream(&server.authority, &addr(&server)).await;
    assert!(refused.is_err(), "a third connection is closed at once");
    let text = metrics(&server).await;
    assert!(
        has_line(
            &text,
            "ferrimesh_webhook_connections_closed_total{reason=\"connection_limit\"} 1"
        ),
        "{text}"
    );
    assert!(
        has_line(&text, "ferrimesh_webhook_open_connections 2"),
        "{text}"
    );
    assert_eq!(
        post(&mut established, "second").await,
        200,
        "the established connection is still served"
    );

    // A closed connection gives its place back.
    drop(idle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match tls_stream(&server.authority, &addr(&server)).await {
            Ok(stream) => break stream,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("no place given back after a connection closed: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_stalled_in_its_handshake_holds_up_no_other_and_is_closed_at_the_timeout() {
    let server = TestServer::start_configured("handshake-stall", MESH, false, |settings| {
        settings.handshake_threads = 1;
        settings.header_timeout = Duration::from_secs(10);
    })
    .await;
    // The head of a TLS handshake record announcing 80 bytes, and no more.
    let mut stalled = tokio::net::TcpStream::connect(addr(&server))
        .await
        .expect("connect");
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50])
        .await
        .expect("write");

    let (status, answer) = server
        .post("/inject", &review("meanwhile", pod(json!({}))))
        .await;
    assert_eq!(status, 200, "{answer}");
    let text = metrics(&server).await;
    assert!(
        !text.contains("reason=\"handshake_timeout\""),
        "the review was answered before the stalled handshake timed out:\n{text}"
    );

    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed by the server: {closed:?}"
    );
    let text = metrics(&server).await;
    assert!(
        has_line(
            &text,
            "ferrimesh_webhook_connections_closed_total{reason=\"handshake_timeout\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_closed_and_counted() {
    let server = TestServer::start("plain-http", MESH).await;
    let mut plain = tokio::net::TcpStream::connect(addr(&server))
        .await
        .expect("connect");
    plain
        .write_all(b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "closed by the server");
    assert!(
        !answer.starts_with(b"HTTP"),
        "no HTTP answer over plain text"
    );
    let text = metrics(&server).await;
    assert!(
        has_line(
            &text,
            "ferrimesh_webhook_connections_closed_total{reason=\"handshake_failed\"} 1"
        ),
        "{text}"
    );
}
