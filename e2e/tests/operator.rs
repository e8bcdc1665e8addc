//! The operator against a real API server: it issues the webhook's
//! certificate, writes the MutatingWebhookConfiguration the API server then
//! uses (so injection works through the operator's CA), labels and
//! unlabels namespaces, reports status, and registers injected pods as
//! WorkloadEntries while they live.

use std::time::Duration;

use ferrimesh_crds::{Mesh, MeshSpec, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, entry_exists, injected_pod, namespace, namespace_label, start_operator,
    start_operator_and_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually, free_port};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_configures_injection_and_registers_workloads() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    namespace(&client, "apps", &[("mesh", "on")]).await?;
    namespace(&client, "manual", &[("istio-injection", "enabled")]).await?;
    namespace(
        &client,
        "opted-out",
        &[("mesh", "on"), ("istio-injection", "disabled")],
    )
    .await?;

    let meshes: Api<Mesh> = Api::all(client.clone());
    let spec = MeshSpec {
        namespace_selector: Some(serde_json::from_value(
            json!({"matchLabels": {"mesh": "on"}}),
        )?),
        ..MeshSpec::default()
    };
    meshes
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    // Operator and webhook as their own ServiceAccounts: RBAC from config/rbac applies.
    let installed = start_operator_and_webhook(&plane, &client).await?;
    let webhook_url = installed.webhook_url.clone();

    // Namespaces: the selected one labelled, the opted-out one left alone.
    eventually("apps labelled", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "apps", "istio-injection")
                .await?
                .filter(|v| v == "enabled"))
        }
    })
    .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    event_about(&events, "NamespaceLabelled", |about, note| {
        about.kind.as_deref() == Some("Namespace")
            && about.name.as_deref() == Some("apps")
            && note.contains("apps")
    })
    .await?;
    assert_eq!(
        namespace_label(&client, "opted-out", "istio-injection")
            .await?
            .as_deref(),
        Some("disabled")
    );

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs.get("ferrimesh-sidecar-injector").await?;
    let webhooks = config.webhooks.unwrap_or_default();
    assert_eq!(webhooks.len(), 4);
    assert!(
        webhooks
            .iter()
            .all(|w| w.client_config.url.as_deref() == Some(webhook_url.as_str()))
    );

    let status = eventually("Mesh status", WAIT, || {
        let meshes = meshes.clone();
        async move {
            let mesh = meshes.get("default").await?;
            Ok(mesh.status.filter(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            }))
        }
    })
    .await?;
    assert_eq!(status.labelled_namespaces, 1);
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "CertificateReady" && c.message.contains("valid until"))
    );

    // A pod in the labelled namespace is injected through the operator's webhook configuration.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "nodeName": "node-a",
                 "containers": [{"name": "web", "image": "registry.example/web:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))?;
    let created = eventually("an injected pod", WAIT, || {
        let (pods, pod) = (pods.clone(), pod.clone());
        async move {
            let created = pods.create(&PostParams::default(), &pod).await?;
            let injected = created
                .annotations()
                .contains_key("sidecar.istio.io/status");
            if !injected {
                pods.delete("web-1", &DeleteParams::default().grace_period(0))
                    .await?;
            }
            Ok(injected.then_some(created))
        }
    })
    .await?;
    assert!(created.labels().get("security.istio.io/tlsMode").is_some());

    // Play the kubelet: an IP and Ready -> a WorkloadEntry.
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/region": "eu-1", "topology.kubernetes.io/zone": "eu-1b"}}}))?,
        )
        .await?;
    // Play the kubelet's status write: the pod's IP and its Ready condition.
    let set_ready = |name: &'static str, ready: &'static str| {
        let status = json!({"status": {"podIP": "10.1.0.5", "phase": "Running",
                                       "conditions": [{"type": "Ready", "status": ready}]}});
        let pods = pods.clone();
        async move {
            pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                .await
        }
    };
    set_ready("web-1", "True").await?;
    let entries: Api<WorkloadEntry> = Api::namespaced(client.clone(), "apps");
    let entry = eventually("a WorkloadEntry", WAIT, || {
        let entries = entries.clone();
        async move {
            Ok(entries
                .get_opt("web-1")
                .await?
                .filter(|e| e.status.is_some()))
        }
    })
    .await?;
    assert_eq!(entry.spec.address.as_deref(), Some("10.1.0.5"));
    // The Mesh counts it (entry changes reach the Mesh status throttled).
    eventually("the Mesh counting the entry", WAIT, || {
        let meshes = meshes.clone();
        async move {
            let mesh = meshes.get("default").await?;
            Ok(mesh.status.filter(|s| s.registered_workloads == 1))
        }
    })
    .await?;
    assert_eq!(entry.spec.service_account.as_deref(), Some("web"));
    assert_eq!(entry.spec.ports.get("http").map(|p| p.0), Some(8080));
    assert_eq!(entry.spec.locality.as_deref(), Some("eu-1/eu-1b"));
    let owner = entry.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(
        owner
            .first()
            .map(|o| (o.kind.as_str(), Some(o.uid.clone()))),
        Some(("Pod", created.uid()))
    );
    assert_eq!(
        entry
            .status
            .as_ref()
            .map(|s| s.conditions[0].status.as_str()),
        Some("True")
    );

    set_ready("web-1", "False").await?;
    eventually("Healthy=False", WAIT, || {
        let entries = entries.clone();
        async move {
            let entry = entries.get("web-1").await?;
            Ok(entry.status.filter(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Healthy" && c.status == "False")
            }))
        }
    })
    .await?;

    // Someone else edits the entry: what the operator writes is put back,
    // a label they added stays.
    entries
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"team": "shop"}}, "spec": {"address": "10.9.9.9"}}),
            ),
        )
        .await?;
    let restored = eventually("the entry's address put back", WAIT, || {
        let entries = entries.clone();
        async move {
            let entry = entries.get("web-1").await?;
            Ok((entry.spec.address.as_deref() == Some("10.1.0.5")).then_some(entry))
        }
    })
    .await?;
    assert_eq!(
        restored.labels().get("team").map(String::as_str),
        Some("shop")
    );
    assert_eq!(
        restored
            .labels()
            .get("ferrimesh.io/managed-by")
            .map(String::as_str),
        Some("ferrimesh-operator")
    );

    // An entry deleted by someone else while its pod lives comes back.
    let first_uid = entries.get("web-1").await?.uid();
    entries.delete("web-1", &DeleteParams::default()).await?;
    eventually("the entry recreated for its live pod", WAIT, || {
        let entries = entries.clone();
        let first_uid = first_uid.clone();
        async move {
            Ok(entries
                .get_opt("web-1")
                .await?
                .filter(|e| e.uid() != first_uid && e.status.is_some()))
        }
    })
    .await?;

    // An entry of a pod's name that ferrimesh did not create is left alone;
    // the pod gets a Warning Event saying why it is not registered.
    let foreign: WorkloadEntry = serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "web-2", "labels": {"team": "vm"}},
        "spec": {"address": "10.7.7.7"}
    }))?;
    entries.create(&PostParams::default(), &foreign).await?;
    let mut second = pod.clone();
    second.metadata.name = Some("web-2".to_owned());
    let second = pods.create(&PostParams::default(), &second).await?;
    assert!(second.annotations().contains_key("sidecar.istio.io/status"));
    set_ready("web-2", "True").await?;
    let pod_events: Api<Event> = Api::namespaced(client.clone(), "apps");
    let warning = event_about(&pod_events, "WorkloadEntryNotManaged", |about, _| {
        about.kind.as_deref() == Some("Pod") && about.name.as_deref() == Some("web-2")
    })
    .await?;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let untouched = entries.get("web-2").await?;
    assert_eq!(untouched.spec.address.as_deref(), Some("10.7.7.7"));
    assert_eq!(untouched.metadata.owner_references, None);
    assert_eq!(
        untouched.labels().get("ferrimesh.io/managed-by"),
        None,
        "not taken over"
    );
    assert!(untouched.status.is_none(), "no status written");

    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    eventually("the entry deleted with its pod", WAIT, || {
        let entries = entries.clone();
        async move { Ok(entries.get_opt("web-1").await?.is_none().then_some(())) }
    })
    .await?;

    // The Mesh has been reconciled again and again by now (entries came
    // and went); its webhook configuration was announced once.
    let configured: Vec<_> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("WebhookConfigured"))
        .collect();
    assert_eq!(
        configured.len(),
        1,
        "one WebhookConfigured Event: {configured:?}"
    );
    assert!(
        configured[0].series.is_none(),
        "WebhookConfigured repeated for a configuration that did not change: {:?}",
        configured[0].series
    );

    // Selector no longer matches: the operator's label goes, the hand-made one stays.
    meshes
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"namespaceSelector": {"matchLabels": {"mesh": "other"}}}}),
            ),
        )
        .await?;
    eventually("apps unlabelled", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "apps", "istio-injection")
                .await?
                .is_none()
                .then_some(()))
        }
    })
    .await?;
    meshes.delete("default", &DeleteParams::default()).await?;
    eventually(
        "the webhook configuration deleted with the Mesh",
        WAIT,
        || {
            let configs = configs.clone();
            async move {
                Ok(configs
                    .get_opt("ferrimesh-sidecar-injector")
                    .await?
                    .is_none()
                    .then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        namespace_label(&client, "manual", "istio-injection")
            .await?
            .as_deref(),
        Some("enabled"),
        "user label survives"
    );
    Ok(())
}

/// Waits for an Event with `reason` whose object and note `matches`.
async fn event_about(
    events: &Api<Event>,
    reason: &str,
    matches: impl Fn(&ObjectReference, &str) -> bool,
) -> anyhow::Result<Event> {
    let matches = &matches;
    eventually(&format!("a {reason} Event"), WAIT, || async move {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding
                        .as_ref()
                        .is_some_and(|about| matches(about, e.note.as_deref().unwrap_or_default()))
            }))
    })
    .await
}

async fn holder(client: &Client) -> anyhow::Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "ferrimesh-system");
    Ok(leases
        .get_opt("ferrimesh-operator")
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

/// The uid of the standby replica's token: the operator's ServiceAccount
/// (so the same RBAC) under a uid of its own, so the API server's audit log
/// tells its requests from the leader's.
const STANDBY_UID: &str = "replica-b-uid";

/// What each uid wrote, as `verb resource` lines, from the audit log.
fn writes_by(plane: &ControlPlane, uid: &str) -> Vec<String> {
    plane
        .audited_writes()
        .into_iter()
        .filter(|e| e["user"]["uid"] == uid)
        .map(|e| {
            format!(
                "{} {}",
                e["verb"].as_str().unwrap_or_default(),
                e["objectRef"]["resource"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over() -> anyhow::Result<()> {
    let mut plane = ControlPlane::start().await?;
    let standby_token = plane.add_token_with_uid("ferrimesh-operator", STANDBY_UID)?;
    plane.enable_audit_log().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let operator_identity = plane.kubeconfig_for("ferrimesh-operator")?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let first = start_operator(&plane, &operator_identity, "replica-a", &url)?;
    eventually("replica-a holds the lease", WAIT, || {
        let client = client.clone();
        async move { Ok(holder(&client).await?.filter(|h| h == "replica-a")) }
    })
    .await?;
    let standby_identity = plane.scratch().path("kubeconfig-replica-b");
    plane.write_kubeconfig(&standby_token, &standby_identity)?;
    let _second = start_operator(&plane, &standby_identity, "replica-b", &url)?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    let spec = MeshSpec {
        namespace_selector: Some(serde_json::from_value(
            json!({"matchLabels": {"mesh": "on"}}),
        )?),
        ..MeshSpec::default()
    };
    meshes
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    namespace(&client, "one", &[("mesh", "on")]).await?;
    eventually("one labelled by the leader", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "one", "istio-injection")
                .await?
                .map(|_| ()))
        }
    })
    .await?;
    let standby_log = std::fs::read_to_string(plane.scratch().path("replica-b.log"))?;
    assert!(
        standby_log.contains("waiting for the lease"),
        "{standby_log}"
    );
    // From the API server's side: the leader's writes are there, and the
    // standby wrote nothing but its attempts at the Lease.
    let leader_writes = writes_by(&plane, "ferrimesh-operator-uid");
    assert!(
        leader_writes.iter().any(|w| w.ends_with(" namespaces")),
        "the audit log shows the leader labelling: {leader_writes:?}"
    );
    let standby_writes = writes_by(&plane, STANDBY_UID);
    assert!(
        standby_writes.iter().all(|w| w.ends_with(" leases")),
        "a standby writes nothing but the Lease: {standby_writes:?}"
    );

    // The leader dies without releasing: the standby takes over within the lease duration.
    drop(first);
    eventually("replica-b holds the lease", WAIT, || {
        let client = client.clone();
        async move { Ok(holder(&client).await?.filter(|h| h == "replica-b")) }
    })
    .await?;
    namespace(&client, "two", &[("mesh", "on")]).await?;
    eventually("two labelled by the new leader", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "two", "istio-injection")
                .await?
                .map(|_| ()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_after_operator_and_api_server_restarts() -> anyhow::Result<()> {
    let mut plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    let operator_identity = plane.kubeconfig_for("ferrimesh-operator")?;
    namespace(&client, "apps", &[]).await?;
    let spec = MeshSpec {
        namespace_selector: Some(serde_json::from_value(
            json!({"matchLabels": {"mesh": "on"}}),
        )?),
        ..MeshSpec::default()
    };
    Api::<Mesh>::all(client.clone())
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    let url = format!("https://127.0.0.1:{}/inject", free_port()?);
    let first = start_operator(&plane, &operator_identity, "operator-1", &url)?;
    injected_pod(&client, "apps", "kept", "10.2.0.1").await?;
    injected_pod(&client, "apps", "gone", "10.2.0.2").await?;
    for name in ["kept", "gone"] {
        eventually(&format!("entry {name}"), WAIT, || {
            let client = client.clone();
            async move { Ok(entry_exists(&client, "apps", name).await?.then_some(())) }
        })
        .await?;
    }

    // The operator stops; a pod goes while it is down; at restart its entry goes too.
    let status = first.terminate(Duration::from_secs(20))?;
    assert!(
        status.success(),
        "the operator exits cleanly on SIGTERM: {status}"
    );
    Api::<Pod>::namespaced(client.clone(), "apps")
        .delete("gone", &DeleteParams::default().grace_period(0))
        .await?;
    assert!(
        entry_exists(&client, "apps", "gone").await?,
        "no one removed it while the operator was down"
    );
    let _second = start_operator(&plane, &operator_identity, "operator-2", &url)?;
    eventually("the orphan removed at restart", WAIT, || {
        let client = client.clone();
        async move { Ok((!entry_exists(&client, "apps", "gone").await?).then_some(())) }
    })
    .await?;
    assert!(
        entry_exists(&client, "apps", "kept").await?,
        "a live pod keeps its entry"
    );

    // The API server restarts under the operator: it reconnects and converges.
    plane.restart_apiserver().await?;
    let client = plane.client().await?;
    injected_pod(&client, "apps", "after", "10.2.0.3").await?;
    namespace(&client, "late", &[("mesh", "on")]).await?;
    eventually(
        "entry after the API server restart",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { Ok(entry_exists(&client, "apps", "after").await?.then_some(())) }
        },
    )
    .await?;
    eventually(
        "namespace labelled after the API server restart",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                Ok(namespace_label(&client, "late", "istio-injection")
                    .await?
                    .map(|_| ()))
            }
        },
    )
    .await?;
    Ok(())
}
