//! Istio's `gateway` injection template, as its gateway Helm chart relies
//! on: the pod brings a container named `istio-proxy` (usually with
//! `image: auto`), and injection turns it into a `proxy router`, with no
//! `istio-init` and no native sidecar, laid under the user's own settings.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Pod, PodSecurityContext, Probe, SecurityContext, Sysctl,
};

use super::annotations as ann;
use super::containers::{
    ENVOY_PROMETHEUS_PORT, PROXY, env, field_env, health_check, leading_env, mount, pod_ports,
    proxy_args, push_identity_env, resource_env, set_trailing_env,
};
use super::overrides::{Overrides, canonicalize_resources, overlay};
use super::settings::Settings;
use super::templates::spire;
use super::workload::Workload;
use super::{Request, merge_pull_secrets, merge_volumes, post_process, set_common_metadata};
use ferrimesh_crds::istio::SidecarStatus;

use crate::{Error, Result};

/// The containers the template reads, as Istio's injector gives them to it:
/// the pod's own on first injection; on re-injection those an earlier
/// injection did not add, then the user's recorded overrides (Istio's
/// `stripPod` and `reinsertOverrides`), so the injected proxy's own ports
/// never count as the pod's.
fn template_view<'p>(
    pod: &'p Pod,
    previous: Option<&SidecarStatus>,
    recorded: Option<&'p Overrides>,
) -> Vec<&'p Container> {
    let containers = pod.spec.iter().flat_map(|s| &s.containers);
    let Some(status) = previous else {
        return containers.collect();
    };
    let injected: BTreeSet<&str> = status.container_names().collect();
    let mut view: Vec<&Container> = containers
        .filter(|c| !injected.contains(c.name.as_str()))
        .collect();
    let overrides = recorded.iter().flat_map(|o| &o.containers);
    for user in overrides {
        if !view.iter().any(|c| c.name == user.name) {
            view.push(user);
        }
    }
    view
}

/// The gateway's `istio-proxy`, as the template renders it from the
/// containers of [`template_view`].
fn template_container(
    settings: &Settings,
    request: &Request<'_>,
    containers: &[&Container],
) -> Container {
    let app_names: Vec<&str> = containers
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| *n != PROXY)
        .collect();
    let workload = request
        .workload
        .cloned()
        .unwrap_or_else(|| Workload::of(request.pod));
    let mut vars: Vec<EnvVar> = leading_env(settings);
    vars.extend([
        // Every container's ports, the user's istio-proxy's included.
        env("ISTIO_META_POD_PORTS", pod_ports(containers)),
        resource_env("GOMEMLIMIT", "limits.memory"),
        resource_env("GOMAXPROCS", "limits.cpu"),
        // Go leaves an empty value out.
        EnvVar {
            name: "ISTIO_META_APP_CONTAINERS".to_owned(),
            value: (!app_names.is_empty()).then(|| app_names.join(",")),
            value_from: None,
        },
        env("ISTIO_META_CLUSTER_ID", settings.cluster_id.clone()),
        field_env("ISTIO_META_NODE_NAME", "spec.nodeName"),
        env(
            "ISTIO_META_INTERCEPTION_MODE",
            settings.proxy_config_mode.as_str(),
        ),
    ]);
    push_identity_env(
        &mut vars,
        workload.display_name(request.pod),
        || workload.owner(request.namespace),
        settings,
    );
    let readiness = &request.mesh.proxy;
    Container {
        name: PROXY.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        ports: Some(vec![ContainerPort {
            container_port: ENVOY_PROMETHEUS_PORT,
            name: Some("http-envoy-prom".to_owned()),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        args: Some(proxy_args("router", settings)),
        security_context: Some(SecurityContext {
            run_as_user: Some(settings.uid),
            run_as_group: Some(settings.uid),
            ..Default::default()
        }),
        env: Some(vars),
        // The template reads the chart's values here, not the pod's
        // readiness annotations.
        readiness_probe: Some(Probe {
            http_get: Some(health_check()),
            initial_delay_seconds: (readiness.readiness_initial_delay_seconds != 0)
                .then_some(readiness.readiness_initial_delay_seconds),
            period_seconds: Some(readiness.readiness_period_seconds),
            timeout_seconds: Some(3),
            failure_threshold: Some(readiness.readiness_failure_threshold),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("workload-socket", "/var/run/secrets/workload-spiffe-uds"),
            mount("credential-socket", "/var/run/secrets/credential-uds"),
            mount(
                "workload-certs",
                "/var/run/secrets/workload-spiffe-credentials",
            ),
            mount("istiod-ca-cert", "/var/run/secrets/istio"),
            mount("istio-data", "/var/lib/istio/data"),
            mount("istio-envoy", "/etc/istio/proxy"),
            mount("istio-token", "/var/run/secrets/tokens"),
            mount("istio-podinfo", "/etc/istio/pod"),
        ]),
        ..Default::default()
    }
}

/// Injects `request.pod` with the `gateway` template.
pub fn inject(request: &Request<'_>, settings: &Settings) -> Result<Pod> {
    let mut pod = request.pod.clone();
    let previous = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::STATUS))
        .and_then(|raw| serde_json::from_str::<SidecarStatus>(raw).ok());
    let recorded = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::PROXY_OVERRIDES))
        .and_then(|v| Overrides::parse(v).ok());
    let fresh = template_container(
        settings,
        request,
        &template_view(request.pod, previous.as_ref(), recorded.as_ref()),
    );
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| Error::InvalidPod("the pod has no spec".into()))?;

    // The template merged into the pod's istio-proxy (or appended), then the
    // user's own container laid over it again (`image: auto` keeps the
    // injected image), recorded on first injection.
    let at = spec.containers.iter().position(|c| c.name == PROXY);
    let existing = at.map(|at| spec.containers.remove(at));
    let user = match (&previous, existing.as_ref()) {
        (None, Some(user)) => {
            let mut user = user.clone();
            canonicalize_resources(&mut user);
            Some(user)
        }
        (Some(_), _) => recorded.as_ref().and_then(|o| o.get(PROXY)).cloned(),
        (None, None) => None,
    };
    let mut proxy = match &existing {
        Some(old) => overlay(old, &fresh)?,
        None => fresh,
    };
    if settings.templates.spire {
        proxy = spire::proxy(&proxy)?;
    }
    if let Some(user) = &user {
        proxy = overlay(&proxy, user)?;
    }
    set_trailing_env(&mut proxy, &settings.trailing_env);
    spec.containers.push(proxy);

    let security = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    security.sysctls = Some(vec![Sysctl {
        name: "net.ipv4.ip_unprivileged_port_start".to_owned(),
        value: "0".to_owned(),
    }]);

    let injected = super::volumes::gateway_volumes();
    let volume_names: Vec<String> = injected.iter().map(|v| v.name.clone()).collect();
    merge_volumes(spec, injected)?;
    merge_pull_secrets(spec, settings);
    let default_container = spec
        .containers
        .iter()
        .map(|c| c.name.clone())
        .find(|n| n != PROXY);

    let workload = request
        .workload
        .cloned()
        .unwrap_or_else(|| Workload::of(request.pod));
    set_common_metadata(
        &mut pod,
        request.pod,
        &workload,
        settings,
        default_container,
    );
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if previous.is_none()
        && let Some(user) = user
    {
        let overrides = Overrides {
            containers: vec![user],
            init_containers: Vec::new(),
        };
        annotations.insert(ann::PROXY_OVERRIDES.to_owned(), overrides.to_annotation()?);
    }
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| Error::InvalidPod("the pod has no spec".into()))?;
    if let Some(at) = spec.containers.iter().position(|c| c.name == PROXY) {
        let mut proxy = spec.containers.remove(at);
        post_process(annotations, spec, &mut proxy, settings, None)?;
        spec.containers.push(proxy);
    }
    if settings.templates.spire {
        spire::pod(&mut pod)?;
    }
    let status = SidecarStatus::new(
        Vec::new(),
        vec![PROXY.to_owned()],
        volume_names,
        settings.image_pull_secrets.clone(),
        &settings.revision,
    );
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ann::STATUS.to_owned(), status.to_annotation());
    annotations.extend(
        settings
            .injected_annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    Ok(pod)
}
