//! Differential injection: the pods two injectors made from the same input,
//! compared field by field, and the documented deviations that excuse a
//! difference (`e2e/differential/deviations.yaml`).
//!
//! A difference is reported at a readable path: map keys with dots are
//! quoted (`metadata.annotations["sidecar.istio.io/status"]`), list
//! elements with a `name` are named (`spec.initContainers[istio-proxy]`,
//! `env[PROXY_CONFIG]`). Two lists of named elements whose names differ in
//! order or membership are reported once, as their `[*].name` lists, and
//! the elements they share are compared by name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// One field that differs between the two pods.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Where, e.g. `spec.initContainers[istio-proxy].args`.
    pub path: String,
    /// ferrimesh's value (`None`: absent).
    pub ours: Option<Value>,
    /// Istio's value (`None`: absent).
    pub theirs: Option<Value>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or("<absent>".to_owned(), Value::to_string);
        write!(
            f,
            "{}\n    ferrimesh: {}\n    istiod:    {}",
            self.path,
            show(&self.ours),
            show(&self.theirs)
        )
    }
}

/// Every difference between `ours` and `theirs`.
pub fn compare(ours: &Value, theirs: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk("", Some(ours), Some(theirs), &mut out);
    out
}

fn key_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

fn name_of(value: &Value) -> Option<&str> {
    value.get("name").and_then(Value::as_str)
}

fn names(list: &[Value]) -> Option<Vec<&str>> {
    list.iter().map(name_of).collect()
}

fn walk(path: &str, ours: Option<&Value>, theirs: Option<&Value>, out: &mut Vec<Difference>) {
    match (ours, theirs) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                walk(&key_path(path, key), a.get(key), b.get(key), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => match (names(a), names(b)) {
            (Some(na), Some(nb)) if !a.is_empty() || !b.is_empty() => {
                if na != nb {
                    out.push(Difference {
                        path: format!("{path}[*].name"),
                        ours: Some(Value::from(na.clone())),
                        theirs: Some(Value::from(nb.clone())),
                    });
                }
                let unique: BTreeSet<&str> = na.iter().copied().collect();
                if unique.len() != na.len() {
                    // Duplicate names: only a positional comparison is meaningful.
                    positional(path, a, b, out);
                    return;
                }
                for (name, element) in na.iter().zip(a) {
                    if let Some(other) = b.iter().find(|e| name_of(e) == Some(name)) {
                        walk(&format!("{path}[{name}]"), Some(element), Some(other), out);
                    }
                }
            }
            _ => positional(path, a, b, out),
        },
        (a, b) if a == b => {}
        (a, b) => out.push(Difference {
            path: path.to_owned(),
            ours: a.cloned(),
            theirs: b.cloned(),
        }),
    }
}

fn positional(path: &str, a: &[Value], b: &[Value], out: &mut Vec<Difference>) {
    if a.len() != b.len() {
        out.push(Difference {
            path: path.to_owned(),
            ours: Some(Value::from(a.to_vec())),
            theirs: Some(Value::from(b.to_vec())),
        });
        return;
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        walk(&format!("{path}[{i}]"), Some(x), Some(y), out);
    }
}

/// A documented, deliberate difference between ferrimesh's injection and
/// Istio's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deviation {
    /// A short name.
    pub name: String,
    /// Why ferrimesh differs.
    pub reason: String,
    /// The difference paths it excuses; `*` matches any run of characters.
    pub fields: Vec<String>,
    /// Only for these scenarios (mesh configurations); all when absent.
    #[serde(default)]
    pub scenarios: Option<Vec<String>>,
    /// Only for inputs whose name matches one of these patterns; all when
    /// absent.
    #[serde(default)]
    pub inputs: Option<Vec<String>>,
    /// Only for input pods with all these annotations, each value matching
    /// its pattern (`*` for any value).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The deviation list.
#[derive(Debug, Clone, Default)]
pub struct Deviations(pub Vec<Deviation>);

impl Deviations {
    /// Reads the list from a YAML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Vec<Deviation> =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Self(list))
    }

    /// The deviation that excuses `difference` for the input pod `pod`
    /// named `input` in `scenario`.
    pub fn excuse(
        &self,
        scenario: &str,
        input: &str,
        pod: &Value,
        difference: &Difference,
    ) -> Option<&Deviation> {
        let annotations = &pod["metadata"]["annotations"];
        self.0.iter().find(|d| {
            d.annotations.iter().all(|(k, v)| {
                annotations
                    .get(k)
                    .and_then(Value::as_str)
                    .is_some_and(|a| wildcard(v, a))
            }) && d
                .scenarios
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == scenario))
                && d.inputs
                    .as_ref()
                    .is_none_or(|i| i.iter().any(|p| wildcard(p, input)))
                && d.fields.iter().any(|f| wildcard(f, &difference.path))
        })
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn equal_pods_have_no_difference() {
        let pod =
            json!({"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]}});
        assert!(compare(&pod, &pod).is_empty());
    }

    #[test]
    fn differences_are_reported_at_named_paths() {
        let ours = json!({
            "metadata": {"annotations": {"sidecar.istio.io/status": "a"}},
            "spec": {"containers": [{"name": "istio-proxy", "env": [{"name": "X", "value": "1"}], "args": ["a", "b"]}]},
        });
        let theirs = json!({
            "metadata": {"annotations": {"sidecar.istio.io/status": "b", "extra": "1"}},
            "spec": {"containers": [{"name": "istio-proxy", "env": [{"name": "X", "value": "2"}], "args": ["a", "c"]}]},
        });
        let paths: Vec<String> = compare(&ours, &theirs)
            .into_iter()
            .map(|d| d.path)
            .collect();
        assert_eq!(
            paths,
            [
                "metadata.annotations.extra",
                "metadata.annotations[\"sidecar.istio.io/status\"]",
                "spec.containers[istio-proxy].args[1]",
                "spec.containers[istio-proxy].env[X].value",
            ]
        );
    }

    #[test]
    fn reordered_named_lists_are_reported_once_and_compared_by_name() {
        let ours =
            json!({"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]});
        let theirs =
            json!({"containers": [{"name": "b", "image": "2"}, {"name": "a", "image": "9"}]});
        let found = compare(&ours, &theirs);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].path, "containers[*].name");
        assert_eq!(found[0].ours, Some(json!(["a", "b"])));
        assert_eq!(found[1].path, "containers[a].image");
        assert_eq!(found[1].theirs, Some(json!("9")));
    }

    #[test]
    fn lists_of_different_length_without_names_are_one_difference() {
        let found = compare(&json!({"args": ["a"]}), &json!({"args": ["a", "b"]}));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "args");
    }

    #[test]
    fn wildcards_match_any_run() {
        assert!(wildcard(
            "spec.*[istio-proxy].env[PROXY_CONFIG].value",
            "spec.initContainers[istio-proxy].env[PROXY_CONFIG].value"
        ));
        assert!(wildcard("*", "anything"));
        assert!(wildcard("exact", "exact"));
        assert!(!wildcard("exact", "exactly"));
        assert!(!wildcard("a*c", "abd"));
        assert!(wildcard("a*b*c", "a-b-b-c"));
    }

    #[test]
    fn a_deviation_excuses_only_its_fields_scenarios_and_inputs() {
        let deviations = Deviations(vec![Deviation {
            name: "x".to_owned(),
            reason: "because".to_owned(),
            fields: vec!["metadata.labels*".to_owned()],
            scenarios: Some(vec!["default".to_owned()]),
            inputs: Some(vec!["gen-*".to_owned()]),
            annotations: BTreeMap::from([("a".to_owned(), "1".to_owned())]),
        }]);
        let pod = json!({"metadata": {"annotations": {"a": "1"}}});
        let difference = Difference {
            path: "metadata.labels[\"a\"]".to_owned(),
            ours: None,
            theirs: Some(json!("1")),
        };
        assert!(
            deviations
                .excuse("default", "gen-1", &pod, &difference)
                .is_some()
        );
        assert!(
            deviations
                .excuse("canary", "gen-1", &pod, &difference)
                .is_none()
        );
        assert!(
            deviations
                .excuse("default", "pod.yaml", &pod, &difference)
                .is_none()
        );
        let other = Difference {
            path: "spec.containers".to_owned(),
            ..difference
        };
        assert!(
            deviations
                .excuse("default", "gen-1", &pod, &other)
                .is_none()
        );
    }
}
