//! Each Mesh's own reconciler: its MutatingWebhookConfiguration (with the
//! CA bundle the cluster reconciler published) and its status. It touches
//! nothing another Mesh shares: the certificate and the namespace labels are
//! [`crate::cluster`]'s. Level-triggered: every reconcile computes the whole
//! desired state and applies what differs.

use std::sync::Arc;
use std::time::Duration;

use ferrimesh_crds::Mesh;
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::selection::{webhook_configuration, webhook_configuration_name};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
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
use crate::{Error, FIELD_MANAGER, Result};

pub mod status;
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
    /// What the cluster reconciler published last (`None` before its first
    /// reconcile).
    pub cluster: watch::Receiver<Option<ClusterState>>,
    /// What the lifecycle loop found last: pods to restart, rollouts.
    pub lifecycle: watch::Receiver<Report>,
    /// Publishes an Event for every change the operator makes.
    pub recorder: Recorder,
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
    let applied = match &cluster.certificate {
        Ok(certificate) => Some(configure_webhook(mesh, ctx, &certificate.ca_bundle).await),
        Err(_) => None,
    };
    let name = mesh.name_any();
    let registered = ctx
        .entries
        .state()
        .iter()
        .filter(|e| e.ours && e.revision.as_ref() == Some(&mesh.spec.revision))
        .count() as i32;
    let outcome = status::Outcome {
        certificate: &cluster.certificate,
        webhook: applied.as_ref().map(|r| match r {
            Ok(name) => Ok(name.clone()),
            Err(error) => Err(Failure::from(error)),
        }),
        labelling: cluster.labelling.as_ref(),
        labelled: cluster.labelled.get(&name).copied().unwrap_or(0),
        registered,
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
    if let Some(Err(error)) = applied {
        return Err(error);
    }
    Ok(Action::requeue(RESYNC))
}

/// Applies the Mesh's webhook configuration trusting `ca_bundle`, with an
/// Event on the Mesh when its webhooks changed; returns its name.
async fn configure_webhook(mesh: &Mesh, ctx: &Context, ca_bundle: &str) -> Result<String> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let name = webhook_configuration_name(&mesh.spec.revision);
    let before = configs.get_opt(&name).await?.and_then(|c| c.webhooks);
    let mut excluded: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    excluded.push(&ctx.namespace);
    let mut config =
        webhook_configuration(&mesh.spec, &ctx.webhook.client_config(ca_bundle), &excluded);
    config.metadata.owner_references = mesh.controller_owner_ref(&()).map(|r| vec![r]);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = configs
        .patch(&name, &params, &Patch::Apply(&config))
        .await?;
    // Both as the API server holds them, defaults filled in: only a real
    // change is announced (the desired webhooks lack the defaults, and
    // compared with them every reconcile looked like a change).
    if before != applied.webhooks {
        let event = KubeEvent {
            type_: EventType::Normal,
            reason: "WebhookConfigured".into(),
            note: Some(format!("applied MutatingWebhookConfiguration {name}")),
            action: "Apply".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &mesh.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
    Ok(name)
}

/// Deletes the Mesh's webhook configuration. Its namespaces are released by
/// the cluster reconciler, which counts no Mesh being deleted.
async fn cleanup(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let name = webhook_configuration_name(&mesh.spec.revision);
    match configs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(mesh = %mesh.name_any(), "deleted the webhook configuration");
    Ok(Action::await_change())
}
