//! Which namespaces and webhook configurations the operator writes, against
//! a real API server: an ambient namespace a Mesh selects stays unlabelled
//! (reported on the Mesh and in an Event) until it leaves ambient mode; a
//! labelled namespace whose Pod Security level refuses the injected pods is
//! reported; revision tags move between Meshes, and a pod created through
//! the API server in an `istio.io/rev=<tag>` namespace is injected (the
//! webhook called over TLS) with the settings of the Mesh holding the tag;
//! the tag `default` takes `istio-injection=enabled` over from the default
//! revision and gives it back; of two Meshes of one revision the older
//! serves it, and hands its configuration to the other when it goes.

use ferrimesh_crds::selection::tag_configuration_name;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_e2e::fixtures::{
    WAIT, create_until_injected, events_about, mesh_condition, namespace, namespace_label,
    start_operator_and_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Waits until the Mesh's condition `type_` has `status` and a message
/// containing `text`; returns the message.
async fn until_condition(
    client: &Client,
    mesh: &str,
    type_: &str,
    status: &str,
    text: &str,
) -> anyhow::Result<String> {
    eventually(
        &format!("{mesh} {type_}={status} ({text})"),
        WAIT,
        || async {
            Ok(mesh_condition(client, mesh, type_)
                .await?
                .filter(|(s, _, m)| s == status && m.contains(text))
                .map(|(_, _, m)| m))
        },
    )
    .await
}

/// Waits for an Event `reason` on the Namespace `namespace`; returns its note.
async fn namespace_event(client: &Client, reason: &str, namespace: &str) -> anyhow::Result<String> {
    eventually(
        &format!("a {reason} Event on {namespace}"),
        WAIT,
        || async {
            let events = events_about(client, "default", reason, "Namespace", namespace).await?;
            Ok(events.into_iter().find_map(|e| e.note))
        },
    )
    .await
}

fn selecting(selector: serde_json::Value) -> anyhow::Result<MeshSpec> {
    Ok(MeshSpec {
        namespace_selector: Some(serde_json::from_value(selector)?),
        ..MeshSpec::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_namespaces_stay_unlabelled_and_pod_security_refusals_are_reported()
-> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    namespace(
        &client,
        "zt",
        &[("mesh", "on"), ("istio.io/dataplane-mode", "ambient")],
    )
    .await?;
    namespace(
        &client,
        "strict",
        &[
            ("mesh", "on"),
            ("pod-security.kubernetes.io/enforce", "baseline"),
        ],
    )
    .await?;
    namespace(&client, "apps", &[("mesh", "on")]).await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    let spec = selecting(json!({"matchLabels": {"mesh": "on"}}))?;
    meshes
        .create(&PostParams::default(), &Mesh::new("default", spec))
        .await?;
    let _installed = start_operator_and_webhook(&plane, &client).await?;

    // The ambient namespace: unlabelled, named on the Mesh, an Event on it.
    let message = until_condition(&client, "default", "NamespacesLabelled", "True", "zt").await?;
    assert!(message.starts_with("2 namespaces labelled"), "{message}");
    assert!(
        message.contains("istio.io/dataplane-mode=ambient"),
        "{message}"
    );
    let note = namespace_event(&client, "NamespaceAmbient", "zt").await?;
    assert!(note.contains("Mesh default"), "{note}");
    assert_eq!(
        namespace_label(&client, "zt", "istio-injection").await?,
        None
    );
    assert_eq!(
        namespace_label(&client, "apps", "istio-injection")
            .await?
            .as_deref(),
        Some("enabled")
    );

    // Pod Security: the baseline namespace refuses istio-init; CNI fixes it.
    let message = until_condition(
        &client,
        "default",
        "PodSecurityCompatible",
        "False",
        "strict",
    )
    .await?;
    assert!(
        message.contains("strict (baseline: traffic.cni.enabled"),
        "{message}"
    );
    assert!(!message.contains("apps"), "{message}");
    let note = namespace_event(&client, "PodSecurityIncompatible", "strict").await?;
    assert!(note.contains("traffic.cni.enabled"), "{note}");
    let ready = mesh_condition(&client, "default", "Ready").await?;
    assert_eq!(ready.map(|(s, _, _)| s).as_deref(), Some("True"));
    meshes
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"traffic": {"cni": {"enabled": true}}}})),
        )
        .await?;
    until_condition(&client, "default", "PodSecurityCompatible", "True", "").await?;

    // The namespace leaves ambient mode: labelled.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            "zt",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}})),
        )
        .await?;
    eventually("zt labelled", WAIT, || async {
        Ok(namespace_label(&client, "zt", "istio-injection")
            .await?
            .filter(|v| v == "enabled"))
    })
    .await?;
    until_condition(
        &client,
        "default",
        "NamespacesLabelled",
        "True",
        "3 namespaces labelled",
    )
    .await?;

    // And back: the operator releases its own label.
    namespaces
        .patch(
            "zt",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})),
        )
        .await?;
    eventually("zt released", WAIT, || async {
        Ok(namespace_label(&client, "zt", "istio-injection")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    Ok(())
}

/// Creates the Mesh `name` of `revision` with `tags`, its `caAddress`
/// `istiod-<name>.istio-system.svc:15012`.
async fn create_mesh(
    meshes: &Api<Mesh>,
    name: &str,
    revision: &str,
    tags: &[&str],
) -> anyhow::Result<()> {
    let spec = MeshSpec {
        revision: revision.to_owned(),
        ca_address: Some(format!("istiod-{name}.istio-system.svc:15012")),
        revision_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..MeshSpec::default()
    };
    meshes
        .create(&PostParams::default(), &Mesh::new(name, spec))
        .await?;
    Ok(())
}

/// A plain pod named `name`.
fn app_pod(name: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?)
}

/// The `CA_ADDR` the injected proxy of `pod` gets.
fn ca_addr(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == "istio-proxy")
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "CA_ADDR")
        .and_then(|e| e.value.clone())
}

/// The revision label of the tag's webhook configuration, once it exists.
async fn tag_revision(client: &Client, tag: &str) -> anyhow::Result<Option<String>> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    Ok(configs
        .get_opt(&tag_configuration_name(tag))
        .await?
        .and_then(|c| c.labels().get("istio.io/rev").cloned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_tag_moves_between_meshes_and_pods_follow_it() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    namespace(&client, "tagged", &[("istio.io/rev", "stable")]).await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    create_mesh(&meshes, "first", "default", &["stable"]).await?;
    // Created second: it lists the tag too, and is refused it.
    create_mesh(&meshes, "second", "canary", &["stable"]).await?;
    let installed = start_operator_and_webhook(&plane, &client).await?;

    until_condition(&client, "first", "RevisionTagsConfigured", "True", "stable").await?;
    let refused = until_condition(
        &client,
        "second",
        "RevisionTagsConfigured",
        "False",
        "stable: held by the older Mesh first",
    )
    .await?;
    assert!(refused.contains("refused"), "{refused}");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs.get(&tag_configuration_name("stable")).await?;
    let own = configs.get("ferrimesh-sidecar-injector").await?;
    let bundle = |c: &MutatingWebhookConfiguration| {
        c.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.clone())
            .collect::<Vec<_>>()
    };
    assert!(!bundle(&config).is_empty());
    assert!(
        bundle(&config)
            .iter()
            .all(|c| Some(c) == bundle(&own).first()),
        "the tag calls the webhook as the Mesh's own configuration does, caBundle included"
    );
    assert_eq!(
        config.labels().get("istio.io/rev").map(String::as_str),
        Some("default")
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "tagged");
    let injected = create_until_injected(&pods, &app_pod("before")?).await?;
    assert_eq!(
        ca_addr(&injected).as_deref(),
        Some("istiod-first.istio-system.svc:15012")
    );

    // The first Mesh lets the tag go: the second holds it, same object.
    let uid = config.uid();
    meshes
        .patch(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revisionTags": []}})),
        )
        .await?;
    eventually("the tag moved to the second Mesh", WAIT, || async {
        Ok(tag_revision(&client, "stable")
            .await?
            .filter(|r| r == "canary"))
    })
    .await?;
    let moved = configs.get(&tag_configuration_name("stable")).await?;
    assert_eq!(moved.uid(), uid, "rewritten, never deleted in between");
    until_condition(
        &client,
        "second",
        "RevisionTagsConfigured",
        "True",
        "stable",
    )
    .await?;
    let after = eventually("a pod injected by the second Mesh", WAIT, || async {
        let name = format!("after-{}", ferrimesh_e2e::free_port()?);
        let created = create_until_injected(&pods, &app_pod(&name)?).await?;
        Ok(ca_addr(&created).filter(|a| a.starts_with("istiod-second")))
    })
    .await?;
    assert_eq!(after, "istiod-second.istio-system.svc:15012");

    // The tag goes: its configuration is deleted.
    meshes
        .patch(
            "second",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revisionTags": []}})),
        )
        .await?;
    eventually("the tag's configuration deleted", WAIT, || async {
        Ok(configs
            .get_opt(&tag_configuration_name("stable"))
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    drop(installed);
    Ok(())
}

/// The number of webhooks of the configuration `name` (`None`: missing).
async fn webhooks(client: &Client, name: &str) -> anyhow::Result<Option<usize>> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    Ok(configs
        .get_opt(name)
        .await?
        .map(|c| c.webhooks.map_or(0, |w| w.len())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_default_takes_over_istio_injection_and_gives_it_back() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    namespace(&client, "enabled", &[("istio-injection", "enabled")]).await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    create_mesh(&meshes, "main", "default", &[]).await?;
    create_mesh(&meshes, "canary", "canary", &["default"]).await?;
    let _installed = start_operator_and_webhook(&plane, &client).await?;

    until_condition(
        &client,
        "canary",
        "RevisionTagsConfigured",
        "True",
        "default",
    )
    .await?;
    assert_eq!(
        webhooks(&client, "ferrimesh-sidecar-injector").await?,
        Some(0)
    );
    assert_eq!(
        webhooks(&client, &tag_configuration_name("default")).await?,
        Some(4)
    );
    until_condition(
        &client,
        "main",
        "WebhookConfigured",
        "True",
        "without entries",
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "enabled");
    let taken = create_until_injected(&pods, &app_pod("taken")?).await?;
    assert_eq!(
        ca_addr(&taken).as_deref(),
        Some("istiod-canary.istio-system.svc:15012")
    );

    // The tag goes: its configuration first, then the default revision's
    // entries come back.
    meshes
        .patch(
            "canary",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revisionTags": []}})),
        )
        .await?;
    eventually("the default revision's entries back", WAIT, || async {
        Ok((webhooks(&client, "ferrimesh-sidecar-injector").await? == Some(4)).then_some(()))
    })
    .await?;
    assert_eq!(
        webhooks(&client, &tag_configuration_name("default")).await?,
        None,
        "the tag's configuration went first"
    );
    let back = eventually("a pod injected by the default revision", WAIT, || async {
        let name = format!("back-{}", ferrimesh_e2e::free_port()?);
        let created = create_until_injected(&pods, &app_pod(&name)?).await?;
        Ok(ca_addr(&created).filter(|a| a.starts_with("istiod-main")))
    })
    .await?;
    assert_eq!(back, "istiod-main.istio-system.svc:15012");
    Ok(())
}

/// The uids of the owners of the webhook configuration `name`.
async fn owners(client: &Client, name: &str) -> anyhow::Result<Vec<String>> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    Ok(configs
        .get_opt(name)
        .await?
        .map(|c| c.owner_references().iter().map(|o| o.uid.clone()).collect())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mesh_of_a_revision_waits_and_takes_over_when_the_first_goes() -> anyhow::Result<()>
{
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_kustomization("config/overlays/local")?;
    wait_for_crds(&client).await?;
    namespace(&client, "canary-apps", &[("istio.io/rev", "canary")]).await?;
    let meshes: Api<Mesh> = Api::all(client.clone());
    create_mesh(&meshes, "first", "canary", &[]).await?;
    let _installed = start_operator_and_webhook(&plane, &client).await?;
    until_condition(&client, "first", "WebhookConfigured", "True", "canary").await?;

    create_mesh(&meshes, "second", "canary", &["next"]).await?;
    let message = until_condition(
        &client,
        "second",
        "WebhookConfigured",
        "False",
        "served by the older Mesh first",
    )
    .await?;
    assert!(message.contains("revision canary"), "{message}");
    // Its revision tag waits too, and says why.
    until_condition(
        &client,
        "second",
        "RevisionTagsConfigured",
        "False",
        "served by the older Mesh first",
    )
    .await?;
    let tag_config = "ferrimesh-revision-tag-next";
    assert_eq!(webhooks(&client, tag_config).await?, None);
    let config = "ferrimesh-sidecar-injector-canary";
    let first_uid = meshes.get("first").await?.uid().unwrap_or_default();
    let second_uid = meshes.get("second").await?.uid().unwrap_or_default();
    assert_eq!(owners(&client, config).await?, [first_uid]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "canary-apps");
    let early = create_until_injected(&pods, &app_pod("early")?).await?;
    assert_eq!(
        ca_addr(&early).as_deref(),
        Some("istiod-first.istio-system.svc:15012"),
        "the older Mesh injects"
    );

    // The first goes: its configuration is handed to the second, never
    // deleted, and the second's settings inject.
    meshes.delete("first", &Default::default()).await?;
    until_condition(&client, "second", "WebhookConfigured", "True", config).await?;
    eventually("the first Mesh gone", WAIT, || async {
        Ok(meshes.get_opt("first").await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(owners(&client, config).await?, [second_uid.as_str()]);
    assert_eq!(webhooks(&client, config).await?, Some(2));
    until_condition(&client, "second", "RevisionTagsConfigured", "True", "next").await?;
    assert_eq!(owners(&client, tag_config).await?, [second_uid.as_str()]);
    let late = eventually("a pod injected by the second Mesh", WAIT, || async {
        let name = format!("late-{}", ferrimesh_e2e::free_port()?);
        let created = create_until_injected(&pods, &app_pod(&name)?).await?;
        Ok(ca_addr(&created).filter(|a| a.starts_with("istiod-second")))
    })
    .await?;
    assert_eq!(late, "istiod-second.istio-system.svc:15012");
    Ok(())
}
