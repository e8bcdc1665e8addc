//! The Mesh controller: the webhook's certificate, the
//! MutatingWebhookConfiguration, namespace labels and the Mesh's status
//! (operator.md sections 1, 2, 3 and 5). Level-triggered: every reconcile
//! computes the whole desired state and applies what differs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrimesh_crds::selection::{SYSTEM_NAMESPACES, webhook_configuration};
use ferrimesh_crds::{Mesh, MeshStatus};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::cluster::cert_manager;
use crate::cluster::certificate_store::{self, Lifetimes};
use crate::cluster::certificates::Renewal;
use crate::cluster::namespaces::{desired_labels, managed_by_operator, selecting_mesh, up_to_date};
use crate::workloads::registered_entry::RegisteredEntry;
use crate::{Error, FIELD_MANAGER, Result};

/// The finalizer that lets a deleted Mesh release its namespaces and
/// webhook configuration first.
pub const FINALIZER: &str = "mesh.ferrimesh.io/cleanup";

/// Where the API server reaches the webhook.
#[derive(Clone, Debug)]
pub enum WebhookTarget {
    /// A Service in the cluster (port, path `/inject`).
    Service {
        /// Service name.
        name: String,
        /// Service namespace.
        namespace: String,
        /// Service port.
        port: i32,
    },
    /// A URL (local control planes).
    Url(String),
}

impl WebhookTarget {
    /// The names the serving certificate must cover.
    pub fn certificate_names(&self) -> Vec<String> {
        match self {
            Self::Service {
                name, namespace, ..
            } => {
                vec![
                    format!("{name}.{namespace}.svc"),
                    format!("{name}.{namespace}.svc.cluster.local"),
                ]
            }
            Self::Url(url) => {
                let host = url
                    .split("://")
                    .nth(1)
                    .unwrap_or(url)
                    .split(['/', '?'])
                    .next()
                    .unwrap_or_default();
                let host = match host.rsplit_once(':') {
                    Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                    _ => host,
                };
                vec![
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                ]
            }
        }
    }

    fn client_config(&self, ca_bundle: &str) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_bundle.as_bytes().to_vec()));
        match self {
            Self::Service {
                name,
                namespace,
                port,
            } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    path: Some("/inject".to_owned()),
                    port: Some(*port),
                }),
                url: None,
            },
            Self::Url(url) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(url.clone()),
            },
        }
    }
}

/// Who issues the webhook's serving certificate.
#[derive(Clone, Copy, Debug)]
pub enum CertificateIssuer {
    /// The operator: its own CA and a serving certificate, with these lifetimes.
    Operator(Lifetimes),
    /// cert-manager writes the serving Secret; the operator publishes its CA.
    CertManager,
}

/// What the Mesh controller needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's own namespace (never labelled; holds the Secrets).
    pub namespace: String,
    /// Where the webhook is.
    pub webhook: WebhookTarget,
    /// Who issues the webhook's certificate.
    pub issuer: CertificateIssuer,
    /// Every Mesh, from the controller's cache.
    pub meshes: Store<Mesh>,
    /// Every Namespace, from a cache synced before the first reconcile.
    pub namespaces: Store<Namespace>,
    /// The WorkloadEntries of ours, from a cache synced before the first
    /// reconcile (counted per revision).
    pub entries: Store<RegisteredEntry>,
    /// Publishes an Event for every change the operator makes.
    pub recorder: Recorder,
}

/// Publishes an Event about `mesh`; a failure to publish is logged, not fatal.
async fn event(ctx: &Context, mesh: &Mesh, reason: &str, action: &str, note: String) {
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &mesh.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reconciles one Mesh.
pub async fn reconcile(mesh: Arc<Mesh>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, mesh, |event| async {
        match event {
            Event::Apply(mesh) => match apply(&mesh, &ctx).await {
                Ok(action) => Ok(action),
                Err(error) => {
                    report_failure(&mesh, &ctx, &error).await;
                    Err(error)
                }
            },
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

fn all_meshes(ctx: &Context, current: &Mesh) -> Vec<Mesh> {
    let mut meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
    // The cache may lag behind the object being reconciled.
    meshes.retain(|m| m.metadata.name != current.metadata.name);
    meshes.push(current.clone());
    meshes
}

/// What labelling the namespaces did.
#[derive(Default)]
struct Labelled {
    /// How many namespaces each Mesh (by name) labels.
    counts: BTreeMap<String, i32>,
    /// Namespaces whose labels were applied, with what they now carry from us.
    changed: Vec<(String, BTreeMap<String, String>)>,
}

/// Applies the namespace labels every Mesh wants.
async fn label_namespaces(ctx: &Context, meshes: &[Mesh]) -> Result<Labelled> {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let mut labelled = Labelled::default();
    let mut namespaces = ctx.namespaces.state();
    namespaces.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for namespace in namespaces {
        let namespace = &*namespace;
        if let Some(mesh) = selecting_mesh(namespace, meshes, &ctx.namespace) {
            *labelled.counts.entry(mesh.name_any()).or_insert(0) += 1;
        }
        let desired = desired_labels(namespace, meshes, &ctx.namespace);
        if up_to_date(namespace, &desired)
            || (desired.is_empty() && !managed_by_operator(namespace))
        {
            continue;
        }
        let name = namespace.name_any();
        let patch = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": desired}});
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %name, labels = ?desired, "namespace labels applied");
                labelled.changed.push((name, desired));
            }
            // Someone else owns the label with another value: theirs stands.
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                tracing::warn!(namespace = %name, error = %status.message, "namespace label owned by another manager; left alone")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(labelled)
}

async fn announce_labels(ctx: &Context, mesh: &Mesh, labelled: &Labelled) {
    for (namespace, labels) in &labelled.changed {
        let (reason, note) = if labels.is_empty() {
            (
                "NamespaceReleased",
                format!("removed the injection label from namespace {namespace}"),
            )
        } else {
            (
                "NamespaceLabelled",
                format!("labelled namespace {namespace} with {labels:?}"),
            )
        };
        event(ctx, mesh, reason, "Label", note).await;
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    old: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

async fn apply(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let now = now();
    let generation = mesh.metadata.generation;
    let old_conditions = mesh
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let config_name = ferrimesh_crds::selection::webhook_configuration_name(&mesh.spec.revision);
    let before = configs
        .get_opt(&config_name)
        .await?
        .and_then(|c| c.webhooks);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let certificate = match ctx.issuer {
        CertificateIssuer::Operator(lifetimes) => {
            certificate_store::reconcile(
                &secrets,
                &ctx.namespace,
                &ctx.webhook.certificate_names(),
                lifetimes,
                now,
            )
            .await?
        }
        CertificateIssuer::CertManager => {
            let published = before
                .iter()
                .flatten()
                .find_map(|w| w.client_config.ca_bundle.as_ref())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default();
            cert_manager::read(&secrets, &ctx.namespace, &published, now).await?
        }
    };

    let mut excluded: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    excluded.push(&ctx.namespace);
    let mut config = webhook_configuration(
        &mesh.spec,
        &ctx.webhook.client_config(&certificate.ca_bundle),
        &excluded,
    );
    config.metadata.owner_references = mesh.controller_owner_ref(&()).map(|r| vec![r]);
    let applied = configs
        .patch(
            &config_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config),
        )
        .await?;
    match certificate.renewal {
        Renewal::Nothing => {}
        Renewal::Serving => {
            event(
                ctx,
                mesh,
                "CertificateIssued",
                "Issue",
                "issued a new webhook serving certificate".into(),
            )
            .await
        }
        Renewal::CaAndServing => {
            event(
                ctx,
                mesh,
                "CAIssued",
                "Issue",
                "issued a new webhook CA and serving certificate".into(),
            )
            .await
        }
    }
    // Both as the API server holds them, defaults filled in: only a real
    // change is announced (the desired webhooks lack the defaults, and
    // compared with them every reconcile looked like a change).
    if before != applied.webhooks {
        let note = format!("applied MutatingWebhookConfiguration {config_name}");
        event(ctx, mesh, "WebhookConfigured", "Apply", note).await;
    }

    let all = label_namespaces(ctx, &all_meshes(ctx, mesh)).await?;
    announce_labels(ctx, mesh, &all).await;
    let labelled = all.counts.get(&mesh.name_any()).copied().unwrap_or(0);
    let registered = ctx
        .entries
        .state()
        .iter()
        .filter(|e| e.ours && e.revision.as_ref() == Some(&mesh.spec.revision))
        .count() as i32;

    let expiry = jiff::Timestamp::from_second(certificate.serving_not_after)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let conditions = vec![
        condition(
            "Ready",
            true,
            "Reconciled",
            "webhook configured, certificate valid, namespaces labelled".into(),
            generation,
            &old_conditions,
        ),
        condition(
            "WebhookConfigured",
            true,
            "Applied",
            format!("MutatingWebhookConfiguration {config_name}"),
            generation,
            &old_conditions,
        ),
        condition(
            "CertificateReady",
            true,
            "Valid",
            format!("serving certificate valid until {expiry}"),
            generation,
            &old_conditions,
        ),
        condition(
            "NamespacesLabelled",
            true,
            "Applied",
            format!("{labelled} namespaces labelled"),
            generation,
            &old_conditions,
        ),
    ];
    let status = MeshStatus {
        observed_generation: generation,
        conditions,
        labelled_namespaces: labelled,
        registered_workloads: registered,
    };
    write_status(ctx, mesh, &status).await?;

    let until_renewal = u64::try_from(certificate.next_renewal - now)
        .unwrap_or(0)
        .max(1);
    // A resync every 30 s at the latest: a watch that silently stops
    // delivering (seen after an etcd restart) delays a change by no more.
    Ok(Action::requeue(Duration::from_secs(until_renewal.min(30))))
}

async fn write_status(ctx: &Context, mesh: &Mesh, status: &MeshStatus) -> Result<()> {
    let api: Api<Mesh> = Api::all(ctx.client.clone());
    let patch =
        json!({"apiVersion": Mesh::api_version(&()), "kind": Mesh::kind(&()), "status": status});
    api.patch_status(
        &mesh.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Puts a failed reconcile into the Mesh's status: `Ready` turns False with
/// the error, and so does `CertificateReady` when the certificate is the
/// cause; the rest stays as last reconciled. A failure to write is logged
/// (the reconcile is retried anyway).
async fn report_failure(mesh: &Mesh, ctx: &Context, error: &Error) {
    let old = mesh.status.clone().unwrap_or_default();
    let generation = mesh.metadata.generation;
    let message = error.to_string();
    let mut failed = vec![];
    if matches!(error, Error::Certificate(_)) {
        failed.push(("Ready", "CertificateNotReady"));
        failed.push(("CertificateReady", "NotReady"));
    } else {
        failed.push(("Ready", "ReconcileFailed"));
    }
    let mut conditions = old.conditions.clone();
    for (type_, reason) in failed {
        let new = condition(
            type_,
            false,
            reason,
            message.clone(),
            generation,
            &old.conditions,
        );
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => *c = new,
            None => conditions.push(new),
        }
    }
    if conditions == old.conditions {
        return;
    }
    let status = MeshStatus { conditions, ..old };
    if let Err(e) = write_status(ctx, mesh, &status).await {
        tracing::warn!(mesh = %mesh.name_any(), error = %e, "could not report the failure in the Mesh's status");
    }
}

async fn cleanup(mesh: &Mesh, ctx: &Context) -> Result<Action> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let name = ferrimesh_crds::selection::webhook_configuration_name(&mesh.spec.revision);
    match configs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    // The Mesh carries a deletion timestamp now: it selects nothing.
    let released = label_namespaces(ctx, &all_meshes(ctx, mesh)).await?;
    announce_labels(ctx, mesh, &released).await;
    tracing::info!(mesh = %mesh.name_any(), "released namespaces and webhook configuration");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::WebhookTarget;

    #[test]
    fn certificate_names_follow_the_target() {
        let service = WebhookTarget::Service {
            name: "ferrimesh-webhook".into(),
            namespace: "ferrimesh-system".into(),
            port: 443,
        };
        assert_eq!(
            service.certificate_names(),
            [
                "ferrimesh-webhook.ferrimesh-system.svc",
                "ferrimesh-webhook.ferrimesh-system.svc.cluster.local"
            ]
        );
        assert_eq!(
            WebhookTarget::Url("https://127.0.0.1:9443/inject".into()).certificate_names(),
            ["127.0.0.1"]
        );
        assert_eq!(
            WebhookTarget::Url("https://[::1]:9443/inject".into()).certificate_names(),
            ["::1"]
        );
        assert_eq!(
            WebhookTarget::Url("https://webhook.example/inject".into()).certificate_names(),
            ["webhook.example"]
        );
    }
}

#[cfg(test)]
mod reconcile_tests {
    //! Namespace labelling against a scripted API server (tower-test).

    use std::time::Duration;

    use ferrimesh_crds::MeshSpec;
    use http::StatusCode;
    use kube::runtime::events::Reporter;
    use kube::runtime::reflector;
    use serde_json::{Value, json};

    use super::*;
    use crate::cluster::certificate_store::Lifetimes;
    use crate::test_api::{self, Handle, answer, failure};

    fn context(namespaces: Value) -> (Context, Handle) {
        let (client, handle) = test_api::client();
        let (meshes, _writer) = reflector::store();
        let (namespace_cache, mut writer) = reflector::store();
        let namespaces: Vec<Namespace> = serde_json::from_value(namespaces).expect("namespaces");
        for namespace in namespaces {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(namespace));
        }
        let (entries, _writer) = reflector::store();
        let context = Context {
            client: client.clone(),
            namespace: "ferrimesh-system".into(),
            webhook: WebhookTarget::Url("https://127.0.0.1:9443/inject".into()),
            issuer: CertificateIssuer::Operator(Lifetimes {
                ca: 3600,
                serving: 600,
            }),
            meshes,
            namespaces: namespace_cache,
            entries,
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
        };
        (context, handle)
    }

    fn mesh() -> Mesh {
        let spec = MeshSpec {
            namespace_selector: Some(
                serde_json::from_value(json!({"matchLabels": {"mesh": "on"}})).expect("selector"),
            ),
            ..MeshSpec::default()
        };
        Mesh::new("default", spec)
    }

    fn owned_by_operator(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels, "managedFields": [{
            "manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:istio-injection": {}}}}}]}})
    }

    #[tokio::test]
    async fn labels_selected_namespaces_releases_the_rest_and_skips_the_up_to_date() {
        let (ctx, mut handle) = context(json!([
            {"metadata": {"name": "fresh", "labels": {"mesh": "on"}}},
            owned_by_operator("current", json!({"mesh": "on", "istio-injection": "enabled"})),
            owned_by_operator("left", json!({"istio-injection": "enabled"})),
            {"metadata": {"name": "untouched", "labels": {"team": "a"}}},
            {"metadata": {"name": "kube-system", "labels": {"mesh": "on"}}}
        ]));
        let server = tokio::spawn(async move {
            let labelled = answer(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/fresh",
                StatusCode::OK,
                json!({}),
            )
            .await;
            assert_eq!(
                labelled["metadata"]["labels"],
                json!({"istio-injection": "enabled"})
            );
            let released = answer(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/left",
                StatusCode::CONFLICT,
                failure(409, "Conflict"),
            )
            .await;
            assert_eq!(
                released["metadata"]["labels"],
                json!({}),
                "an empty set releases the operator's label"
            );
        });
        let result =
            tokio::time::timeout(Duration::from_secs(5), label_namespaces(&ctx, &[mesh()])).await;
        let labelled = result
            .expect("no unexpected API call")
            .expect("a conflict is left to its owner");
        server.await.expect("scripted requests");
        assert_eq!(
            labelled.counts.get("default"),
            Some(&2),
            "fresh and current"
        );
        let changed: Vec<&str> = labelled.changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(changed, ["fresh"], "the conflicting release did not happen");
    }

    #[tokio::test]
    async fn reports_a_failed_write() {
        let (ctx, mut handle) =
            context(json!([{"metadata": {"name": "new", "labels": {"mesh": "on"}}}]));
        let server = tokio::spawn(async move {
            answer(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/new",
                StatusCode::FORBIDDEN,
                failure(403, "Forbidden"),
            )
            .await;
        });
        let result =
            tokio::time::timeout(Duration::from_secs(5), label_namespaces(&ctx, &[mesh()])).await;
        assert!(matches!(
            result.expect("no unexpected API call"),
            Err(Error::Kube(_))
        ));
        server.await.expect("scripted requests");
    }
}
