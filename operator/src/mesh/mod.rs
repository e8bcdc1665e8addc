//! Each Mesh's own reconciler: its MutatingWebhookConfiguration (with the
//! CA bundle the cluster reconciler published) and its status. It touches
//! nothing another Mesh shares: the certificate and the namespace labels are
//! [`crate::cluster`]'s. Level-triggered: every reconcile computes the whole
//! desired state and applies what differs.

use std::sync::Arc;
use std::time::Duration;

use ferrimesh_crds::Mesh;
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::mesh::DEFAULT_REVISION;
use ferrimesh_crds::selection::{webhook_configuration, webhook_configuration_name};
use ferrimesh_crds::tags::revision_holder;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::cluster::{ClusterState, Failure};
use crate::lifecycle::Report;
use crate::workloads::registered_entry::RegisteredEntry;
use crate::workloads::target::Registration;
use crate::{Error, FIELD_MANAGER, Result};

pub mod status;
pub mod tags;
mod webhook;

pub use webhook::WebhookTarget;

/// The finalizer that lets a deleted Mesh delete its webhook configuration
/// first.
pub const FINALIZER: &str = "mesh.ferrimesh.io/cleanup";

/// The longest time between two reconciles of a Mesh: a watch that silently
/// stops delivering (seen after an etcd restart) delays a change by no more.
const RESYNC: Duration = Duration::from_secs(30);

/// What the Mesh controller needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's own namespace, which no webhook entry selects.
    pub namespace: String,
    /// Where the webhook is.
    pub webhook: WebhookTarget,
    /// The WorkloadEntries of ours, from a cache synced before the first
    /// reconcile (counted per revision).
    pub entries: Store<RegisteredEntry>,
    /// Every Mesh (which Mesh holds which revision tag).
    pub meshes: Store<Mesh>,
    /// What the cluster reconciler published last (`None` before its first
    /// reconcile).
    pub cluster: watch::Receiver<Option<ClusterState>>,
    /// What the lifecycle loop found last: pods to restart, rollouts.
    pub lifecycle: watch::Receiver<Report>,
    /// Publishes an Event for every change the operator makes.
    pub recorder: Recorder,
    /// The last sweep's registration of each Mesh revision that pushes its
    /// entries into a config cluster.
    pub registrations: watch::Receiver<std::collections::BTreeMap<String, Registration>>,
}

/// Reconciles one Mesh.
pub async fn reconcile(mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, mesh, |event| async {
        match event {
            Event::Apply(mesh) => apply(&mesh, &ctx).await,
            Event::Cleanup(mesh) => cleanup(&mesh, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(mesh: Arc<Mesh>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(mesh = %mesh.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

async fn apply(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    // Before the cluster reconciler's first outcome there is nothing to
    // configure; its first publication reconciles every Mesh.
    let Some(cluster) = ctx.cluster.borrow().clone() else {
        return Ok(Action::await_change());
    };
    let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
    // An older Mesh of the same revision serves it: this one writes no
    // webhook configuration (both would write the same object).
    let served_by = revision_holder(&mesh.spec.revision, &meshes)
        .filter(|holder| holder.metadata.name != mesh.metadata.name)
        .map(ResourceExt::name_any);
    let (applied, tags) = match (&cluster.certificate, &served_by) {
        (Ok(certificate), None) => {
            let client_config = ctx.webhook.client_config(&certificate.ca_bundle);
            let applied = configure_webhook(mesh, &meshes, ctx, &client_config).await;
            let tags = tags::configure(mesh, &meshes, ctx, &client_config).await;
            (Some(applied), Some(tags))
        }
        _ => (None, None),
    };
    // Both the webhook configuration and the revision tags wait for it.
    let served = served_by.as_ref().map(|holder| Failure {
        reason: "RevisionServedByOlderMesh".into(),
        message: format!(
            "revision {} is served by the older Mesh {holder}; this Mesh configures nothing until it is gone",
            mesh.spec.revision
        ),
    });
    let webhook = match &served {
        Some(failure) => Some(Err(failure.clone())),
        None => applied.as_ref().map(|r| match r {
            Ok((name, _)) => Ok(name.clone()),
            Err(error) => Err(Failure::from(error)),
        }),
    };
    let name = mesh.name_any();
    let registration = registration(mesh, ctx);
    let registered = match &registration {
        None => ctx
            .entries
            .state()
            .iter()
            .filter(|e| e.ours && e.revision.as_ref() == Some(&mesh.spec.revision))
            .count() as i32,
        Some(Ok(count)) => *count,
        // Unknown while the config cluster cannot be read: the last count stays.
        Some(Err(_)) => mesh.status.as_ref().map_or(0, |s| s.registered_workloads),
    };
    let outcome = status::Outcome {
        certificate: &cluster.certificate,
        webhook,
        tags: match &served {
            Some(failure) => Some(Err(failure.clone())),
            None => tags.as_ref().map(|r| r.as_ref().map_err(Failure::from)),
        },
        labelling: cluster.labelling.as_ref(),
        labelled: cluster.labelled.get(&name).copied().unwrap_or(0),
        ambient: cluster.ambient.get(&name).map_or(&[], Vec::as_slice),
        pod_security: cluster.pod_security.get(&name).map_or(&[], Vec::as_slice),
        registered,
        registration,
        drift: ctx.lifecycle.borrow().for_mesh(mesh),
    };
    let status = status::status(mesh, &outcome);
    if mesh.status.as_ref() != Some(&status) {
        let api: Api<Mesh> = Api::all(ctx.client.clone());
        let patch = json!({"apiVersion": Mesh::api_version(&()), "kind": Mesh::kind(&()), "status": status});
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&name, &params, &Patch::Apply(&patch))
            .await?;
    }
    let waiting = matches!(&applied, Some(Ok((_, true))))
        || matches!(&tags, Some(Ok(t)) if t.waiting.is_some());
    if let Some(Err(error)) = applied {
        return Err(error);
    }
    if let Some(Err(error)) = tags {
        return Err(error);
    }
    // A write that waits for another configuration looks again soon.
    Ok(Action::requeue(if waiting { tags::WAIT } else { RESYNC }))
}

/// The registration of a Mesh that pushes its entries into a config
/// cluster, as the last sweep found it; `None` for one that registers them
/// beside its pods.
fn registration(mesh: &Mesh, ctx: &Context) -> Option<Registration> {
    let settings = &mesh.spec.workload_registration;
    settings.target.as_ref().filter(|_| settings.enabled)?;
    let swept = ctx.registrations.borrow().get(&mesh.spec.revision).cloned();
    Some(swept.unwrap_or_else(|| {
        Err(Failure {
            reason: "TargetPending".into(),
            message: "the config cluster has not been reached yet".into(),
        })
    }))
}

/// The namespaces no webhook entry selects: the system ones and the
/// operator's own.
fn excluded(ctx: &Context) -> Vec<&str> {
    let mut excluded: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    excluded.push(&ctx.namespace);
    excluded
}

/// An Event on `mesh` for a change the operator made; a failure to publish
/// is logged, not fatal.
async fn announce(ctx: &Context, mesh: &Mesh, reason: &str, note: String) {
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Apply".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &mesh.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

/// Applies the Mesh's webhook configuration calling `client_config`, with
/// an Event on the Mesh when its webhooks changed; returns what its
/// condition says of it and whether it waits for the revision tag
/// `default`'s configuration to go (the default revision's configuration
/// has no entry while another Mesh holds that tag or its configuration is
/// still there).
async fn configure_webhook(
    mesh: &Mesh,
    meshes: &[Mesh],
    ctx: &Context,
    client_config: &WebhookClientConfig,
) -> Result<(String, bool)> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let name = webhook_configuration_name(&mesh.spec.revision);
    let before = configs.get_opt(&name).await?.and_then(|c| c.webhooks);
    let mut config = webhook_configuration(&mesh.spec, client_config, &excluded(ctx));
    let yields = if mesh.spec.revision == DEFAULT_REVISION {
        tags::default_revision_yields(&configs, meshes).await?
    } else {
        tags::Yield::No
    };
    if yields != tags::Yield::No {
        config.webhooks = Some(Vec::new());
    }
    config.metadata.owner_references = mesh.controller_owner_ref(&()).map(|r| vec![r]);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = configs
        .patch(&name, &params, &Patch::Apply(&config))
        .await?;
    // Both as the API server holds them, defaults filled in: only a real
    // change is announced (the desired webhooks lack the defaults, and
    // compared with them every reconcile looked like a change).
    if before != applied.webhooks {
        let note = format!("applied MutatingWebhookConfiguration {name}");
        announce(ctx, mesh, "WebhookConfigured", note).await;
    }
    if yields == tags::Yield::No {
        return Ok((name, false));
    }
    let note =
        format!("{name}, without entries: the revision tag {DEFAULT_REVISION} selects its pods");
    Ok((note, yields == tags::Yield::UntilTagGone))
}

/// Deletes the Mesh's webhook configuration and those of its revision tags
/// no other Mesh holds (one another Mesh holds is rewritten for it, as is
/// the revision's configuration when another Mesh of the revision is
/// left). Its namespaces are released by the cluster reconciler, which
/// counts no Mesh being deleted.
async fn cleanup(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let certificate = ctx
        .cluster
        .borrow()
        .as_ref()
        .and_then(|c| c.certificate.as_ref().ok().cloned());
    let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
    let next = revision_holder(&mesh.spec.revision, &meshes);
    if let Some(certificate) = certificate {
        let client_config = ctx.webhook.client_config(&certificate.ca_bundle);
        tags::configure(mesh, &meshes, ctx, &client_config).await?;
        if let Some(next) = next {
            // Owned by the next Mesh before this one goes, so that garbage
            // collection does not take it.
            configure_webhook(next, &meshes, ctx, &client_config).await?;
            tracing::info!(mesh = %mesh.name_any(), next = %next.name_any(), "the revision's webhook configuration handed over");
            return Ok(Action::await_change());
        }
    } else if next.is_some() {
        return Err(Error::Finalizer(
            "no CA bundle yet to hand the webhook configuration over to the next Mesh of the revision".into(),
        ));
    }
    let name = webhook_configuration_name(&mesh.spec.revision);
    match configs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(mesh = %mesh.name_any(), "deleted the webhook configuration");
    Ok(Action::await_change())
}
