//! Pushing WorkloadEntries into a config cluster
//! (`workloadRegistration.target`, docs/operator.md "Registration into a
//! config cluster"): a client per target, made from the kubeconfig in a
//! Secret of the operator's namespace and made again whenever the Secret
//! changes; the periodic sweep of this cluster's entries there (orphans
//! deleted, the others counted); and what each Mesh's status says of it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrimesh_crds::WorkloadEntry;
use ferrimesh_crds::mesh::RegistrationTarget;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use super::controller::{Context, delete_entry, is_injected_meta, mesh_for};
use super::entry::cluster_label;
use super::injected_pod::InjectedPod;
use super::{
    CLUSTER_LABEL, MANAGED_BY, MANAGED_BY_LABEL, POD_ANNOTATION, POD_UID_ANNOTATION, REVISION_LABEL,
};
use crate::cluster::Failure;
use crate::{Error, Result};

/// What a Mesh's status says of its pushed registration: the entries of
/// its pods in the config cluster, or why the operator cannot reach them.
pub type Registration = Result<i32, Failure>;

/// A target's client, keyed by the Secret it was made from.
type SecretKey = (String, String);

struct Connection {
    /// The Secret's resourceVersion the client was made from.
    version: Option<String>,
    client: Client,
}

/// The config clusters the operator pushes into, each reached with the
/// kubeconfig of a Secret in the operator's namespace.
pub struct Targets {
    local: Client,
    namespace: String,
    connections: Mutex<BTreeMap<SecretKey, Connection>>,
    registrations: watch::Sender<BTreeMap<String, Registration>>,
}

/// How long a call to a config cluster may take: an unreachable one fails
/// the reconcile (retried) rather than holding it.
const TIMEOUT: Duration = Duration::from_secs(15);

impl Targets {
    /// Targets read from Secrets of `namespace` through `local`; the
    /// receiver sees each sweep's [`Registration`] per Mesh revision.
    pub fn new(
        local: Client,
        namespace: &str,
    ) -> (Arc<Self>, watch::Receiver<BTreeMap<String, Registration>>) {
        let (registrations, rx) = watch::channel(BTreeMap::new());
        let targets = Self {
            local,
            namespace: namespace.to_owned(),
            connections: Mutex::new(BTreeMap::new()),
            registrations,
        };
        (Arc::new(targets), rx)
    }

    fn key(target: &RegistrationTarget) -> SecretKey {
        (target.secret_name.clone(), target.secret_key.clone())
    }

    /// The client for `target`: the one made last, or a new one.
    pub async fn client(&self, target: &RegistrationTarget) -> Result<Client, Failure> {
        let cached = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&Self::key(target))
            .map(|c| c.client.clone());
        match cached {
            Some(client) => Ok(client),
            None => self.connect(target).await,
        }
    }

    /// Reads `target`'s Secret and returns its client, made again when the
    /// Secret changed since (a rotated kubeconfig is used from then on).
    pub async fn connect(&self, target: &RegistrationTarget) -> Result<Client, Failure> {
        let key = Self::key(target);
        let secret = Api::<Secret>::namespaced(self.local.clone(), &self.namespace)
            .get_opt(&target.secret_name)
            .await
            .map_err(|e| Failure {
                reason: "TargetSecretUnreadable".into(),
                message: format!("Secret {}/{}: {e}", self.namespace, target.secret_name),
            })?
            .ok_or_else(|| Failure {
                reason: "TargetSecretMissing".into(),
                message: format!(
                    "no Secret {}/{} with the config cluster's kubeconfig",
                    self.namespace, target.secret_name
                ),
            })?;
        let version = secret.metadata.resource_version.clone();
        if let Some(connection) = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .filter(|c| c.version == version)
        {
            return Ok(connection.client.clone());
        }
        let client = client_from(&secret, &target.secret_key)
            .await
            .map_err(|message| Failure {
                reason: "TargetSecretInvalid".into(),
                message: format!(
                    "Secret {}/{} key {}: {message}",
                    self.namespace, target.secret_name, target.secret_key
                ),
            })?;
        tracing::info!(secret = %target.secret_name, "client for the config cluster (re)made");
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                key,
                Connection {
                    version,
                    client: client.clone(),
                },
            );
        Ok(client)
    }

    /// Uses `client` for `target` (tests: the scripted API server).
    #[cfg(test)]
    pub fn insert(&self, target: &RegistrationTarget, client: Client) {
        let connection = Connection {
            version: None,
            client,
        };
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Self::key(target), connection);
    }

    /// Drops the clients of targets no Mesh names any more.
    fn retain(&self, used: &BTreeSet<SecretKey>) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| used.contains(key));
    }

    /// Publishes each pushing Mesh revision's registration.
    fn publish(&self, registrations: BTreeMap<String, Registration>) {
        self.registrations.send_if_modified(|current| {
            let changed = *current != registrations;
            *current = registrations;
            changed
        });
    }
}

/// A client from the kubeconfig under `key` of `secret`.
async fn client_from(secret: &Secret, key: &str) -> Result<Client, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| "no such key".to_owned())?;
    let text = std::str::from_utf8(&bytes.0).map_err(|e| e.to_string())?;
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| e.to_string())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
    config.connect_timeout = Some(TIMEOUT);
    config.read_timeout = Some(TIMEOUT);
    config.write_timeout = Some(TIMEOUT);
    Client::try_from(config).map_err(|e| e.to_string())
}

/// A failed call to a config cluster as a Mesh's condition says it:
/// `TargetUnauthorized` when it refused the operator's credentials or
/// rights (revoked token, RoleBinding removed), `TargetUnreachable` when it
/// did not answer.
pub fn failure(error: &Error) -> Failure {
    let reason = match error {
        Error::Kube(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
            "TargetUnauthorized".to_owned()
        }
        Error::Kube(kube::Error::Api(status)) if !status.reason.is_empty() => {
            format!("Target{}", status.reason)
        }
        Error::Kube(kube::Error::Api(_)) => "TargetError".to_owned(),
        Error::Kube(_) => "TargetUnreachable".to_owned(),
        other => other.reason(),
    };
    Failure {
        reason,
        message: format!("config cluster: {error}"),
    }
}

/// One sweep of every target the Meshes name: each target's Secret read
/// (its client made again if it changed), this cluster's entries there
/// listed, those whose pod is gone (or no longer pushed there) deleted, the
/// others counted per revision and published.
pub async fn sweep(ctx: &Context, pods: &Store<InjectedPod>, namespaces: &Store<Namespace>) {
    let mut groups: BTreeMap<(SecretKey, Option<String>, String), Vec<String>> = BTreeMap::new();
    for mesh in ctx.meshes.state() {
        let registration = &mesh.spec.workload_registration;
        let Some(target) = registration
            .target
            .as_ref()
            .filter(|_| registration.enabled)
        else {
            continue;
        };
        if mesh.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = (
            Targets::key(target),
            target.namespace.clone(),
            cluster_label(&mesh.spec.cluster_id),
        );
        groups
            .entry(key)
            .or_default()
            .push(mesh.spec.revision.clone());
    }
    ctx.targets
        .retain(&groups.keys().map(|(key, ..)| key.clone()).collect());
    let mut registrations = BTreeMap::new();
    for ((key, namespace, cluster), revisions) in groups {
        let target = RegistrationTarget {
            secret_name: key.0,
            secret_key: key.1,
            namespace,
        };
        let counted = match ctx.targets.connect(&target).await {
            Ok(client) => sweep_target(ctx, &client, &target, &cluster, pods, namespaces)
                .await
                .map_err(|e| failure(&e)),
            Err(failure) => Err(failure),
        };
        if let Err(failure) = &counted {
            tracing::warn!(reason = %failure.reason, message = %failure.message, "registration target");
        }
        for revision in revisions {
            let registration = match &counted {
                Ok(counts) => Ok(counts.get(&revision).copied().unwrap_or(0)),
                Err(failure) => Err(failure.clone()),
            };
            registrations.insert(revision, registration);
        }
    }
    ctx.targets.publish(registrations);
}

/// Sweeps the entries of `cluster` in `target`; returns how many stay, per
/// revision.
async fn sweep_target(
    ctx: &Context,
    client: &Client,
    target: &RegistrationTarget,
    cluster: &str,
    pods: &Store<InjectedPod>,
    namespaces: &Store<Namespace>,
) -> Result<BTreeMap<String, i32>> {
    let with_pods: BTreeSet<String> = pods.state().iter().filter_map(|p| p.namespace()).collect();
    // Without a target namespace, entries go to their pod's namespace name:
    // any namespace of this cluster may hold some.
    let searched: Vec<String> = match &target.namespace {
        Some(namespace) => vec![namespace.clone()],
        None => namespaces.state().iter().map(|n| n.name_any()).collect(),
    };
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY},{CLUSTER_LABEL}={cluster}");
    let mut counts = BTreeMap::new();
    for namespace in searched {
        let api: Api<WorkloadEntry> = Api::namespaced(client.clone(), &namespace);
        // In pages: the metadata of ten thousand entries, managed fields
        // and all, took over 80 MiB parsed in one list.
        let mut params = ListParams::default().labels(&selector).limit(SWEEP_PAGE);
        loop {
            let page = match api.list_metadata(&params).await {
                Ok(page) => page,
                // No Role there, and no pod to push there: nothing of ours
                // can be there either.
                Err(kube::Error::Api(status))
                    if status.code == 403
                        && target.namespace.is_none()
                        && !with_pods.contains(&namespace) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            let kept =
                sweep_page(ctx, client, target, cluster, pods, &namespace, page.items).await?;
            for revision in kept {
                *counts.entry(revision).or_insert(0) += 1;
            }
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(counts)
}

/// Entries listed per request by the sweep of a config cluster.
const SWEEP_PAGE: u32 = 500;

/// Sweeps one page of `cluster`'s entries in `namespace` of `target`: an
/// entry whose pod is gone (or no longer pushed there) is deleted; returns
/// the revisions of those that stay, one per entry.
async fn sweep_page(
    ctx: &Context,
    client: &Client,
    target: &RegistrationTarget,
    cluster: &str,
    pods: &Store<InjectedPod>,
    namespace: &str,
    entries: Vec<PartialObjectMeta<WorkloadEntry>>,
) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    for entry in entries {
        let annotations = entry.annotations();
        let uid = annotations
            .get(POD_UID_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let pod = annotations
            .get(POD_ANNOTATION)
            .and_then(|p| p.split_once('/'))
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
        let keep = match &pod {
            Some((ns, name)) => pushed_here(ctx, pods, target, cluster, ns, name, &uid).await?,
            None => false,
        };
        if keep {
            let revision = entry.labels().get(REVISION_LABEL).cloned();
            kept.push(revision.unwrap_or_default());
        } else {
            delete_entry(client, namespace, &entry.name_any(), &uid).await?;
        }
    }
    Ok(kept)
}

/// Whether the pod `ns/name` with `uid` lives and is pushed into `target`
/// as `cluster`. A pod the cache lacks is asked of the API server: the
/// cache may lag behind a pod just created.
async fn pushed_here(
    ctx: &Context,
    pods: &Store<InjectedPod>,
    target: &RegistrationTarget,
    cluster: &str,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<bool> {
    let Some(pod) = pods.get(&ObjectRef::new(name).within(ns)) else {
        let pod = Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .get_metadata_opt(name)
            .await?;
        return Ok(
            pod.is_some_and(|p| p.uid().as_deref() == Some(uid) && is_injected_meta(&p.metadata))
        );
    };
    if pod.uid().as_deref() != Some(uid) || !pod.injected || pod.is_gone() {
        return Ok(false);
    }
    Ok(mesh_for(&pod, &ctx.meshes).is_some_and(|mesh| {
        let registration = &mesh.spec.workload_registration;
        registration.enabled
            && registration.target.as_ref() == Some(target)
            && cluster_label(&mesh.spec.cluster_id) == cluster
    }))
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::{Mesh, MeshSpec};
    use http::StatusCode;
    use kube::core::Status;
    use kube::runtime::events::{Recorder, Reporter};
    use serde_json::{Value, json};

    use super::*;
    use crate::test_api::{self, answer, store, within};

    fn pushed_pod(name: &str) -> InjectedPod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("{name}-uid"),
                         "annotations": {"sidecar.istio.io/status": "{}"}}
        }))
        .expect("pod");
        pod.into()
    }

    fn entry_meta(pod: &str) -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
               "metadata": {"name": format!("east-{pod}"), "namespace": "cluster-a",
                            "labels": {REVISION_LABEL: "default"},
                            "annotations": {POD_ANNOTATION: format!("shop/{pod}"),
                                            POD_UID_ANNOTATION: format!("{pod}-uid")}}})
    }

    fn page(items: Vec<Value>, next: &str) -> Value {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
               "metadata": {"resourceVersion": "9", "continue": next}, "items": items})
    }

    #[tokio::test]
    async fn the_sweep_reads_the_config_cluster_page_by_page() {
        let target = RegistrationTarget {
            secret_name: "ferrimesh-registration-target".into(),
            secret_key: "kubeconfig".into(),
            namespace: Some("cluster-a".into()),
        };
        let mut spec = MeshSpec {
            cluster_id: "east".into(),
            ..MeshSpec::default()
        };
        spec.workload_registration.target = Some(target.clone());
        let (client, mut handle) = test_api::client();
        let ctx = Context {
            client: client.clone(),
            meshes: store(&[Mesh::new("default", spec)]),
            entries: store(&[]),
            nodes: store(&[]),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            targets: Targets::new(client.clone(), "ferrimesh-system").0,
        };
        let pods = store(&[pushed_pod("a"), pushed_pod("b")]);
        let namespaces = store(&[]);
        let server = tokio::spawn(async move {
            let path = "/apis/networking.istio.io/v1/namespaces/cluster-a/workloadentries";
            let first = page(vec![entry_meta("a")], "next-page");
            answer(&mut handle, "GET", path, StatusCode::OK, first).await;
            let (request, send) = handle.next_request().await.expect("a second list");
            let query = request.uri().query().unwrap_or_default().to_owned();
            test_api::respond(send, StatusCode::OK, &page(vec![entry_meta("b")], ""));
            query
        });
        let counts = within(sweep_target(
            &ctx,
            &client,
            &target,
            "east",
            &pods,
            &namespaces,
        ))
        .await
        .expect("swept");
        let second = server.await.expect("scripted requests");
        assert_eq!(counts, BTreeMap::from([("default".to_owned(), 2)]));
        assert!(second.contains("continue=next-page"), "{second}");
        assert!(second.contains("limit=500"), "{second}");
    }

    fn api_error(code: u16, reason: &str) -> Error {
        Error::Kube(kube::Error::Api(
            Status::failure("refused", reason).with_code(code).boxed(),
        ))
    }

    #[test]
    fn refused_credentials_and_rights_are_unauthorized() {
        assert_eq!(
            failure(&api_error(401, "Unauthorized")).reason,
            "TargetUnauthorized"
        );
        assert_eq!(
            failure(&api_error(403, "Forbidden")).reason,
            "TargetUnauthorized"
        );
        assert_eq!(
            failure(&api_error(404, "NotFound")).reason,
            "TargetNotFound"
        );
    }
}
