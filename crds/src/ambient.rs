//! Ambient mode: Istio's sidecar-less data plane, asked for with
//! `istio.io/dataplane-mode=ambient` on a namespace or a pod. A pod with a
//! sidecar is not captured by ztunnel, so injecting one that asks for
//! ambient is worth a warning (and the operator never enables injection in
//! an ambient namespace).

use std::collections::BTreeMap;

pub use crate::istio::DATAPLANE_MODE;
/// Its value for ambient mode.
pub const AMBIENT: &str = "ambient";

/// Where a pod asks for ambient, if it does: its own label, else its own
/// annotation, else (when known) its namespace's label. A pod's own value
/// other than `ambient` (Istio's `none`) overrides its namespace's.
pub fn ambient_request(
    pod_labels: Option<&BTreeMap<String, String>>,
    pod_annotations: Option<&BTreeMap<String, String>>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<&'static str> {
    fn value(map: Option<&BTreeMap<String, String>>) -> Option<&String> {
        map?.get(DATAPLANE_MODE)
    }
    let sources = [
        (value(pod_labels), "pod label"),
        (value(pod_annotations), "pod annotation"),
        (value(namespace_labels), "namespace label"),
    ];
    let (mode, source) = sources
        .into_iter()
        .find_map(|(mode, source)| mode.map(|m| (m, source)))?;
    (mode == AMBIENT).then_some(source)
}

/// The warning for a pod injected although `source` asks for ambient.
pub fn injected_ambient_warning(source: &str) -> String {
    format!(
        "the {source} {DATAPLANE_MODE}={AMBIENT} asks for Istio's ambient mode, but the pod is \
         injected with a sidecar: ztunnel does not capture pods with a sidecar; remove the \
         label, or opt the pod out with sidecar.istio.io/inject=false"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn finds_ambient_on_the_pod_then_its_namespace() {
        let ambient = map(&[(DATAPLANE_MODE, AMBIENT)]);
        let none = map(&[(DATAPLANE_MODE, "none")]);
        assert_eq!(
            ambient_request(Some(&ambient), None, None),
            Some("pod label")
        );
        assert_eq!(
            ambient_request(None, Some(&ambient), None),
            Some("pod annotation")
        );
        assert_eq!(
            ambient_request(Some(&map(&[])), None, Some(&ambient)),
            Some("namespace label")
        );
        assert_eq!(
            ambient_request(Some(&none), None, Some(&ambient)),
            None,
            "the pod's own mode wins over its namespace's"
        );
        assert_eq!(ambient_request(None, None, None), None);
    }

    #[test]
    fn the_warning_names_where_ambient_was_asked() {
        let warning = injected_ambient_warning("namespace label");
        assert!(
            warning.starts_with("the namespace label istio.io/dataplane-mode=ambient"),
            "{warning}"
        );
    }
}
