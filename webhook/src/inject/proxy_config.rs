//! Istio's `ProxyConfig`, as far as injection reads it: the
//! `proxy.istio.io/config` annotation in, the `PROXY_CONFIG` env var out.

use std::collections::BTreeMap;

use ferrimesh_crds::settings::InterceptionMode;
use serde::Deserialize;

use super::json::Object;

/// The fields of Istio's ProxyConfig that change what is injected. Other
/// ProxyConfig fields are accepted and reported as not applied.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Envoy drain duration (`"45s"`, `"1m30s"`).
    pub drain_duration: Option<String>,
    /// istiod's XDS address.
    pub discovery_address: Option<String>,
    /// Envoy worker threads.
    pub concurrency: Option<i32>,
    /// REDIRECT, TPROXY or NONE.
    pub interception_mode: Option<String>,
    /// Extra proxy environment variables.
    #[serde(default)]
    pub proxy_metadata: BTreeMap<String, String>,
    /// The agent's status port.
    pub status_port: Option<i32>,
    /// Mesh ID.
    pub mesh_id: Option<String>,
    /// Hold the application until the proxy is ready.
    pub hold_application_until_proxy_starts: Option<bool>,
    /// Fields of the annotation this injector does not apply.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

impl ProxyConfig {
    /// Parses the annotation value (YAML, of which JSON is a subset).
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.trim().is_empty() {
            return Ok(Self::default());
        }
        super::annotations::refuse_yaml_aliases(value)?;
        let config: Self =
            serde_yaml::from_str(value).map_err(|e| format!("not a valid proxy config: {e}"))?;
        if let Some(mode) = &config.interception_mode
            && InterceptionMode::parse(mode).is_none()
        {
            return Err(format!(
                "interceptionMode {mode:?} must be REDIRECT, TPROXY or NONE"
            ));
        }
        if let Some(port) = config.status_port
            && !(0..=65535).contains(&port)
        {
            return Err(format!("statusPort {port} must be 0-65535"));
        }
        if let Some(duration) = &config.drain_duration {
            parse_duration(duration).map_err(|e| format!("drainDuration {duration:?}: {e}"))?;
        }
        if config.concurrency.is_some_and(|c| c < 0) {
            return Err("concurrency must not be negative".to_owned());
        }
        Ok(config)
    }
}

/// Parses a Go duration (`"1m30s"`, `"250ms"`, `"45s"`) into nanoseconds.
pub fn parse_duration(value: &str) -> Result<u128, String> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return Err("empty duration".to_owned());
    }
    if rest == "0" {
        return Ok(0);
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("unknown unit {unit:?}")),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err("missing number".to_owned());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "bad number".to_owned())?
        };
        let mut frac_nanos: u128 = 0;
        let mut denominator: u128 = 1;
        for digit in frac.chars().take(18) {
            frac_nanos = frac_nanos * 10 + u128::from(digit.to_digit(10).ok_or("bad number")?);
            denominator *= 10;
        }
        total = total
            .checked_add(
                whole.checked_mul(scale).ok_or("duration too large")?
                    + frac_nanos * scale / denominator,
            )
            .ok_or("duration too large")?;
        rest = tail;
    }
    Ok(total)
}

/// Writes nanoseconds as protobuf's JSON duration (`"23s"`, `"1.500s"`).
pub fn format_duration(nanos: u128) -> String {
    let seconds = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    if frac == 0 {
        format!("{seconds}s")
    } else if frac.is_multiple_of(1_000_000) {
        format!("{seconds}.{:03}s", frac / 1_000_000)
    } else if frac.is_multiple_of(1_000) {
        format!("{seconds}.{:06}s", frac / 1_000)
    } else {
        format!("{seconds}.{frac:09}s")
    }
}

/// The effective values that `PROXY_CONFIG` reports, each `None` when it is
/// Istio's built-in default (and so left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyConfigEnv {
    /// Drain duration in nanoseconds.
    pub drain_duration: Option<u128>,
    /// Discovery address, when not `istiod.istio-system.svc:15012`.
    pub discovery_address: Option<String>,
    /// Concurrency, when explicitly set.
    pub concurrency: Option<i32>,
    /// Interception mode, when not REDIRECT.
    pub interception_mode: Option<&'static str>,
    /// Proxy metadata.
    pub proxy_metadata: BTreeMap<String, String>,
    /// Status port, when not 15020.
    pub status_port: Option<i32>,
    /// Mesh ID, when set by the pod's proxy config.
    pub mesh_id: Option<String>,
    /// Hold, when set by the pod's proxy config.
    pub hold_application_until_proxy_starts: Option<bool>,
}

/// Istio's built-in default drain duration.
const DEFAULT_DRAIN: u128 = 45_000_000_000;
/// Istio's built-in default discovery address.
pub const DEFAULT_DISCOVERY_ADDRESS: &str = "istiod.istio-system.svc:15012";

impl ProxyConfigEnv {
    /// Renders `PROXY_CONFIG`: compact JSON in Istio's field order, then a newline.
    pub fn render(&self) -> String {
        let mut config = Object::new();
        if let Some(drain) = self.drain_duration.filter(|d| *d != DEFAULT_DRAIN) {
            config.insert("drainDuration", &format_duration(drain));
        }
        if let Some(address) = self
            .discovery_address
            .as_ref()
            .filter(|a| *a != DEFAULT_DISCOVERY_ADDRESS)
        {
            config.insert("discoveryAddress", address);
        }
        if let Some(concurrency) = self.concurrency {
            config.insert("concurrency", &concurrency);
        }
        if let Some(mode) = self.interception_mode.filter(|m| *m != "REDIRECT") {
            config.insert("interceptionMode", &mode);
        }
        if !self.proxy_metadata.is_empty() {
            config.insert("proxyMetadata", &self.proxy_metadata);
        }
        if let Some(port) = self
            .status_port
            .filter(|p| *p != ferrimesh_crds::settings::DEFAULT_STATUS_PORT)
        {
            config.insert("statusPort", &port);
        }
        if let Some(mesh_id) = self.mesh_id.as_ref().filter(|m| !m.is_empty()) {
            config.insert("meshId", mesh_id);
        }
        if let Some(hold) = self.hold_application_until_proxy_starts {
            config.insert("holdApplicationUntilProxyStarts", &hold);
        }
        let mut out = config.to_string();
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_empty_config_as_braces_and_newline() {
        assert_eq!(ProxyConfigEnv::default().render(), "{}\n");
    }

    #[test]
    fn renders_only_non_default_fields_in_istio_order() {
        let env = ProxyConfigEnv {
            drain_duration: Some(23_000_000_000),
            discovery_address: Some("foo:123".into()),
            concurrency: Some(0),
            interception_mode: Some("TPROXY"),
            proxy_metadata: [("B".into(), "2".into()), ("A".into(), "1".into())].into(),
            status_port: Some(15020),
            mesh_id: None,
            hold_application_until_proxy_starts: Some(false),
        };
        assert_eq!(
            env.render(),
            "{\"drainDuration\":\"23s\",\"discoveryAddress\":\"foo:123\",\"concurrency\":0,\"interceptionMode\":\"TPROXY\",\"proxyMetadata\":{\"A\":\"1\",\"B\":\"2\"},\"holdApplicationUntilProxyStarts\":false}\n"
        );
    }

    #[test]
    fn leaves_out_istio_defaults() {
        let env = ProxyConfigEnv {
            drain_duration: Some(45_000_000_000),
            discovery_address: Some(DEFAULT_DISCOVERY_ADDRESS.into()),
            interception_mode: Some("REDIRECT"),
            ..Default::default()
        };
        assert_eq!(env.render(), "{}\n");
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert!(parse_duration("5 minutes").is_err());
        assert_eq!(format_duration(1_500_000_000), "1.500s");
        assert_eq!(format_duration(90_000_000_000), "90s");
    }

    #[test]
    fn parses_yaml_and_json_proxy_configs() {
        let yaml =
            ProxyConfig::parse("concurrency: 0\nproxyMetadata:\n  FOO: bar\n").expect("valid");
        assert_eq!(yaml.concurrency, Some(0));
        assert_eq!(
            yaml.proxy_metadata.get("FOO").map(String::as_str),
            Some("bar")
        );
        let json = ProxyConfig::parse(
            r#"{"discoveryAddress":"foo:123","holdApplicationUntilProxyStarts":true}"#,
        )
        .expect("valid");
        assert_eq!(json.hold_application_until_proxy_starts, Some(true));
    }

    #[test]
    fn rejects_bad_proxy_configs() {
        assert!(ProxyConfig::parse("concurrency: many").is_err());
        assert!(ProxyConfig::parse("interceptionMode: BOGUS").is_err());
        assert!(ProxyConfig::parse("drainDuration: soon").is_err());
        assert!(ProxyConfig::parse("[1, 2]").is_err());
    }

    #[test]
    fn rejects_yaml_aliases_in_proxy_config() {
        for value in [
            "proxyMetadata: &m {A: b}\nmeshId: x\n",
            "a: &x [1, 2]\nb: [*x, *x]\n",
            "meshId: &id one\n",
        ] {
            let err = ProxyConfig::parse(value).expect_err(value);
            assert!(err.contains("anchors and aliases"), "{err}");
        }
        assert!(ProxyConfig::parse("meshId: \"&not-an-anchor *nor-alias\"\n").is_ok());
    }
}
