//! Test support: a webhook server started in-process on loopback (with
//! certificates from the e2e crate's test authority), and AdmissionReview
//! bodies.

#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrimesh_e2e::Scratch;
use ferrimesh_e2e::tls::Authority;
use ferrimesh_webhook::config::FileSource;
use ferrimesh_webhook::server::{self, Running, Settings, tls};
use serde_json::{Value, json};

/// Writes a file atomically (write then rename), as a Secret volume swaps.
pub fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub const MESH: &str =
    "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {}\n";

/// A webhook server on loopback with a fresh CA, serving `mesh`.
pub struct TestServer {
    pub running: Option<Running>,
    pub authority: Authority,
    pub scratch: Scratch,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(name: &str, mesh: &str) -> Self {
        Self::start_with(name, mesh, false).await
    }

    /// With `require_client_certs`, clients must present a certificate from
    /// the test authority.
    pub async fn start_with(name: &str, mesh: &str, require_client_certs: bool) -> Self {
        Self::start_configured(name, mesh, require_client_certs, |_| {}).await
    }

    /// With the server's settings changed by `configure` first.
    pub async fn start_configured(
        name: &str,
        mesh: &str,
        require_client_certs: bool,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let scratch = Scratch::new(name).expect("scratch dir");
        let authority = Authority::new().expect("test CA");
        let leaf = authority.loopback().expect("serving certificate");
        std::fs::write(scratch.path("tls.crt"), &leaf.cert_pem).expect("cert");
        std::fs::write(scratch.path("tls.key"), &leaf.key_pem).expect("key");
        std::fs::write(scratch.path("mesh.yaml"), mesh).expect("mesh");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(
            tls::ReloadingCertificate::load(
                scratch.path("tls.crt"),
                scratch.path("tls.key"),
                Arc::clone(&provider),
            )
            .expect("certificate"),
        );
        std::fs::write(scratch.path("client-ca.crt"), authority.ca_pem()).expect("client ca");
        let client_ca = require_client_certs.then(|| scratch.path("client-ca.crt"));
        let tls = tls::server_config(provider, certificate, client_ca.as_deref()).expect("tls");
        let source = FileSource::load(scratch.path("mesh.yaml"), Vec::new(), true).expect("mesh");
        source.watch(Duration::from_millis(100));
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            tls: Arc::new(tls),
            max_connections: 256,
            handshake_threads: 1,
            source,
            max_concurrent_requests: 64,
            review_workers: 2,
            max_buffered_body_bytes: 24 << 20,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(5),
        };
        configure(&mut settings);
        let running = server::start(settings).await.expect("server starts");
        let client = client(&authority, true);
        Self {
            running: Some(running),
            authority,
            scratch,
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}{path}",
            self.running.as_ref().expect("running").addr.port()
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.running.as_ref().expect("running").admin_addr.port()
        )
    }

    /// Posts `body` as JSON to `path` and returns status and body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// An HTTPS client trusting the authority; `keep_alive: false` makes every
/// request a new TLS handshake.
pub fn client(authority: &Authority, keep_alive: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(authority.ca_pem().as_bytes()).expect("ca");
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .tls_info(true)
        .timeout(Duration::from_secs(20));
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().expect("client")
}

/// A pod AdmissionReview.
pub fn review(uid: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "tester"},
            "object": pod,
            "dryRun": false
        }
    })
}

/// A Deployment-style pod.
pub fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7c9f-",
            "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7c9f"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9f", "uid": "u1", "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1"}]
        },
        "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080, "name": "http"}]}]}
    })
}

/// A TLS connection to `addr` trusting the authority, for requests written
/// by hand (slow, partial, or stalled).
pub async fn tls_stream(
    authority: &Authority,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(authority.ca_pem().as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The head of a POST to `path` announcing a JSON body of `length` bytes.
pub fn request_head(path: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}
