//! The effective settings for one pod: Mesh < namespace ProxyProfile <
//! workload ProxyProfile < the pod's annotations, validated, each bad value
//! reported with the annotation or field that carried it.

use std::collections::BTreeMap;

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::mesh::{MeshSpec, NativeSidecars};
use ferrimesh_crds::settings::{
    CniSettings, InterceptionMode, ProxySettings, TrafficSettings, TrafficSettingsOverride,
};
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, SeccompProfile, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

use super::Environment;
use super::annotations as ann;
use super::proxy_config::{ProxyConfig, ProxyConfigEnv, parse_duration};
use super::quantity::canonicalize;
use super::templates::Templates;
use crate::{Error, Result};

/// The arguments of `istio-iptables` that come from settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Capture {
    /// `-p`
    pub proxy_listen_port: i32,
    /// `-z`
    pub inbound_listen_port: i32,
    /// `-i`
    pub include_outbound_ip_ranges: String,
    /// `-x`
    pub exclude_outbound_ip_ranges: String,
    /// `-b`
    pub include_inbound_ports: String,
    /// The user's part of `-d`.
    pub exclude_inbound_ports: String,
    /// `-q`, when passed at all.
    pub include_outbound_ports: Option<String>,
    /// `-o`, when passed at all.
    pub exclude_outbound_ports: Option<String>,
    /// `-k`, when passed at all.
    pub reroute_virtual_interfaces: Option<String>,
    /// `-c`, when passed at all.
    pub exclude_interfaces: Option<String>,
}

/// Everything the builders need, resolved for one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The revision written to `istio.io/rev` and the status annotation.
    pub revision: String,
    /// `ISTIO_META_MESH_ID`.
    pub mesh_id: String,
    /// `TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `ISTIO_META_CLUSTER_ID`.
    pub cluster_id: String,
    /// Env vars for the sorted block at the end of the proxy env (cluster,
    /// network and URL parameters); when it holds the cluster ID, the ID is
    /// written there rather than in its usual place.
    pub trailing_env: BTreeMap<String, String>,
    /// The network, when one is known (also labelled on the pod).
    pub network: Option<String>,
    /// `CA_ADDR`.
    pub ca_address: String,
    /// Native sidecar layout.
    pub native: bool,
    /// Hold the application until the proxy is ready.
    pub hold_application: bool,
    /// Rewrite application probes.
    pub rewrite_probes: bool,
    /// Merge Prometheus metrics.
    pub merge_metrics: bool,
    /// `imagePullPolicy` of the injected containers.
    pub image_pull_policy: Option<String>,
    /// Pull secrets put before the pod's own.
    pub image_pull_secrets: Vec<String>,
    /// Annotations put on every injected pod.
    pub injected_annotations: BTreeMap<String, String>,
    /// `istio-proxy` image.
    pub proxy_image: String,
    /// `istio-init` image.
    pub init_image: String,
    /// Resources of both containers, canonical quantities.
    pub resources: ResourceRequirements,
    /// `--proxyLogLevel`.
    pub log_level: String,
    /// `--proxyComponentLogLevel`.
    pub component_log_level: String,
    /// `--log_output_level`.
    pub agent_log_level: String,
    /// The status port of probes, `-d`, preStop and rewritten probes.
    pub status_port: i32,
    /// The configured status port (Mesh < profiles < proxy config), used for
    /// `prometheus.io/port`.
    pub metrics_port: i32,
    /// Readiness probe initialDelaySeconds.
    pub readiness_initial_delay_seconds: i32,
    /// Readiness probe periodSeconds.
    pub readiness_period_seconds: i32,
    /// Readiness probe failureThreshold.
    pub readiness_failure_threshold: i32,
    /// Proxy UID/GID.
    pub uid: i64,
    /// Interception mode.
    pub interception_mode: InterceptionMode,
    /// The injection templates the pod gets (`inject.istio.io/templates`,
    /// else the Mesh's default).
    pub templates: Templates,
    /// The interception mode of the Mesh or proxy config, before the pod's
    /// own annotation.
    pub proxy_config_mode: InterceptionMode,
    /// Whether the proxy must run as root for TPROXY whatever runAsUser a
    /// user asks for: TPROXY in the Mesh or proxy config (even when the
    /// pod's annotation chose another mode), or in the pod's annotation.
    pub tproxy_forces_root: bool,
    /// Effective proxy metadata.
    pub proxy_metadata: BTreeMap<String, String>,
    /// The rendered `PROXY_CONFIG`.
    pub proxy_config: String,
    /// iptables settings.
    pub capture: Capture,
    /// Volumes from `sidecar.istio.io/userVolume`, sorted by name.
    pub user_volumes: Vec<Volume>,
    /// Mounts from `sidecar.istio.io/userVolumeMount`, sorted by name.
    pub user_volume_mounts: Vec<VolumeMount>,
    /// Istio CNI mode: `istio-validation` instead of `istio-init`.
    pub cni: CniSettings,
    /// The seccomp profile of the injected containers.
    pub seccomp_profile: Option<SeccompProfile>,
}

struct Annotations<'a>(Option<&'a BTreeMap<String, String>>);

impl<'a> Annotations<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0.and_then(|a| a.get(name)).map(String::as_str)
    }

    /// A validated annotation: `check` returns why a value is refused.
    fn checked<T>(
        &self,
        name: &str,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>> {
        self.get(name)
            .map(|v| check(v).map_err(|reason| Error::annotation(name, v, reason)))
            .transpose()
    }
}

fn i32_value(value: &str) -> Result<i32, String> {
    ann::parse_u32(value).and_then(|v| i32::try_from(v).map_err(|_| "too large".to_owned()))
}

/// The ProxyProfiles that apply to a pod, lowest precedence first, with a
/// warning for every profile that lost to an older one of the same level
/// (`ferrimesh_crds::proxy_profile::select`, shared with the operator).
pub fn select_profiles<'p>(
    pod: &Pod,
    profiles: &'p [ProxyProfile],
    warnings: &mut Vec<String>,
) -> Vec<&'p ProxyProfile> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    ferrimesh_crds::proxy_profile::select(labels, profiles, warnings)
}

fn check_traffic_field(origin: &str, field: &str, value: &str) -> Result<()> {
    let result = match field {
        "includeOutboundIPRanges" => ann::validate_cidr_list(value, true),
        "excludeOutboundIPRanges" => ann::validate_cidr_list(value, false),
        "includeInboundPorts" => ann::validate_port_list(value, true),
        "excludeInboundPorts" | "includeOutboundPorts" | "excludeOutboundPorts" => {
            ann::validate_port_list(value, false)
        }
        _ => ann::validate_interface_list(value),
    };
    result.map_err(|reason| Error::InvalidSetting {
        origin: origin.to_owned(),
        field: format!("traffic.{field}"),
        value: value.to_owned(),
        reason,
    })
}

fn traffic_lists(t: &TrafficSettingsOverride) -> [(&'static str, Option<&String>); 8] {
    [
        (
            "includeOutboundIPRanges",
            t.include_outbound_ip_ranges.as_ref(),
        ),
        (
            "excludeOutboundIPRanges",
            t.exclude_outbound_ip_ranges.as_ref(),
        ),
        ("includeInboundPorts", t.include_inbound_ports.as_ref()),
        ("excludeInboundPorts", t.exclude_inbound_ports.as_ref()),
        ("includeOutboundPorts", t.include_outbound_ports.as_ref()),
        ("excludeOutboundPorts", t.exclude_outbound_ports.as_ref()),
        ("excludeInterfaces", t.exclude_interfaces.as_ref()),
        (
            "rerouteVirtualInterfaces",
            t.reroute_virtual_interfaces.as_ref(),
        ),
    ]
}

fn as_override(t: &TrafficSettings) -> TrafficSettingsOverride {
    TrafficSettingsOverride {
        include_outbound_ip_ranges: Some(t.include_outbound_ip_ranges.clone()),
        exclude_outbound_ip_ranges: Some(t.exclude_outbound_ip_ranges.clone()),
        include_inbound_ports: Some(t.include_inbound_ports.clone()),
        exclude_inbound_ports: Some(t.exclude_inbound_ports.clone()),
        include_outbound_ports: Some(t.include_outbound_ports.clone()),
        exclude_outbound_ports: Some(t.exclude_outbound_ports.clone()),
        exclude_interfaces: Some(t.exclude_interfaces.clone()),
        reroute_virtual_interfaces: Some(t.reroute_virtual_interfaces.clone()),
        ..Default::default()
    }
}

fn check_traffic(origin: &str, traffic: &TrafficSettingsOverride) -> Result<()> {
    for (field, value) in traffic_lists(traffic) {
        if let Some(value) = value {
            check_traffic_field(origin, field, value)?;
        }
    }
    Ok(())
}

fn check_proxy(origin: &str, proxy: &ProxySettings) -> Result<()> {
    let invalid = |field: &str, value: &str, reason: String| Error::InvalidSetting {
        origin: origin.to_owned(),
        field: format!("proxy.{field}"),
        value: value.to_owned(),
        reason,
    };
    if let Some(duration) = &proxy.drain_duration {
        parse_duration(duration).map_err(|e| invalid("drainDuration", duration, e))?;
    }
    if !(0..=65535).contains(&proxy.status_port) {
        return Err(invalid(
            "statusPort",
            &proxy.status_port.to_string(),
            "must be a port number (0-65535)".into(),
        ));
    }
    Ok(())
}

fn canonical_resources(
    resources: &ResourceRequirements,
    origin: &str,
) -> Result<ResourceRequirements> {
    let canonical = |map: &Option<BTreeMap<String, Quantity>>, kind: &str| -> Result<_> {
        map.as_ref()
            .map(|m| {
                m.iter()
                    .map(|(k, q)| {
                        canonicalize(&q.0)
                            .map(|c| (k.clone(), Quantity(c)))
                            .map_err(|e| Error::InvalidSetting {
                                origin: origin.to_owned(),
                                field: format!("proxy.resources.{kind}.{k}"),
                                value: q.0.clone(),
                                reason: e.to_string(),
                            })
                    })
                    .collect::<Result<BTreeMap<_, _>>>()
            })
            .transpose()
    };
    Ok(ResourceRequirements {
        requests: canonical(&resources.requests, "requests")?,
        limits: canonical(&resources.limits, "limits")?,
        claims: resources.claims.clone(),
    })
}

/// Resources from the four resource annotations, when any is present; they
/// replace the configured resources entirely.
fn annotation_resources(a: &Annotations<'_>) -> Result<Option<ResourceRequirements>> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, is_limit, key) in [
        (ann::PROXY_CPU, false, "cpu"),
        (ann::PROXY_MEMORY, false, "memory"),
        (ann::PROXY_CPU_LIMIT, true, "cpu"),
        (ann::PROXY_MEMORY_LIMIT, true, "memory"),
    ] {
        if let Some(q) = a.checked(name, |v| {
            canonicalize(v)
                .map_err(|_| "must be a Kubernetes quantity such as 500m or 1Gi".to_owned())
        })? {
            let map = if is_limit { &mut limits } else { &mut requests };
            map.insert(key.to_owned(), Quantity(q));
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return Ok(None);
    }
    Ok(Some(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        claims: None,
    }))
}

/// The Mesh's `injection.defaultTemplates` (empty: `[sidecar]`, as in
/// Istio).
fn default_templates(origin: &str, names: &[String]) -> Result<Templates> {
    if names.is_empty() {
        return Ok(Templates::default());
    }
    Templates::from_names(names.iter().map(|n| n.trim())).map_err(|reason| Error::InvalidSetting {
        origin: origin.to_owned(),
        field: "injection.defaultTemplates".to_owned(),
        value: names.join(","),
        reason,
    })
}

/// Parses a JSON map annotation (`userVolume`, `userVolumeMount`) whose keys
/// become the `name` of each entry; an unusable value is a warning.
fn named_entries<T: serde::de::DeserializeOwned>(
    a: &Annotations<'_>,
    name: &str,
    warnings: &mut Vec<String>,
) -> Vec<T> {
    let Some(raw) = a.get(name) else {
        return Vec::new();
    };
    let parsed = serde_json::from_str::<BTreeMap<String, Value>>(raw)
        .map_err(|e| e.to_string())
        .and_then(|map| {
            map.into_iter()
                .map(|(key, mut value)| {
                    let object = value
                        .as_object_mut()
                        .ok_or_else(|| format!("entry {key:?} is not an object"))?;
                    object.insert("name".to_owned(), Value::String(key.clone()));
                    serde_json::from_value(value).map_err(|e| format!("entry {key:?}: {e}"))
                })
                .collect::<Result<Vec<T>, String>>()
        });
    match parsed {
        Ok(entries) => entries,
        Err(e) => {
            warnings.push(format!("annotation {name} is ignored: {e}"));
            Vec::new()
        }
    }
}

/// The part of the settings that depends on the Mesh alone: its proxy and
/// traffic settings checked, its resources in canonical form and its
/// default templates. It is the
/// same for every pod a Mesh generation serves, so the webhook resolves it
/// once per generation rather than once per admission.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshSettings {
    resources: ResourceRequirements,
    default_templates: Templates,
}

impl MeshSettings {
    /// Checks `mesh` and canonicalises its resources; the error names the
    /// first field the injector refuses.
    pub fn resolve(mesh: &MeshSpec) -> Result<Self> {
        let origin = format!("Mesh (revision {})", mesh.revision);
        check_proxy(&origin, &mesh.proxy)?;
        check_traffic(&origin, &as_override(&mesh.traffic))?;
        Ok(Self {
            resources: canonical_resources(&mesh.proxy.resources, &origin)?,
            default_templates: default_templates(&origin, &mesh.injection.default_templates)?,
        })
    }
}

impl Settings {
    /// Resolves the settings for `pod`, which the decision says to inject;
    /// `mesh_settings` is [`MeshSettings::resolve`] of `mesh`.
    pub fn resolve(
        pod: &Pod,
        mesh: &MeshSpec,
        mesh_settings: &MeshSettings,
        profiles: &[&ProxyProfile],
        env: &Environment,
        warnings: &mut Vec<String>,
    ) -> Result<Self> {
        let mut proxy = mesh.proxy.clone();
        let mut traffic = mesh.traffic.clone();
        let mut resources = mesh_settings.resources.clone();
        for profile in profiles {
            let origin = format!("ProxyProfile {}", profile.display_name());
            check_traffic(&origin, &profile.spec.traffic)?;
            if let Some(r) = &profile.spec.proxy.resources {
                ferrimesh_crds::settings::merge_resources(
                    &mut resources,
                    &canonical_resources(r, &origin)?,
                );
            }
            proxy.apply(&profile.spec.proxy);
            traffic.apply(&profile.spec.traffic);
            check_proxy(&origin, &proxy)?;
        }

        let a = Annotations(pod.metadata.annotations.as_ref());
        let templates = match a.checked(ann::TEMPLATES, Templates::parse)? {
            Some(templates) => templates,
            None => mesh_settings.default_templates,
        };
        let config = a
            .checked(ann::PROXY_CONFIG, ProxyConfig::parse)?
            .unwrap_or_default();
        for field in config.other.keys() {
            warnings.push(format!(
                "{} field {field} is not applied by ferrimesh",
                ann::PROXY_CONFIG
            ));
        }

        // Proxy config (Mesh < profiles < proxy.istio.io/config).
        let mut proxy_metadata = proxy.proxy_metadata.clone();
        proxy_metadata.extend(config.proxy_metadata.clone());
        let config_mode = config
            .interception_mode
            .as_deref()
            .and_then(InterceptionMode::parse)
            .unwrap_or(traffic.interception_mode);
        let metrics_port = config.status_port.unwrap_or(proxy.status_port);
        let discovery_address = config
            .discovery_address
            .clone()
            .unwrap_or_else(|| mesh.effective_discovery_address());
        let drain = match config
            .drain_duration
            .as_ref()
            .or(proxy.drain_duration.as_ref())
        {
            Some(d) => {
                Some(parse_duration(d).map_err(|e| Error::annotation(ann::PROXY_CONFIG, d, e))?)
            }
            None => None,
        };
        let proxy_config = ProxyConfigEnv {
            drain_duration: drain,
            discovery_address: Some(discovery_address),
            concurrency: config.concurrency.or(proxy.concurrency),
            interception_mode: Some(config_mode.as_str()),
            proxy_metadata: proxy_metadata.clone(),
            status_port: Some(metrics_port),
            // A Mesh ID other than the trust domain is mesh-wide proxy
            // config in Istio (its chart's `global.meshID` becomes
            // `defaultConfig.meshId`); one equal to it is Istio's default.
            mesh_id: config
                .mesh_id
                .clone()
                .or_else(|| (mesh.mesh_id != mesh.trust_domain).then(|| mesh.mesh_id.clone())),
            hold_application_until_proxy_starts: config.hold_application_until_proxy_starts,
        }
        .render();

        // Per-pod annotations.
        let interception_mode = a
            .checked(ann::INTERCEPTION_MODE, |v| {
                InterceptionMode::parse(v)
                    .ok_or_else(|| "must be one of REDIRECT, TPROXY, NONE".to_owned())
            })?
            .unwrap_or(config_mode);
        let status_port = a
            .checked(ann::STATUS_PORT, ann::parse_port)?
            .map_or(metrics_port, i32::from);
        let readiness = |name: &str, default: i32| -> Result<i32> {
            Ok(a.checked(name, i32_value)?.unwrap_or(default))
        };
        let merge_metrics = a
            .checked(ann::MERGE_METRICS, |v| {
                ann::parse_bool(v).ok_or_else(|| "must be a boolean".to_owned())
            })?
            .unwrap_or(mesh.injection.merge_prometheus_metrics);
        let rewrite_probes = match a.get(ann::REWRITE_APP_PROBES) {
            None => mesh.injection.rewrite_app_probes,
            Some(v) => ann::parse_bool(v).unwrap_or_else(|| {
                warnings.push(format!(
                    "annotation {}={v:?} is not a boolean; the Mesh's rewriteAppProbes applies",
                    ann::REWRITE_APP_PROBES
                ));
                mesh.injection.rewrite_app_probes
            }),
        };
        if let Some(r) = annotation_resources(&a)? {
            resources = r;
        }

        let mut proxy_image = proxy.image.clone();
        let mut init_image = if proxy.init_image.is_empty() {
            proxy.image.clone()
        } else {
            proxy.init_image.clone()
        };
        if let Some(image) = a.get(ann::PROXY_IMAGE) {
            if image.contains('/') {
                proxy_image = image.to_owned();
                init_image = image.to_owned();
            } else {
                warnings.push(format!(
                    "annotation {}={image:?} is ignored: it is not a full image reference (no '/')",
                    ann::PROXY_IMAGE
                ));
            }
        }

        let native = match a.get(ann::NATIVE_SIDECAR) {
            Some("false") => false,
            Some(v) if !v.is_empty() => true,
            _ => match mesh.injection.native_sidecars {
                NativeSidecars::Enabled => true,
                NativeSidecars::Disabled => false,
                NativeSidecars::Auto => env.native_sidecars_supported,
            },
        };

        let capture = Self::capture(&a, &traffic, warnings)?;

        // Cluster, network and URL parameters.
        let labels = pod.metadata.labels.as_ref();
        let network = labels
            .and_then(|l| l.get(ann::NETWORK_LABEL))
            .filter(|n| !n.is_empty())
            .cloned()
            .or_else(|| env.network.clone())
            .or_else(|| (!mesh.network.is_empty()).then(|| mesh.network.clone()));
        let cluster_id = env
            .cluster_id
            .clone()
            .unwrap_or_else(|| mesh.cluster_id.clone());
        let mut trailing_env: BTreeMap<String, String> = env.extra_env.clone();
        if env.cluster_id.is_some() || cluster_id != "Kubernetes" {
            trailing_env.insert("ISTIO_META_CLUSTER_ID".to_owned(), cluster_id.clone());
        }
        if let Some(network) = &network {
            trailing_env.insert("ISTIO_META_NETWORK".to_owned(), network.clone());
        }

        Ok(Self {
            revision: mesh.revision.clone(),
            mesh_id: config
                .mesh_id
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| mesh.mesh_id.clone()),
            trust_domain: mesh.trust_domain.clone(),
            cluster_id,
            trailing_env,
            network,
            ca_address: mesh.effective_ca_address(),
            native,
            hold_application: mesh.injection.hold_application_until_proxy_starts
                || config.hold_application_until_proxy_starts.unwrap_or(false),
            rewrite_probes,
            merge_metrics,
            image_pull_policy: mesh
                .injection
                .image_pull_policy
                .as_kubernetes()
                .map(str::to_owned),
            image_pull_secrets: mesh.injection.image_pull_secrets.clone(),
            injected_annotations: mesh.injection.injected_annotations.clone(),
            proxy_image,
            init_image,
            resources,
            log_level: a
                .get(ann::LOG_LEVEL)
                .map_or(proxy.log_level.clone(), str::to_owned),
            component_log_level: a
                .get(ann::COMPONENT_LOG_LEVEL)
                .map_or(proxy.component_log_level.clone(), str::to_owned),
            agent_log_level: a
                .get(ann::AGENT_LOG_LEVEL)
                .map_or(proxy.agent_log_level.clone(), str::to_owned),
            status_port,
            metrics_port,
            readiness_initial_delay_seconds: readiness(
                ann::READINESS_INITIAL_DELAY,
                proxy.readiness_initial_delay_seconds,
            )?,
            readiness_period_seconds: readiness(
                ann::READINESS_PERIOD,
                proxy.readiness_period_seconds,
            )?,
            readiness_failure_threshold: readiness(
                ann::READINESS_FAILURE_THRESHOLD,
                proxy.readiness_failure_threshold,
            )?,
            uid: proxy.uid,
            interception_mode,
            templates,
            proxy_config_mode: config_mode,
            tproxy_forces_root: config_mode == InterceptionMode::Tproxy
                || a.get(ann::INTERCEPTION_MODE) == Some(InterceptionMode::Tproxy.as_str()),
            proxy_metadata,
            proxy_config,
            capture,
            user_volumes: named_entries(&a, ann::USER_VOLUME, warnings),
            user_volume_mounts: named_entries(&a, ann::USER_VOLUME_MOUNT, warnings),
            cni: traffic.cni.clone(),
            seccomp_profile: proxy.seccomp_profile.clone(),
        })
    }

    fn capture(
        a: &Annotations<'_>,
        traffic: &TrafficSettings,
        warnings: &mut Vec<String>,
    ) -> Result<Capture> {
        let list =
            |name: &str, default: &str, check: fn(&str) -> Result<(), String>| -> Result<String> {
                Ok(a.checked(name, |v| check(v).map(|()| v.to_owned()))?
                    .unwrap_or_else(|| default.to_owned()))
            };
        // Present when the annotation is present (even empty) or the value is non-empty.
        let optional = |annotation: Option<&str>, value: &str| -> Option<String> {
            annotation
                .map(str::to_owned)
                .or_else(|| (!value.is_empty()).then(|| value.to_owned()))
        };
        let exclude_outbound_ports = list(ann::EXCLUDE_OUTBOUND_PORTS, "", |v| {
            ann::validate_port_list(v, false)
        })?;
        let exclude_interfaces = list(ann::EXCLUDE_INTERFACES, "", ann::validate_interface_list)?;
        let reroute = a
            .checked(ann::REROUTE_VIRTUAL_INTERFACES, |v| {
                ann::validate_interface_list(v).map(|()| v.to_owned())
            })?
            .or(a.checked(ann::KUBEVIRT_INTERFACES, |v| {
                ann::validate_interface_list(v).map(|()| v.to_owned())
            })?);
        let include_outbound_ports = a.get(ann::INCLUDE_OUTBOUND_PORTS);
        if let Some(Err(e)) = include_outbound_ports.map(|v| ann::validate_port_list(v, false)) {
            warnings.push(format!("annotation {}: {e}", ann::INCLUDE_OUTBOUND_PORTS));
        }
        Ok(Capture {
            proxy_listen_port: traffic.proxy_listen_port,
            inbound_listen_port: traffic.inbound_listen_port,
            include_outbound_ip_ranges: list(
                ann::INCLUDE_OUTBOUND_IP_RANGES,
                &traffic.include_outbound_ip_ranges,
                |v| ann::validate_cidr_list(v, true),
            )?,
            exclude_outbound_ip_ranges: list(
                ann::EXCLUDE_OUTBOUND_IP_RANGES,
                &traffic.exclude_outbound_ip_ranges,
                |v| ann::validate_cidr_list(v, false),
            )?,
            include_inbound_ports: list(
                ann::INCLUDE_INBOUND_PORTS,
                &traffic.include_inbound_ports,
                |v| ann::validate_port_list(v, true),
            )?,
            exclude_inbound_ports: list(
                ann::EXCLUDE_INBOUND_PORTS,
                &traffic.exclude_inbound_ports,
                |v| ann::validate_port_list(v, false),
            )?,
            include_outbound_ports: optional(
                include_outbound_ports,
                &traffic.include_outbound_ports,
            ),
            exclude_outbound_ports: optional(
                a.get(ann::EXCLUDE_OUTBOUND_PORTS)
                    .map(|_| exclude_outbound_ports.as_str()),
                &traffic.exclude_outbound_ports,
            ),
            reroute_virtual_interfaces: optional(
                reroute.as_deref(),
                &traffic.reroute_virtual_interfaces,
            ),
            exclude_interfaces: optional(
                a.get(ann::EXCLUDE_INTERFACES)
                    .map(|_| exclude_interfaces.as_str()),
                &traffic.exclude_interfaces,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;
    use serde_json::json;

    use super::*;
    use crate::inject::{Request, inject, inject_with};

    fn mesh_with_cpu_request(cpu: &str) -> MeshSpec {
        let mut mesh = MeshSpec::default();
        mesh.proxy.resources.requests = Some(BTreeMap::from([(
            "cpu".to_owned(),
            Quantity(cpu.to_owned()),
        )]));
        mesh
    }

    #[test]
    fn mesh_settings_refuse_an_invalid_mesh_naming_the_field() {
        let mut mesh = MeshSpec::default();
        mesh.traffic.exclude_outbound_ip_ranges = "10.0.0.0/40".into();
        let error = MeshSettings::resolve(&mesh)
            .expect_err("an invalid CIDR is refused")
            .to_string();
        assert!(
            error.contains("traffic.excludeOutboundIPRanges") && error.contains("10.0.0.0/40"),
            "{error}"
        );
    }

    #[test]
    fn mesh_settings_hold_the_mesh_resources_in_canonical_form() {
        let settings = MeshSettings::resolve(&mesh_with_cpu_request("0.5")).expect("valid");
        let cpu = settings
            .resources
            .requests
            .as_ref()
            .and_then(|r| r.get("cpu"));
        assert_eq!(cpu, Some(&Quantity("500m".to_owned())));
    }

    #[test]
    fn injecting_with_resolved_mesh_settings_gives_what_inject_gives() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"containers": [{"name": "web", "image": "web:1"}]}
        }))
        .expect("pod");
        let mesh = mesh_with_cpu_request("0.5");
        let environment = Environment::default();
        let request = Request {
            pod: &pod,
            namespace: "shop",
            mesh: &mesh,
            profiles: &[],
            environment: &environment,
            workload: None,
        };
        let settings = MeshSettings::resolve(&mesh).expect("valid");
        let with = inject_with(&request, Some(&settings)).expect("injects");
        assert_eq!(with, inject(&request).expect("injects"));
        let proxy: Option<&Container> =
            with.pod
                .as_ref()
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| {
                    s.init_containers
                        .iter()
                        .flatten()
                        .chain(&s.containers)
                        .find(|c| c.name == "istio-proxy")
                });
        let cpu = proxy
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("cpu"));
        assert_eq!(cpu, Some(&Quantity("500m".to_owned())));
    }
}
