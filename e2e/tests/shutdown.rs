//! A webhook replica terminated while the API server keeps creating pods:
//! two `ferrimesh-webhook` processes behind one stable address (a TCP proxy
//! in the test, standing in for a Service: it sends each new connection to
//! a replica whose `/readyz` is 200, as endpoints do), one of them SIGTERMed
//! in the middle; with `failurePolicy: Fail`, not one create fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::selection::webhook_configuration;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::fixtures::{namespace, start_webhook_named, wait_for_crds};
use ferrimesh_e2e::{ControlPlane, Process, ServingCertificate, free_port, http_get};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

/// One webhook replica: its process and addresses.
struct Replica {
    process: Process,
    addr: SocketAddr,
    admin: SocketAddr,
}

/// Starts a replica in cluster mode with a short shutdown delay, and waits
/// for it to be ready.
async fn replica(
    plane: &ControlPlane,
    cert: &ServingCertificate,
    name: &str,
) -> anyhow::Result<Replica> {
    let (port, admin_port) = (free_port()?, free_port()?);
    let process = start_webhook_named(
        plane,
        name,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        (port, admin_port),
        (&cert.cert, &cert.key),
        &[
            "--shutdown-delay-seconds",
            "3",
            "--shutdown-grace-seconds",
            "10",
        ],
    )
    .await?;
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    Ok(Replica {
        process,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
    })
}

/// A Service in miniature: every new connection goes to the next replica
/// whose `/readyz` answered 200 at the last check. Checks run every second,
/// so the proxy lags a replica's readiness by up to a second, as endpoints
/// lag a terminating pod in a cluster.
async fn service(
    listener: TcpListener,
    backends: Vec<(SocketAddr, SocketAddr)>,
    stop: Arc<AtomicBool>,
) {
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new(backends.iter().map(|_| AtomicBool::new(true)).collect());
    let checker = {
        let (ready, stop, backends) = (Arc::clone(&ready), Arc::clone(&stop), backends.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                for (i, (_, admin)) in backends.iter().enumerate() {
                    let ok = http_get(&format!("http://{admin}/readyz"), None)
                        .await
                        .is_some();
                    ready[i].store(ok, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let next = AtomicUsize::new(0);
    while !stop.load(Ordering::Acquire) {
        let Ok(Ok((mut inbound, _))) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        else {
            continue;
        };
        let start = next.fetch_add(1, Ordering::Relaxed);
        let chosen = (0..backends.len())
            .map(|k| (start + k) % backends.len())
            .find(|&i| ready[i].load(Ordering::Acquire));
        let Some(chosen) = chosen else {
            continue;
        };
        let target = backends[chosen].0;
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
    let _ = checker.await;
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .expect("pod")
}

fn injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| c.name == "istio-proxy")
    })
}

async fn configure(client: &Client, url: &str, ca_pem: &str) -> anyhow::Result<()> {
    let client_config = WebhookClientConfig {
        url: Some(url.to_owned()),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    };
    let config = webhook_configuration(&MeshSpec::default(), &client_config, &SYSTEM_NAMESPACES);
    let name = config.metadata.name.clone().unwrap_or_default();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply("ferrimesh-e2e").force(),
            &Patch::Apply(&config),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_replica_fails_no_pod_create() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    Api::<Mesh>::all(client.clone())
        .create(
            &PostParams::default(),
            &Mesh::new("default", MeshSpec::default()),
        )
        .await?;
    let cert = ServingCertificate::issue(plane.scratch().path("").as_path())?;
    let first = replica(&plane, &cert, "webhook-1").await?;
    let second = replica(&plane, &cert, "webhook-2").await?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}/inject", listener.local_addr()?.port());
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = tokio::spawn(service(
        listener,
        vec![(first.addr, first.admin), (second.addr, second.admin)],
        Arc::clone(&stop),
    ));
    configure(&client, &url, &cert.ca_pem).await?;
    namespace(&client, "shop", &[("istio-injection", "enabled")]).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");

    // Wait for the webhook configuration to reach the admission chain.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warmup = 0;
    loop {
        warmup += 1;
        let created = pods
            .create(&PostParams::default(), &pod(&format!("warmup-{warmup}")))
            .await?;
        if injected(&created) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the webhook is never called");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Pods created back to back while the first replica is terminated:
    // 2 s before SIGTERM, through its delay and drain, and 2 s after it exits.
    let creating = {
        let pods = pods.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let (mut created, mut failures) = (0usize, Vec::new());
            while !stop.load(Ordering::Acquire) && created + failures.len() < 2000 {
                let name = format!("pod-{}", created + failures.len());
                match pods.create(&PostParams::default(), &pod(&name)).await {
                    Ok(p) if injected(&p) => created += 1,
                    Ok(_) => failures.push(format!("{name}: not injected")),
                    Err(e) => failures.push(format!("{name}: {e}")),
                }
            }
            (created, failures)
        });
        (task, stopper)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status =
        tokio::task::spawn_blocking(move || first.process.terminate(Duration::from_secs(20)))
            .await??;
    assert!(
        status.success(),
        "the terminated replica exits cleanly: {status}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    creating.1.store(true, Ordering::Release);
    let (created, failures) = creating.0.await?;
    stop.store(true, Ordering::Release);
    let _ = proxy.await;
    drop(second);

    eprintln!("{created} pods created, {} failed", failures.len());
    assert!(created > 20, "pods kept being created ({created})");
    assert!(
        failures.is_empty(),
        "{} of {} creates failed: {failures:?}",
        failures.len(),
        created + failures.len()
    );
    Ok(())
}
