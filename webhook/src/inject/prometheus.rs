//! Prometheus metrics merging: the app's scrape annotations are handed to
//! the agent, and the pod is pointed at the agent's merged endpoint.

use std::collections::BTreeMap;

use super::annotations::{SCRAPE_TARGETS, parse_bool};
use super::json::Object;
use crate::{Error, Result};

const SCRAPE: [&str; 3] = [
    "prometheus.io/scrape",
    "prometheus.io.scrape",
    "prometheus-io/scrape",
];
const PORT: [&str; 3] = [
    "prometheus.io/port",
    "prometheus.io.port",
    "prometheus-io/port",
];
const PATH: [&str; 3] = [
    "prometheus.io/path",
    "prometheus.io.path",
    "prometheus-io/path",
];
/// Ports of the data plane that an application cannot be scraped on.
const RESERVED_PORTS: [u16; 9] = [
    15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090,
];

fn first<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a String)> {
    keys.iter()
        .find_map(|k| annotations.get(*k).map(|v| (*k, v)))
}

fn check_port(name: &str, value: &str, status_port: i32) -> Result<()> {
    match value.trim().parse::<u16>() {
        Ok(0) => Err(Error::annotation(
            name,
            value,
            "must be a port number (1-65535)",
        )),
        Ok(port) if RESERVED_PORTS.contains(&port) || i32::from(port) == status_port => Err(
            Error::annotation(name, value, "the port is reserved by the Istio proxy"),
        ),
        Ok(_) => Ok(()),
        Err(_) => Err(Error::annotation(
            name,
            value,
            "must be a port number (1-65535)",
        )),
    }
}

/// Applies the merge to `annotations`; returns `ISTIO_PROMETHEUS_ANNOTATIONS`
/// when the app had scrape settings to hand over.
pub fn merge(
    annotations: &mut BTreeMap<String, String>,
    metrics_port: i32,
) -> Result<Option<String>> {
    if metrics_port == 0 {
        return Ok(None);
    }
    if first(annotations, &SCRAPE).is_some_and(|(_, v)| parse_bool(v) == Some(false)) {
        return Ok(None);
    }
    let metrics_port_text = metrics_port.to_string();
    if annotations
        .get(PORT[0])
        .is_some_and(|p| *p == metrics_port_text)
    {
        return Ok(None);
    }
    let scrape = first(annotations, &SCRAPE);
    let port = first(annotations, &PORT);
    let path = first(annotations, &PATH);
    let targets = annotations
        .get(SCRAPE_TARGETS)
        .map(|t| scrape_targets(t, metrics_port))
        .transpose()?;
    // With scrape targets, the legacy port and path handed to the agent are
    // the first target's (for agents that do not know targets), and
    // `prometheus.io/port` is not checked: as Istio does.
    let first_target = targets.as_ref().and_then(|t| t.first());
    if first_target.is_none()
        && let Some((name, value)) = port
    {
        check_port(name, value, metrics_port)?;
    }
    let handed_over = if scrape.is_some() || port.is_some() || path.is_some() || targets.is_some() {
        let text =
            |entry: Option<(&str, &String)>| entry.map(|(_, v)| v.clone()).unwrap_or_default();
        let (port, path) = match first_target {
            Some(target) => (target.port.clone(), target.path.clone()),
            None => (text(port), text(path)),
        };
        let mut object = Object::new();
        object.insert("scrape", &text(scrape));
        object.insert("path", &path);
        object.insert("port", &port);
        if let Some(targets) = targets {
            let targets: Vec<Object> = targets.iter().map(Target::to_object).collect();
            object.insert("targets", &targets);
        }
        Some(object.to_string())
    } else {
        None
    };
    for key in SCRAPE
        .iter()
        .chain(&PORT)
        .chain(&PATH)
        .chain(&[SCRAPE_TARGETS])
    {
        annotations.remove(*key);
    }
    annotations.insert(PORT[0].to_owned(), metrics_port_text);
    annotations.insert(PATH[0].to_owned(), "/stats/prometheus".to_owned());
    annotations.insert(SCRAPE[0].to_owned(), "true".to_owned());
    Ok(handed_over)
}

/// One `prometheus.istio.io/scrape-targets` entry.
struct Target {
    port: String,
    path: String,
}

impl Target {
    fn to_object(&self) -> Object {
        let mut object = Object::new();
        object.insert("port", &self.port);
        object.insert("path", &self.path);
        object
    }
}

/// `prometheus.istio.io/scrape-targets`: comma-separated `port[:path]`.
fn scrape_targets(value: &str, metrics_port: i32) -> Result<Vec<Target>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|target| {
            let (port, path) = target.split_once(':').unwrap_or((target, "/metrics"));
            check_port(SCRAPE_TARGETS, port, metrics_port)?;
            let path = if path.is_empty() { "/metrics" } else { path };
            Ok(Target {
                port: port.trim().to_owned(),
                path: path.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn hands_app_annotations_to_the_agent() {
        let mut a = annotations(&[
            ("prometheus.io.scrape", "true"),
            ("prometheus-io/port", "9090"),
        ]);
        let env = merge(&mut a, 15020).expect("valid");
        assert_eq!(
            env.as_deref(),
            Some(r#"{"scrape":"true","path":"","port":"9090"}"#)
        );
        assert_eq!(
            a,
            annotations(&[
                ("prometheus.io/port", "15020"),
                ("prometheus.io/path", "/stats/prometheus"),
                ("prometheus.io/scrape", "true")
            ])
        );
    }

    #[test]
    fn sets_agent_annotations_when_the_app_has_none() {
        let mut a = BTreeMap::new();
        assert_eq!(merge(&mut a, 15020).expect("valid"), None);
        assert_eq!(
            a.get("prometheus.io/scrape").map(String::as_str),
            Some("true")
        );
    }

    #[test]
    fn skips_when_scrape_is_false_or_already_merged() {
        for value in ["false", "0", "f", "F", "FALSE", "False"] {
            let mut a = annotations(&[
                ("prometheus.io/scrape", value),
                ("prometheus.io/port", "9090"),
            ]);
            let before = a.clone();
            assert_eq!(merge(&mut a, 15020).expect("valid"), None);
            assert_eq!(a, before, "scrape={value}");
        }
        let mut merged = annotations(&[
            ("prometheus.io/port", "15020"),
            ("prometheus.io/path", "/custom"),
        ]);
        let before = merged.clone();
        merge(&mut merged, 15020).expect("valid");
        assert_eq!(merged, before);
    }

    #[test]
    fn rejects_reserved_or_invalid_app_ports() {
        for port in ["15090", "15021", "0", "70000", "http"] {
            let mut a = annotations(&[("prometheus.io/port", port)]);
            let err = merge(&mut a, 15020).expect_err(port).to_string();
            assert!(err.contains("prometheus.io/port"), "{err}");
        }
    }

    #[test]
    fn rejects_the_agents_usual_port_under_another_status_port() {
        let mut a = annotations(&[("prometheus.io/port", "15020")]);
        let err = merge(&mut a, 15030).expect_err("15020 is the agent's");
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn hands_over_scrape_targets_with_the_first_as_legacy_port_and_path() {
        let mut a = annotations(&[
            (SCRAPE_TARGETS, "8080:/stats, 9100"),
            // Not checked when targets are given.
            ("prometheus.io/port", "15090"),
        ]);
        let env = merge(&mut a, 15020).expect("valid");
        assert_eq!(
            env.as_deref(),
            Some(
                r#"{"scrape":"","path":"/stats","port":"8080","targets":[{"port":"8080","path":"/stats"},{"port":"9100","path":"/metrics"}]}"#
            )
        );
        assert!(!a.contains_key(SCRAPE_TARGETS));
        let mut bad = annotations(&[(SCRAPE_TARGETS, "15020:/metrics")]);
        assert!(merge(&mut bad, 15020).is_err());
    }
}
