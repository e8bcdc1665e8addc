//! The injected containers, `istio-init` and `istio-proxy`, built fresh from
//! the effective settings (docs/injection.md, sections 3 and 4).

use std::collections::BTreeMap;

use ferrimesh_crds::settings::InterceptionMode;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ResourceFieldSelector,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::json::Object;
use super::settings::Settings;
use super::workload::Workload;

/// Name of the injected proxy container.
pub const PROXY: &str = ferrimesh_crds::istio::PROXY_CONTAINER;
/// Name of the injected init container.
pub const INIT: &str = "istio-init";
/// Envoy's Prometheus port.
pub const ENVOY_PROMETHEUS_PORT: i32 = 15090;
/// Envoy's health port, target of the proxy's own probes.
pub const HEALTH_PORT: i32 = 15021;

/// What the proxy's env needs to know about the pod beyond the settings.
pub struct PodFacts<'a> {
    /// The pod being injected.
    pub pod: &'a Pod,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its workload.
    pub workload: &'a Workload,
    /// App containers (not injected ones), in order.
    pub app_containers: &'a [&'a Container],
}

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

pub(super) fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

pub(super) fn resource_env(name: &str, resource: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                resource: resource.to_owned(),
                divisor: Some(Quantity("1".to_owned())),
                container_name: None,
            }),
            ..Default::default()
        }),
    }
}

/// Builds `istio-init`, or `None` when interception is off.
pub fn init_container(settings: &Settings, user_uid: Option<i64>) -> Option<Container> {
    if settings.interception_mode == InterceptionMode::None {
        return None;
    }
    let capture = &settings.capture;
    let uid = user_uid.unwrap_or(match settings.interception_mode {
        InterceptionMode::Tproxy => ferrimesh_crds::settings::DEFAULT_PROXY_UID,
        _ => settings.uid,
    });
    let mut args: Vec<String> = [
        "istio-iptables",
        "-p",
        &capture.proxy_listen_port.to_string(),
        "-z",
        &capture.inbound_listen_port.to_string(),
        "-u",
        &uid.to_string(),
        "-m",
        settings.interception_mode.as_str(),
        "-i",
        &capture.include_outbound_ip_ranges,
        "-x",
        &capture.exclude_outbound_ip_ranges,
        "-b",
        &capture.include_inbound_ports,
        "-d",
        &excluded_inbound_ports(&capture.exclude_inbound_ports, settings.status_port),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (flag, value) in [
        ("-q", &capture.include_outbound_ports),
        ("-o", &capture.exclude_outbound_ports),
        ("-k", &capture.reroute_virtual_interfaces),
        ("-c", &capture.exclude_interfaces),
    ] {
        if let Some(value) = value {
            args.push(flag.to_owned());
            args.push(value.clone());
        }
    }
    args.push(format!("--log_output_level={}", settings.agent_log_level));
    let metadata: Vec<EnvVar> = settings
        .proxy_metadata
        .iter()
        .map(|(k, v)| env(k, v.clone()))
        .collect();
    Some(Container {
        name: INIT.to_owned(),
        image: Some(settings.init_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(args),
        env: (!metadata.is_empty()).then_some(metadata),
        resources: Some(settings.resources.clone()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            read_only_root_filesystem: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            seccomp_profile: settings.seccomp_profile.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `-d`: Envoy's own ports, then the user's exclusions with the status port
/// added, exactly as Istio's `excludeInboundPort` template function does it.
pub fn excluded_inbound_ports(user: &str, status_port: i32) -> String {
    let tail = with_status_port(user, status_port);
    if tail.is_empty() {
        "15090,15021".to_owned()
    } else {
        format!("15090,15021,{tail}")
    }
}

/// The user's excluded inbound ports plus the status port: unchanged when
/// the port is 0 or already listed as is; otherwise the entries trimmed,
/// empty ones dropped, and the port appended.
pub fn with_status_port(user: &str, status_port: i32) -> String {
    let port = status_port.to_string();
    if status_port == 0 || user.split(',').any(|entry| entry == port) {
        return user.to_owned();
    }
    let mut ports: Vec<&str> = user
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    ports.push(&port);
    ports.join(",")
}

/// `ISTIO_META_POD_PORTS`: Istio's exact layout of the app containers' ports.
pub fn pod_ports(containers: &[&Container]) -> String {
    let mut out = String::from("[\n");
    let mut first = true;
    for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
        let mut object = Object::new();
        if let Some(name) = port.name.as_ref().filter(|n| !n.is_empty()) {
            object.insert("name", name);
        }
        if let Some(host_port) = port.host_port.filter(|p| *p != 0) {
            object.insert("hostPort", &host_port);
        }
        if port.container_port != 0 {
            object.insert("containerPort", &port.container_port);
        }
        if let Some(protocol) = port.protocol.as_ref().filter(|p| !p.is_empty()) {
            object.insert("protocol", protocol);
        }
        if let Some(host_ip) = port.host_ip.as_ref().filter(|h| !h.is_empty()) {
            object.insert("hostIP", host_ip);
        }
        out.push_str(if first { "    " } else { "    ," });
        out.push_str(&object.to_string());
        out.push('\n');
        first = false;
    }
    out.push(']');
    out
}

/// Builds `istio-proxy` (before post-processing).
pub fn proxy_container(settings: &Settings, facts: &PodFacts<'_>) -> Container {
    Container {
        name: PROXY.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(proxy_args("sidecar", settings)),
        ports: Some(vec![ContainerPort {
            container_port: ENVOY_PROMETHEUS_PORT,
            name: Some("http-envoy-prom".to_owned()),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        env: Some(proxy_env(settings, facts)),
        resources: Some(settings.resources.clone()),
        security_context: Some(proxy_security_context(settings)),
        volume_mounts: Some(proxy_volume_mounts(settings)),
        readiness_probe: (settings.status_port != 0).then(|| Probe {
            http_get: Some(health_check()),
            initial_delay_seconds: (settings.readiness_initial_delay_seconds != 0)
                .then_some(settings.readiness_initial_delay_seconds),
            period_seconds: Some(settings.readiness_period_seconds),
            timeout_seconds: Some(3),
            failure_threshold: Some(settings.readiness_failure_threshold),
            ..Default::default()
        }),
        startup_probe: (settings.status_port != 0).then(|| Probe {
            http_get: Some(health_check()),
            period_seconds: Some(1),
            timeout_seconds: Some(3),
            failure_threshold: Some(600),
            ..Default::default()
        }),
        lifecycle: settings.native.then(|| Lifecycle {
            pre_stop: Some(exec_handler(&[
                "pilot-agent",
                "request",
                &format!("--debug-port={}", settings.status_port),
                "POST",
                "drain",
            ])),
            ..Default::default()
        }),
        restart_policy: settings.native.then(|| "Always".to_owned()),
        ..Default::default()
    }
}

pub(super) fn health_check() -> HTTPGetAction {
    HTTPGetAction {
        path: Some("/healthz/ready".into()),
        port: IntOrString::Int(HEALTH_PORT),
        ..Default::default()
    }
}

/// An exec lifecycle handler.
pub fn exec_handler(command: &[&str]) -> LifecycleHandler {
    LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(command.iter().map(|c| (*c).to_owned()).collect()),
        }),
        ..Default::default()
    }
}

fn proxy_security_context(settings: &Settings) -> SecurityContext {
    let tproxy = settings.interception_mode == InterceptionMode::Tproxy;
    let trace = settings
        .proxy_metadata
        .get("IPTABLES_TRACE_LOGGING")
        .is_some_and(|v| v == "true");
    let root = tproxy || trace;
    SecurityContext {
        allow_privilege_escalation: Some(trace),
        privileged: Some(trace),
        capabilities: Some(Capabilities {
            add: root.then(|| vec!["NET_ADMIN".to_owned()]),
            drop: Some(vec!["ALL".to_owned()]),
        }),
        read_only_root_filesystem: Some(true),
        run_as_user: Some(if root { 0 } else { settings.uid }),
        run_as_group: Some(settings.uid),
        run_as_non_root: Some(!root),
        seccomp_profile: settings.seccomp_profile.clone(),
        ..Default::default()
    }
}

pub(super) fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        ..Default::default()
    }
}

fn proxy_volume_mounts(settings: &Settings) -> Vec<VolumeMount> {
    let mut mounts = vec![
        mount("workload-socket", "/var/run/secrets/workload-spiffe-uds"),
        mount("credential-socket", "/var/run/secrets/credential-uds"),
        mount(
            "workload-certs",
            "/var/run/secrets/workload-spiffe-credentials",
        ),
        mount("istiod-ca-cert", "/var/run/secrets/istio"),
        mount("istio-ca-crl", "/var/run/secrets/istio/crl"),
        mount("istio-data", "/var/lib/istio/data"),
        mount("istio-envoy", "/etc/istio/proxy"),
        mount("istio-token", "/var/run/secrets/tokens"),
        mount("istio-podinfo", "/etc/istio/pod"),
    ];
    mounts.extend(settings.user_volume_mounts.iter().cloned());
    mounts
}

/// The env every proxy template starts with: certificate provider, CA,
/// the pod's identity and addresses, its CPU limit and `PROXY_CONFIG`.
pub(super) fn leading_env(settings: &Settings) -> Vec<EnvVar> {
    vec![
        env("PILOT_CERT_PROVIDER", "istiod"),
        env("CA_ADDR", settings.ca_address.clone()),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("HOST_IP", "status.hostIP"),
        resource_env("ISTIO_CPU_LIMIT", "limits.cpu"),
        env("PROXY_CONFIG", settings.proxy_config.clone()),
    ]
}

fn proxy_env(settings: &Settings, facts: &PodFacts<'_>) -> Vec<EnvVar> {
    let mut vars = leading_env(settings);
    vars.extend([
        env("ISTIO_META_POD_PORTS", pod_ports(facts.app_containers)),
        env(
            "ISTIO_META_APP_CONTAINERS",
            facts
                .app_containers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        resource_env("GOMEMLIMIT", "limits.memory"),
        resource_env("GOMAXPROCS", "limits.cpu"),
    ]);
    if !settings.trailing_env.contains_key("ISTIO_META_CLUSTER_ID") {
        vars.push(env("ISTIO_META_CLUSTER_ID", settings.cluster_id.clone()));
    }
    vars.push(field_env("ISTIO_META_NODE_NAME", "spec.nodeName"));
    vars.push(env(
        "ISTIO_META_INTERCEPTION_MODE",
        settings.interception_mode.as_str(),
    ));
    push_identity_env(
        &mut vars,
        facts.workload.display_name(facts.pod),
        || facts.workload.owner(facts.namespace),
        settings,
    );
    vars
}

/// The arguments of the agent for a proxy of `mode` (`sidecar`, `router`),
/// as every proxy template writes them.
pub(super) fn proxy_args(mode: &str, settings: &Settings) -> Vec<String> {
    vec![
        "proxy".to_owned(),
        mode.to_owned(),
        "--domain".to_owned(),
        "$(POD_NAMESPACE).svc.cluster.local".to_owned(),
        format!("--proxyLogLevel={}", settings.log_level),
        format!("--proxyComponentLogLevel={}", settings.component_log_level),
        format!("--log_output_level={}", settings.agent_log_level),
    ]
}

/// The identity part of a proxy's env, as every proxy template writes it:
/// the workload's name and owner (when it has a name), the mesh ID, the
/// trust domain, then the proxy metadata in name order.
pub(super) fn push_identity_env(
    vars: &mut Vec<EnvVar>,
    workload_name: &str,
    owner: impl FnOnce() -> String,
    settings: &Settings,
) {
    if !workload_name.is_empty() {
        vars.push(env("ISTIO_META_WORKLOAD_NAME", workload_name));
        vars.push(env("ISTIO_META_OWNER", owner()));
    }
    vars.push(env("ISTIO_META_MESH_ID", settings.mesh_id.clone()));
    vars.push(env("TRUST_DOMAIN", settings.trust_domain.clone()));
    vars.extend(
        settings
            .proxy_metadata
            .iter()
            .map(|(k, v)| env(k, v.clone())),
    );
}

/// The cluster, network and webhook-URL env (`trailing_env`), set as Istio
/// does after the user's overrides: any entry of the same name removed,
/// then all of them appended in name order.
pub fn set_trailing_env(proxy: &mut Container, trailing_env: &BTreeMap<String, String>) {
    if trailing_env.is_empty() {
        return;
    }
    let vars = proxy.env.get_or_insert_with(Vec::new);
    vars.retain(|e| !trailing_env.contains_key(&e.name));
    vars.extend(trailing_env.iter().map(|(k, v)| env(k, v.clone())));
}

/// The app containers' named ports (name -> port), for lookups.
pub fn named_ports(container: &Container) -> BTreeMap<&str, i32> {
    container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.as_deref().map(|n| (n, p.container_port)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_inbound_ports_append_status_port_unless_listed_or_zero() {
        assert_eq!(
            excluded_inbound_ports(" 4, ,5,6 ", 15020),
            "15090,15021,4,5,6,15020"
        );
        assert_eq!(excluded_inbound_ports("15020", 15020), "15090,15021,15020");
        assert_eq!(excluded_inbound_ports("", 0), "15090,15021");
        assert_eq!(excluded_inbound_ports("", 15020), "15090,15021,15020");
        // Listed as is: the user's value is kept untouched, spaces and all.
        assert_eq!(
            excluded_inbound_ports("4, 5,15020", 15020),
            "15090,15021,4, 5,15020"
        );
    }

    #[test]
    fn pod_ports_use_istio_layout() {
        let c = Container {
            name: "app".into(),
            ports: Some(vec![
                ContainerPort {
                    name: Some("http".into()),
                    container_port: 80,
                    ..Default::default()
                },
                ContainerPort {
                    name: Some("grpc".into()),
                    container_port: 90,
                    protocol: Some("TCP".into()),
                    host_port: Some(0),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(
            pod_ports(&[&c]),
            "[\n    {\"name\":\"http\",\"containerPort\":80}\n    ,{\"name\":\"grpc\",\"containerPort\":90,\"protocol\":\"TCP\"}\n]"
        );
        assert_eq!(pod_ports(&[]), "[\n]");
    }
}
