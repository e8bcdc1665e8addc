//! Faults while ferrimesh runs on a real control plane: the operator killed
//! in the middle of pod churn, the API server and etcd restarted under both
//! binaries, and the operator's lease taken by someone else. Each ends
//! converged: nothing lost, nothing duplicated, nothing applied that should
//! not be. Beside them, validation: a Mesh edit that breaks the CRD's schema
//! is refused by the API server, so the operator never sees it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrimesh_crds::{Mesh, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, injected_pod, mesh_selecting_mesh_on, namespace, namespace_label, start_operator,
    start_operator_and_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

async fn installed_plane() -> anyhow::Result<(ControlPlane, Client)> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    mesh_selecting_mesh_on(&client).await?;
    Ok((plane, client))
}

/// Live pods with an IP, by name, and the WorkloadEntries of ours, by name
/// (address as value).
async fn pods_and_entries(
    client: &Client,
    ns: &str,
) -> anyhow::Result<(BTreeMap<String, String>, BTreeMap<String, String>)> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), ip))
        })
        .collect();
    let entries = Api::<WorkloadEntry>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("ferrimesh.io/managed-by=ferrimesh-operator"))
        .await?
        .into_iter()
        .map(|e| (e.name_any(), e.spec.address.clone().unwrap_or_default()))
        .collect();
    Ok((pods, entries))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_during_pod_churn_converges() -> anyhow::Result<()> {
    let (plane, client) = installed_plane().await?;
    namespace(&client, "churn", &[]).await?;
    let identity = plane.kubeconfig_for("ferrimesh-operator")?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let mut operator = Some(start_operator(&plane, &identity, "operator-1", &url)?);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "churn");
    for i in 0..60u32 {
        injected_pod(&client, "churn", &format!("p{i}"), &format!("10.4.0.{i}")).await?;
        if i % 3 == 2 {
            pods.delete(
                &format!("p{}", i - 1),
                &DeleteParams::default().grace_period(0),
            )
            .await?;
        }
        match i {
            // SIGKILL: no lease release, no cleanup, whatever was in flight is lost.
            20 => drop(operator.take()),
            40 => operator = Some(start_operator(&plane, &identity, "operator-2", &url)?),
            _ => {}
        }
    }
    // Two cores run the API server, etcd, the test and the operator: allow
    // for a slow start of the second operator (it waits out the lease).
    let converged = eventually(
        "one WorkloadEntry per live pod",
        Duration::from_secs(120),
        || async {
            let (pods, entries) = pods_and_entries(&client, "churn").await?;
            Ok((pods == entries).then_some((pods, entries)))
        },
    )
    .await;
    let (pods, entries) = match converged {
        Ok(both) => both,
        Err(e) => {
            let (pods, entries) = pods_and_entries(&client, "churn").await?;
            let missing: Vec<&String> = pods.keys().filter(|p| !entries.contains_key(*p)).collect();
            let orphans: Vec<&String> = entries.keys().filter(|e| !pods.contains_key(*e)).collect();
            anyhow::bail!(
                "{e}; pods without an entry: {missing:?}; entries without a pod: {orphans:?}; {}",
                plane.log_tail("operator-2.log")
            );
        }
    };
    assert_eq!(pods.len(), 40, "60 created, 20 deleted");
    assert_eq!(entries, pods, "same names, same addresses");
    Ok(())
}

fn proxy_args(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.clone().unwrap_or_default();
    spec.init_containers
        .into_iter()
        .flatten()
        .chain(spec.containers)
        .find(|c| c.name == "istio-proxy")
        .and_then(|c| c.args)
        .unwrap_or_default()
}

/// Sets the Mesh's proxy log level, then waits until a pod created through
/// the API server carries it: proof that the webhook's watch is live.
async fn webhook_follows_log_level(client: &Client, level: &str) -> anyhow::Result<()> {
    Api::<Mesh>::all(client.clone())
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"proxy": {"logLevel": level}}})),
        )
        .await?;
    let want = format!("--proxyLogLevel={level}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let mut attempt = 0;
    eventually(&format!("a pod injected with {want}"), Duration::from_secs(60), || {
        attempt += 1;
        let (pods, want) = (pods.clone(), want.clone());
        let name = format!("{level}-{attempt}");
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
            }))?;
            let created = pods.create(&PostParams::default(), &pod).await?;
            Ok(proxy_args(&created).contains(&want).then_some(()))
        }
    })
    .await
}

async fn labelled(client: &Client, ns: &str) -> anyhow::Result<()> {
    namespace(client, ns, &[("mesh", "on")]).await?;
    // Within the operator's 30 s resync even if its Namespace watch stalls.
    eventually(
        &format!("namespace {ns} labelled"),
        Duration::from_secs(90),
        || async {
            Ok(namespace_label(client, ns, "istio-injection")
                .await?
                .map(|_| ()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_ride_out_api_server_and_etcd_restarts() -> anyhow::Result<()> {
    let (mut plane, client) = installed_plane().await?;
    let _installed = start_operator_and_webhook(&plane, &client).await?;
    labelled(&client, "shop").await?;
    webhook_follows_log_level(&client, "info").await?;

    plane.restart_apiserver().await?;
    let client = plane.client().await?;
    webhook_follows_log_level(&client, "debug").await?;
    labelled(&client, "after-apiserver").await?;

    plane.restart_etcd(Duration::from_secs(5)).await?;
    let client = plane.client().await?;
    webhook_follows_log_level(&client, "trace").await?;
    labelled(&client, "after-etcd").await?;
    injected_pod(&client, "shop", "registered", "10.5.0.1").await?;
    eventually("a WorkloadEntry after the etcd restart", WAIT, || async {
        Ok(Api::<WorkloadEntry>::namespaced(client.clone(), "shop")
            .get_opt("registered")
            .await?
            .map(|_| ()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_away_stops_the_operator_until_it_comes_back() -> anyhow::Result<()> {
    let (plane, client) = installed_plane().await?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let _operator = start_operator(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
    )?;
    labelled(&client, "before").await?;

    // Another candidate (as admin) takes the lease and keeps renewing it.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ferrimesh-system");
    let intruding = Arc::new(AtomicBool::new(true));
    let intruder = {
        let (leases, intruding) = (leases.clone(), Arc::clone(&intruding));
        tokio::spawn(async move {
            while intruding.load(Ordering::Acquire) {
                let now = MicroTime(jiff::Timestamp::now());
                let patch = json!({"spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 6,
                                            "acquireTime": now, "renewTime": now}});
                leases
                    .patch(
                        "ferrimesh-operator",
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            anyhow::Ok(())
        })
    };
    // Stopped, not merely told: the controllers are dropped ("lost the
    // lease") and the operator is back to waiting for the lease.
    eventually(
        "the operator stands by after losing the lease",
        WAIT,
        || async {
            let log = std::fs::read_to_string(plane.scratch().path("operator.log"))?;
            Ok(log
                .split_once("lost the lease")
                .is_some_and(|(_, after)| after.contains("waiting for the lease"))
                .then_some(()))
        },
    )
    .await?;
    namespace(&client, "during", &[("mesh", "on")]).await?;
    // A leader labels a new namespace at once through its watch, and within
    // the Mesh's 30 s requeue without it: unlabelled for longer than that,
    // the namespace shows the former leader writes nothing.
    let unlabelled_for = Duration::from_secs(35);
    let until = Instant::now() + unlabelled_for;
    while Instant::now() < until {
        assert_eq!(
            namespace_label(&client, "during", "istio-injection").await?,
            None,
            "a former leader writes nothing (within {unlabelled_for:?} of losing the lease)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    intruding.store(false, Ordering::Release);
    intruder.await??;
    eventually(
        "namespace during labelled once the lease is back",
        Duration::from_secs(60),
        || async {
            Ok(namespace_label(&client, "during", "istio-injection")
                .await?
                .map(|_| ()))
        },
    )
    .await?;
    let holder = leases
        .get("ferrimesh-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("operator"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_mesh_is_refused_with_its_fields_named_and_nothing_changes() -> anyhow::Result<()>
{
    let (plane, client) = installed_plane().await?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let _operator = start_operator(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
    )?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let applied = eventually("the webhook configuration", WAIT, || async {
        Ok(configs.get_opt("ferrimesh-sidecar-injector").await?)
    })
    .await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    let before = meshes.get("default").await?;

    let invalid = plane.scratch().path("invalid-mesh.yaml");
    std::fs::write(
        &invalid,
        "apiVersion: mesh.ferrimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n\
         spec:\n  webhook: {failurePolicy: Sometimes, timeoutSeconds: 99}\n",
    )?;
    let error = plane
        .apply_files(&invalid)
        .expect_err("the API server refuses the invalid Mesh")
        .to_string();
    for field in ["spec.webhook.failurePolicy", "spec.webhook.timeoutSeconds"] {
        assert!(error.contains(field), "{field} named in: {error}");
    }
    assert!(error.contains("Sometimes"), "the bad value quoted: {error}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = meshes.get("default").await?;
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(
        after.spec, before.spec,
        "nothing of the invalid Mesh stored"
    );
    let config = configs.get("ferrimesh-sidecar-injector").await?;
    assert_eq!(
        config.webhooks, applied.webhooks,
        "the webhook configuration unchanged"
    );
    Ok(())
}
