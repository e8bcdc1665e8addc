//! Istio's names, defined once for every crate: the labels and annotations
//! ferrimesh reads and writes with Istio's meaning, the injection status
//! the webhook writes on a pod and the operator reads back, and the system
//! namespaces nothing of Istio's touches.

use serde::{Deserialize, Serialize};

/// Namespace label that turns injection by the default revision on
/// (`enabled`) or off (`disabled`).
pub const INJECTION_LABEL: &str = "istio-injection";
/// Namespace or pod label, and pod annotation, naming a control-plane
/// revision.
pub const REVISION: &str = "istio.io/rev";
/// Pod label or annotation with the pod's own injection choice (`"true"`,
/// `"false"`).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Annotation on every injected pod: what the injection added
/// ([`SidecarStatus`]).
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Label on every injected pod: its mutual TLS mode (`istio`).
pub const TLS_MODE: &str = "security.istio.io/tlsMode";
/// The injected proxy container.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// Namespace or pod label (or pod annotation) that chooses the data plane:
/// `ambient` for Istio's sidecar-less mode ([`crate::ambient`]).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Namespaces whose pods are never injected, which no webhook entry
/// selects and the operator never labels: Istio's own list
/// (`IgnoredNamespaces` in its injector, the `NotIn` of its chart's
/// webhook), kind's `local-path-storage` included.
pub const SYSTEM_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

/// The status annotation, as Istio writes it: empty lists are `null`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// Injected init containers.
    pub init_containers: Option<Vec<String>>,
    /// Injected containers.
    pub containers: Option<Vec<String>>,
    /// Injected volumes.
    pub volumes: Option<Vec<String>>,
    /// Injected pull secrets.
    pub image_pull_secrets: Option<Vec<String>>,
    /// The revision that injected.
    #[serde(default)]
    pub revision: String,
}

fn non_empty(list: Vec<String>) -> Option<Vec<String>> {
    (!list.is_empty()).then_some(list)
}

impl SidecarStatus {
    /// A status from plain lists.
    pub fn new(
        init_containers: Vec<String>,
        containers: Vec<String>,
        volumes: Vec<String>,
        image_pull_secrets: Vec<String>,
        revision: &str,
    ) -> Self {
        Self {
            init_containers: non_empty(init_containers),
            containers: non_empty(containers),
            volumes: non_empty(volumes),
            image_pull_secrets: non_empty(image_pull_secrets),
            revision: revision.to_owned(),
        }
    }

    /// Every container name the status lists.
    pub fn container_names(&self) -> impl Iterator<Item = &str> {
        self.init_containers
            .iter()
            .chain(&self.containers)
            .flatten()
            .map(String::as_str)
    }

    /// Compact JSON.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_empty_lists_as_null_in_istio_order() {
        let status = SidecarStatus::new(
            vec!["istio-init".into(), "istio-proxy".into()],
            vec![],
            vec!["istio-envoy".into()],
            vec![],
            "default",
        );
        assert_eq!(
            status.to_annotation(),
            r#"{"initContainers":["istio-init","istio-proxy"],"containers":null,"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#
        );
    }
}
