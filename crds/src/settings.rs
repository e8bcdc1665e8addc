//! Proxy and traffic settings, shared by `Mesh` (fully defaulted) and
//! `ProxyProfile` (overrides). Field names follow Istio's where Istio has one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, SeccompProfile};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::layered::layered_settings;

/// The default sidecar image.
pub const DEFAULT_PROXY_IMAGE: &str = "docker.io/istio/proxyv2:1.28.0";
/// The proxy's default UID and GID (Istio's `1337`).
pub const DEFAULT_PROXY_UID: i64 = 1337;
/// The default status (health and merged metrics) port of the proxy agent.
pub const DEFAULT_STATUS_PORT: i32 = 15020;

/// How inbound traffic is captured by `istio-init`'s iptables rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum InterceptionMode {
    /// NAT REDIRECT: the proxy sees the connection as coming from itself.
    #[default]
    #[serde(rename = "REDIRECT")]
    Redirect,
    /// TPROXY: the original source address is preserved (needs NET_ADMIN).
    #[serde(rename = "TPROXY")]
    Tproxy,
    /// No capture at all: no `istio-init` container is injected.
    #[serde(rename = "NONE")]
    None,
}

impl InterceptionMode {
    /// The value as Istio spells it (`REDIRECT`, `TPROXY`, `NONE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redirect => "REDIRECT",
            Self::Tproxy => "TPROXY",
            Self::None => "NONE",
        }
    }

    /// Parses Istio's spelling; `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "REDIRECT" => Some(Self::Redirect),
            "TPROXY" => Some(Self::Tproxy),
            "NONE" => Some(Self::None),
            _ => None,
        }
    }
}

/// Merges `over` into `target` key by key.
pub fn merge_map(target: &mut BTreeMap<String, String>, over: &BTreeMap<String, String>) {
    target.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// Merges resource requirements quantity by quantity: a profile that sets
/// only `requests.cpu` keeps the Mesh's memory request and limits.
pub fn merge_resources(target: &mut ResourceRequirements, over: &ResourceRequirements) {
    fn merge(
        target: &mut Option<BTreeMap<String, Quantity>>,
        over: &Option<BTreeMap<String, Quantity>>,
    ) {
        if let Some(over) = over {
            let target = target.get_or_insert_with(BTreeMap::new);
            target.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    merge(&mut target.requests, &over.requests);
    merge(&mut target.limits, &over.limits);
    if over.claims.is_some() {
        target.claims.clone_from(&over.claims);
    }
}

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect(),
    )
}

/// The default proxy resources: requests 100m/128Mi, limits 2000m/1024Mi.
pub fn default_proxy_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: quantities(&[("cpu", "100m"), ("memory", "128Mi")]),
        limits: quantities(&[("cpu", "2000m"), ("memory", "1024Mi")]),
        claims: None,
    }
}

layered_settings! {
    /// Settings of the injected `istio-proxy` and `istio-init` containers.
    pub struct ProxySettings;
    /// Overrides of `ProxySettings`; every field is optional and replaces the
    /// Mesh's value (maps merge key by key).
    pub struct ProxySettingsOverride;
    fields {
        /// Full image reference of the sidecar (`istio-proxy`).
        #[schemars(length(min = 1))]
        image: String = DEFAULT_PROXY_IMAGE.to_owned();
        /// Full image reference of `istio-init`; empty means the same as `image`.
        init_image: String = String::new();
        /// Resources of both injected containers.
        resources: ResourceRequirements = default_proxy_resources() => merge_resources;
        /// Envoy's log level (`--proxyLogLevel`).
        log_level: String = "warning".to_owned();
        /// Envoy's per-component log levels (`--proxyComponentLogLevel`).
        component_log_level: String = "misc:error".to_owned();
        /// The agent's log levels (`--log_output_level`).
        agent_log_level: String = "default:info".to_owned();
        /// Port of the agent's health and metrics endpoint; 0 disables the
        /// status port, the proxy's probes and metrics merging.
        #[schemars(range(min = 0, max = 65535))]
        status_port: i32 = DEFAULT_STATUS_PORT;
        /// `initialDelaySeconds` of the proxy's readiness probe.
        #[schemars(range(min = 0))]
        readiness_initial_delay_seconds: i32 = 0;
        /// `periodSeconds` of the proxy's readiness probe.
        #[schemars(range(min = 1))]
        readiness_period_seconds: i32 = 15;
        /// `failureThreshold` of the proxy's readiness probe.
        #[schemars(range(min = 1))]
        readiness_failure_threshold: i32 = 4;
        /// UID and GID the proxy runs as; also `istio-iptables -u`.
        #[schemars(range(min = 0))]
        uid: i64 = DEFAULT_PROXY_UID;
        /// Envoy worker threads; unset derives them from the CPU limit.
        #[schemars(range(min = 0))]
        concurrency: Option<i32> = None;
        /// How long Envoy drains connections on shutdown (`"45s"`).
        #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
        drain_duration: Option<String> = None;
        /// Extra environment variables for the proxy (name -> value).
        proxy_metadata: BTreeMap<String, String> = BTreeMap::new() => merge_map;
        /// The seccomp profile of the injected containers (Istio's
        /// `global.proxy.seccompProfile`); unset leaves it to the pod.
        /// Pod Security `restricted` needs `RuntimeDefault` or `Localhost`
        /// on every container or on the pod.
        seccomp_profile: Option<SeccompProfile> = None;
    }
}

/// Which CNI the `istio-cni` plugin is chained into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum CniProvider {
    /// The cluster's default CNI: nothing to add to the pod.
    #[default]
    #[serde(rename = "default")]
    Default,
    /// Multus: the pod asks for the `default/istio-cni` network
    /// (`k8s.v1.cni.cncf.io/networks`).
    #[serde(rename = "multus")]
    Multus,
}

layered_settings! {
    /// Istio CNI mode: the `istio-cni` node agent sets up the pod's traffic
    /// capture, so no privileged `istio-init` is injected.
    pub struct CniSettings;
    /// Overrides of `CniSettings`; every field is optional.
    pub struct CniSettingsOverride;
    fields {
        /// Inject for the `istio-cni` node agent: an unprivileged
        /// `istio-validation` init container instead of `istio-init`, and
        /// the capture settings as pod annotations.
        enabled: bool = false;
        /// `default`, or `multus` to request the `istio-cni` network.
        provider: CniProvider = CniProvider::Default;
    }
}

/// A comma-separated list of CIDRs, or `*`.
const CIDR_LIST_OR_STAR: &str =
    r"^(\*|\s*([0-9a-fA-F:.]+/[0-9]{1,3})?(\s*,\s*[0-9a-fA-F:.]+/[0-9]{1,3})*\s*)$";
/// A comma-separated list of CIDRs.
const CIDR_LIST: &str =
    r"^(\s*([0-9a-fA-F:.]+/[0-9]{1,3})?(\s*,\s*[0-9a-fA-F:.]+/[0-9]{1,3})*\s*)$";
/// A comma-separated list of ports, or `*`.
const PORT_LIST_OR_STAR: &str = r"^(\*|\s*([0-9]{1,5})?(\s*,\s*[0-9]{1,5})*\s*)$";
/// A comma-separated list of ports.
const PORT_LIST: &str = r"^(\s*([0-9]{1,5})?(\s*,\s*[0-9]{1,5})*\s*)$";
/// A comma-separated list of network interface names.
const INTERFACE_LIST: &str = r"^(\s*([A-Za-z0-9_.:@-]{1,15})?(\s*,\s*[A-Za-z0-9_.:@-]{1,15})*\s*)$";

layered_settings! {
    /// Traffic capture settings, passed to `istio-iptables` by `istio-init`.
    pub struct TrafficSettings;
    /// Overrides of `TrafficSettings`; every field is optional.
    pub struct TrafficSettingsOverride;
    fields {
        /// REDIRECT, TPROXY or NONE (no capture, no `istio-init`).
        interception_mode: InterceptionMode = InterceptionMode::Redirect;
        /// Envoy's outbound listener port (`-p`).
        #[schemars(range(min = 1, max = 65535))]
        proxy_listen_port: i32 = 15001;
        /// Envoy's inbound listener port (`-z`).
        #[schemars(range(min = 1, max = 65535))]
        inbound_listen_port: i32 = 15006;
        /// Outbound destinations to capture, CIDRs or `*` (`-i`).
        #[schemars(regex(pattern = CIDR_LIST_OR_STAR))]
        #[serde(rename = "includeOutboundIPRanges")]
        include_outbound_ip_ranges: String = "*".to_owned();
        /// Outbound destinations never captured, CIDRs (`-x`).
        #[schemars(regex(pattern = CIDR_LIST))]
        #[serde(rename = "excludeOutboundIPRanges")]
        exclude_outbound_ip_ranges: String = String::new();
        /// Inbound ports to capture, or `*` (`-b`).
        #[schemars(regex(pattern = PORT_LIST_OR_STAR))]
        include_inbound_ports: String = "*".to_owned();
        /// Inbound ports never captured (added to `-d`).
        #[schemars(regex(pattern = PORT_LIST))]
        exclude_inbound_ports: String = String::new();
        /// Outbound ports to capture whatever the destination (`-q`).
        #[schemars(regex(pattern = PORT_LIST))]
        include_outbound_ports: String = String::new();
        /// Outbound ports never captured (`-o`).
        #[schemars(regex(pattern = PORT_LIST))]
        exclude_outbound_ports: String = String::new();
        /// Interfaces whose traffic is never captured (`-c`).
        #[schemars(regex(pattern = INTERFACE_LIST))]
        exclude_interfaces: String = String::new();
        /// Virtual interfaces whose inbound traffic is treated as outbound (`-k`).
        #[schemars(regex(pattern = INTERFACE_LIST))]
        reroute_virtual_interfaces: String = String::new();
        /// Istio CNI mode (`enabled`, `provider`), each field overridable.
        cni: CniSettings | CniSettingsOverride = CniSettings::default() => CniSettings::apply;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_defaults_to_off_with_the_default_provider() {
        let traffic: TrafficSettings = serde_json::from_str("{}").expect("empty traffic");
        assert!(!traffic.cni.enabled);
        assert_eq!(traffic.cni.provider, CniProvider::Default);
    }

    #[test]
    fn profile_overrides_cni_field_by_field() {
        let mut traffic: TrafficSettings =
            serde_json::from_str(r#"{"cni": {"enabled": true}}"#).expect("mesh traffic");
        let profile: TrafficSettingsOverride =
            serde_json::from_str(r#"{"cni": {"provider": "multus"}}"#).expect("profile traffic");
        traffic.apply(&profile);
        assert!(traffic.cni.enabled, "the profile did not name enabled");
        assert_eq!(traffic.cni.provider, CniProvider::Multus);
        let off: TrafficSettingsOverride =
            serde_json::from_str(r#"{"cni": {"enabled": false}}"#).expect("profile traffic");
        traffic.apply(&off);
        assert!(!traffic.cni.enabled);
        assert_eq!(traffic.cni.provider, CniProvider::Multus);
    }

    #[test]
    fn seccomp_profile_is_a_core_v1_seccomp_profile() {
        let proxy: ProxySettings =
            serde_json::from_str(r#"{"seccompProfile": {"type": "RuntimeDefault"}}"#)
                .expect("proxy settings");
        assert_eq!(
            proxy.seccomp_profile.map(|p| p.type_),
            Some("RuntimeDefault".to_owned())
        );
        assert_eq!(ProxySettings::default().seccomp_profile, None);
    }
}
