//! Certificate rotation while pods are being created: the operator renews
//! the serving certificate every few seconds and the CA once, the test keeps
//! the webhook's certificate files in step with the Secret (as the kubelet
//! does for a Secret volume), and not one admission fails. That the
//! rotations happened is seen from outside: the distinct certificates a TLS
//! client is served by the webhook during the run, and the distinct CAs
//! leading the `caBundle` the API server is given.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferrimesh_e2e::fixtures::{self, WAIT, namespace, start_operator_with, wait_for_crds};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_certificates_fail_no_admission() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    fixtures::mesh_selecting_mesh_on(&client).await?;
    namespace(&client, "busy", &[("mesh", "on")]).await?;

    // Serving certificates live 12 s (renewed every 8 s), the CA 36 s (renewed once in the run).
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}/inject");
    let lifetimes = [
        "--cert-lifetime-seconds",
        "12",
        "--ca-lifetime-seconds",
        "36",
    ];
    let _operator = start_operator_with(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
        &lifetimes,
    )?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ferrimesh-system");
    let first_ca = eventually("the first CA", WAIT, || {
        let secrets = secrets.clone();
        async move {
            Ok(secrets
                .get_opt("ferrimesh-webhook-ca")
                .await?
                .and_then(|s| s.data?.get("ca.crt").cloned()))
        }
    })
    .await?;
    let run_until = Instant::now() + Duration::from_secs(40);
    let (_webhook, syncer) =
        fixtures::start_webhook_on_secret(&plane, &client, port, run_until).await?;
    // The webhook configuration reaches the admission chain.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "busy");
    let pod = |name: String| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
        }))?)
    };
    eventually("injection working", WAIT, || {
        let pods = pods.clone();
        let probe = pod(format!("probe-{}", free_port().unwrap_or_default()));
        async move {
            let created = pods.create(&PostParams::default(), &probe?).await?;
            Ok(created
                .annotations()
                .contains_key("sidecar.istio.io/status")
                .then_some(()))
        }
    })
    .await?;

    // What a client is served and what the API server trusts, sampled
    // through the run.
    let observer = {
        let client = client.clone();
        tokio::spawn(async move {
            let (mut served, mut leading_cas) = (BTreeSet::new(), BTreeSet::new());
            while Instant::now() < run_until {
                served.insert(fixtures::served_certificate(port).await?);
                if let Some(bundle) = fixtures::ca_bundle(&client).await? {
                    let leading = bundle.split("-----END CERTIFICATE-----").next();
                    leading_cas.insert(leading.unwrap_or_default().trim().to_owned());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            anyhow::Ok((served, leading_cas))
        })
    };
    let (mut created, mut failures) = (0, Vec::new());
    while Instant::now() < run_until {
        match pods
            .create(&PostParams::default(), &pod(format!("pod-{created}"))?)
            .await
        {
            Ok(p) if p.annotations().contains_key("sidecar.istio.io/status") => {}
            Ok(p) => failures.push(format!("{} not injected", p.name_any())),
            Err(e) => failures.push(e.to_string()),
        }
        created += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    syncer.await??;
    let (served, leading_cas) = observer.await??;
    let last_ca = secrets
        .get("ferrimesh-webhook-ca")
        .await?
        .data
        .and_then(|d| d.get("ca.crt").cloned());
    println!(
        "{created} pods, {} certificates served, {} CAs leading the caBundle",
        served.len(),
        leading_cas.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {created} admissions failed: {failures:?}",
        failures.len()
    );
    assert!(created > 100, "pods kept coming ({created})");
    assert!(
        served.len() >= 4,
        "the webhook served several certificates ({} seen by a TLS client)",
        served.len()
    );
    assert!(
        leading_cas.len() >= 2,
        "the caBundle led with a new CA during the run ({} CAs seen)",
        leading_cas.len()
    );
    assert_ne!(last_ca, Some(first_ca), "the CA rotated during the run");
    Ok(())
}
