//! cert-manager issuing the webhook's certificate
//! (`config/components/cert-manager`): the component's Issuers and
//! Certificates are accepted by cert-manager's real CRDs, and the operator,
//! run with `--certificate-issuer cert-manager`, issues nothing: it waits
//! for the Secret and publishes its `ca.crt` as the `caBundle`, keeping the
//! previous CA in it across a CA rotation. The test plays cert-manager
//! (writing the Secret its Certificate would produce) and the kubelet
//! (copying it into the webhook's files), and rotates the CA twice while
//! pods are created every 100 ms:
//!
//! - the Secret first, the files 2 s later (the kubelet lagging, as it
//!   usually does): no admission fails, and a new connection trusting the
//!   `caBundle` is accepted throughout;
//! - the files first, the Secret 4 s later (a kubelet quicker than the
//!   operator): the webhook serves a certificate from a CA the `caBundle`
//!   does not hold yet. In that window a new connection trusting the
//!   `caBundle` is refused. Admissions over the connections the API server
//!   already holds go on; once the webhook restarts (as a replica started
//!   in the window would), the API server's new connections fail to verify
//!   it and, with `failurePolicy: Fail`, admissions fail with a certificate
//!   error until the operator publishes the new CA (the restart itself is
//!   a kill: a call the old process held ends with EOF, and one made before
//!   the new process listens is refused). Every admission that fails does
//!   so in the window, and once the `caBundle` holds the new CA every
//!   create succeeds without a retry.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrimesh_crds::Mesh;
use ferrimesh_e2e::fixtures::{
    self, WAIT, namespace, start_operator_with, start_webhook, wait_for_crds,
};
use ferrimesh_e2e::tls::Authority;
use ferrimesh_e2e::{ControlPlane, cert_manager_crds, eventually, free_port, write_private};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

/// What cert-manager's CA Issuer writes into a Certificate's Secret.
struct Issued {
    ca: String,
    cert: String,
    key: String,
}

/// A new CA and a loopback certificate it signed.
fn issue() -> anyhow::Result<Issued> {
    let authority = Authority::new()?;
    let serving = authority.loopback()?;
    Ok(Issued {
        ca: authority.ca_pem().to_owned(),
        cert: serving.cert_pem,
        key: serving.key_pem,
    })
}

/// Writes the Secret as cert-manager does.
async fn write_secret(client: &Client, issued: &Issued) -> anyhow::Result<()> {
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &issued.ca),
        ("tls.crt", &issued.cert),
        ("tls.key", &issued.key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "ferrimesh-webhook-tls", "namespace": "ferrimesh-system",
                     "annotations": {"cert-manager.io/certificate-name": "ferrimesh-webhook"}},
        "data": data,
    }))?;
    Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
        .patch(
            "ferrimesh-webhook-tls",
            &PatchParams::apply("cert-manager-certificates-issuing").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(())
}

/// Writes the webhook's files as the kubelet does for its Secret volume.
fn write_files(issued: &Issued, files: &Path) -> anyhow::Result<()> {
    for (name, text) in [("tls.key", &issued.key), ("tls.crt", &issued.cert)] {
        let tmp = files.join(format!("{name}.tmp"));
        write_private(&tmp, text)?;
        std::fs::rename(&tmp, files.join(name))?;
    }
    Ok(())
}

async fn condition(client: &Client, type_: &str) -> anyhow::Result<Option<(String, String)>> {
    let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
    Ok(mesh
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
        .map(|c| (c.status, c.message)))
}

/// A pod created in `shop` as a test runs: when its create started and
/// ended, and why it failed (an error, or a pod left uninjected).
struct Admission {
    started: Instant,
    ended: Instant,
    failure: Option<String>,
}

/// Creates a pod in `shop` every 100 ms until `stop` is set.
fn admit_continuously(
    client: Client,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Admission>> {
    tokio::spawn(async move {
        let mut admissions = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let started = Instant::now();
            let name = format!("{prefix}-{}", admissions.len());
            let failure = create_injected_pod(&client, &name).await.err();
            admissions.push(Admission {
                started,
                ended: Instant::now(),
                failure: failure.map(|e| e.to_string()),
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admissions
    })
}

/// Whether a new connection to the webhook trusting the `caBundle` was
/// accepted, with when the bundle was read and when the connection ended.
struct Trust {
    read: Instant,
    ended: Instant,
    trusted: bool,
}

/// Samples [`Trust`] every 100 ms until `stop` is set.
fn sample_trust(
    client: Client,
    port: u16,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<Trust>>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let read = Instant::now();
            let bundle = fixtures::ca_bundle(&client).await?.unwrap_or_default();
            let trusted = fixtures::trusted_by_bundle(port, &bundle).await?;
            samples.push(Trust {
                read,
                ended: Instant::now(),
                trusted,
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(samples)
    })
}

fn der(pem: &str) -> anyhow::Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

/// Waits until the webhook serves `issued`'s certificate to a new client.
async fn served(port: u16, issued: &Issued) -> anyhow::Result<()> {
    let want = der(&issued.cert)?;
    eventually("the webhook serving the new certificate", WAIT, || async {
        Ok((fixtures::served_certificate(port).await? == want).then_some(()))
    })
    .await
}

async fn create_injected_pod(client: &Client, name: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?;
    let created = Api::<Pod>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await?;
    let spec = created.spec.unwrap_or_default();
    anyhow::ensure!(
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| c.name == "istio-proxy"),
        "pod {name} was not injected"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_issues_and_the_operator_publishes_its_ca() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_files(&cert_manager_crds()?)?;
    // The component's objects need cert-manager's CRDs established first.
    eventually(
        "config/overlays/local-cert-manager applied",
        WAIT,
        || async {
            Ok(plane
                .apply_kustomization("config/overlays/local-cert-manager")
                .ok())
        },
    )
    .await?;
    wait_for_crds(&client).await?;
    let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate");
    let certificates: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "ferrimesh-system",
        &ApiResource::from_gvk(&gvk),
    );
    let certificate = certificates.get("ferrimesh-webhook").await?;
    assert_eq!(
        certificate.data["spec"]["secretName"], "ferrimesh-webhook-tls",
        "the Certificate writes the Secret the webhook mounts"
    );
    assert_eq!(
        certificate.data["spec"]["issuerRef"]["name"],
        "ferrimesh-webhook-ca"
    );

    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}/inject");
    let _operator = start_operator_with(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
        &["--certificate-issuer", "cert-manager"],
    )?;
    fixtures::mesh_selecting_mesh_on(&client).await?;
    namespace(&client, "shop", &[("mesh", "on")]).await?;

    // Before cert-manager has issued: the Mesh says why, nothing is configured.
    let (_, message) = eventually("CertificateReady=False", WAIT, || async {
        Ok(condition(&client, "CertificateReady")
            .await?
            .filter(|(status, _)| status == "False"))
    })
    .await?;
    assert!(message.contains("waiting for cert-manager"), "{message}");
    assert_eq!(
        fixtures::ca_bundle(&client).await?,
        None,
        "no caBundle to publish yet"
    );

    let files = plane.scratch().path("");
    let first = issue()?;
    write_secret(&client, &first).await?;
    write_files(&first, &files)?;
    let webhook = start_webhook(
        &plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &files.join("tls.crt"),
        &files.join("tls.key"),
    )
    .await?;
    eventually("the caBundle is cert-manager's CA", WAIT, || async {
        Ok(fixtures::ca_bundle(&client)
            .await?
            .filter(|b| b.trim() == first.ca.trim()))
    })
    .await?;
    let (_, message) = eventually("CertificateReady=True", WAIT, || async {
        Ok(condition(&client, "CertificateReady")
            .await?
            .filter(|(status, _)| status == "True"))
    })
    .await?;
    assert!(message.contains("valid until"), "{message}");
    create_injected_pod(&client, "before-rotation").await?;

    // A CA rotation, the Secret first and the files 2 s later: the new CA
    // leads the bundle, the old one stays trusted, nothing fails.
    let stop = Arc::new(AtomicBool::new(false));
    let admissions = admit_continuously(client.clone(), "secret-first", Arc::clone(&stop));
    let trust = sample_trust(client.clone(), port, Arc::clone(&stop));
    let second = issue()?;
    write_secret(&client, &second).await?;
    let bundle = eventually("the caBundle holds both CAs", WAIT, || async {
        Ok(fixtures::ca_bundle(&client)
            .await?
            .filter(|b| b.matches("BEGIN CERTIFICATE").count() == 2))
    })
    .await?;
    assert!(bundle.starts_with(second.ca.trim()), "{bundle}");
    assert!(bundle.contains(first.ca.trim()), "{bundle}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    write_files(&second, &files)?;
    served(port, &second).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let (admissions, trust) = (admissions.await?, trust.await??);
    let failed: Vec<&String> = admissions
        .iter()
        .filter_map(|a| a.failure.as_ref())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} admissions failed: {failed:?}",
        failed.len(),
        admissions.len()
    );
    assert!(
        admissions.len() >= 20,
        "pods kept coming ({})",
        admissions.len()
    );
    assert!(
        trust.iter().all(|t| t.trusted),
        "a new connection trusting the caBundle was refused"
    );

    // A CA rotation, the files first and the Secret 3 s later: the window.
    let stop = Arc::new(AtomicBool::new(false));
    let admissions = admit_continuously(client.clone(), "files-first", Arc::clone(&stop));
    let trust = sample_trust(client.clone(), port, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let third = issue()?;
    let opened = Instant::now();
    write_files(&third, &files)?;
    served(port, &third).await?;
    // Admissions go on over the connections the API server holds. A webhook
    // restarted in the window (as a replica started then would be) makes
    // it open new ones, which it cannot verify.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    drop(webhook);
    let _restarted = start_webhook(
        &plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &files.join("tls.crt"),
        &files.join("tls.key"),
    )
    .await?;
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lagging = fixtures::ca_bundle(&client).await?.unwrap_or_default();
    assert!(!lagging.contains(third.ca.trim()), "the window is open");
    write_secret(&client, &third).await?;
    let published = Instant::now();
    let bundle = eventually("the caBundle holds the third CA", WAIT, || async {
        Ok(fixtures::ca_bundle(&client)
            .await?
            .filter(|b| b.starts_with(third.ca.trim())))
    })
    .await?;
    let closed = Instant::now();
    assert!(bundle.contains(second.ca.trim()), "{bundle}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Release);
    let (admissions, trust) = (admissions.await?, trust.await??);
    // In the window: from the files written (a call can end after it) to
    // the new bundle seen (a call can have begun before it).
    let in_window = |began: Instant, ended: Instant| ended >= opened && began <= closed;
    let refused: Vec<&Trust> = trust.iter().filter(|t| !t.trusted).collect();
    assert!(
        !refused.is_empty(),
        "in the window a new connection trusting the caBundle is refused"
    );
    assert!(
        refused.iter().all(|t| in_window(t.read, t.ended)),
        "refused outside the window: {} of {} samples",
        refused
            .iter()
            .filter(|t| !in_window(t.read, t.ended))
            .count(),
        trust.len()
    );
    let certificate_error =
        |failure: &str| failure.contains("x509") || failure.contains("certificate");
    for admission in &admissions {
        if let Some(failure) = &admission.failure {
            assert!(
                in_window(admission.started, admission.ended),
                "an admission failed outside the window: {failure}"
            );
            // The webhook is killed (SIGKILL, not a graceful shutdown): a
            // call it held ends with EOF or a reset, and until the new
            // process listens, a call is refused. Only calls that overlap
            // the restart may fail that way.
            let restarting = admission.ended >= killed && admission.started <= restarted;
            let connection_lost = ["connection refused", "EOF", "connection reset"]
                .iter()
                .any(|m| failure.contains(m));
            assert!(
                certificate_error(failure) || (restarting && connection_lost),
                "an admission failed for another reason than the certificate \
                 or the webhook's restart: {failure}"
            );
        }
    }
    let unverifiable = admissions
        .iter()
        .filter(|a| a.started >= restarted && a.failure.as_deref().is_some_and(certificate_error))
        .count();
    assert!(
        unverifiable > 0,
        "over a new connection in the window, the API server cannot verify the webhook"
    );
    let during = admissions
        .iter()
        .filter(|a| in_window(a.started, a.ended))
        .count();
    let failed = admissions.iter().filter(|a| a.failure.is_some()).count();
    println!(
        "window of {:?}: {failed} of {during} admissions in it failed, \
         {unverifiable} with a certificate error after the webhook restarted; \
         the new CA in the caBundle {:?} after the Secret",
        closed - opened,
        closed - published
    );
    // Once the bundle holds the new CA, creates need no retry.
    for i in 0..20 {
        create_injected_pod(&client, &format!("after-window-{i}")).await?;
    }

    // The operator never wrote the Secret: cert-manager owns it.
    let secret = Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
        .get("ferrimesh-webhook-tls")
        .await?;
    let managers: Vec<String> = secret
        .managed_fields()
        .iter()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(managers, ["cert-manager-certificates-issuing"]);
    assert!(
        Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
            .get_opt("ferrimesh-webhook-ca")
            .await?
            .is_none(),
        "no operator CA in cert-manager mode"
    );
    Ok(())
}
