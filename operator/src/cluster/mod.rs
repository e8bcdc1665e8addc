//! What every Mesh shares, kept by ONE reconciler with a single key and
//! nothing running beside it: the webhook's CA and serving certificate
//! (Secrets in the operator's namespace, or cert-manager's), and the
//! injection labels of every namespace the Meshes select, with an Event on
//! each Namespace it changes. It reports, per Mesh, the selected namespaces
//! it leaves unlabelled because they are in ambient mode, and those it
//! labels whose Pod Security level refuses what is injected, each once as
//! an Event on the Namespace.
//!
//! It runs after every change of a Mesh, a Namespace or one of the two
//! Secrets, at the next certificate renewal, and every 30 seconds at the
//! latest; a failure is retried after 15 seconds. What it found is
//! published as a [`ClusterState`]: each Mesh's reconciler reads the CA
//! bundle from there (so every webhook configuration trusts the one CA) and
//! reports a failure in the Mesh's status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrimesh_crds::ambient::AMBIENT;
use ferrimesh_crds::istio::DATAPLANE_MODE;
use ferrimesh_crds::pod_security::ENFORCE_LABEL;
use ferrimesh_crds::{Mesh, ProxyProfile};
use futures::{Stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use self::certificate_store::{Current, Lifetimes, SERVING_SECRET};
use self::certificates::Renewal;
use self::namespaces::{
    desired_labels, is_ambient, managed_by_operator, selecting_mesh, up_to_date,
};
use crate::mesh::WebhookTarget;
use crate::runtime::admin::Metrics;
use crate::runtime::profiles;
use crate::{Error, FIELD_MANAGER, Result};

pub mod cert_manager;
pub mod certificate_store;
pub mod certificates;
pub mod namespaces;
pub mod pod_security;

/// The label on every webhook configuration the operator writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Who issues the webhook's serving certificate.
#[derive(Clone, Copy, Debug)]
pub enum CertificateIssuer {
    /// The operator: its own CA and a serving certificate, with these lifetimes.
    Operator(Lifetimes),
    /// cert-manager writes the serving Secret; the operator publishes its CA.
    CertManager,
}

/// Why the cluster reconciler failed, as a Mesh's condition says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// CamelCase reason ([`Error::reason`]).
    pub reason: String,
    /// The error.
    pub message: String,
}

impl From<&Error> for Failure {
    fn from(error: &Error) -> Self {
        Self {
            reason: error.reason(),
            message: error.to_string(),
        }
    }
}

/// The certificate every webhook configuration trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// PEM bundle for the webhook configurations' `caBundle`.
    pub ca_bundle: String,
    /// When the serving certificate expires (Unix seconds).
    pub serving_not_after: i64,
}

/// What the cluster reconciler found, for the Meshes' reconcilers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    /// The certificate to trust, or why there is none.
    pub certificate: std::result::Result<Certificate, Failure>,
    /// How many namespaces each Mesh (by name) labels.
    pub labelled: BTreeMap<String, i32>,
    /// Why a namespace could not be labelled, if one could not.
    pub labelling: Option<Failure>,
    /// The ambient namespaces each Mesh (by name) selects and leaves
    /// unlabelled, by name.
    pub ambient: BTreeMap<String, Vec<String>>,
    /// The namespaces each Mesh (by name) labels whose Pod Security level
    /// refuses what it injects, each described with its level and fixes
    /// ([`pod_security::describe`]).
    pub pod_security: BTreeMap<String, Vec<String>>,
}

/// What the cluster reconciler needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's own namespace (never labelled; holds the Secrets).
    pub namespace: String,
    /// Where the webhook is: the names its certificate covers.
    pub webhook: WebhookTarget,
    /// Who issues the webhook's certificate.
    pub issuer: CertificateIssuer,
    /// Every Mesh, from a cache synced before the first reconcile.
    pub meshes: Store<Mesh>,
    /// Every Namespace, from a cache synced before the first reconcile.
    pub namespaces: Store<Namespace>,
    /// Every ProxyProfile, from a cache synced before the first reconcile
    /// (the Pod Security report layers a namespace's over its Mesh).
    pub profiles: Store<ProxyProfile>,
    /// Publishes an Event for every change.
    pub recorder: Recorder,
}

/// How long a failed reconcile waits before it is retried.
const RETRY: Duration = Duration::from_secs(15);
/// The longest time between two reconciles: a watch that silently stops
/// delivering (seen after an etcd restart) delays a change by no more.
const RESYNC: Duration = Duration::from_secs(30);

/// Reconciles at once, then after each of `triggers`, at the next renewal
/// or retry, publishing every outcome to `publish`; ends when `triggers`
/// does. One loop: never two reconciles at a time.
pub async fn run(
    ctx: Context,
    triggers: impl Stream<Item = ()>,
    publish: watch::Sender<Option<ClusterState>>,
    metrics: Metrics,
) {
    tokio::pin!(triggers);
    let mut written = Written::default();
    loop {
        let (state, next) = reconcile(&ctx, &mut written).await;
        let failed = state.certificate.is_err() || state.labelling.is_some();
        metrics.count("cluster", !failed);
        publish.send_if_modified(|published| {
            let changed = published.as_ref() != Some(&state);
            *published = Some(state);
            changed
        });
        tokio::select! {
            trigger = triggers.next() => if trigger.is_none() { return },
            () = tokio::time::sleep(next) => {}
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the last reconciles did, so that nothing is done or announced
/// twice.
#[derive(Debug, Default)]
pub struct Written {
    /// The labels applied, by namespace, with the resourceVersion the cache
    /// showed then: until the cache shows another version, it has not seen
    /// the write, and the namespace is not labelled (nor announced) twice.
    applied: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// The ambient namespaces announced as left unlabelled.
    ambient: BTreeSet<String>,
    /// The Pod Security reports announced, by namespace.
    pod_security: BTreeMap<String, String>,
}

/// One reconcile: the certificate, then the namespace labels (a failure of
/// one does not stop the other). Returns what it found and when to look
/// again.
pub async fn reconcile(ctx: &Context, written: &mut Written) -> (ClusterState, Duration) {
    let now = now();
    let certificate = match certificate(ctx, now).await {
        Ok(current) => {
            announce_certificate(ctx, current.renewal).await;
            Ok(current)
        }
        Err(error) => {
            tracing::warn!(%error, "the webhook's certificate is not ready; retrying");
            Err(Failure::from(&error))
        }
    };
    let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
    let labelled = label_namespaces(ctx, &meshes, written).await;
    for (namespace, labels) in &labelled.changed {
        announce_labels(ctx, namespace, labels).await;
    }
    announce_reports(ctx, &labelled, written).await;
    let labelling = labelled.failure.as_ref().map(|error| {
        tracing::warn!(%error, "labelling namespaces failed; retrying");
        Failure::from(error)
    });
    let next = match &certificate {
        Ok(current) if labelling.is_none() => {
            let until_renewal = u64::try_from(current.next_renewal - now).unwrap_or(0);
            Duration::from_secs(until_renewal.max(1)).min(RESYNC)
        }
        _ => RETRY,
    };
    let state = ClusterState {
        certificate: certificate.map(|current| Certificate {
            ca_bundle: current.ca_bundle,
            serving_not_after: current.serving_not_after,
        }),
        labelled: labelled.counts,
        labelling,
        ambient: labelled.ambient,
        pod_security: labelled
            .pod_security
            .into_iter()
            .map(|(mesh, reports)| (mesh, reports.into_iter().map(|(_, r)| r).collect()))
            .collect(),
    };
    (state, next)
}

/// Makes sure the webhook has a valid certificate and returns the bundle
/// that verifies it.
async fn certificate(ctx: &Context, now: i64) -> Result<Current> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match ctx.issuer {
        CertificateIssuer::Operator(lifetimes) => {
            let names = ctx.webhook.certificate_names();
            certificate_store::reconcile(&secrets, &ctx.namespace, &names, lifetimes, now).await
        }
        CertificateIssuer::CertManager => {
            // The CAs published so far, so that one cert-manager rotated
            // away stays trusted while it is valid.
            let configs: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
            let ours = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}"));
            let published: String = configs
                .list(&ours)
                .await?
                .items
                .iter()
                .flat_map(|c| c.webhooks.iter().flatten())
                .filter_map(|w| w.client_config.ca_bundle.as_ref())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .collect();
            cert_manager::read(&secrets, &ctx.namespace, &published, now).await
        }
    }
}

/// Publishes an Event about `regarding`; a failure to publish is logged,
/// not fatal.
async fn event(
    ctx: &Context,
    regarding: &ObjectReference,
    (type_, reason): (EventType, &str),
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}

/// An Event on the serving Secret for what the reconcile issued.
async fn announce_certificate(ctx: &Context, renewal: Renewal) {
    let (reason, note) = match renewal {
        Renewal::Nothing => return,
        Renewal::Serving => (
            "CertificateIssued",
            "issued a new webhook serving certificate",
        ),
        Renewal::CaAndServing => (
            "CAIssued",
            "issued a new webhook CA and serving certificate",
        ),
    };
    let secret = ObjectReference {
        api_version: Some(Secret::api_version(&()).into_owned()),
        kind: Some(Secret::kind(&()).into_owned()),
        name: Some(SERVING_SECRET.to_owned()),
        namespace: Some(ctx.namespace.clone()),
        ..ObjectReference::default()
    };
    let why = (EventType::Normal, reason);
    event(ctx, &secret, why, "Issue", note.to_owned()).await;
}

/// An Event on the Namespace whose injection labels changed.
async fn announce_labels(ctx: &Context, namespace: &str, labels: &BTreeMap<String, String>) {
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
    let why = (EventType::Normal, reason);
    event(ctx, &namespace_ref(namespace), why, "Label", note).await;
}

/// A reference to the Namespace `name`, for its Events.
fn namespace_ref(name: &str) -> ObjectReference {
    Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Namespace::default()
    }
    .object_ref(&())
}

/// A Warning Event on each Namespace newly reported: an ambient namespace
/// a Mesh selects and leaves unlabelled (`NamespaceAmbient`), a labelled one
/// whose Pod Security level refuses what is injected
/// (`PodSecurityIncompatible`). Each report is announced once per operator
/// run, and again after it changed.
async fn announce_reports(ctx: &Context, labelled: &Labelled, written: &mut Written) {
    let ambient: BTreeMap<&str, &str> = labelled
        .ambient
        .iter()
        .flat_map(|(mesh, names)| names.iter().map(move |n| (n.as_str(), mesh.as_str())))
        .collect();
    for (namespace, mesh) in &ambient {
        if written.ambient.insert((*namespace).to_owned()) {
            let note = format!(
                "Mesh {mesh} selects namespace {namespace}, which is labelled {DATAPLANE_MODE}={AMBIENT}: \
                 not labelled for injection (ztunnel does not capture pods with a sidecar)"
            );
            let why = (EventType::Warning, "NamespaceAmbient");
            event(ctx, &namespace_ref(namespace), why, "Label", note).await;
        }
    }
    written.ambient.retain(|n| ambient.contains_key(n.as_str()));
    let reports: BTreeMap<&str, (&str, &str)> = labelled
        .pod_security
        .iter()
        .flat_map(|(mesh, reports)| {
            reports
                .iter()
                .map(move |(n, report)| (n.as_str(), (mesh.as_str(), report.as_str())))
        })
        .collect();
    for (namespace, (mesh, report)) in &reports {
        if written.pod_security.get(*namespace).map(String::as_str) != Some(*report) {
            written
                .pod_security
                .insert((*namespace).to_owned(), (*report).to_owned());
            let note = format!(
                "{ENFORCE_LABEL} refuses the pods Mesh {mesh} injects into namespace {report}"
            );
            let why = (EventType::Warning, "PodSecurityIncompatible");
            event(ctx, &namespace_ref(namespace), why, "Report", note).await;
        }
    }
    written
        .pod_security
        .retain(|n, _| reports.contains_key(n.as_str()));
}

/// What labelling the namespaces did.
#[derive(Debug, Default)]
struct Labelled {
    /// How many namespaces each Mesh (by name) labels.
    counts: BTreeMap<String, i32>,
    /// Namespaces whose labels were applied, with what they now carry from us.
    changed: Vec<(String, BTreeMap<String, String>)>,
    /// The first write that failed; the other namespaces were labelled.
    failure: Option<Error>,
    /// The ambient namespaces each Mesh selects and leaves unlabelled.
    ambient: BTreeMap<String, Vec<String>>,
    /// The namespaces each Mesh labels whose Pod Security level refuses what
    /// it injects, with the report ([`pod_security::describe`]).
    pod_security: BTreeMap<String, Vec<(String, String)>>,
}

/// Applies the namespace labels the Meshes want, in name order.
async fn label_namespaces(ctx: &Context, meshes: &[Mesh], written: &mut Written) -> Labelled {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let mut labelled = Labelled::default();
    let mut namespaces = ctx.namespaces.state();
    namespaces.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let profiles = profiles::by_namespace(&ctx.profiles);
    written.applied.retain(|name, (seen, _)| {
        namespaces.iter().any(|n| {
            n.metadata.name.as_ref() == Some(name)
                && n.resource_version().unwrap_or_default() == *seen
        })
    });
    for namespace in namespaces {
        let namespace = &*namespace;
        if let Some(mesh) = selecting_mesh(namespace, meshes, &ctx.namespace) {
            if is_ambient(namespace) {
                let ambient = labelled.ambient.entry(mesh.name_any()).or_default();
                ambient.push(namespace.name_any());
            } else {
                *labelled.counts.entry(mesh.name_any()).or_insert(0) += 1;
                let own = profiles.get(&namespace.name_any());
                report_pod_security(
                    namespace,
                    mesh,
                    own.map_or(&[], Vec::as_slice),
                    &mut labelled,
                );
            }
        }
        let desired = desired_labels(namespace, meshes, &ctx.namespace);
        if up_to_date(namespace, &desired)
            || (desired.is_empty() && !managed_by_operator(namespace))
        {
            continue;
        }
        let name = namespace.name_any();
        let seen = namespace.resource_version().unwrap_or_default();
        if written.applied.get(&name) == Some(&(seen.clone(), desired.clone())) {
            continue; // applied before; the cache has not caught up yet
        }
        let patch = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": desired}});
        let params = PatchParams::apply(FIELD_MANAGER);
        match api.patch(&name, &params, &Patch::Apply(&patch)).await {
            Ok(_) => {
                tracing::info!(namespace = %name, labels = ?desired, "namespace labels applied");
                written
                    .applied
                    .insert(name.clone(), (seen, desired.clone()));
                labelled.changed.push((name, desired));
            }
            // Someone else owns the label with another value: theirs stands.
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                tracing::warn!(namespace = %name, error = %status.message, "namespace label owned by another manager; left alone")
            }
            Err(e) => {
                tracing::warn!(namespace = %name, error = %e, "could not label the namespace");
                labelled.failure.get_or_insert(e.into());
            }
        }
    }
    labelled
}

/// Adds `namespace`'s Pod Security report, when its level refuses what
/// `mesh` injects, with the namespace's ProxyProfiles (`profiles`) layered
/// over it.
fn report_pod_security(
    namespace: &Namespace,
    mesh: &Mesh,
    profiles: &[ProxyProfile],
    labelled: &mut Labelled,
) {
    let name = namespace.name_any();
    if let Some((level, found)) = pod_security::refused(namespace, mesh, profiles) {
        let report = pod_security::describe(&name, level, &found);
        let reports = labelled.pod_security.entry(mesh.name_any()).or_default();
        reports.push((name, report));
    }
}

#[cfg(test)]
mod tests {
    //! The reconciler against a scripted API server (tower-test).

    use ferrimesh_crds::MeshSpec;
    use http::StatusCode;
    use serde_json::{Value, json};

    use super::*;
    use crate::cluster::certificate_store::CA_SECRET;
    use crate::test_api::{self, Handle, answer, failure, store, within};

    const SECRETS: &str = "/api/v1/namespaces/ferrimesh-system/secrets";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces";

    fn context(meshes: Vec<Mesh>, namespaces: Value) -> (Context, Handle) {
        let (client, handle) = test_api::client();
        let namespaces: Vec<Namespace> = serde_json::from_value(namespaces).expect("namespaces");
        let context = Context {
            client: client.clone(),
            namespace: "ferrimesh-system".into(),
            webhook: WebhookTarget::Url("https://127.0.0.1:9443/inject".into()),
            issuer: CertificateIssuer::Operator(Lifetimes {
                ca: 3600,
                serving: 600,
            }),
            meshes: store(&meshes),
            namespaces: store(&namespaces),
            profiles: store(&[]),
            recorder: test_api::recorder(client),
        };
        (context, handle)
    }

    fn mesh(name: &str, revision: &str, selector: Value) -> Mesh {
        let spec = MeshSpec {
            revision: revision.into(),
            namespace_selector: Some(serde_json::from_value(selector).expect("selector")),
            ..MeshSpec::default()
        };
        Mesh::new(name, spec)
    }

    /// The Mesh `default` selecting the namespaces labelled `mesh=on`.
    fn mesh_on() -> Mesh {
        mesh("default", "default", json!({"matchLabels": {"mesh": "on"}}))
    }

    fn owned_by_operator(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels, "managedFields": [{
            "manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:istio-injection": {}}}}}]}})
    }

    /// Answers an Event's creation and returns it.
    async fn expect_event(handle: &mut Handle, namespace: &str) -> Value {
        let created = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                             "metadata": {"name": "e", "namespace": namespace},
                             "eventTime": "2026-01-01T00:00:00.000000Z"});
        let path = format!("{EVENTS}/{namespace}/events");
        answer(handle, "POST", &path, StatusCode::CREATED, created).await
    }

    /// Answers the reads of both Secrets (missing) and the writes of a new
    /// CA and serving certificate; returns the CA written.
    async fn expect_new_ca(handle: &mut Handle) -> String {
        let missing = || failure(404, "NotFound");
        for name in [CA_SECRET, SERVING_SECRET] {
            let path = format!("{SECRETS}/{name}");
            answer(handle, "GET", &path, StatusCode::NOT_FOUND, missing()).await;
        }
        let path = format!("{SECRETS}/{CA_SECRET}");
        let ca = answer(handle, "PATCH", &path, StatusCode::OK, json!({})).await;
        let path = format!("{SECRETS}/{SERVING_SECRET}");
        answer(handle, "PATCH", &path, StatusCode::OK, json!({})).await;
        let event = expect_event(handle, "ferrimesh-system").await;
        assert_eq!(event["reason"], "CAIssued");
        assert_eq!(event["regarding"]["kind"], "Secret");
        assert_eq!(event["regarding"]["name"], SERVING_SECRET);
        let ca: Secret = serde_json::from_value(ca).expect("a Secret");
        let pem = ca
            .data
            .and_then(|mut d| d.remove("ca.crt"))
            .unwrap_or_default();
        String::from_utf8(pem.0).expect("PEM")
    }

    #[tokio::test]
    async fn a_certificate_that_cannot_be_written_is_reported_and_labelling_goes_on() {
        let meshes = vec![mesh("default", "default", json!({}))];
        let (ctx, mut handle) = context(meshes, json!([{"metadata": {"name": "shop"}}]));
        let server = tokio::spawn(async move {
            let missing = || failure(404, "NotFound");
            for name in [CA_SECRET, SERVING_SECRET] {
                let path = format!("{SECRETS}/{name}");
                answer(&mut handle, "GET", &path, StatusCode::NOT_FOUND, missing()).await;
            }
            let path = format!("{SECRETS}/{CA_SECRET}");
            let denied = failure(403, "Forbidden");
            answer(&mut handle, "PATCH", &path, StatusCode::FORBIDDEN, denied).await;
            let path = "/api/v1/namespaces/shop";
            answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
            expect_event(&mut handle, "default").await;
        });
        let (state, next) = within(reconcile(&ctx, &mut Written::default())).await;
        server.await.expect("scripted requests");
        let failure = state.certificate.expect_err("no certificate");
        assert_eq!(failure.reason, "Forbidden");
        assert!(failure.message.contains("Forbidden"), "{failure:?}");
        assert_eq!(state.labelled.get("default"), Some(&1));
        assert_eq!(state.labelling, None);
        assert_eq!(next, RETRY);
    }

    #[tokio::test]
    async fn labels_selected_namespaces_releases_the_rest_and_skips_the_up_to_date() {
        let (ctx, mut handle) = context(
            vec![mesh_on()],
            json!([
                {"metadata": {"name": "fresh", "labels": {"mesh": "on"}}},
                owned_by_operator("current", json!({"mesh": "on", "istio-injection": "enabled"})),
                owned_by_operator("left", json!({"istio-injection": "enabled"})),
                {"metadata": {"name": "untouched", "labels": {"team": "a"}}},
                {"metadata": {"name": "kube-system", "labels": {"mesh": "on"}}}
            ]),
        );
        let server = tokio::spawn(async move {
            let path = "/api/v1/namespaces/fresh";
            let labelled = answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
            assert_eq!(
                labelled["metadata"]["labels"],
                json!({"istio-injection": "enabled"})
            );
            let path = "/api/v1/namespaces/left";
            let conflict = failure(409, "Conflict");
            let released = answer(&mut handle, "PATCH", path, StatusCode::CONFLICT, conflict).await;
            assert_eq!(
                released["metadata"]["labels"],
                json!({}),
                "an empty set releases the operator's label"
            );
        });
        let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
        let labelled = within(label_namespaces(&ctx, &meshes, &mut Written::default())).await;
        server.await.expect("scripted requests");
        assert!(
            labelled.failure.is_none(),
            "a conflict is left to its owner"
        );
        assert_eq!(
            labelled.counts.get("default"),
            Some(&2),
            "fresh and current"
        );
        let changed: Vec<&str> = labelled.changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(changed, ["fresh"], "the conflicting release did not happen");
    }

    #[tokio::test]
    async fn an_ambient_namespace_is_released_reported_and_announced_once() {
        let (ctx, mut handle) = context(
            vec![mesh_on()],
            json!([
                owned_by_operator("turned", json!({"mesh": "on", "istio-injection": "enabled",
                                                   "istio.io/dataplane-mode": "ambient"})),
                {"metadata": {"name": "zt", "labels": {"mesh": "on", "istio.io/dataplane-mode": "ambient"}}},
                {"metadata": {"name": "strict", "labels": {"mesh": "on",
                    "pod-security.kubernetes.io/enforce": "baseline"}}}
            ]),
        );
        let server = tokio::spawn(async move {
            let path = "/api/v1/namespaces/strict";
            answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
            let path = "/api/v1/namespaces/turned";
            let released = answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
            assert_eq!(released["metadata"]["labels"], json!({}), "released");
            let mut events = Vec::new();
            for _ in 0..5 {
                let event = expect_event(&mut handle, "default").await;
                events.push((
                    event["reason"].as_str().unwrap_or_default().to_owned(),
                    event["regarding"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    event["type"].as_str().unwrap_or_default().to_owned(),
                    event["note"].as_str().unwrap_or_default().to_owned(),
                ));
            }
            (events, handle)
        });
        let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
        let mut written = Written::default();
        let labelled = within(label_namespaces(&ctx, &meshes, &mut written)).await;
        for (namespace, labels) in &labelled.changed {
            announce_labels(&ctx, namespace, labels).await;
        }
        within(announce_reports(&ctx, &labelled, &mut written)).await;
        let (events, mut handle) = server.await.expect("scripted requests");
        let reasons: Vec<(&str, &str, &str)> = events
            .iter()
            .map(|(r, n, t, _)| (r.as_str(), n.as_str(), t.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("NamespaceLabelled", "strict", "Normal"),
                ("NamespaceReleased", "turned", "Normal"),
                ("NamespaceAmbient", "turned", "Warning"),
                ("NamespaceAmbient", "zt", "Warning"),
                ("PodSecurityIncompatible", "strict", "Warning"),
            ]
        );
        assert!(
            events[4].3.contains("traffic.cni.enabled"),
            "{:?}",
            events[4]
        );
        assert_eq!(
            labelled.ambient.get("default"),
            Some(&vec!["turned".to_owned(), "zt".to_owned()])
        );
        assert_eq!(labelled.counts.get("default"), Some(&1), "strict only");
        let reports = &labelled.pod_security["default"];
        assert_eq!(reports.len(), 1);
        assert!(
            reports[0].1.starts_with("strict (baseline: "),
            "{reports:?}"
        );
        // Nothing new: no second Event.
        within(announce_reports(&ctx, &labelled, &mut written)).await;
        let next = tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await;
        assert!(next.is_err(), "no request after the first announcements");
    }

    #[tokio::test]
    async fn a_namespace_is_not_labelled_again_before_the_cache_has_seen_the_write() {
        let namespace = json!({"metadata": {"name": "shop", "resourceVersion": "7"}});
        let (ctx, mut handle) = context(
            vec![mesh("default", "default", json!({}))],
            json!([namespace]),
        );
        let server = tokio::spawn(async move {
            let path = "/api/v1/namespaces/shop";
            answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
        });
        let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
        let mut written = Written::default();
        let first = within(label_namespaces(&ctx, &meshes, &mut written)).await;
        server.await.expect("scripted requests");
        assert_eq!(first.changed.len(), 1);
        // The cache still holds version 7: no second write, no second Event.
        let again = within(label_namespaces(&ctx, &meshes, &mut written)).await;
        assert!(again.changed.is_empty() && again.failure.is_none());
        assert_eq!(again.counts.get("default"), Some(&1));
    }

    #[tokio::test]
    async fn a_failed_label_write_is_reported_and_the_other_namespaces_are_labelled() {
        let (ctx, mut handle) = context(
            vec![mesh("default", "default", json!({}))],
            json!([{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]),
        );
        let server = tokio::spawn(async move {
            let denied = failure(403, "Forbidden");
            let path = "/api/v1/namespaces/a";
            answer(&mut handle, "PATCH", path, StatusCode::FORBIDDEN, denied).await;
            let path = "/api/v1/namespaces/b";
            answer(&mut handle, "PATCH", path, StatusCode::OK, json!({})).await;
        });
        let meshes: Vec<Mesh> = ctx.meshes.state().iter().map(|m| (**m).clone()).collect();
        let labelled = within(label_namespaces(&ctx, &meshes, &mut Written::default())).await;
        server.await.expect("scripted requests");
        assert!(matches!(labelled.failure, Some(Error::Kube(_))));
        assert_eq!(labelled.changed.len(), 1, "b labelled all the same");
        assert_eq!(labelled.counts.get("default"), Some(&2));
    }

    #[tokio::test]
    async fn issues_one_ca_and_labels_every_meshs_namespaces_with_events_on_them() {
        let meshes = vec![
            mesh("default", "default", json!({"matchLabels": {"mesh": "a"}})),
            mesh("canary", "canary", json!({"matchLabels": {"mesh": "b"}})),
        ];
        let (ctx, mut handle) = context(
            meshes,
            json!([
                {"metadata": {"name": "a", "labels": {"mesh": "a"}}},
                {"metadata": {"name": "b", "labels": {"mesh": "b"}}},
                {"metadata": {"name": "c"}}
            ]),
        );
        let server = tokio::spawn(async move {
            let ca = expect_new_ca(&mut handle).await;
            for (namespace, label) in [
                ("a", json!({"istio-injection": "enabled"})),
                ("b", json!({"istio.io/rev": "canary"})),
            ] {
                let path = format!("/api/v1/namespaces/{namespace}");
                let sent = answer(&mut handle, "PATCH", &path, StatusCode::OK, json!({})).await;
                assert_eq!(sent["metadata"]["labels"], label);
            }
            for namespace in ["a", "b"] {
                let event = expect_event(&mut handle, "default").await;
                assert_eq!(event["reason"], "NamespaceLabelled");
                assert_eq!(event["regarding"]["kind"], "Namespace");
                assert_eq!(event["regarding"]["name"], namespace);
            }
            ca
        });
        let (state, next) = within(reconcile(&ctx, &mut Written::default())).await;
        let ca = server.await.expect("scripted requests");
        let certificate = state.certificate.expect("a certificate");
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        assert_eq!(
            certificate.ca_bundle, ca,
            "the bundle is the one CA written"
        );
        assert_eq!(
            state.labelled,
            BTreeMap::from([("canary".into(), 1), ("default".into(), 1)])
        );
        assert_eq!(state.labelling, None);
        assert_eq!(next, RESYNC);
    }
}
