//! The one mapping from a ferrimesh `Mesh` to the configuration Istio's
//! `istio-discovery` Helm chart would give istiod for the same mesh: the
//! injector's `values` and `config` (the `istio-sidecar-injector` ConfigMap),
//! the `mesh` of the `istio` ConfigMap, and istiod's environment.
//!
//! The chart's own files (its `values.yaml` and injection templates, read
//! from the `istio.io/istio` module at test time) give every default; this
//! module lays the Mesh's settings over them exactly where a Helm user would
//! set them, and refuses the Mesh settings Istio has no place for, so a
//! differential test never compares two different meshes.

use std::path::Path;

use anyhow::{Context, bail};
use ferrimesh_crds::MeshSpec;
use ferrimesh_crds::mesh::{InjectionPolicy, NativeSidecars};
use ferrimesh_crds::settings::{CniProvider, DEFAULT_PROXY_UID, InterceptionMode};
use serde_json::{Map, Value, json};

/// The injection templates of the chart (`files/<name>.yaml`), by the name
/// the injector knows them under.
pub const TEMPLATES: [(&str, &str); 8] = [
    ("sidecar", "injection-template.yaml"),
    ("gateway", "gateway-injection-template.yaml"),
    ("grpc-simple", "grpc-simple.yaml"),
    ("grpc-agent", "grpc-agent.yaml"),
    ("waypoint", "waypoint.yaml"),
    ("kube-gateway", "kube-gateway.yaml"),
    ("agentgateway", "agentgateway.yaml"),
    ("agentgateway-waypoint", "agentgateway-waypoint.yaml"),
];

/// istiod's configuration for one Mesh.
#[derive(Debug, Clone)]
pub struct IstioConfig {
    /// istiod's `REVISION` (the Mesh's revision).
    pub revision: String,
    /// The injector's `values` (JSON), as the chart renders them.
    pub values: Value,
    /// The injector's `config` (YAML).
    pub injector: String,
    /// The MeshConfig (YAML) of the `istio` ConfigMap.
    pub mesh: String,
    /// Environment variables of the istiod process.
    pub env: Vec<(String, String)>,
}

impl IstioConfig {
    /// The names of the two ConfigMaps istiod reads for this revision:
    /// mesh config and injector config (`istio[-rev]`,
    /// `istio-sidecar-injector[-rev]`).
    pub fn config_map_names(&self) -> (String, String) {
        let suffix = if self.revision == "default" {
            String::new()
        } else {
            format!("-{}", self.revision)
        };
        (
            format!("istio{suffix}"),
            format!("istio-sidecar-injector{suffix}"),
        )
    }
}

/// Renders istiod's configuration for `mesh` from the chart in `chart_dir`
/// (`manifests/charts/istio-control/istio-discovery` of the istio module).
pub fn render(mesh: &MeshSpec, chart_dir: &Path) -> anyhow::Result<IstioConfig> {
    let values_file = chart_dir.join("values.yaml");
    let chart_values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(&values_file)
            .with_context(|| format!("reading {}", values_file.display()))?,
    )
    .with_context(|| format!("parsing {}", values_file.display()))?;
    let mut values = chart_defaults(chart_values);
    merge(&mut values, values_overlay(mesh)?);
    let mut templates = Map::new();
    for (name, file) in TEMPLATES {
        let path = chart_dir.join("files").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        templates.insert(name.to_owned(), Value::String(text));
    }
    templates.insert("spire".to_owned(), Value::String(spire_template(mesh)?));
    let injector = injector_config(&values, templates);
    Ok(IstioConfig {
        revision: mesh.revision.clone(),
        values: injector_values(&values),
        injector: serde_json::to_string_pretty(&injector)?,
        mesh: serde_json::to_string_pretty(&mesh_config(mesh, &values))?,
        env: istiod_env(mesh),
    })
}

/// The `spire` template of Istio's SPIRE integration, which users add to
/// the chart's `sidecarInjectorWebhook.templates` (the chart has none),
/// for the Mesh's default template list.
pub fn spire_template(mesh: &MeshSpec) -> anyhow::Result<String> {
    let path = crate::repo_root().join("e2e/differential/spire-template.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.replace(
        "DEFAULT_TEMPLATES",
        &mesh.injection.default_templates.join(","),
    ))
}

/// The chart's values as Helm sees them with no user values:
/// `_internal_defaults_do_not_set` laid under the top level.
fn chart_defaults(mut chart: Value) -> Value {
    let defaults = chart
        .as_object_mut()
        .and_then(|c| c.remove("_internal_defaults_do_not_set"))
        .unwrap_or_else(|| json!({}));
    let mut values = defaults;
    merge(&mut values, chart);
    values
}

/// Deep-merges `over` into `base`: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// The chart values a Helm user would set for `mesh`. Fails for settings
/// Istio's chart cannot express.
pub fn values_overlay(mesh: &MeshSpec) -> anyhow::Result<Value> {
    let proxy = &mesh.proxy;
    let traffic = &mesh.traffic;
    if proxy.uid != DEFAULT_PROXY_UID {
        bail!(
            "proxy.uid {}: Istio's chart has no setting for the proxy UID",
            proxy.uid
        );
    }
    if !traffic.exclude_interfaces.is_empty() || !traffic.reroute_virtual_interfaces.is_empty() {
        bail!(
            "traffic.excludeInterfaces/rerouteVirtualInterfaces: Istio reads them from pod annotations only"
        );
    }
    let init_image = if proxy.init_image.is_empty() {
        &proxy.image
    } else {
        &proxy.init_image
    };
    // As a Helm user writes it: `hub`, `tag` and the image's name, so that
    // Istio's image logic (annotations without a `/` fall back to
    // hub/name:tag) sees what it sees in a real install. An init image
    // with another hub or tag stays a full reference.
    let (hub, image_name, tag) =
        split_image(&proxy.image).unwrap_or(("", proxy.image.as_str(), ""));
    let init_image_name = match split_image(init_image) {
        Some((h, name, t)) if h == hub && t == tag => name,
        _ => init_image.as_str(),
    };
    let revision = if mesh.revision == "default" {
        ""
    } else {
        mesh.revision.as_str()
    };
    let mesh_id = if mesh.mesh_id == mesh.trust_domain {
        // Istio's chart leaves meshID empty and falls back to the trust domain.
        ""
    } else {
        mesh.mesh_id.as_str()
    };
    // Istio's chart leaves clusterName empty for its default, `Kubernetes`.
    let cluster_name = if mesh.cluster_id == "Kubernetes" {
        ""
    } else {
        mesh.cluster_id.as_str()
    };
    let cni_provider = match traffic.cni.provider {
        CniProvider::Default => "default",
        CniProvider::Multus => "multus",
    };
    Ok(json!({
        "revision": revision,
        // The chart's top-level `cni`, which the injector sees as `pilot.cni`.
        "cni": {"enabled": traffic.cni.enabled, "provider": cni_provider},
        "global": {
            "hub": hub,
            "tag": tag,
            "caAddress": mesh.effective_ca_address(),
            "meshID": mesh_id,
            "network": mesh.network,
            "multiCluster": {"clusterName": cluster_name},
            "imagePullPolicy": mesh.injection.image_pull_policy.as_kubernetes().unwrap_or_default(),
            "imagePullSecrets": mesh.injection.image_pull_secrets,
            "logging": {"level": proxy.agent_log_level},
            "proxy": {
                "image": image_name,
                "autoInject": match mesh.injection.policy {
                    InjectionPolicy::Enabled => "enabled",
                    InjectionPolicy::Disabled => "disabled",
                },
                "logLevel": proxy.log_level,
                "componentLogLevel": proxy.component_log_level,
                "statusPort": proxy.status_port,
                "readinessInitialDelaySeconds": proxy.readiness_initial_delay_seconds,
                "readinessPeriodSeconds": proxy.readiness_period_seconds,
                "readinessFailureThreshold": proxy.readiness_failure_threshold,
                "resources": proxy.resources,
                "includeIPRanges": traffic.include_outbound_ip_ranges,
                "excludeIPRanges": traffic.exclude_outbound_ip_ranges,
                "includeInboundPorts": traffic.include_inbound_ports,
                "excludeInboundPorts": traffic.exclude_inbound_ports,
                "includeOutboundPorts": traffic.include_outbound_ports,
                "excludeOutboundPorts": traffic.exclude_outbound_ports,
                "holdApplicationUntilProxyStarts": mesh.injection.hold_application_until_proxy_starts,
                "seccompProfile": proxy.seccomp_profile.as_ref().map_or_else(|| json!({}), |p| json!(p)),
            },
            "proxy_init": {"image": init_image_name},
        },
        "meshConfig": {"enablePrometheusMerge": mesh.injection.merge_prometheus_metrics},
        "sidecarInjectorWebhook": {
            "neverInjectSelector": mesh.injection.never_inject_selector,
            "alwaysInjectSelector": mesh.injection.always_inject_selector,
            "injectedAnnotations": mesh.injection.injected_annotations,
            "rewriteAppHTTPProbe": mesh.injection.rewrite_app_probes,
            "defaultTemplates": mesh.injection.default_templates,
        },
    }))
}

/// `<hub>/<name>:<tag>` split in three; `None` for a reference with a
/// digest or without a tag.
fn split_image(image: &str) -> Option<(&str, &str, &str)> {
    if image.contains('@') {
        return None;
    }
    let (hub, name_tag) = image.rsplit_once('/')?;
    let (name, tag) = name_tag.split_once(':')?;
    Some((hub, name, tag))
}

/// The `values` key of the injector ConfigMap: the chart picks `global`,
/// `sidecarInjectorWebhook` and `revision`, plus `pilot.{cni,env}` and
/// `gateways.{securityContext,seccompProfile}`.
fn injector_values(values: &Value) -> Value {
    let pick = |from: &Value, keys: &[&str]| -> Value {
        Value::Object(
            keys.iter()
                .filter_map(|k| from.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                .collect(),
        )
    };
    let mut picked = pick(values, &["global", "sidecarInjectorWebhook", "revision"]);
    picked["pilot"] = pick(values, &["cni", "env"]);
    picked["gateways"] = pick(&values["gateways"], &["securityContext", "seccompProfile"]);
    picked
}

/// The `config` key of the injector ConfigMap, as the chart writes it.
fn injector_config(values: &Value, templates: Map<String, Value>) -> Value {
    let webhook = &values["sidecarInjectorWebhook"];
    let default_templates = match webhook["defaultTemplates"].as_array() {
        Some(list) if !list.is_empty() => Value::Array(list.clone()),
        _ => json!(["sidecar"]),
    };
    json!({
        "defaultTemplates": default_templates,
        "policy": values["global"]["proxy"]["autoInject"],
        "alwaysInjectSelector": webhook["alwaysInjectSelector"],
        "neverInjectSelector": webhook["neverInjectSelector"],
        "injectedAnnotations": webhook["injectedAnnotations"],
        "templates": templates,
    })
}

/// The MeshConfig of the `istio` ConfigMap: the chart's `mesh` block with
/// `meshConfig` values merged over it, plus the proxy defaults ferrimesh's
/// Mesh sets mesh-wide.
fn mesh_config(mesh: &MeshSpec, values: &Value) -> Value {
    let proxy = &mesh.proxy;
    let mut default_config = json!({"discoveryAddress": mesh.effective_discovery_address()});
    let global = &values["global"];
    if let Some(id) = global["meshID"].as_str().filter(|id| !id.is_empty()) {
        default_config["meshId"] = json!(id);
    }
    if let Some(drain) = &proxy.drain_duration {
        default_config["drainDuration"] = json!(drain);
    }
    if let Some(concurrency) = proxy.concurrency {
        default_config["concurrency"] = json!(concurrency);
    }
    if mesh.traffic.interception_mode != InterceptionMode::Redirect {
        default_config["interceptionMode"] = json!(mesh.traffic.interception_mode.as_str());
    }
    if !proxy.proxy_metadata.is_empty() {
        default_config["proxyMetadata"] = json!(proxy.proxy_metadata);
    }
    if proxy.status_port != ferrimesh_crds::settings::DEFAULT_STATUS_PORT {
        default_config["statusPort"] = json!(proxy.status_port);
    }
    let mut config = json!({
        "trustDomain": mesh.trust_domain,
        "rootNamespace": "istio-system",
        "defaultProviders": {"metrics": ["prometheus"]},
        "defaultConfig": default_config,
        "proxyListenPort": mesh.traffic.proxy_listen_port,
        "proxyInboundListenPort": mesh.traffic.inbound_listen_port,
    });
    merge(&mut config, values["meshConfig"].clone());
    config
}

/// istiod's environment for `mesh`.
fn istiod_env(mesh: &MeshSpec) -> Vec<(String, String)> {
    let native = match mesh.injection.native_sidecars {
        NativeSidecars::Auto => "auto",
        NativeSidecars::Enabled => "true",
        NativeSidecars::Disabled => "false",
    };
    vec![
        ("REVISION".to_owned(), mesh.revision.clone()),
        ("ENABLE_NATIVE_SIDECARS".to_owned(), native.to_owned()),
        ("CLUSTER_ID".to_owned(), mesh.cluster_id.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mesh_maps_to_the_chart_defaults_a_helm_user_gets() {
        let overlay = values_overlay(&MeshSpec::default()).expect("mappable");
        assert_eq!(
            overlay["revision"], "",
            "revision default is the chart's empty one"
        );
        assert_eq!(
            overlay["global"]["meshID"], "",
            "meshID equal to the trust domain"
        );
        assert_eq!(
            overlay["global"]["caAddress"],
            "istiod.istio-system.svc:15012"
        );
        assert_eq!(overlay["global"]["hub"], "docker.io/istio");
        assert_eq!(overlay["global"]["tag"], "1.28.0");
        assert_eq!(overlay["global"]["proxy"]["image"], "proxyv2");
        assert_eq!(overlay["global"]["proxy_init"]["image"], "proxyv2");
        assert_eq!(overlay["global"]["imagePullPolicy"], "");
        assert_eq!(overlay["global"]["multiCluster"]["clusterName"], "");
    }

    #[test]
    fn mesh_settings_land_where_a_helm_user_would_set_them() {
        let mut mesh = MeshSpec {
            revision: "canary".to_owned(),
            mesh_id: "mesh1".to_owned(),
            network: "net1".to_owned(),
            ..MeshSpec::default()
        };
        mesh.proxy.init_image = "registry.example/init:1".to_owned();
        mesh.proxy.status_port = 15555;
        mesh.proxy.concurrency = Some(0);
        mesh.traffic.interception_mode = InterceptionMode::Tproxy;
        mesh.traffic.exclude_outbound_ports = "5432".to_owned();
        mesh.injection.native_sidecars = NativeSidecars::Disabled;
        let overlay = values_overlay(&mesh).expect("mappable");
        assert_eq!(overlay["revision"], "canary");
        assert_eq!(
            overlay["global"]["caAddress"],
            "istiod-canary.istio-system.svc:15012"
        );
        assert_eq!(overlay["global"]["meshID"], "mesh1");
        assert_eq!(overlay["global"]["network"], "net1");
        assert_eq!(
            overlay["global"]["proxy_init"]["image"], "registry.example/init:1",
            "another hub: a full reference"
        );
        assert_eq!(overlay["global"]["proxy"]["statusPort"], 15555);
        assert_eq!(overlay["global"]["proxy"]["excludeOutboundPorts"], "5432");

        let config = mesh_config(&mesh, &overlay);
        let defaults = &config["defaultConfig"];
        assert_eq!(defaults["interceptionMode"], "TPROXY");
        assert_eq!(defaults["concurrency"], 0);
        assert_eq!(defaults["statusPort"], 15555);
        assert_eq!(defaults["meshId"], "mesh1");
        assert_eq!(
            defaults["discoveryAddress"],
            "istiod-canary.istio-system.svc:15012"
        );
        assert_eq!(
            overlay["sidecarInjectorWebhook"]["defaultTemplates"],
            json!(["sidecar"])
        );
        let env = istiod_env(&mesh);
        assert!(env.contains(&("ENABLE_NATIVE_SIDECARS".to_owned(), "false".to_owned())));
        assert!(env.contains(&("REVISION".to_owned(), "canary".to_owned())));
    }

    #[test]
    fn default_templates_become_the_injector_configs_default_templates() {
        let mut mesh = MeshSpec::default();
        mesh.injection.default_templates = vec!["sidecar".to_owned(), "spire".to_owned()];
        let mut values = json!({"global": {"proxy": {"autoInject": "enabled"}}});
        merge(&mut values, values_overlay(&mesh).expect("mappable"));
        let config = injector_config(&values, Map::new());
        assert_eq!(config["defaultTemplates"], json!(["sidecar", "spire"]));
        let spire = spire_template(&mesh).expect("the spire template");
        assert!(
            spire.contains("default `sidecar,spire`"),
            "the template knows the defaults: {spire}"
        );
    }

    #[test]
    fn cni_and_seccomp_map_to_pilot_cni_and_the_global_proxy_profile() {
        let defaults = values_overlay(&MeshSpec::default()).expect("mappable");
        assert_eq!(
            defaults["cni"],
            json!({"enabled": false, "provider": "default"})
        );
        assert_eq!(defaults["global"]["proxy"]["seccompProfile"], json!({}));
        let mut mesh = MeshSpec::default();
        mesh.traffic.cni.enabled = true;
        mesh.traffic.cni.provider = CniProvider::Multus;
        mesh.proxy.seccomp_profile = Some(k8s_openapi::api::core::v1::SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        });
        let overlay = values_overlay(&mesh).expect("mappable");
        assert_eq!(
            overlay["cni"],
            json!({"enabled": true, "provider": "multus"})
        );
        assert_eq!(
            overlay["global"]["proxy"]["seccompProfile"],
            json!({"type": "RuntimeDefault"})
        );
        // As the chart hands it to the injector.
        let mut values = chart_defaults(json!({"cni": {"enabled": false}, "env": {}}));
        merge(&mut values, overlay);
        assert_eq!(
            injector_values(&values)["pilot"]["cni"],
            json!({"enabled": true, "provider": "multus"})
        );
    }

    #[test]
    fn refuses_settings_istio_cannot_express() {
        let mut mesh = MeshSpec::default();
        mesh.proxy.uid = 2000;
        let error = values_overlay(&mesh).expect_err("no UID setting in Istio");
        assert!(error.to_string().contains("proxy.uid"), "{error}");
        let mut mesh = MeshSpec::default();
        mesh.traffic.exclude_interfaces = "eth1".to_owned();
        assert!(values_overlay(&mesh).is_err());
    }

    #[test]
    fn chart_defaults_put_the_internal_defaults_under_the_top_level() {
        let chart = json!({
            "_internal_defaults_do_not_set": {"a": 1, "global": {"hub": "x", "tag": "1"}},
            "global": {"tag": "2"},
        });
        assert_eq!(
            chart_defaults(chart),
            json!({"a": 1, "global": {"hub": "x", "tag": "2"}})
        );
    }

    #[test]
    fn injector_values_pick_what_the_chart_picks() {
        let values = json!({
            "global": {"x": 1}, "sidecarInjectorWebhook": {}, "revision": "",
            "cni": {"enabled": true}, "env": {}, "gateways": {"securityContext": {}, "other": 1},
            "meshConfig": {"unrelated": true},
        });
        assert_eq!(
            injector_values(&values),
            json!({
                "global": {"x": 1}, "sidecarInjectorWebhook": {}, "revision": "",
                "pilot": {"cni": {"enabled": true}, "env": {}},
                "gateways": {"securityContext": {}},
            })
        );
    }
}
