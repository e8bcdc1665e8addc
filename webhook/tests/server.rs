//! The webhook server over real HTTPS on loopback: admission answers, every
//! HTTP error, concurrency, certificate rotation, configuration reload,
//! readiness and metrics.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferrimesh_crds::MeshSpec;
use ferrimesh_webhook::inject::{Environment, Request, inject};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use support::{MESH, TestServer, pod, review, write_atomic};

fn patched(original: &Value, response: &Value) -> Value {
    let patch = response["response"]["patch"].as_str().expect("a patch");
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let patch: json_patch::Patch =
        serde_json::from_slice(&STANDARD.decode(patch).expect("base64")).expect("json patch");
    let mut document = original.clone();
    json_patch::patch(&mut document, &patch.0).expect("patch applies");
    document
}

fn engine_output(pod_json: &Value) -> Value {
    let mut pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
    pod.metadata.managed_fields = None;
    let mesh = MeshSpec::default();
    let environment = Environment::default();
    let request = Request {
        pod: &pod,
        namespace: "shop",
        mesh: &mesh,
        profiles: &[],
        environment: &environment,
        workload: None,
    };
    let mut injected = inject(&request).expect("engine").pod.expect("injected");
    injected.metadata.managed_fields = pod_json["metadata"]["managedFields"].as_array().map(|_| {
        serde_json::from_value(pod_json["metadata"]["managedFields"].clone())
            .expect("managed fields")
    });
    serde_json::to_value(injected).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_and_the_patch_gives_the_engine_output() {
    let server = TestServer::start("inject", MESH).await;
    let original = pod(json!({}));
    let (status, answer) = server
        .post("/inject", &review("uid-1", original.clone()))
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["response"]["uid"], "uid-1");
    assert_eq!(answer["response"]["allowed"], true);
    let result = patched(&original, &answer);
    assert_eq!(result, engine_output(&original));
    let env = &result["spec"]["initContainers"][1]["env"];
    let owner = env
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "ISTIO_META_OWNER")
        .expect("owner");
    assert_eq!(
        owner["value"],
        "kubernetes://apis/apps/v1/namespaces/shop/deployments/web"
    );
    assert!(
        result["metadata"]["managedFields"].is_array(),
        "managedFields are not touched by the patch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skips_without_a_patch_and_rejects_bad_annotations() {
    let server = TestServer::start("skip", MESH).await;
    let (status, answer) = server
        .post(
            "/inject",
            &review("uid-2", pod(json!({"sidecar.istio.io/inject": "false"}))),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());

    let (status, answer) = server
        .post(
            "/inject",
            &review(
                "uid-3",
                pod(json!({"traffic.sidecar.istio.io/excludeInboundPorts": "*"})),
            ),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains("traffic.sidecar.istio.io/excludeInboundPorts"),
        "{message}"
    );
    assert_eq!(answer["response"]["status"]["code"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_warnings_for_values_it_ignores() {
    let server = TestServer::start("warnings", MESH).await;
    let (_, answer) = server
        .post(
            "/inject",
            &review("uid-w", pod(json!({"sidecar.istio.io/proxyImage": "nope"}))),
        )
        .await;
    let warnings = answer["response"]["warnings"].as_array().expect("warnings");
    assert!(
        warnings[0]
            .as_str()
            .is_some_and(|w| w.contains("sidecar.istio.io/proxyImage"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_v1beta1_dry_run_other_kinds_and_istio_paths() {
    let server = TestServer::start("versions", MESH).await;
    let mut beta = review("uid-4", pod(json!({})));
    beta["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (_, answer) = server.post("/inject/", &beta).await;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(answer["response"]["uid"], "uid-4");

    let mut dry = review("uid-5", pod(json!({})));
    dry["request"]["dryRun"] = json!(true);
    let (_, dry_answer) = server.post("/inject", &dry).await;
    let (_, wet_answer) = server
        .post("/inject", &review("uid-5", pod(json!({}))))
        .await;
    assert_eq!(dry_answer, wet_answer, "dryRun gets the same answer");

    let mut service = review(
        "uid-6",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
    );
    service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    let (status, answer) = server.post("/inject", &service).await;
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(true))
    );
    assert!(answer["response"].get("patch").is_none());

    let original = pod(json!({}));
    let (_, answer) = server
        .post(
            "/inject/cluster/east/net/net1",
            &review("uid-7", original.clone()),
        )
        .await;
    let result = patched(&original, &answer);
    assert_eq!(
        result["metadata"]["labels"]["topology.istio.io/network"],
        "net1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_requests_with_http_errors_that_say_why() {
    let server = TestServer::start("errors", MESH).await;
    let client = &server.client;
    let send = |path: &str, content_type: &str, body: Vec<u8>| {
        client
            .post(server.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let status_and_error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };

    let (status, error) = status_and_error(
        send("/inject", "text/plain", b"{}".to_vec())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 415);
    assert!(error.contains("text/plain"));
    let (status, error) = status_and_error(
        send("/inject", "application/json", Vec::new())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, error.contains("empty")), (400, true));
    let (status, error) = status_and_error(
        send("/inject", "application/json", b"{not json".to_vec())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, error.contains("malformed")), (400, true));
    let (status, error) = status_and_error(
        send(
            "/inject",
            "application/json",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        )
        .await
        .expect("send"),
    )
    .await;
    assert_eq!((status, error.contains("no request")), (400, true));
    let mut no_uid = review("", pod(json!({})));
    no_uid["request"]["uid"] = json!("");
    let (status, error) = status_and_error(
        send(
            "/inject",
            "application/json",
            no_uid.to_string().into_bytes(),
        )
        .await
        .expect("send"),
    )
    .await;
    assert_eq!((status, error.contains("uid")), (400, true));
    let (status, _) = status_and_error(
        send("/mutate", "application/json", b"{}".to_vec())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(status, 404);
    let response = client
        .get(server.url("/inject"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_200_concurrent_requests() {
    let server = Arc::new(TestServer::start("concurrent", MESH).await);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                server
                    .post("/inject", &review(&format!("uid-{i}"), pod(json!({}))))
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, answer) = task.await.expect("task");
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["uid"], format!("uid-{i}"));
        assert!(answer["response"]["patch"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_rotated_certificate_without_failing_a_request() {
    let server = Arc::new(TestServer::start("rotation", MESH).await);
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (server, failures, done) = (
            Arc::clone(&server),
            Arc::clone(&failures),
            Arc::clone(&done),
        );
        tokio::spawn(async move {
            // New connection per request: every request is a handshake.
            let client = support::client(&server.authority, false);
            let mut sent = 0;
            while !done.load(Ordering::Acquire) {
                let ok = client
                    .post(server.url("/inject"))
                    .json(&review("uid-r", pod(json!({}))))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = server.authority.loopback().expect("serving certificate");
    write_atomic(&server.scratch.path("tls.key"), &new.key_pem);
    write_atomic(&server.scratch.path("tls.crt"), &new.cert_pem);
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Release);
    let sent = looping.await.expect("loop");
    assert!(sent > 5, "the client kept sending ({sent})");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during rotation"
    );

    let response = support::client(&server.authority, false)
        .get(server.url("/inject"))
        .send()
        .await
        .expect("send");
    let info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    assert_eq!(
        info.peer_certificate(),
        Some(new.der().expect("der").as_slice()),
        "the new certificate is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_up_a_rewritten_mesh_file_without_restart() {
    let server = TestServer::start("reload", MESH).await;
    let image = |answer: &Value| {
        let result = patched(&pod(json!({})), answer);
        result["spec"]["initContainers"][1]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (_, answer) = server
        .post("/inject", &review("uid-a", pod(json!({}))))
        .await;
    assert_eq!(
        image(&answer),
        ferrimesh_crds::settings::DEFAULT_PROXY_IMAGE
    );
    write_atomic(
        &server.scratch.path("mesh.yaml"),
        "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {proxy: {image: my.registry/proxyv2:2}}\n",
    );
    let mut latest = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, answer) = server
            .post("/inject", &review("uid-b", pod(json!({}))))
            .await;
        latest = image(&answer);
        if latest == "my.registry/proxyv2:2" {
            break;
        }
    }
    assert_eq!(latest, "my.registry/proxyv2:2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_readiness_and_istio_metrics() {
    let mut server = TestServer::start("admin", MESH).await;
    let http = reqwest::Client::new();
    let ready = http
        .get(server.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(
        http.get(server.admin_url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status()
            .as_u16(),
        200
    );
    server.post("/inject", &review("m1", pod(json!({})))).await;
    server
        .post(
            "/inject",
            &review("m2", pod(json!({"sidecar.istio.io/inject": "false"}))),
        )
        .await;
    server
        .post(
            "/inject",
            &review("m3", pod(json!({"sidecar.istio.io/interceptionMode": "X"}))),
        )
        .await;
    let metrics = http
        .get(server.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in [
        "sidecar_injection_requests_total 3",
        "sidecar_injection_success_total 1",
        "sidecar_injection_skip_total{reason=\"pod_annotation\"} 1",
        "sidecar_injection_failure_total{type=\"rejected\"} 1",
        "sidecar_injection_time_seconds_count 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    let admin = server.admin_url("/readyz");
    server
        .running
        .take()
        .expect("running")
        .shutdown()
        .await
        .expect("shutdown");
    assert!(
        http.get(admin).send().await.is_err(),
        "the admin server is gone after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requires_client_certificates_when_given_a_client_ca() {
    let server = TestServer::start_with("client-ca", MESH, true).await;
    let body = review("uid-c", pod(json!({})));
    assert!(
        server
            .client
            .post(server.url("/inject"))
            .json(&body)
            .send()
            .await
            .is_err(),
        "no client certificate: refused"
    );

    let certificate = server
        .authority
        .client("kube-apiserver")
        .expect("client certificate");
    let identity =
        reqwest::Identity::from_pem(certificate.identity_pem().as_bytes()).expect("identity");
    let ca = reqwest::Certificate::from_pem(server.authority.ca_pem().as_bytes()).expect("ca");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(identity)
        .build()
        .expect("client");
    let response = client
        .post(server.url("/inject"))
        .json(&body)
        .send()
        .await
        .expect("accepted with a certificate");
    assert_eq!(response.status().as_u16(), 200);
}
