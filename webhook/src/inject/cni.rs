//! Istio CNI mode (Mesh `traffic.cni`): the `istio-cni` node agent sets up
//! the pod's traffic capture, so the sidecar template injects, as Istio's
//! does with `pilot.cni.enabled`, an unprivileged `istio-validation` init
//! container in place of `istio-init`, and writes the capture settings as
//! the pod annotations the CNI plugin reads.

use std::collections::BTreeMap;

use ferrimesh_crds::pod_security::{ENFORCE_LABEL, Injected, Level, violations};
use ferrimesh_crds::settings::{CniProvider, DEFAULT_PROXY_UID, InterceptionMode};
use k8s_openapi::api::core::v1::{Capabilities, Container, Pod, SecurityContext};
use serde_json::Value;

use super::annotations as ann;
use super::containers::with_status_port;
use super::settings::Settings;

/// Name of the init container that checks the CNI agent's rules.
pub const VALIDATION: &str = "istio-validation";
/// The Multus network annotation.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
/// The network the `istio-cni` plugin is installed as under Multus.
pub const ISTIO_CNI_NETWORK: &str = "default/istio-cni";

/// Turns a freshly built `istio-init` into `istio-validation`: the same
/// `istio-iptables` arguments plus `--run-validation --skip-rule-apply`, no
/// added capabilities, a read-only root, and the proxy's UID and GID (1337
/// under TPROXY), as Istio's template does.
pub fn into_validation(mut init: Container, settings: &Settings) -> Container {
    init.name = VALIDATION.to_owned();
    let args = init.args.get_or_insert_with(Vec::new);
    args.push("--run-validation".to_owned());
    args.push("--skip-rule-apply".to_owned());
    let id = if settings.interception_mode == InterceptionMode::Tproxy {
        DEFAULT_PROXY_UID
    } else {
        settings.uid
    };
    let security = init
        .security_context
        .get_or_insert_with(SecurityContext::default);
    security.capabilities = Some(Capabilities {
        add: None,
        drop: Some(vec!["ALL".to_owned()]),
    });
    security.read_only_root_filesystem = Some(true);
    security.run_as_user = Some(id);
    security.run_as_group = Some(id);
    security.run_as_non_root = Some(true);
    init
}

/// Istio's `adjustInitContainerUser` for the validation container: unless
/// TPROXY forces the proxy to root, it runs as the user and group the
/// user's (or an earlier injection's) `istio-proxy` asks for.
pub fn follow_proxy_user(validation: &mut Container, proxy: Option<&SecurityContext>) {
    let Some(proxy) = proxy else {
        return;
    };
    let security = validation
        .security_context
        .get_or_insert_with(SecurityContext::default);
    if let Some(user) = proxy.run_as_user {
        security.run_as_user = Some(user);
    }
    if let Some(group) = proxy.run_as_group {
        security.run_as_group = Some(group);
    }
}

/// The annotations Istio's template writes in CNI mode, from the effective
/// settings: the interception mode, the capture lists the CNI plugin reads
/// (the status port added to the excluded inbound ports), the interface
/// lists, and under Multus the `istio-cni` network appended to the pod's.
///
/// `original` is the pod's annotations before injection.
pub fn annotate(
    annotations: &mut BTreeMap<String, String>,
    original: &BTreeMap<String, String>,
    settings: &Settings,
) {
    if settings.cni.provider == CniProvider::Multus {
        let existing = original.get(MULTUS_NETWORKS).map_or("", String::as_str);
        annotations.insert(
            MULTUS_NETWORKS.to_owned(),
            append_multus_network(existing, ISTIO_CNI_NETWORK),
        );
    }
    let capture = &settings.capture;
    let mut set = |key: &str, value: &str| {
        annotations.insert(key.to_owned(), value.to_owned());
    };
    set(ann::INTERCEPTION_MODE, settings.interception_mode.as_str());
    for (key, value) in [
        (
            ann::INCLUDE_OUTBOUND_IP_RANGES,
            &capture.include_outbound_ip_ranges,
        ),
        (
            ann::EXCLUDE_OUTBOUND_IP_RANGES,
            &capture.exclude_outbound_ip_ranges,
        ),
    ] {
        if !value.is_empty() {
            set(key, value);
        }
    }
    set(ann::INCLUDE_INBOUND_PORTS, &capture.include_inbound_ports);
    set(
        ann::EXCLUDE_INBOUND_PORTS,
        &with_status_port(&capture.exclude_inbound_ports, settings.status_port),
    );
    for (key, value) in [
        (ann::INCLUDE_OUTBOUND_PORTS, &capture.include_outbound_ports),
        (ann::EXCLUDE_OUTBOUND_PORTS, &capture.exclude_outbound_ports),
    ] {
        if let Some(value) = value {
            set(key, value);
        }
    }
    // Istio copies the pod's own interface annotations (a no-op); a Mesh or
    // ProxyProfile value, which Istio has no place for, is written where the
    // CNI plugin reads it.
    let pod_has = |key: &str| original.get(key).is_some_and(|v| !v.is_empty());
    if let Some(value) = capture
        .exclude_interfaces
        .as_ref()
        .filter(|v| !v.is_empty())
        && !pod_has(ann::EXCLUDE_INTERFACES)
    {
        set(ann::EXCLUDE_INTERFACES, value);
    }
    if let Some(value) = capture
        .reroute_virtual_interfaces
        .as_ref()
        .filter(|v| !v.is_empty())
        && !pod_has(ann::REROUTE_VIRTUAL_INTERFACES)
        && !pod_has(ann::KUBEVIRT_INTERFACES)
    {
        set(ann::REROUTE_VIRTUAL_INTERFACES, value);
    }
}

/// What decides the privileges of the containers the sidecar template
/// injects into `pod` with `settings`.
pub fn privileges(pod: &Pod, settings: &Settings) -> Injected {
    Injected {
        cni: settings.cni.enabled,
        interception_mode: settings.interception_mode,
        uid: settings.uid,
        seccomp_profile: settings.seccomp_profile.clone(),
        pod_seccomp: pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .is_some_and(|s| s.seccomp_profile.is_some()),
        trace_logging: settings
            .proxy_metadata
            .get("IPTABLES_TRACE_LOGGING")
            .is_some_and(|v| v == "true"),
    }
}

/// The warnings for an injected pod whose namespace (labels
/// `namespace_labels`) enforces a Pod Security level that the injected
/// containers break: one per reason, each naming the Mesh field that fixes
/// it.
pub fn pod_security_warnings(
    injected: &Injected,
    namespace_labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let Some(level) = Level::enforced(namespace_labels) else {
        return Vec::new();
    };
    violations(level, injected)
        .into_iter()
        .map(|v| {
            format!(
                "the namespace enforces Pod Security {level} ({ENFORCE_LABEL}) and will refuse this injected pod: {v}"
            )
        })
        .collect()
}

/// Istio's `appendMultusNetwork`: `network` (`namespace/name`) added to a
/// Multus networks annotation, either a comma-separated list or a JSON list
/// of network objects, unless it is already there. A JSON value that does
/// not parse is left as it is.
pub fn append_multus_network(existing: &str, network: &str) -> String {
    if existing.is_empty() {
        return network.to_owned();
    }
    let Some(close) = existing.rfind(']') else {
        if existing.split(',').any(|n| n.trim() == network) {
            return existing.to_owned();
        }
        return format!("{existing}, {network}");
    };
    let Ok(networks) =
        serde_json::from_str::<Vec<Option<serde_json::Map<String, Value>>>>(existing)
    else {
        return existing.to_owned();
    };
    let (namespace, name) = network.split_once('/').unwrap_or(("", network));
    let listed = networks.iter().flatten().any(|n| {
        let ns = match n.get("namespace") {
            None | Some(Value::Null) => Some(""),
            Some(Value::String(ns)) => Some(ns.as_str()),
            Some(_) => None,
        };
        n.get("name").and_then(Value::as_str) == Some(name) && ns == Some(namespace)
    });
    if listed {
        return existing.to_owned();
    }
    let entry = if namespace.is_empty() {
        format!(r#", {{"name": "{name}"}}"#)
    } else {
        format!(r#", {{"name": "{name}", "namespace": "{namespace}"}}"#)
    };
    format!("{}{entry}{}", &existing[..close], &existing[close..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_istio_cni_to_a_comma_separated_list() {
        assert_eq!(
            append_multus_network("", ISTIO_CNI_NETWORK),
            "default/istio-cni"
        );
        assert_eq!(
            append_multus_network("macvlan", ISTIO_CNI_NETWORK),
            "macvlan, default/istio-cni"
        );
        assert_eq!(
            append_multus_network("a, default/istio-cni ", ISTIO_CNI_NETWORK),
            "a, default/istio-cni ",
            "already listed"
        );
    }

    #[test]
    fn appends_istio_cni_to_a_json_list_before_its_last_bracket() {
        assert_eq!(
            append_multus_network(r#"[{"name": "macvlan"}] "#, ISTIO_CNI_NETWORK),
            r#"[{"name": "macvlan"}, {"name": "istio-cni", "namespace": "default"}] "#
        );
        let listed = r#"[{"name":"istio-cni","namespace":"default"}]"#;
        assert_eq!(append_multus_network(listed, ISTIO_CNI_NETWORK), listed);
        // Another namespace's istio-cni is another network.
        assert_eq!(
            append_multus_network(r#"[{"name":"istio-cni"}]"#, ISTIO_CNI_NETWORK),
            r#"[{"name":"istio-cni"}, {"name": "istio-cni", "namespace": "default"}]"#
        );
    }

    #[test]
    fn warns_when_the_namespace_level_refuses_the_injected_containers() {
        let injected = Injected::of(
            &ferrimesh_crds::settings::ProxySettings::default(),
            &ferrimesh_crds::settings::TrafficSettings::default(),
        );
        let labels = BTreeMap::from([(ENFORCE_LABEL.to_owned(), "baseline".to_owned())]);
        let warnings = pod_security_warnings(&injected, &labels);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("Pod Security baseline")
                && warnings[0].contains("traffic.cni.enabled"),
            "{}",
            warnings[0]
        );
        assert!(pod_security_warnings(&injected, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn leaves_a_multus_value_that_is_not_json_alone() {
        assert_eq!(
            append_multus_network("[not json]", ISTIO_CNI_NETWORK),
            "[not json]"
        );
        assert_eq!(
            append_multus_network("[1]", ISTIO_CNI_NETWORK),
            "[1]",
            "not a list of objects"
        );
    }
}
