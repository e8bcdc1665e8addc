//! The pod annotations and labels the injector reads and writes, and the
//! parsers for their values. Names are Istio's.

use std::net::IpAddr;

pub use ferrimesh_crds::istio::{
    INJECT, REVISION, SIDECAR_STATUS as STATUS, TLS_MODE as TLS_MODE_LABEL,
};
/// `"false"` selects the classic layout; any other non-empty value native.
pub const NATIVE_SIDECAR: &str = "sidecar.istio.io/nativeSidecar";
/// Replaces both injected images (only when the value contains `/`).
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
/// Envoy log level.
pub const LOG_LEVEL: &str = "sidecar.istio.io/logLevel";
/// Envoy component log levels.
pub const COMPONENT_LOG_LEVEL: &str = "sidecar.istio.io/componentLogLevel";
/// Agent log levels.
pub const AGENT_LOG_LEVEL: &str = "sidecar.istio.io/agentLogLevel";
/// Proxy CPU request.
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
/// Proxy memory request.
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
/// Proxy CPU limit.
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
/// Proxy memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
/// Interception mode for this pod.
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// JSON map of extra pod volumes.
pub const USER_VOLUME: &str = "sidecar.istio.io/userVolume";
/// JSON map of extra proxy volume mounts.
pub const USER_VOLUME_MOUNT: &str = "sidecar.istio.io/userVolumeMount";
/// Overrides Mesh `rewriteAppProbes`.
pub const REWRITE_APP_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
/// Status port of the agent.
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
/// Readiness probe initial delay.
pub const READINESS_INITIAL_DELAY: &str = "readiness.status.sidecar.istio.io/initialDelaySeconds";
/// Readiness probe period.
pub const READINESS_PERIOD: &str = "readiness.status.sidecar.istio.io/periodSeconds";
/// Readiness probe failure threshold.
pub const READINESS_FAILURE_THRESHOLD: &str = "readiness.status.sidecar.istio.io/failureThreshold";
/// Outbound IP ranges to capture.
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// Outbound IP ranges never captured.
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Inbound ports to capture.
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Inbound ports never captured.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Outbound ports always captured.
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// Outbound ports never captured.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Interfaces never captured.
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// Virtual interfaces treated as outbound (older name).
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
/// Virtual interfaces treated as outbound; wins over `KUBEVIRT_INTERFACES`.
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// The injection templates to apply, comma-separated (Istio's default:
/// `sidecar`).
pub const TEMPLATES: &str = "inject.istio.io/templates";
/// Per-pod proxy config (YAML or JSON of Istio's ProxyConfig).
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// The user's own `istio-proxy` / `istio-init` containers, as first given.
pub const PROXY_OVERRIDES: &str = "proxy.istio.io/overrides";
/// Overrides Mesh `mergePrometheusMetrics`.
pub const MERGE_METRICS: &str = "prometheus.istio.io/merge-metrics";
/// Additional `port:path` scrape targets.
pub const SCRAPE_TARGETS: &str = "prometheus.istio.io/scrape-targets";
/// Secure merged metrics port, set when the proxy exposes one.
pub const SECURE_PORT: &str = "prometheus.istio.io/secure-port";
/// The container `kubectl exec` and `logs` pick by default.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// The container `kubectl logs` picks by default.
pub const DEFAULT_LOGS_CONTAINER: &str = "kubectl.kubernetes.io/default-logs-container";

/// Label: canonical service name.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// Label: canonical service revision.
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
/// Label: overrides the workload name.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
/// Label: network of the workload.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Label: HBONE tunnel support.
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// Why a value was refused.
pub type Invalid = String;

/// The largest value accepted for an annotation the injector parses as
/// structured data (YAML or JSON); Istio's own values are far smaller.
pub const MAX_PARSED_ANNOTATION_BYTES: usize = 64 * 1024;

/// The annotations the injector parses as YAML or JSON (or, for
/// scrape-targets, as a list of entries): each is refused past
/// [`MAX_PARSED_ANNOTATION_BYTES`].
pub const PARSED_ANNOTATIONS: [&str; 6] = [
    PROXY_CONFIG,
    USER_VOLUME,
    USER_VOLUME_MOUNT,
    PROXY_OVERRIDES,
    SCRAPE_TARGETS,
    STATUS,
];

/// The first of [`PARSED_ANNOTATIONS`] whose value is over the size limit,
/// with its length.
pub fn oversized(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<(&'static str, usize)> {
    PARSED_ANNOTATIONS.into_iter().find_map(|name| {
        annotations
            .get(name)
            .map(String::len)
            .filter(|len| *len > MAX_PARSED_ANNOTATION_BYTES)
            .map(|len| (name, len))
    })
}

/// Whether YAML text defines anchors or uses aliases (an error when it is
/// not YAML at all).
pub fn has_yaml_aliases(value: &str) -> Result<bool, Invalid> {
    use granit_parser::{Event, Parser};
    for event in Parser::new_from_str(value) {
        let (event, _) = event.map_err(|e| format!("not valid YAML: {e}"))?;
        let anchored = match event {
            Event::Alias(_) | Event::UnresolvedAlias(_) | Event::Anchor(..) => true,
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(_, anchor, _)
            | Event::MappingStart(_, anchor, _) => anchor != 0,
            _ => false,
        };
        if anchored {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Refuses YAML that defines anchors or uses aliases: expanding aliases
/// multiplies the input (a few KiB can stand for gigabytes), and no
/// annotation the injector reads needs them.
pub fn refuse_yaml_aliases(value: &str) -> Result<(), Invalid> {
    if has_yaml_aliases(value)? {
        return Err("YAML anchors and aliases are not accepted".to_owned());
    }
    Ok(())
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A non-negative 32-bit integer.
pub fn parse_u32(value: &str) -> Result<u32, Invalid> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| "must be a non-negative 32-bit integer".to_owned())
}

/// A port number 0..=65535.
pub fn parse_port(value: &str) -> Result<u16, Invalid> {
    value
        .trim()
        .parse::<u16>()
        .map_err(|_| "must be a port number (0-65535)".to_owned())
}

/// A comma-separated list of ports 0..=65535, as Istio's injector checks
/// it: the value is trimmed, then every entry is trimmed and must be a port
/// (an empty entry is not); `*` (exactly) only when `allow_star`.
pub fn validate_port_list(value: &str, allow_star: bool) -> Result<(), Invalid> {
    if value == "*" {
        return if allow_star {
            Ok(())
        } else {
            Err("`*` is not allowed here".to_owned())
        };
    }
    let value = value.trim();
    if value.is_empty() {
        return Ok(());
    }
    for entry in value.split(',') {
        if entry.trim().parse::<u16>().is_err() {
            return Err(format!("{entry:?} is not a port number (0-65535)"));
        }
    }
    Ok(())
}

/// A comma-separated list of CIDRs, as Istio's injector checks it: no
/// space around the entries, none empty; `*` (exactly) only when
/// `allow_star`.
pub fn validate_cidr_list(value: &str, allow_star: bool) -> Result<(), Invalid> {
    if value == "*" {
        return if allow_star {
            Ok(())
        } else {
            Err("`*` is not allowed here".to_owned())
        };
    }
    if value.is_empty() {
        return Ok(());
    }
    for entry in value.split(',') {
        let valid = entry.split_once('/').is_some_and(|(ip, bits)| {
            let max = match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => 32,
                Ok(IpAddr::V6(_)) => 128,
                Err(_) => return false,
            };
            bits.bytes().all(|b| b.is_ascii_digit()) && bits.parse::<u8>().is_ok_and(|b| b <= max)
        });
        if !valid {
            return Err(format!("{entry:?} is not a CIDR"));
        }
    }
    Ok(())
}

/// A comma-separated list of network interface names, as Istio checks it:
/// entries trimmed, none empty, each at most 15 characters, a letter first,
/// then letters, digits, `_`, `.` or `-`.
pub fn validate_interface_list(value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Ok(());
    }
    for entry in value.split(',').map(str::trim) {
        let valid = entry.len() <= 15
            && entry.starts_with(|c: char| c.is_ascii_alphabetic())
            && entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(format!("{entry:?} is not a network interface name"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_booleans_as_go_does() {
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }

    #[test]
    fn validates_port_lists() {
        assert!(validate_port_list(" 80, 443 ,8080 ", false).is_ok());
        assert!(validate_port_list("", false).is_ok());
        assert!(validate_port_list("  ", false).is_ok());
        assert!(validate_port_list("*", true).is_ok());
        assert!(validate_port_list(" *", true).is_err(), "only an exact `*`");
        assert!(validate_port_list("*", false).is_err());
        assert!(
            validate_port_list("0", false).is_ok(),
            "Istio accepts port 0"
        );
        assert!(
            validate_port_list("80,,8080", false).is_err(),
            "an empty entry"
        );
        assert!(validate_port_list("65536", false).is_err());
        assert!(validate_port_list("http", false).is_err());
    }

    #[test]
    fn validates_cidr_lists() {
        assert!(validate_cidr_list("10.0.0.0/8,fd00::/64", false).is_ok());
        assert!(validate_cidr_list("", false).is_ok());
        assert!(
            validate_cidr_list("10.0.0.0/8, fd00::/64", false).is_err(),
            "Istio does not trim CIDR entries"
        );
        assert!(validate_cidr_list("10.0.0.0/8,", false).is_err());
        assert!(validate_cidr_list("*", true).is_ok());
        assert!(validate_cidr_list("*", false).is_err());
        assert!(validate_cidr_list("10.0.0.0", false).is_err());
        assert!(validate_cidr_list("10.0.0.0/33", false).is_err());
        assert!(validate_cidr_list("nope/8", false).is_err());
    }

    #[test]
    fn validates_interface_lists() {
        assert!(validate_interface_list("eth0, net1").is_ok());
        assert!(validate_interface_list("eth0,,net1").is_err());
        assert!(validate_interface_list("0eth").is_err(), "a letter first");
        assert!(validate_interface_list("eth@1").is_err());
        assert!(validate_interface_list("").is_ok());
        assert!(validate_interface_list("bad name").is_err());
        assert!(validate_interface_list("averyveryverylongname").is_err());
    }
}
