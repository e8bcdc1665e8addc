//! The injection engine: a pure function from a pod and the mesh settings to
//! the injected pod, a skip decision, or a rejection (docs/injection.md).
//!
//! The webhook server and the `ferrimesh` CLI both call [`inject`], so the
//! two can never disagree.

pub mod annotations;
pub mod cni;
pub mod containers;
pub mod decision;
pub mod gateway;
pub mod json;
pub mod overrides;
pub mod probes;
pub mod prometheus;
pub mod proxy_config;
pub mod quantity;
pub mod settings;
pub mod templates;
pub mod volumes;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::mesh::MeshSpec;
use ferrimesh_crds::{ambient, stamp};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, Lifecycle, LocalObjectReference, Pod, PodSpec, Volume,
};

use self::annotations as ann;
use self::containers::{INIT, PROXY, PodFacts};
use self::decision::{Decision, decide};
use self::overrides::{Overrides, canonicalize_resources, merge_json, overlay};
use self::settings::{MeshSettings, Settings, select_profiles};
use self::templates::{Base, spire};
use self::workload::Workload;
use crate::{Error, Result};
use ferrimesh_crds::istio::SidecarStatus;

/// What the engine knows about where the pod will run, beyond the Mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    /// What `nativeSidecars: Auto` resolves to: whether the kubelets that
    /// may run the pod support native sidecars (offline: true).
    pub native_sidecars_supported: bool,
    /// Cluster ID from the webhook URL (`/inject/cluster/<id>`).
    pub cluster_id: Option<String>,
    /// Network from the webhook URL (`/net/<network>`).
    pub network: Option<String>,
    /// Other `/<key>/<value>` URL segments, as upper-cased env vars.
    pub extra_env: BTreeMap<String, String>,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            native_sidecars_supported: true,
            cluster_id: None,
            network: None,
            extra_env: BTreeMap::new(),
        }
    }
}

impl Environment {
    /// Reads the parameters of Istio's webhook path form,
    /// `/inject/cluster/<id>/net/<network>[/<key>/<value>...]`; `None` for a
    /// path that is not an injection path.
    pub fn from_path(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/inject")?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        if !segments.len().is_multiple_of(2) {
            return None;
        }
        let mut env = Self::default();
        for pair in segments.chunks(2) {
            let value = pair[1].replace("--slash--", "/");
            match pair[0] {
                "cluster" => env.cluster_id = Some(value),
                "net" => env.network = Some(value),
                key => {
                    env.extra_env.insert(key.to_uppercase(), value);
                }
            }
        }
        Some(env)
    }
}

/// One injection request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The pod as created (managedFields already dropped).
    pub pod: &'a Pod,
    /// The namespace it is created in.
    pub namespace: &'a str,
    /// The Mesh serving it.
    pub mesh: &'a MeshSpec,
    /// The ProxyProfiles of its namespace.
    pub profiles: &'a [ProxyProfile],
    /// Cluster facts.
    pub environment: &'a Environment,
    /// The workload, when the caller knows it better than the pod's
    /// metadata does (offline injection of a Deployment, say).
    pub workload: Option<&'a Workload>,
}

/// The engine's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    /// Inject or skip, and why.
    pub decision: Decision,
    /// The injected pod, when the decision is to inject.
    pub pod: Option<Pod>,
    /// Things the user should know (ignored values, conflicting profiles).
    pub warnings: Vec<String>,
    /// What decides the privileges of the injected sidecar's containers,
    /// for callers that know the namespace's Pod Security level
    /// ([`cni::pod_security_warnings`]); `None` when nothing is injected or
    /// the template is not `sidecar`.
    pub pod_security: Option<ferrimesh_crds::pod_security::Injected>,
}

/// Decides, and injects when the decision says so.
pub fn inject(request: &Request<'_>) -> Result<Injection> {
    inject_with(request, None)
}

/// [`inject`] with the Mesh-wide settings already resolved for
/// `request.mesh` (a webhook resolves them once per Mesh generation);
/// `None` resolves them here.
pub fn inject_with(
    request: &Request<'_>,
    mesh_settings: Option<&MeshSettings>,
) -> Result<Injection> {
    let mut warnings = Vec::new();
    let decision = decide(
        request.pod,
        request.namespace,
        &request.mesh.injection,
        &mut warnings,
    );
    if !decision.inject {
        return Ok(Injection {
            decision,
            pod: None,
            warnings,
            pod_security: None,
        });
    }
    if let Some((name, len)) = request
        .pod
        .metadata
        .annotations
        .as_ref()
        .and_then(ann::oversized)
    {
        return Err(Error::AnnotationTooLarge {
            name: name.to_owned(),
            len,
            max: ann::MAX_PARSED_ANNOTATION_BYTES,
        });
    }
    let meta = &request.pod.metadata;
    if let Some(source) =
        ambient::ambient_request(meta.labels.as_ref(), meta.annotations.as_ref(), None)
    {
        warnings.push(ambient::injected_ambient_warning(source));
    }
    let profiles = select_profiles(request.pod, request.profiles, &mut warnings);
    let resolved;
    let mesh_settings = match mesh_settings {
        Some(settings) => settings,
        None => {
            resolved = MeshSettings::resolve(request.mesh)?;
            &resolved
        }
    };
    let settings = Settings::resolve(
        request.pod,
        request.mesh,
        mesh_settings,
        &profiles,
        request.environment,
        &mut warnings,
    )?;
    let mut pod = match settings.templates.base {
        Base::Sidecar => inject_pod(request, &settings, &mut warnings)?,
        Base::Gateway => gateway::inject(request, &settings)?,
        Base::GrpcAgent => templates::grpc::agent(request, &settings)?,
        Base::GrpcSimple => templates::grpc::simple(request, &settings)?,
    };
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let hash = stamp::injection_hash(request.mesh, &profiles, annotations);
    annotations.insert(stamp::INJECTION_HASH.to_owned(), hash);
    let pod_security = matches!(settings.templates.base, Base::Sidecar)
        .then(|| cni::privileges(request.pod, &settings));
    Ok(Injection {
        decision,
        pod: Some(pod),
        warnings,
        pod_security,
    })
}

/// Removes the containers named in `names` from `list`, returning them.
fn take_named(list: &mut Vec<Container>, names: &BTreeSet<String>) -> Vec<Container> {
    let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
        .into_iter()
        .partition(|c| names.contains(&c.name));
    *list = kept;
    taken
}

fn set_env(container: &mut Container, name: &str, value: String) {
    let env = container.env.get_or_insert_with(Vec::new);
    let var = EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    match env.iter_mut().find(|e| e.name == name) {
        Some(existing) => *existing = var,
        None => env.push(var),
    }
}

fn env_value<'c>(container: Option<&'c Container>, name: &str) -> Option<&'c str> {
    container?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

fn inject_pod(
    request: &Request<'_>,
    settings: &Settings,
    warnings: &mut Vec<String>,
) -> Result<Pod> {
    let mut pod = request.pod.clone();
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let previous = match annotations.get(ann::STATUS) {
        Some(raw) => match serde_json::from_str::<SidecarStatus>(raw) {
            Ok(status) => Some(status),
            Err(e) => {
                warnings.push(format!(
                    "annotation {} could not be read and is replaced: {e}",
                    ann::STATUS
                ));
                None
            }
        },
        None => None,
    };
    let spec: &mut PodSpec = pod
        .spec
        .as_mut()
        .ok_or_else(|| Error::InvalidPod("the pod has no spec".into()))?;

    // Separate what an earlier injection added, and the user's overrides.
    // The init container the template injects: istio-init, or
    // istio-validation in CNI mode.
    let init_name = if settings.cni.enabled {
        cni::VALIDATION
    } else {
        INIT
    };
    let sidecar_names: BTreeSet<String> =
        [PROXY, init_name].iter().map(|s| (*s).to_owned()).collect();
    let (existing, user_overrides) = match &previous {
        Some(status) => {
            let names: BTreeSet<String> = status
                .container_names()
                .map(str::to_owned)
                .chain(sidecar_names.iter().cloned())
                .collect();
            let mut existing =
                take_named(spec.init_containers.get_or_insert_with(Vec::new), &names);
            existing.extend(take_named(&mut spec.containers, &names));
            let recorded = annotations
                .get(ann::PROXY_OVERRIDES)
                .map(|v| Overrides::parse(v))
                .transpose();
            let recorded = recorded.unwrap_or_else(|e| {
                warnings.push(format!(
                    "annotation {} could not be read and is ignored: {e}",
                    ann::PROXY_OVERRIDES
                ));
                None
            });
            (existing, recorded.unwrap_or_default())
        }
        None => {
            // As Istio does: a classic proxy is only overridden by an
            // `istio-proxy` among the containers (one among the init
            // containers stays the user's own init container); a native
            // one by either, and each override is recorded under the list
            // its injected container ends up in.
            let init_names: BTreeSet<String> = if settings.native {
                sidecar_names.clone()
            } else {
                BTreeSet::from([init_name.to_owned()])
            };
            let mut overrides = Overrides {
                containers: take_named(&mut spec.containers, &sidecar_names),
                init_containers: take_named(
                    spec.init_containers.get_or_insert_with(Vec::new),
                    &init_names,
                ),
            }
            .placed(settings.native);
            let all = overrides
                .containers
                .iter_mut()
                .chain(&mut overrides.init_containers);
            all.for_each(canonicalize_resources);
            (Vec::new(), overrides)
        }
    };

    let workload = request
        .workload
        .cloned()
        .unwrap_or_else(|| Workload::of(request.pod));
    let app_containers: Vec<&Container> = spec.containers.iter().collect();
    // The proxy the user wrote (first injection) or the one an earlier
    // injection left: a runAsUser there goes to istio-init's `-u`, and under
    // TPROXY it puts the proxy back to root (Istio's adjustInitContainerUser).
    let requested_security = match &previous {
        None => user_overrides.get(PROXY),
        Some(_) => existing.iter().find(|c| c.name == PROXY),
    }
    .and_then(|c| c.security_context.as_ref());
    let requested_uid = requested_security.and_then(|s| s.run_as_user);
    let user_uid = requested_uid.filter(|uid| *uid != 0);
    let facts = PodFacts {
        pod: request.pod,
        namespace: request.namespace,
        workload: &workload,
        app_containers: &app_containers,
    };

    // In Istio's order: the fresh sidecar (the template) laid over the one
    // an earlier injection left, then the user's overrides, then the
    // cluster and network env, the prometheus merge and probe rewriting.
    // The template is merged into the container of its name the pod has:
    // the one an earlier injection left, or on first injection the user's
    // own; the user's override is then laid over the result.
    let merge_existing = |fresh: Container| -> Result<Container> {
        let base = match &previous {
            Some(_) => existing.iter().find(|c| c.name == fresh.name),
            None => user_overrides.get(&fresh.name),
        };
        match base {
            Some(base) => overlay(base, &fresh),
            None => Ok(fresh),
        }
    };
    let mut proxy = containers::proxy_container(settings, &facts);
    let default_container = app_containers.first().map(|c| c.name.clone());
    drop(app_containers);
    if settings.hold_application && !settings.native {
        let lifecycle = proxy.lifecycle.get_or_insert_with(Lifecycle::default);
        lifecycle.post_start = Some(containers::exec_handler(&["pilot-agent", "wait"]));
    }
    let mut proxy = merge_existing(proxy)?;
    if settings.templates.spire {
        proxy = spire::proxy(&proxy)?;
    }
    if let Some(user) = user_overrides.get(PROXY) {
        proxy = overlay(&proxy, user)?;
    }
    let mut init = containers::init_container(settings, user_uid)
        .map(|init| {
            if settings.cni.enabled {
                cni::into_validation(init, settings)
            } else {
                init
            }
        })
        .map(merge_existing)
        .transpose()?;
    // Only with an istio-init to capture traffic (not with NONE).
    if settings.tproxy_forces_root
        && init.is_some()
        && requested_uid.is_some()
        && let Some(sc) = proxy.security_context.as_mut()
    {
        sc.run_as_user = Some(0);
    }
    if let (Some(fresh), Some(user)) = (init.as_ref(), user_overrides.get(init_name)) {
        init = Some(overlay(fresh, user)?);
    }
    if settings.cni.enabled
        && !settings.tproxy_forces_root
        && let Some(validation) = init.as_mut()
    {
        cni::follow_proxy_user(validation, requested_security);
    }
    containers::set_trailing_env(&mut proxy, &settings.trailing_env);
    let old_proxy = existing.iter().find(|c| c.name == PROXY);

    let old_probers = env_value(old_proxy, "ISTIO_KUBE_APP_PROBERS").map(str::to_owned);
    post_process(
        annotations,
        spec,
        &mut proxy,
        settings,
        old_probers.as_deref(),
    )?;

    // Layout.
    let (injected_init, injected_containers) = if settings.native {
        let mut injected: Vec<Container> = init.into_iter().collect();
        injected.push(proxy);
        let names: Vec<String> = injected.iter().map(|c| c.name.clone()).collect();
        injected.extend(spec.init_containers.take().unwrap_or_default());
        spec.init_containers = Some(injected);
        (names, Vec::new())
    } else {
        // istio-init after the user's init containers (they keep the
        // network before capture starts); istio-validation before them
        // (none runs before the CNI agent's rules are checked).
        if let Some(init) = init {
            let list = spec.init_containers.get_or_insert_with(Vec::new);
            if settings.cni.enabled {
                list.insert(0, init);
            } else {
                list.push(init);
            }
        }
        if settings.hold_application {
            spec.containers.insert(0, proxy);
        } else {
            spec.containers.push(proxy);
        }
        let init_names = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.name == init_name)
            .map(|c| c.name.clone());
        (init_names.collect(), vec![PROXY.to_owned()])
    };
    if spec.init_containers.as_ref().is_some_and(Vec::is_empty) {
        spec.init_containers = None;
    }

    // Volumes: the injected ones first, then the pod's own; none removed.
    let injected_volumes = volumes::injected_volumes(&settings.user_volumes);
    let volume_names: Vec<String> = injected_volumes.iter().map(|v| v.name.clone()).collect();
    merge_volumes(spec, injected_volumes)?;

    merge_pull_secrets(spec, settings);

    set_common_metadata(
        &mut pod,
        request.pod,
        &workload,
        settings,
        default_container,
    );
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels
        .entry(ann::TLS_MODE_LABEL.to_owned())
        .or_insert_with(|| "istio".to_owned());
    if settings
        .proxy_metadata
        .get("ISTIO_META_ENABLE_HBONE")
        .is_some_and(|v| v == "true")
    {
        labels.insert(ann::TUNNEL_LABEL.to_owned(), "http".to_owned());
    }
    if settings.templates.spire {
        spire::pod(&mut pod)?;
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if settings.cni.enabled {
        let none = BTreeMap::new();
        let original = request.pod.metadata.annotations.as_ref().unwrap_or(&none);
        cni::annotate(annotations, original, settings);
    }
    if previous.is_none() && !user_overrides.is_empty() {
        annotations.insert(
            ann::PROXY_OVERRIDES.to_owned(),
            user_overrides.to_annotation()?,
        );
    }
    if let Some(port) = settings
        .proxy_metadata
        .get("ENVOY_SECURE_MERGED_METRICS_PORT")
        .filter(|p| {
            let port = p.trim();
            !port.is_empty() && port != "0"
        })
    {
        annotations.insert(ann::SECURE_PORT.to_owned(), port.clone());
    }
    let status = SidecarStatus::new(
        injected_init,
        injected_containers,
        volume_names,
        settings.image_pull_secrets.clone(),
        &settings.revision,
    );
    annotations.insert(ann::STATUS.to_owned(), status.to_annotation());
    annotations.extend(
        settings
            .injected_annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    Ok(pod)
}

/// The Mesh's pull secrets before the pod's own, duplicates merged by name.
fn merge_pull_secrets(spec: &mut PodSpec, settings: &Settings) {
    if settings.image_pull_secrets.is_empty() {
        return;
    }
    let mesh_secrets = settings
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() });
    let own = spec.image_pull_secrets.take().unwrap_or_default();
    let mut seen = BTreeSet::new();
    let merged: Vec<_> = mesh_secrets
        .chain(own)
        .filter(|s| seen.insert(s.name.clone()))
        .collect();
    spec.image_pull_secrets = Some(merged);
}

/// What every template writes on the pod's metadata: the canonical name and
/// revision labels (an existing non-empty value kept), the network label,
/// `istio.io/rev`, and the default-container annotations (an existing value
/// kept) naming `default_container`.
fn set_common_metadata(
    pod: &mut Pod,
    original: &Pod,
    workload: &Workload,
    settings: &Settings,
    default_container: Option<String>,
) {
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    let mut set_if_absent = |key: &str, value: String| {
        if labels.get(key).is_none_or(String::is_empty) {
            labels.insert(key.to_owned(), value);
        }
    };
    set_if_absent(
        ann::CANONICAL_NAME_LABEL,
        canonical_name(original, &workload.name),
    );
    set_if_absent(ann::CANONICAL_REVISION_LABEL, canonical_revision(original));
    if let Some(network) = &settings.network {
        labels.insert(ann::NETWORK_LABEL.to_owned(), network.clone());
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ann::REVISION.to_owned(), settings.revision.clone());
    if let Some(first) = default_container {
        annotations
            .entry(ann::DEFAULT_CONTAINER.to_owned())
            .or_insert_with(|| first.clone());
        annotations
            .entry(ann::DEFAULT_LOGS_CONTAINER.to_owned())
            .or_insert(first);
    }
}

/// Lays the injected volumes over the pod's: the injected ones first, in
/// order, each merged with one of the same name an earlier injection left
/// (as Istio's strategic merge does); the pod's own after them; none removed.
fn merge_volumes(spec: &mut PodSpec, injected_volumes: Vec<Volume>) -> Result<()> {
    let mut own_volumes = spec.volumes.take().unwrap_or_default();
    // Sized up front: a `Volume` is kilobytes (every volume source inline),
    // and growing the list would copy all of them.
    let mut all_volumes = Vec::with_capacity(injected_volumes.len() + own_volumes.len());
    for fresh in injected_volumes {
        // One an earlier injection left is merged with, as Istio's strategic
        // merge does (the API server's defaults, such as `defaultMode`, stay).
        match own_volumes.iter().position(|v| v.name == fresh.name) {
            Some(at) => {
                let mut merged = serde_json::to_value(own_volumes.remove(at))?;
                let fresh = serde_json::to_value(fresh)?;
                merge_json(&mut merged, &fresh);
                if fresh.as_object().is_some_and(|f| f.len() == 1)
                    && let Some(merged) = merged.as_object_mut()
                {
                    // A volume with no source is `emptyDir:` with no value in
                    // Istio's template: a null, which the strategic merge
                    // turns into removing the emptyDir the API server had
                    // defaulted (and then defaults again).
                    merged.remove("emptyDir");
                }
                all_volumes.push(serde_json::from_value(merged)?);
            }
            None => all_volumes.push(fresh),
        }
    }
    all_volumes.append(&mut own_volumes);
    spec.volumes = Some(all_volumes);
    Ok(())
}

/// Istio's post-processing after the template: the prometheus merge, then
/// the probes of every container but the proxy rewritten through the status
/// port (`old_probers`: what an earlier injection handed over).
fn post_process(
    annotations: &mut BTreeMap<String, String>,
    spec: &mut PodSpec,
    proxy: &mut Container,
    settings: &Settings,
    old_probers: Option<&str>,
) -> Result<()> {
    if settings.merge_metrics
        && let Some(handed_over) = prometheus::merge(annotations, settings.metrics_port)?
    {
        set_env(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS", handed_over);
    }
    if settings.rewrite_probes && settings.status_port != 0 {
        let mut probers = probes::Probers::new();
        let ports = probes::Ports {
            status: settings.status_port,
            rewritten: settings.metrics_port,
        };
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
            .filter(|c| c.name != PROXY)
        {
            probes::rewrite_container(container, ports, &mut probers);
        }
        if let Some(value) = probes::probers_env(probers, old_probers) {
            set_env(proxy, "ISTIO_KUBE_APP_PROBERS", value);
        }
    }
    Ok(())
}

fn first_label<'p>(pod: &'p Pod, keys: &[&str]) -> Option<&'p str> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).map(String::as_str))
}

/// `service.istio.io/canonical-name` for a pod that has none: the app's
/// name label, else the workload's name, cut to a valid label value.
fn canonical_name(pod: &Pod, workload: &str) -> String {
    let raw = first_label(pod, &["app.kubernetes.io/name", "app"]).unwrap_or(workload);
    let cut: String = raw.chars().take(63).collect();
    cut.trim_matches(|c| matches!(c, '-' | '_' | '.'))
        .to_owned()
}

/// `service.istio.io/canonical-revision` for a pod that has none.
fn canonical_revision(pod: &Pod) -> String {
    first_label(pod, &["app.kubernetes.io/version", "version"])
        .unwrap_or("latest")
        .to_owned()
}

#[cfg(test)]
mod tests;
