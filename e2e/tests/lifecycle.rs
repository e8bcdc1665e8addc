//! The operator's sidecar lifecycle against a real API server, with the
//! webhook injecting for real: the Mesh's status counts uninjected and
//! outdated pods, their owners get a `NeedsRestart` Event, and with
//! `rollout.policy: Automatic` the stale Deployments are restarted one at
//! a time, paused on request, and resumed by a new operator without a
//! second restart. The test plays the kubelet and the Deployment and
//! ReplicaSet controllers: it creates each Deployment's ReplicaSet and
//! pods, and writes the Deployment's status.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ferrimesh_crds::{Mesh, MeshSpec, ProxyProfile};
use ferrimesh_e2e::fixtures::{
    WAIT, create_until_injected, debug_profile, namespace, patch_default_mesh,
    start_operator_and_webhook, start_operator_with, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const RESTARTED_FOR: &str = "ferrimesh.io/restarted-for";
const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// The pod template's metadata and spec of app `app`.
fn template(app: &str) -> Value {
    json!({"metadata": {"labels": {"app": app}},
           "spec": {"serviceAccountName": "default",
                    "containers": [{"name": "app", "image": "registry.example/app:1"}]}})
}

/// Creates Deployment `ns/name` (one replica), its ReplicaSet and a pod of
/// it, as the controllers would; the pod goes through the webhook (and is
/// injected where the namespace says so, `injected`).
async fn deployment(client: &Client, ns: &str, name: &str, injected: bool) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let created = deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template(name)}
            }))?,
        )
        .await?;
    let owner = |kind: &str, name: &str, uid: Option<String>| {
        json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": uid.unwrap_or_default(), "controller": true}])
    };
    let rs_name = format!("{name}-1");
    let rs = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": rs_name, "ownerReferences": owner("Deployment", name, created.metadata.uid)},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template(name)}
            }))?,
        )
        .await?;
    let mut pod = template(name);
    pod["metadata"]["name"] = json!(format!("{rs_name}-a"));
    pod["metadata"]["ownerReferences"] = owner("ReplicaSet", &rs_name, rs.metadata.uid);
    let pod: Pod = serde_json::from_value(pod)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if injected {
        create_until_injected(&pods, &pod).await?;
    } else {
        pods.create(&PostParams::default(), &pod).await?;
    }
    Ok(())
}

/// A pod of app `app` with no owner, through the webhook.
fn bare_pod(name: &str) -> anyhow::Result<Pod> {
    let mut pod = template(name);
    pod["metadata"]["name"] = json!(name);
    Ok(serde_json::from_value(pod)?)
}

async fn label(client: &Client, ns: &str, value: Option<&str>) -> anyhow::Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio-injection": value}}})),
        )
        .await?;
    Ok(())
}

/// Waits until the Mesh `default` counts (uninjected, outdated) pods.
async fn counts(client: &Client, uninjected: i32, outdated: i32) -> anyhow::Result<()> {
    let meshes: Api<Mesh> = Api::all(client.clone());
    let last = Mutex::new(None);
    let found = eventually(
        &format!("uninjectedPods={uninjected}, outdatedPods={outdated}"),
        WAIT,
        || async {
            let status = meshes.get("default").await?.status.unwrap_or_default();
            let seen = (status.uninjected_pods, status.outdated_pods);
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
            Ok((seen == (uninjected, outdated)).then_some(()))
        },
    )
    .await;
    let last = *last.lock().unwrap_or_else(|e| e.into_inner());
    found.map_err(|e| anyhow::anyhow!("{e}; last seen (uninjected, outdated): {last:?}"))
}

/// The notes of the Events with `reason` on `[ns, kind, name]`.
async fn events(
    client: &Client,
    [ns, kind, name]: [&str; 3],
    reason: &str,
) -> anyhow::Result<Vec<String>> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .map(|e| e.note.unwrap_or_default())
        .collect())
}

/// Waits for Events with `reason` on `[ns, kind, name]`; their notes.
async fn wait_events(client: &Client, on: [&str; 3], reason: &str) -> anyhow::Result<Vec<String>> {
    let [ns, kind, name] = on;
    let what = format!("a {reason} Event on {kind} {ns}/{name}");
    eventually(&what, WAIT, || async {
        let notes = events(client, on, reason).await?;
        Ok((!notes.is_empty()).then_some(notes))
    })
    .await
}

async fn installed(spec: MeshSpec) -> anyhow::Result<(ControlPlane, Client)> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    Api::<Mesh>::all(client.clone())
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    Ok((plane, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_status_counts_stale_pods_and_their_owners_get_an_event() -> anyhow::Result<()> {
    let (plane, client) = installed(MeshSpec::default()).await?;
    let _running = start_operator_and_webhook(&plane, &client).await?;

    // A Deployment's pod created before its namespace is enabled.
    namespace(&client, "late", &[]).await?;
    deployment(&client, "late", "early", false).await?;
    // Injected pods of an enabled namespace: up to date.
    namespace(&client, "shop", &[("istio-injection", "enabled")]).await?;
    let shop: Api<Pod> = Api::namespaced(client.clone(), "shop");
    create_until_injected(&shop, &bare_pod("api")?).await?;
    create_until_injected(&shop, &bare_pod("web")?).await?;
    counts(&client, 0, 0).await?;

    label(&client, "late", Some("enabled")).await?;
    counts(&client, 1, 0).await?;
    let notes = wait_events(&client, ["late", "Deployment", "early"], "NeedsRestart").await?;
    assert!(
        notes[0].contains("uninjected: revision default would inject it"),
        "{notes:?}"
    );
    assert!(
        events(&client, ["late", "ReplicaSet", "early-1"], "NeedsRestart")
            .await?
            .is_empty(),
        "on the Deployment, not its ReplicaSet"
    );

    // The Mesh's image changes: exactly its injected pods are outdated.
    patch_default_mesh(
        &client,
        json!({"proxy": {"image": "registry.example/proxyv2:next"}}),
    )
    .await?;
    counts(&client, 1, 2).await?;
    let notes = wait_events(&client, ["shop", "Pod", "api"], "NeedsRestart").await?;
    assert!(
        notes[0].contains("registry.example/proxyv2:next"),
        "{notes:?}"
    );
    let image = ferrimesh_crds::settings::DEFAULT_PROXY_IMAGE;
    patch_default_mesh(&client, json!({"proxy": {"image": image}})).await?;
    counts(&client, 1, 0).await?;

    // A ProxyProfile concerns only the pods it selects.
    debug_profile(&client, "shop", "api").await?;
    let profiles: Api<ProxyProfile> = Api::namespaced(client.clone(), "shop");
    counts(&client, 1, 1).await?;
    profiles
        .delete("api-debug", &DeleteParams::default())
        .await?;
    counts(&client, 1, 0).await?;

    // The uninjected pod replaced (as a restart would): nothing left.
    let late: Api<Pod> = Api::namespaced(client.clone(), "late");
    let old = late.get("early-1-a").await?;
    late.delete("early-1-a", &DeleteParams::default().grace_period(0))
        .await?;
    let mut new = old.clone();
    new.metadata = kube::core::ObjectMeta {
        name: Some("early-1-b".into()),
        labels: old.metadata.labels.clone(),
        owner_references: old.metadata.owner_references.clone(),
        ..Default::default()
    };
    new.status = None;
    create_until_injected(&late, &new).await?;
    counts(&client, 0, 0).await?;
    let status = Api::<Mesh>::all(client.clone())
        .get("default")
        .await?
        .status
        .unwrap_or_default();
    assert_eq!(status.orphaned_pods, 0);
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != "RolloutProgressing"),
        "no rollout condition with a manual rollout"
    );
    Ok(())
}

/// The restart annotations of Deployment `ns/name` and its generation.
async fn restarted(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<(Option<String>, Option<String>, i64)> {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let template = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(RESTARTED_AT))
        .cloned();
    let generation = d.metadata.generation.unwrap_or_default();
    Ok((
        d.annotations().get(RESTARTED_FOR).cloned(),
        template,
        generation,
    ))
}

/// Waits until Deployment `ns/name` is restarted (both annotations set).
async fn wait_restarted(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<(String, String, i64)> {
    eventually(
        &format!("Deployment {ns}/{name} restarted"),
        WAIT,
        || async {
            Ok(match restarted(client, ns, name).await? {
                (Some(target), Some(at), generation) => Some((target, at, generation)),
                _ => None,
            })
        },
    )
    .await
}

/// Plays the Deployment controller: the rollout of `ns/name` is done.
async fn roll_out(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let generation = api.get(name).await?.metadata.generation.unwrap_or_default();
    let status = json!({"status": {"observedGeneration": generation, "replicas": 1,
                                   "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// Asserts for `seconds` that none of `deployments` gets restarted.
async fn stays_unrestarted(
    client: &Client,
    deployments: &[(&str, &str)],
    seconds: u64,
) -> anyhow::Result<()> {
    for _ in 0..seconds {
        for (ns, name) in deployments {
            let (target, at, _) = restarted(client, ns, name).await?;
            anyhow::ensure!(
                target.is_none() && at.is_none(),
                "Deployment {ns}/{name} restarted too early"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// The Mesh's RolloutProgressing condition: (status, reason, message).
async fn progress(client: &Client) -> anyhow::Result<Option<(String, String, String)>> {
    let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
    Ok(mesh
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "RolloutProgressing")
        .map(|c| (c.status, c.reason, c.message)))
}

async fn wait_progress(client: &Client, reason: &str) -> anyhow::Result<String> {
    eventually(&format!("RolloutProgressing {reason}"), WAIT, || async {
        Ok(progress(client)
            .await?
            .filter(|(_, r, _)| r == reason)
            .map(|(_, _, message)| message))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rollout_restarts_stale_deployments_one_at_a_time_and_survives_a_kill()
-> anyhow::Result<()> {
    let spec = MeshSpec {
        rollout: serde_json::from_value(json!({"policy": "Automatic", "maxConcurrent": 1}))?,
        ..MeshSpec::default()
    };
    let (plane, client) = installed(spec).await?;
    let mut running = start_operator_and_webhook(&plane, &client).await?;

    // Three stale Deployments in two namespaces (created before injection
    // was enabled there), a fresh one, and a bare pod.
    for ns in ["a", "b"] {
        namespace(&client, ns, &[]).await?;
    }
    deployment(&client, "a", "one", false).await?;
    deployment(&client, "a", "two", false).await?;
    deployment(&client, "b", "three", false).await?;
    let bare: Api<Pod> = Api::namespaced(client.clone(), "a");
    bare.create(&PostParams::default(), &bare_pod("lonely")?)
        .await?;
    for ns in ["a", "b"] {
        label(&client, ns, Some("enabled")).await?;
    }
    deployment(&client, "b", "fresh", true).await?;
    counts(&client, 4, 0).await?;

    // One at a time: a/one first (namespace, then name), the rest wait.
    let (target, one_at, one_generation) = wait_restarted(&client, "a", "one").await?;
    let (stamp, recorded) = target.split_once('@').unwrap_or((&target, ""));
    assert_eq!(stamp.len(), 16, "the injection stamp: {target}");
    assert!(one_at.parse::<jiff::Timestamp>().is_ok(), "{one_at}");
    assert_eq!(one_generation, 2, "one change of the pod template");
    assert_eq!(recorded, "2", "the generation the restart gave: {target}");
    let message = wait_progress(&client, "RollingOut").await?;
    assert!(message.contains("Deployment a/one"), "{message}");
    stays_unrestarted(&client, &[("a", "two"), ("b", "three")], 5).await?;

    // Paused: a/one finishing starts nothing new.
    patch_default_mesh(&client, json!({"rollout": {"paused": true}})).await?;
    wait_progress(&client, "RolloutPaused").await?;
    roll_out(&client, "a", "one").await?;
    stays_unrestarted(&client, &[("a", "two"), ("b", "three")], 5).await?;
    patch_default_mesh(&client, json!({"rollout": {"paused": false}})).await?;
    let (_, two_at, _) = wait_restarted(&client, "a", "two").await?;

    // The operator SIGKILLed while a/two rolls out: its successor neither
    // restarts a/two again nor starts b/three before a/two is done.
    drop(running.operator);
    running.operator = start_operator_with(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator-2",
        &running.webhook_url,
        &["--resync-interval-seconds", "2"],
    )?;
    eventually(
        "the new operator leading",
        Duration::from_secs(60),
        || async {
            let log = std::fs::read_to_string(plane.scratch().path("operator-2.log"))?;
            Ok(log.contains("holding the lease").then_some(()))
        },
    )
    .await?;
    stays_unrestarted(&client, &[("b", "three")], 6).await?;
    assert_eq!(
        restarted(&client, "a", "two").await?,
        (Some(target.clone()), Some(two_at), 2),
        "a/two restarted once"
    );
    roll_out(&client, "a", "two").await?;
    wait_restarted(&client, "b", "three").await?;
    roll_out(&client, "b", "three").await?;
    let message = wait_progress(&client, "RolloutComplete").await?;
    assert_eq!(message, "no workload needs a restart");

    // Each stale Deployment restarted exactly once (its pods, which this
    // test does not replace, stay stale: not a reason to restart again);
    // the fresh one and the bare pod untouched, the bare pod announced.
    for (ns, name) in [("a", "one"), ("a", "two"), ("b", "three")] {
        let (for_, _, generation) = restarted(&client, ns, name).await?;
        assert_eq!(
            (for_.as_deref(), generation),
            (Some(target.as_str()), 2),
            "{ns}/{name}"
        );
        let notes = events(&client, [ns, "Deployment", name], "RolloutRestarted").await?;
        // a/two's Event may have been lost with the operator killed right
        // after its restart; none is ever published twice.
        let expected = if name == "two" { 0..=1 } else { 1..=1 };
        assert!(expected.contains(&notes.len()), "{ns}/{name}: {notes:?}");
    }
    assert_eq!(
        restarted(&client, "a", "one").await?.1,
        Some(one_at),
        "a/one not restarted again"
    );
    assert_eq!(
        restarted(&client, "b", "fresh").await?,
        (None, None, 1),
        "up to date: never restarted"
    );
    let lonely = bare.get("lonely").await?;
    assert!(lonely.metadata.deletion_timestamp.is_none());
    assert!(!lonely.annotations().contains_key(RESTARTED_FOR));
    wait_events(&client, ["a", "Pod", "lonely"], "NeedsRestart").await?;
    let labels: BTreeMap<String, String> = lonely.labels().clone();
    assert_eq!(labels.get("app").map(String::as_str), Some("lonely"));
    Ok(())
}
