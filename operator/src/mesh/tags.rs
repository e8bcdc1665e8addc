//! A Mesh's revision tags (`spec.revisionTags`): one
//! MutatingWebhookConfiguration `ferrimesh-revision-tag-<tag>` per tag it
//! holds ([`ferrimesh_crds::tags`]), calling the webhook with the same
//! `caBundle` as the Mesh's own, owned by the Mesh.
//!
//! The writes are ordered so that no pod is ever matched by two webhooks:
//! - a tag is one object whichever Mesh holds it, so moving it rewrites
//!   that object in one write (a Mesh that lets a tag go deletes its
//!   configuration only when no other Mesh holds it);
//! - the tag `default` is written only once the default revision's own
//!   configuration has no entry left, and the default revision's entries
//!   come back only once the tag's configuration is gone: a pod created in
//!   between is admitted without a sidecar (the drift report lists it as
//!   uninjected), never injected twice.

use std::time::Duration;

use ferrimesh_crds::Mesh;
use ferrimesh_crds::mesh::DEFAULT_REVISION;
use ferrimesh_crds::selection::{
    TAG_LABEL, tag_configuration_name, tag_webhook_configurations, webhook_configuration_name,
};
use ferrimesh_crds::tags::{holders, refusal};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, Resource, ResourceExt};

use super::{Context, announce};
use crate::cluster::MANAGED_BY_LABEL;
use crate::{FIELD_MANAGER, Result};

/// How soon a Mesh waiting for another configuration to change looks again.
pub const WAIT: Duration = Duration::from_secs(2);

/// What configuring a Mesh's tags found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags {
    /// The tags whose configurations are applied.
    pub held: Vec<String>,
    /// The tags refused, each with why (`stable: held by the older Mesh a`).
    pub refused: Vec<String>,
    /// Why a tag is not applied yet, if one is waiting for another write.
    pub waiting: Option<String>,
}

/// Whether the default revision's own configuration must have no entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Yield {
    /// No: it has its entries.
    No,
    /// Another Mesh holds the tag `default`.
    TakenOver,
    /// No Mesh holds the tag any more, but its configuration is still
    /// there: the entries come back once it is gone.
    UntilTagGone,
}

/// Whether the default revision's own configuration must have no entry.
pub async fn default_revision_yields(
    configs: &Api<MutatingWebhookConfiguration>,
    meshes: &[Mesh],
) -> Result<Yield> {
    if ferrimesh_crds::tags::default_taken_over(meshes) {
        return Ok(Yield::TakenOver);
    }
    let tag = tag_configuration_name(DEFAULT_REVISION);
    Ok(match configs.get_opt(&tag).await? {
        Some(_) => Yield::UntilTagGone,
        None => Yield::No,
    })
}

/// Applies the configurations of the tags `mesh` holds and deletes those it
/// let go that no Mesh holds; `client_config` calls the webhook. A Mesh
/// being deleted holds nothing: its tags another Mesh holds are rewritten
/// for that Mesh at once, before garbage collection could take them.
pub async fn configure(
    mesh: &Mesh,
    meshes: &[Mesh],
    ctx: &Context,
    client_config: &WebhookClientConfig,
) -> Result<Tags> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let mut tags = Tags::default();
    if mesh.metadata.deletion_timestamp.is_some() {
        for tag in &mesh.spec.revision_tags {
            if let Some(holder) = holders(meshes).get(tag.as_str()) {
                apply(&configs, holder, tag, ctx, client_config).await?;
            }
        }
        release(&configs, mesh, meshes, ctx).await?;
        return Ok(tags);
    }
    for tag in &mesh.spec.revision_tags {
        if let Some(why) = refusal(tag, mesh, meshes) {
            tags.refused.push(format!("{tag}: {why}"));
            continue;
        }
        if tag == DEFAULT_REVISION {
            let own = configs
                .get_opt(&webhook_configuration_name(DEFAULT_REVISION))
                .await?;
            if own.is_some_and(|c| c.webhooks.is_some_and(|w| !w.is_empty())) {
                tags.waiting = Some(format!(
                    "tag {tag}: waiting for {} to drop its entries",
                    webhook_configuration_name(DEFAULT_REVISION)
                ));
                continue;
            }
        }
        apply(&configs, mesh, tag, ctx, client_config).await?;
        tags.held.push(tag.clone());
    }
    release(&configs, mesh, meshes, ctx).await?;
    Ok(tags)
}

/// Applies the configuration of `tag` for its holder `mesh`, with an Event
/// on the Mesh when its webhooks or its Mesh changed.
async fn apply(
    configs: &Api<MutatingWebhookConfiguration>,
    mesh: &Mesh,
    tag: &str,
    ctx: &Context,
    client_config: &WebhookClientConfig,
) -> Result<()> {
    let name = tag_configuration_name(tag);
    let single = Mesh {
        spec: ferrimesh_crds::MeshSpec {
            revision_tags: vec![tag.to_owned()],
            ..mesh.spec.clone()
        },
        ..mesh.clone()
    };
    let excluded = super::excluded(ctx);
    let Some(mut config) = tag_webhook_configurations(&single.spec, client_config, &excluded)
        .into_iter()
        .next()
    else {
        return Ok(());
    };
    config.metadata.owner_references = mesh.controller_owner_ref(&()).map(|r| vec![r]);
    let before = configs.get_opt(&name).await?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = configs
        .patch(&name, &params, &Patch::Apply(&config))
        .await?;
    let moved = before
        .as_ref()
        .is_some_and(|b| b.metadata.owner_references != applied.metadata.owner_references);
    if before.and_then(|b| b.webhooks) != applied.webhooks || moved {
        let note = format!("applied MutatingWebhookConfiguration {name} for revision tag {tag}");
        announce(ctx, mesh, "RevisionTagConfigured", note).await;
    }
    Ok(())
}

/// Deletes the tag configurations owned by `mesh` whose tag no Mesh holds
/// any more (one another Mesh holds is rewritten by it instead); a
/// configuration changed since it was read is left for the next reconcile.
async fn release(
    configs: &Api<MutatingWebhookConfiguration>,
    mesh: &Mesh,
    meshes: &[Mesh],
    ctx: &Context,
) -> Result<()> {
    let held = holders(meshes);
    let ours =
        ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER},{TAG_LABEL}"));
    let uid = mesh.metadata.uid.clone();
    for config in configs.list(&ours).await? {
        let owned = config
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| Some(&r.uid) == uid.as_ref());
        let tag = config.labels().get(TAG_LABEL).cloned().unwrap_or_default();
        if !owned || held.contains_key(tag.as_str()) {
            continue;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: config.resource_version(),
                uid: config.uid(),
            }),
            ..DeleteParams::default()
        };
        match configs.delete(&config.name_any(), &params).await {
            Ok(_) => {
                let note = format!(
                    "deleted MutatingWebhookConfiguration {} of revision tag {tag}",
                    config.name_any()
                );
                announce(ctx, mesh, "RevisionTagReleased", note).await;
            }
            Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The tag writes against a scripted API server (tower-test).

    use http::StatusCode;
    use serde_json::{Value, json};
    use tokio::sync::watch;

    use super::*;
    use crate::mesh::WebhookTarget;
    use crate::test_api::{self, Handle, answer, store, within};

    const CONFIGS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

    fn mesh(name: &str, revision: &str, tags: &[&str], created: &str) -> Mesh {
        serde_json::from_value(json!({
            "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": name, "uid": name, "creationTimestamp": created},
            "spec": {"revision": revision, "revisionTags": tags}
        }))
        .expect("mesh")
    }

    fn context(meshes: &[Mesh]) -> (Context, Handle) {
        let (client, handle) = test_api::client();
        let (_, cluster) = watch::channel(None);
        let (_, registrations) = watch::channel(std::collections::BTreeMap::new());
        let (_, lifecycle) = watch::channel(crate::lifecycle::Report::default());
        let context = Context {
            client: client.clone(),
            namespace: "ferrimesh-system".into(),
            webhook: WebhookTarget::Url("https://127.0.0.1:9443/inject".into()),
            entries: store(&[]),
            meshes: store(meshes),
            cluster,
            lifecycle,
            registrations,
            recorder: test_api::recorder(client),
        };
        (context, handle)
    }

    /// A webhook configuration as the API server returns it.
    fn config(name: &str, webhooks: usize, tag: Option<(&str, &str)>) -> Value {
        let webhook = json!({"name": "w.sidecar-injector.ferrimesh.io", "sideEffects": "None",
                             "admissionReviewVersions": ["v1"], "clientConfig": {}});
        let mut config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "uid": name, "resourceVersion": "5"},
            "webhooks": vec![webhook; webhooks]
        });
        if let Some((tag, owner)) = tag {
            config["metadata"]["labels"] = json!({"istio.io/tag": tag});
            config["metadata"]["ownerReferences"] = json!([{"apiVersion": "mesh.ferrimesh.io/v1alpha1",
                "kind": "Mesh", "name": owner, "uid": owner}]);
        }
        config
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
    }

    fn client_config() -> WebhookClientConfig {
        WebhookTarget::Url("https://127.0.0.1:9443/inject".into()).client_config("ca")
    }

    #[tokio::test]
    async fn the_tag_default_is_written_only_once_the_default_revision_has_no_entry() {
        let meshes = [
            mesh("main", "default", &[], "2026-01-01T00:00:00Z"),
            mesh("canary", "canary", &["default"], "2026-01-02T00:00:00Z"),
        ];
        let (ctx, mut handle) = context(&meshes);
        let own = format!("{CONFIGS}/ferrimesh-sidecar-injector");
        let tag = format!("{CONFIGS}/ferrimesh-revision-tag-default");
        let server = tokio::spawn(async move {
            let still = config("ferrimesh-sidecar-injector", 4, None);
            answer(&mut handle, "GET", &own, StatusCode::OK, still).await;
            answer(&mut handle, "GET", CONFIGS, StatusCode::OK, list(vec![])).await;
            let emptied = config("ferrimesh-sidecar-injector", 0, None);
            answer(&mut handle, "GET", &own, StatusCode::OK, emptied).await;
            let missing = test_api::failure(404, "NotFound");
            answer(&mut handle, "GET", &tag, StatusCode::NOT_FOUND, missing).await;
            let applied = config("ferrimesh-revision-tag-default", 4, None);
            let sent = answer(&mut handle, "PATCH", &tag, StatusCode::OK, applied).await;
            let event = answer(&mut handle, "POST", EVENTS, StatusCode::CREATED, json!({})).await;
            answer(&mut handle, "GET", CONFIGS, StatusCode::OK, list(vec![])).await;
            (sent, event)
        });
        let waiting = within(configure(&meshes[1], &meshes, &ctx, &client_config()))
            .await
            .expect("configured");
        assert!(waiting.held.is_empty(), "nothing written: {waiting:?}");
        assert!(
            waiting
                .waiting
                .as_deref()
                .is_some_and(|w| w.contains("ferrimesh-sidecar-injector")),
            "{waiting:?}"
        );
        let written = within(configure(&meshes[1], &meshes, &ctx, &client_config()))
            .await
            .expect("configured");
        let (sent, event) = server.await.expect("scripted requests");
        assert_eq!(written.held, ["default"]);
        assert_eq!(written.waiting, None);
        assert_eq!(sent["metadata"]["ownerReferences"][0]["uid"], "canary");
        assert_eq!(sent["metadata"]["labels"]["istio.io/rev"], "canary");
        assert_eq!(sent["webhooks"].as_array().map(Vec::len), Some(4));
        assert_eq!(event["reason"], "RevisionTagConfigured");
    }

    #[tokio::test]
    async fn a_tag_let_go_is_deleted_only_when_no_other_mesh_lists_it() {
        let meshes = [
            mesh("first", "default", &[], "2026-01-01T00:00:00Z"),
            mesh("second", "canary", &["stable"], "2026-01-02T00:00:00Z"),
        ];
        let (ctx, mut handle) = context(&meshes);
        let server = tokio::spawn(async move {
            let ours = list(vec![
                config(
                    "ferrimesh-revision-tag-stable",
                    2,
                    Some(("stable", "first")),
                ),
                config("ferrimesh-revision-tag-gone", 2, Some(("gone", "first"))),
                config(
                    "ferrimesh-revision-tag-theirs",
                    2,
                    Some(("theirs", "second")),
                ),
            ]);
            let (request, send) = handle.next_request().await.expect("a request");
            assert_eq!(request.uri().path(), CONFIGS);
            let query = request.uri().query().unwrap_or_default().to_owned();
            test_api::respond(send, StatusCode::OK, &ours);
            let path = format!("{CONFIGS}/ferrimesh-revision-tag-gone");
            let deleted = answer(&mut handle, "DELETE", &path, StatusCode::OK, json!({})).await;
            let event = answer(&mut handle, "POST", EVENTS, StatusCode::CREATED, json!({})).await;
            (query, deleted, event)
        });
        let tags = within(configure(&meshes[0], &meshes, &ctx, &client_config()))
            .await
            .expect("configured");
        let (query, deleted, event) = server.await.expect("scripted requests");
        assert_eq!(tags, Tags::default());
        assert!(
            query.contains(
                "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dferrimesh-operator%2Cistio.io%2Ftag"
            ),
            "{query}"
        );
        assert_eq!(
            deleted["preconditions"],
            json!({"resourceVersion": "5", "uid": "ferrimesh-revision-tag-gone"}),
            "only the configuration as it was read"
        );
        assert_eq!(event["reason"], "RevisionTagReleased");
    }
}
