//! Istio's templates for proxyless gRPC applications, rendered as its chart
//! renders them: `grpc-simple` (an init container writes an xDS bootstrap
//! file for the apps; no agent) and `grpc-agent` (an `istio-proxy` that
//! runs the agent without Envoy, serving xDS and certificates to the apps
//! over a shared volume). Both turn probe rewriting off and leave the pod's
//! traffic alone (no `istio-init`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, HTTPGetAction, Lifecycle,
    LifecycleHandler, Pod, Probe, ResourceRequirements, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::super::annotations as ann;
use super::super::containers::{
    PROXY, env, field_env, mount, pod_ports, proxy_args, push_identity_env,
};
use super::super::settings::Settings;
use super::super::volumes::injected_volumes;
use super::super::workload::Workload;
use super::{Fragment, inject_fragment, template_input};
use crate::Result;
use crate::inject::Request;

/// The volume the `grpc-simple` bootstrap is written to.
const BOOTSTRAP_VOLUME: &str = "grpc-io-proxyless-bootstrap";
/// Where the `grpc-simple` bootstrap volume is mounted.
const BOOTSTRAP_DIR: &str = "/var/lib/grpc/data/";
/// The agent's status port in `grpc-agent` (fixed in Istio's template).
const AGENT_PORT: i32 = 15020;

/// The script of the `grpc-simple` init container: writes an xDS bootstrap
/// naming istiod (plaintext, port 15010) and the pod's node ID.
const BOOTSTRAP_SCRIPT: &str = r#"NODE_ID="sidecar~${INSTANCE_IP}~${POD_NAME}.${POD_NAMESPACE}~cluster.local"
SERVER_URI="dns:///istiod.${ISTIO_NAMESPACE}.svc:15010"
echo '
{
  "xds_servers": [
    {
      "server_uri": "'${SERVER_URI}'",
      "channel_creds": [{"type": "insecure"}],
      "server_features" : ["xds_v3"]
    }
  ],
  "node": {
    "id": "'${NODE_ID}'",
    "metadata": {
      "GENERATOR": "grpc"
    }
  }
}' > /var/lib/grpc/data/bootstrap.json"#;

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn containers_of(pod: &Pod) -> &[Container] {
    pod.spec.as_ref().map_or(&[], |s| s.containers.as_slice())
}

/// Injects `request.pod` with the `grpc-simple` template: a
/// `grpc-bootstrap-init` init container, the bootstrap's env and volume on
/// every container.
pub fn simple(request: &Request<'_>, settings: &Settings) -> Result<Pod> {
    let input = template_input(request.pod)?;
    let init = Container {
        name: "grpc-bootstrap-init".to_owned(),
        image: Some("busybox:1.28".to_owned()),
        volume_mounts: Some(vec![mount(BOOTSTRAP_VOLUME, BOOTSTRAP_DIR)]),
        env: Some(vec![
            field_env("INSTANCE_IP", "status.podIP"),
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            // A literal block in Istio's template: the value ends in a newline.
            env("ISTIO_NAMESPACE", "istio-system\n"),
        ]),
        // Go writes the empty struct: the API server sees `resources: {}`.
        resources: Some(ResourceRequirements::default()),
        command: Some(vec![
            "sh".to_owned(),
            "-c".to_owned(),
            BOOTSTRAP_SCRIPT.to_owned(),
        ]),
        ..Default::default()
    };
    let containers = containers_of(&input)
        .iter()
        .map(|c| Container {
            name: c.name.clone(),
            env: Some(vec![
                env("GRPC_XDS_BOOTSTRAP", "/var/lib/grpc/data/bootstrap.json"),
                env("GRPC_GO_LOG_VERBOSITY_LEVEL", "99"),
                env("GRPC_GO_LOG_SEVERITY_LEVEL", "info"),
            ]),
            volume_mounts: Some(vec![mount(BOOTSTRAP_VOLUME, BOOTSTRAP_DIR)]),
            ..Default::default()
        })
        .collect();
    let fragment = Fragment {
        annotations: annotations(&[(ann::REWRITE_APP_PROBES, "false")]),
        init_containers: vec![init],
        containers,
        volumes: vec![Volume {
            name: BOOTSTRAP_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }],
        ..Fragment::default()
    };
    inject_fragment(request, settings, &fragment)
}

/// The volumes of `grpc-agent`: the sidecar's without the credential socket
/// and the CRL, with `istio-xds` (the agent's socket for the apps) in place
/// of `istio-envoy`, then the user's.
fn agent_volumes(user: &[Volume]) -> Vec<Volume> {
    let mut volumes = injected_volumes(user);
    volumes.retain(|v| v.name != "credential-socket" && v.name != "istio-ca-crl");
    for volume in &mut volumes {
        if volume.name == "istio-envoy" {
            "istio-xds".clone_into(&mut volume.name);
        }
    }
    volumes
}

/// The `grpc-agent` proxy's env, in the template's order.
fn agent_env(
    settings: &Settings,
    input: &Pod,
    workload: &Workload,
    namespace: &str,
) -> Vec<EnvVar> {
    let containers: Vec<&Container> = containers_of(input).iter().collect();
    let apps: Vec<&str> = containers
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| *n != PROXY)
        .collect();
    let mut vars = vec![
        env("ISTIO_META_GENERATOR", "grpc"),
        env("OUTPUT_CERTS", "/var/lib/istio/data"),
        env("PILOT_CERT_PROVIDER", "istiod"),
        env("CA_ADDR", settings.ca_address.clone()),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("HOST_IP", "status.hostIP"),
        env("PROXY_CONFIG", settings.proxy_config.clone()),
        env("ISTIO_META_POD_PORTS", pod_ports(&containers)),
        // Go leaves an empty value out.
        EnvVar {
            name: "ISTIO_META_APP_CONTAINERS".to_owned(),
            value: (!apps.is_empty()).then(|| apps.join(",")),
            value_from: None,
        },
        env("ISTIO_META_CLUSTER_ID", settings.cluster_id.clone()),
        field_env("ISTIO_META_NODE_NAME", "spec.nodeName"),
    ];
    if let Some(network) = &settings.network {
        vars.push(env("ISTIO_META_NETWORK", network.clone()));
    }
    push_identity_env(
        &mut vars,
        &workload.name,
        || workload.owner(namespace),
        settings,
    );
    vars.push(env("ISTIO_META_DNS_CAPTURE", "false"));
    vars.push(env("DISABLE_ENVOY", "true"));
    vars
}

/// The `grpc-agent` proxy: `proxy sidecar` with Envoy disabled, its status
/// port 15020 open, a postStart that waits for it, and (unless the status
/// port is 0) its readiness probe, resources and mounts.
fn agent_container(settings: &Settings, vars: Vec<EnvVar>) -> Container {
    let mut proxy = Container {
        name: PROXY.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        ports: Some(vec![ContainerPort {
            container_port: AGENT_PORT,
            protocol: Some("TCP".to_owned()),
            name: Some("mesh-metrics".to_owned()),
            ..Default::default()
        }]),
        args: Some(proxy_args("sidecar", settings)),
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "pilot-agent".to_owned(),
                        "wait".to_owned(),
                        format!("--url=http://localhost:{AGENT_PORT}/healthz/ready"),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        env: Some(vars),
        resources: Some(ResourceRequirements::default()),
        ..Default::default()
    };
    if settings.status_port != 0 {
        proxy.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(AGENT_PORT),
                ..Default::default()
            }),
            initial_delay_seconds: (settings.readiness_initial_delay_seconds != 0)
                .then_some(settings.readiness_initial_delay_seconds),
            period_seconds: Some(settings.readiness_period_seconds),
            timeout_seconds: Some(3),
            failure_threshold: Some(settings.readiness_failure_threshold),
            ..Default::default()
        });
        proxy.resources = Some(settings.resources.clone());
        let mut mounts = vec![
            mount("workload-socket", "/var/run/secrets/workload-spiffe-uds"),
            mount(
                "workload-certs",
                "/var/run/secrets/workload-spiffe-credentials",
            ),
            mount("istiod-ca-cert", "/var/run/secrets/istio"),
            mount("istio-data", "/var/lib/istio/data"),
            mount("istio-xds", "/etc/istio/proxy"),
            mount("istio-token", "/var/run/secrets/tokens"),
            mount("istio-podinfo", "/etc/istio/pod"),
        ];
        mounts.extend(settings.user_volume_mounts.iter().cloned());
        proxy.volume_mounts = Some(mounts);
    }
    proxy
}

fn first_label<'p>(pod: &'p Pod, keys: &[&str]) -> Option<&'p str> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).map(String::as_str))
}

/// Injects `request.pod` with the `grpc-agent` template: the agent as
/// `istio-proxy`, and on every app container the env and mounts that point
/// gRPC at the agent's bootstrap and certificates.
pub fn agent(request: &Request<'_>, settings: &Settings) -> Result<Pod> {
    let input = template_input(request.pod)?;
    let workload = request
        .workload
        .cloned()
        .unwrap_or_else(|| Workload::of(request.pod));
    let vars = agent_env(settings, &input, &workload, request.namespace);
    let mut containers = vec![agent_container(settings, vars)];
    containers.extend(
        containers_of(&input)
            .iter()
            .filter(|c| c.name != PROXY)
            .map(|c| Container {
                name: c.name.clone(),
                env: Some(vec![
                    env("GRPC_XDS_EXPERIMENTAL_SECURITY_SUPPORT", "true"),
                    env("GRPC_XDS_BOOTSTRAP", "/etc/istio/proxy/grpc-bootstrap.json"),
                ]),
                volume_mounts: Some(vec![
                    mount("istio-data", "/var/lib/istio/data"),
                    mount("istio-xds", "/etc/istio/proxy"),
                    mount(
                        "workload-certs",
                        "/var/run/secrets/workload-spiffe-credentials",
                    ),
                ]),
                ..Default::default()
            }),
    );
    // The template reads the labels as given: no cut to 63 characters.
    let name = first_label(
        &input,
        &[ann::CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app"],
    )
    .unwrap_or(&workload.name);
    let revision = first_label(
        &input,
        &[
            ann::CANONICAL_REVISION_LABEL,
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest");
    let labels = annotations(&[
        (ann::CANONICAL_NAME_LABEL, name),
        (ann::CANONICAL_REVISION_LABEL, revision),
    ]);
    let mut pod_annotations = annotations(&[
        (ann::REVISION, &settings.revision),
        (ann::REWRITE_APP_PROBES, "false"),
    ]);
    let own = input.metadata.annotations.clone().unwrap_or_default();
    if let Some(first) = containers_of(&input).iter().find(|c| c.name != PROXY) {
        for key in [ann::DEFAULT_LOGS_CONTAINER, ann::DEFAULT_CONTAINER] {
            if !own.contains_key(key) {
                pod_annotations.insert(key.to_owned(), first.name.clone());
            }
        }
    }
    let fragment = Fragment {
        labels,
        annotations: pod_annotations,
        init_containers: Vec::new(),
        containers,
        volumes: agent_volumes(&settings.user_volumes),
        image_pull_secrets: settings.image_pull_secrets.clone(),
    };
    inject_fragment(request, settings, &fragment)
}
