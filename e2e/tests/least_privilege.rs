//! Least privilege, enforced by a real API server: with `config/default`
//! applied (RBAC from `config/rbac`, admission policies from
//! `config/policy`), the operator's own token may write what the operator
//! writes and is refused the rest (among which: any change to a workload
//! but the rollout's restart). The other e2e tests run the operator
//! under the same rules and show it still does its job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use ferrimesh_crds::MeshSpec;
use ferrimesh_crds::selection::{
    tag_configuration_name, tag_webhook_configurations, webhook_configuration,
    webhook_configuration_name,
};
use ferrimesh_e2e::fixtures::{WAIT, namespace, namespace_label};
use ferrimesh_e2e::{ControlPlane, client_for, eventually};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// The operator's field manager, as it writes.
const MANAGER: &str = "ferrimesh-operator";

/// The message of a 403 answer; anything else fails the test.
fn refused<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) -> anyhow::Result<String> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(status.message),
        other => bail!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

fn namespace_labels(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The webhook configuration the operator writes for `revision` in a
/// cluster: calling the webhook's Service.
fn own_configuration(revision: &str) -> MutatingWebhookConfiguration {
    let spec = MeshSpec {
        revision: revision.to_owned(),
        ..MeshSpec::default()
    };
    let client_config = WebhookClientConfig {
        service: Some(ServiceReference {
            name: "ferrimesh-webhook".into(),
            namespace: "ferrimesh-system".into(),
            path: Some("/inject".into()),
            port: Some(443),
        }),
        ..WebhookClientConfig::default()
    };
    let excluded = [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "ferrimesh-system",
    ];
    let mut config = webhook_configuration(&spec, &client_config, &excluded);
    config.metadata.owner_references = None;
    config
}

/// Whether `result` is a refusal by the admission policy `policy`.
fn refused_by<T>(result: kube::Result<T>, policy: &str) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains(policy))
}

/// Waits until both admission policies answer for the operator: a dry-run
/// change of a foreign label and a dry-run creation of a foreign webhook
/// configuration are refused by them (the API server loads policies, and
/// RBAC, asynchronously).
async fn policies_in_force(operator: &Client) -> anyhow::Result<()> {
    let last = Arc::new(Mutex::new(String::new()));
    eventually("the admission policies in force", WAIT, || {
        let (operator, last) = (operator.clone(), Arc::clone(&last));
        async move {
            let label = Api::<Namespace>::all(operator.clone())
                .patch(
                    "team",
                    &apply().dry_run(),
                    &Patch::Apply(namespace_labels("team", json!({"policy-probe": "x"}))),
                )
                .await;
            let mut probe = own_configuration("probe");
            probe.metadata.name = Some("policy-probe".into());
            let config = Api::<MutatingWebhookConfiguration>::all(operator)
                .patch("policy-probe", &apply().dry_run(), &Patch::Apply(&probe))
                .await;
            *last.lock().unwrap_or_else(|e| e.into_inner()) =
                format!("namespace: {label:?}; webhook configuration: {config:?}");
            Ok((refused_by(label, "ferrimesh-operator-namespaces")
                && refused_by(config, "ferrimesh-operator-webhook-configurations"))
            .then_some(()))
        }
    })
    .await
    .with_context(|| {
        format!(
            "last answers: {}",
            last.lock().unwrap_or_else(|e| e.into_inner())
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_may_change_only_injection_labels_of_a_namespace() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let admin = plane.client().await?;
    plane.apply_kustomization("config/default")?;
    let operator = client_for(&plane.kubeconfig_for("ferrimesh-operator")?).await?;
    namespace(
        &admin,
        "team",
        &[
            ("pod-security.kubernetes.io/enforce", "restricted"),
            ("team", "a"),
        ],
    )
    .await?;
    policies_in_force(&operator).await?;
    let namespaces: Api<Namespace> = Api::all(operator.clone());

    // What the operator does: apply its injection label, and release it.
    namespaces
        .patch(
            "team",
            &apply(),
            &Patch::Apply(namespace_labels(
                "team",
                json!({"istio-injection": "enabled"}),
            )),
        )
        .await?;
    assert_eq!(
        namespace_label(&admin, "team", "istio-injection")
            .await?
            .as_deref(),
        Some("enabled")
    );
    namespaces
        .patch(
            "team",
            &apply(),
            &Patch::Apply(namespace_labels("team", json!({"istio.io/rev": "canary"}))),
        )
        .await?;
    assert_eq!(
        namespace_label(&admin, "team", "istio-injection").await?,
        None
    );

    // What it may not: Pod Security, another label, an annotation, a new namespace.
    let message = refused(
        namespaces
            .patch(
                "team",
                &apply(),
                &Patch::Apply(namespace_labels(
                    "team",
                    json!({"istio.io/rev": "canary", "pod-security.kubernetes.io/enforce": "privileged"}),
                )),
            )
            .await,
        "the operator weakening Pod Security",
    )?;
    assert!(
        message.contains(
            "ferrimesh-operator may change only the labels istio-injection and istio.io/rev"
        ),
        "{message}"
    );
    refused(
        namespaces
            .patch(
                "team",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"team": null}}})),
            )
            .await,
        "the operator removing a user's label",
    )?;
    let message = refused(
        namespaces
            .patch(
                "team",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"scheduler.alpha.kubernetes.io/node-selector": "x=y"}}})),
            )
            .await,
        "the operator annotating a namespace",
    )?;
    assert!(message.contains("annotations"), "{message}");
    let message = refused(
        namespaces
            .patch(
                "made-by-apply",
                &apply(),
                &Patch::Apply(namespace_labels(
                    "made-by-apply",
                    json!({"istio-injection": "enabled"}),
                )),
            )
            .await,
        "the operator creating a namespace with server-side apply",
    )?;
    assert!(message.contains("cannot create"), "{message}");

    let team = Api::<Namespace>::all(admin.clone()).get("team").await?;
    assert_eq!(
        team.labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    assert_eq!(team.labels().get("team").map(String::as_str), Some("a"));
    assert!(
        !team
            .annotations()
            .contains_key("scheduler.alpha.kubernetes.io/node-selector")
    );
    assert!(
        Api::<Namespace>::all(admin.clone())
            .get_opt("made-by-apply")
            .await?
            .is_none()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_may_write_only_its_own_webhook_configurations() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let admin = plane.client().await?;
    plane.apply_kustomization("config/default")?;
    let operator = client_for(&plane.kubeconfig_for("ferrimesh-operator")?).await?;
    namespace(&admin, "team", &[]).await?;
    policies_in_force(&operator).await?;

    // An admin's own configuration, calling ferrimesh's webhook too: only
    // its name says it is not the operator's.
    let foreign: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "someone-elses-injector"},
        "webhooks": [{"name": "inject.example.com", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                      "clientConfig": {"service": {"namespace": "ferrimesh-system", "name": "ferrimesh-webhook", "path": "/inject"}},
                      "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                      "failurePolicy": "Ignore"}]
    }))?;
    Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .create(&PostParams::default(), &foreign)
        .await?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(operator.clone());

    // What the operator does: apply its own configuration (creating it), then delete it.
    let name = webhook_configuration_name("canary");
    configs
        .patch(&name, &apply(), &Patch::Apply(own_configuration("canary")))
        .await?;
    configs
        .patch(&name, &apply(), &Patch::Apply(own_configuration("canary")))
        .await?;
    // A revision tag's configuration, as the Mesh holding it writes it,
    // then deleted as when the tag goes.
    let tagged = MeshSpec {
        revision: "canary".into(),
        revision_tags: vec!["stable".into()],
        ..MeshSpec::default()
    };
    let own = own_configuration("canary");
    let client_config = own
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.clone())
        .next()
        .unwrap_or_default();
    let excluded = [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "ferrimesh-system",
    ];
    let tag = tag_webhook_configurations(&tagged, &client_config, &excluded)
        .into_iter()
        .next()
        .context("the tag's configuration")?;
    let tag_name = tag_configuration_name("stable");
    configs
        .patch(&tag_name, &apply(), &Patch::Apply(&tag))
        .await?;
    configs.delete(&tag_name, &DeleteParams::default()).await?;
    // A name that is neither: refused.
    let mut misnamed = tag.clone();
    misnamed.metadata.name = Some("ferrimesh-revision-tags".into());
    let message = refused(
        configs
            .patch(
                "ferrimesh-revision-tags",
                &apply(),
                &Patch::Apply(&misnamed),
            )
            .await,
        "the operator writing a configuration of another name",
    )?;
    assert!(
        message.contains("ferrimesh-revision-tag-<tag>"),
        "{message}"
    );

    // What it may not: touch another's configuration, or make its own a tap
    // on other kinds or on a server of its choosing, or reach the system
    // namespaces.
    let mut taken = foreign.clone();
    taken.metadata.labels = Some([("app.kubernetes.io/managed-by".into(), MANAGER.into())].into());
    let message = refused(
        configs
            .patch("someone-elses-injector", &apply(), &Patch::Apply(&taken))
            .await,
        "the operator changing a foreign webhook configuration",
    )?;
    assert!(message.contains("not someone-elses-injector"), "{message}");
    refused(
        configs
            .delete("someone-elses-injector", &DeleteParams::default())
            .await,
        "the operator deleting a foreign webhook configuration",
    )?;
    let mut secrets_tap = own_configuration("canary");
    for webhook in secrets_tap.webhooks.iter_mut().flatten() {
        for rule in webhook.rules.iter_mut().flatten() {
            rule.resources = Some(vec!["secrets".into()]);
        }
    }
    let message = refused(
        configs
            .patch(&name, &apply(), &Patch::Apply(&secrets_tap))
            .await,
        "the operator intercepting Secrets",
    )?;
    assert!(message.contains("only CREATE of core/v1 pods"), "{message}");
    let mut elsewhere = own_configuration("canary");
    for webhook in elsewhere.webhooks.iter_mut().flatten() {
        webhook.client_config = WebhookClientConfig {
            url: Some("https://collector.example.com/inject".into()),
            ..WebhookClientConfig::default()
        };
    }
    let message = refused(
        configs
            .patch(&name, &apply(), &Patch::Apply(&elsewhere))
            .await,
        "the operator pointing its webhooks at a URL",
    )?;
    assert!(
        message.contains("ferrimesh-system/ferrimesh-webhook"),
        "{message}"
    );
    let mut everywhere = own_configuration("canary");
    for webhook in everywhere.webhooks.iter_mut().flatten() {
        if let Some(selector) = webhook.namespace_selector.as_mut() {
            selector.match_expressions = None;
        }
    }
    let message = refused(
        configs
            .patch(&name, &apply(), &Patch::Apply(&everywhere))
            .await,
        "the operator's webhooks reaching kube-system",
    )?;
    assert!(message.contains("must exclude the namespaces"), "{message}");
    let mut unlabelled = own_configuration("other");
    unlabelled.metadata.labels = None;
    refused(
        configs
            .patch(
                &webhook_configuration_name("other"),
                &apply(),
                &Patch::Apply(&unlabelled),
            )
            .await,
        "the operator writing a configuration without its label",
    )?;

    let admin_configs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let kept = admin_configs.get("someone-elses-injector").await?;
    assert_eq!(kept.labels().get("app.kubernetes.io/managed-by"), None);
    let own = admin_configs.get(&name).await?;
    for webhook in own.webhooks.iter().flatten() {
        assert_eq!(
            webhook
                .client_config
                .service
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("ferrimesh-webhook")
        );
    }
    configs.delete(&name, &DeleteParams::default()).await?;
    eventually(
        "the canary configuration deleted",
        Duration::from_secs(10),
        || {
            let admin_configs = admin_configs.clone();
            let name = name.clone();
            async move { Ok(admin_configs.get_opt(&name).await?.is_none().then_some(())) }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_reads_and_writes_only_its_own_secrets() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let admin = plane.client().await?;
    plane.apply_kustomization("config/default")?;
    let other: Secret = serde_json::from_value(json!({
        "metadata": {"name": "database-password", "namespace": "ferrimesh-system"},
        "stringData": {"password": "hunter2"}
    }))?;
    Api::<Secret>::namespaced(admin.clone(), "ferrimesh-system")
        .create(&PostParams::default(), &other)
        .await?;
    let operator = client_for(&plane.kubeconfig_for("ferrimesh-operator")?).await?;
    let secrets: Api<Secret> = Api::namespaced(operator.clone(), "ferrimesh-system");

    // Its own, by name: created with server-side apply, read, listed by name.
    let own = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": "ferrimesh-webhook-ca", "namespace": "ferrimesh-system"},
                     "stringData": {"ca.crt": "x"}});
    let last = Arc::new(Mutex::new(String::new()));
    eventually("the operator's Role in force", WAIT, || {
        let (secrets, own, last) = (secrets.clone(), own.clone(), Arc::clone(&last));
        async move {
            match secrets
                .patch("ferrimesh-webhook-ca", &apply(), &Patch::Apply(&own))
                .await
            {
                Ok(created) => Ok(Some(created)),
                Err(kube::Error::Api(status)) if status.code == 403 => {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = status.message;
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "last refusal: {}",
            last.lock().unwrap_or_else(|e| e.into_inner())
        )
    })?;
    secrets.get("ferrimesh-webhook-ca").await?;
    let listed = secrets
        .list(&ListParams::default().fields("metadata.name=ferrimesh-webhook-ca"))
        .await?;
    assert_eq!(listed.items.len(), 1);

    // Anything else: refused.
    refused(
        secrets.get("database-password").await,
        "the operator reading another Secret",
    )?;
    refused(
        secrets.list(&ListParams::default()).await,
        "the operator listing every Secret of its namespace",
    )?;
    let taken = json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": "database-password", "namespace": "ferrimesh-system"},
                       "stringData": {"password": "changed"}});
    refused(
        secrets
            .patch("database-password", &apply(), &Patch::Apply(&taken))
            .await,
        "the operator writing another Secret",
    )?;
    refused(
        Api::<Secret>::namespaced(operator, "default")
            .list(&ListParams::default())
            .await,
        "the operator listing Secrets of another namespace",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_may_only_restart_a_workload() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let admin = plane.client().await?;
    plane.apply_kustomization("config/default")?;
    namespace(&admin, "team", &[]).await?;
    let web: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "annotations": {"team": "a"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]}}}
    }))?;
    Api::<Deployment>::namespaced(admin.clone(), "team")
        .create(&PostParams::default(), &web)
        .await?;
    let operator = client_for(&plane.kubeconfig_for("ferrimesh-operator")?).await?;
    let deployments: Api<Deployment> = Api::namespaced(operator.clone(), "team");
    let merge = |patch: serde_json::Value| {
        let deployments = deployments.clone();
        async move {
            deployments
                .patch(
                    "web",
                    &PatchParams::default().dry_run(),
                    &Patch::Merge(patch),
                )
                .await
        }
    };

    // What it may not (tried as dry runs, which admission sees whole):
    // change what runs, scale, or touch another annotation.
    let image = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": "attacker.example/web:1"}]}}}});
    let last = Arc::new(Mutex::new(String::new()));
    eventually("the workload policy in force", WAIT, || {
        let (image, last) = (image.clone(), Arc::clone(&last));
        async move {
            let result = merge(image).await;
            *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{result:?}");
            Ok(refused_by(result, "ferrimesh-operator-workloads").then_some(()))
        }
    })
    .await
    .with_context(|| {
        format!(
            "last answer: {}",
            last.lock().unwrap_or_else(|e| e.into_inner())
        )
    })?;
    let message = refused(
        merge(json!({"spec": {"replicas": 0}})).await,
        "the operator scaling a Deployment",
    )?;
    assert!(message.contains("replicas"), "{message}");
    let message = refused(
        merge(json!({"metadata": {"annotations": {"team": "b"}}})).await,
        "the operator changing another annotation",
    )?;
    assert!(message.contains("ferrimesh.io/restarted-for"), "{message}");
    refused(
        merge(json!({"spec": {"template": {"metadata": {"labels": {"app": "web", "x": "y"}}}}}))
            .await,
        "the operator relabelling the pod template",
    )?;

    // What it does: a restart, as its rollout writes it.
    let restart = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "team",
                     "annotations": {"ferrimesh.io/restarted-for": "86b80008e0348c92"}},
        "spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": "2026-12-02T12:00:00Z"}}}},
    });
    deployments
        .patch("web", &apply(), &Patch::Apply(&restart))
        .await?;
    let stored = Api::<Deployment>::namespaced(admin, "team")
        .get("web")
        .await?;
    let spec = stored.spec.unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        spec.template.spec.map(|s| s.containers[0].image.clone()),
        Some(Some("registry.example/web:1".to_owned()))
    );
    assert_eq!(
        stored
            .metadata
            .annotations
            .unwrap_or_default()
            .get("team")
            .map(String::as_str),
        Some("a")
    );
    Ok(())
}
