//! `Mesh`: one control-plane revision's injection and proxy settings.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::settings::{ProxySettings, TrafficSettings};

/// The revision served by a Mesh that names none.
pub const DEFAULT_REVISION: &str = "default";

/// A Mesh: everything the injector needs to know about one Istio control-plane
/// revision, and which namespaces the operator enrols in it.
///
/// Every field has a default, so `spec: {}` is a valid, working Mesh.
// Each `printcolumn(...)` repeats the same keys, which clippy reads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.ferrimesh.io",
    version = "v1alpha1",
    kind = "Mesh",
    shortname = "mesh",
    status = "MeshStatus",
    doc = "A Mesh configures sidecar injection for one Istio control-plane revision.",
    printcolumn(name = "Revision", type_ = "string", json_path = ".spec.revision"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Namespaces",
        type_ = "integer",
        json_path = ".status.labelledNamespaces"
    ),
    printcolumn(
        name = "Workloads",
        type_ = "integer",
        json_path = ".status.registeredWorkloads"
    ),
    printcolumn(
        name = "Uninjected",
        type_ = "integer",
        json_path = ".status.uninjectedPods"
    ),
    printcolumn(
        name = "Outdated",
        type_ = "integer",
        json_path = ".status.outdatedPods"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshSpec {
    /// The value of `istio.io/rev` this Mesh serves; `default` also serves
    /// namespaces labelled `istio-injection=enabled`.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub revision: String,
    /// Mesh ID (`ISTIO_META_MESH_ID`).
    #[serde(rename = "meshID")]
    pub mesh_id: String,
    /// SPIFFE trust domain (`TRUST_DOMAIN`).
    pub trust_domain: String,
    /// Cluster ID (`ISTIO_META_CLUSTER_ID`).
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// Network of the cluster (`ISTIO_META_NETWORK`); empty for a flat network.
    pub network: String,
    /// Address of the certificate authority (`CA_ADDR`). Unset means
    /// `istiod.istio-system.svc:15012`, or `istiod-<revision>.istio-system.svc:15012`
    /// for a revision other than `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_address: Option<String>,
    /// Address of istiod's XDS server. Unset means the same default as `caAddress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_address: Option<String>,
    /// Namespaces the operator labels for injection by this Mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Which pods are injected and how.
    pub injection: InjectionSettings,
    /// The injected containers.
    pub proxy: ProxySettings,
    /// Traffic capture.
    pub traffic: TrafficSettings,
    /// The MutatingWebhookConfiguration the operator writes.
    pub webhook: WebhookSettings,
    /// Registration of injected pods as Istio WorkloadEntries.
    pub workload_registration: WorkloadRegistration,
    /// Restarting workloads whose sidecar is outdated or missing.
    pub rollout: RolloutSettings,
    /// Revision tags (as `istioctl tag`) served by this Mesh: namespaces and
    /// pods labelled `istio.io/rev=<tag>` are injected by it; the tag
    /// `default` also takes over `istio-injection=enabled`.
    #[schemars(inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")))]
    pub revision_tags: Vec<String>,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            revision: DEFAULT_REVISION.to_owned(),
            mesh_id: "cluster.local".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cluster_id: "Kubernetes".to_owned(),
            network: String::new(),
            ca_address: None,
            discovery_address: None,
            namespace_selector: None,
            injection: InjectionSettings::default(),
            proxy: ProxySettings::default(),
            traffic: TrafficSettings::default(),
            webhook: WebhookSettings::default(),
            workload_registration: WorkloadRegistration::default(),
            rollout: RolloutSettings::default(),
            revision_tags: Vec::new(),
        }
    }
}

impl MeshSpec {
    /// istiod's address for this revision: `istiod[-<rev>].istio-system.svc:15012`.
    pub fn istiod_address(&self) -> String {
        if self.revision == DEFAULT_REVISION || self.revision.is_empty() {
            "istiod.istio-system.svc:15012".to_owned()
        } else {
            format!("istiod-{}.istio-system.svc:15012", self.revision)
        }
    }

    /// The effective `CA_ADDR`.
    pub fn effective_ca_address(&self) -> String {
        self.ca_address
            .clone()
            .unwrap_or_else(|| self.istiod_address())
    }

    /// The effective discovery address.
    pub fn effective_discovery_address(&self) -> String {
        self.discovery_address
            .clone()
            .unwrap_or_else(|| self.istiod_address())
    }
}

/// Default for pods that make no choice of their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InjectionPolicy {
    /// Inject unless the pod opts out.
    #[default]
    Enabled,
    /// Inject only pods that opt in.
    Disabled,
}

/// Whether `istio-proxy` runs as a native sidecar (an init container with
/// `restartPolicy: Always`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NativeSidecars {
    /// Native when every kubelet that may run the pod is 1.33 or newer.
    #[default]
    Auto,
    /// Always native.
    Enabled,
    /// Always classic (the proxy is the last container).
    Disabled,
}

/// `imagePullPolicy` of the injected containers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    /// Not set: the API server's default applies.
    #[default]
    #[serde(rename = "")]
    Unset,
    /// Always pull.
    Always,
    /// Pull when the image is not on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes value, `None` when unset.
    pub fn as_kubernetes(self) -> Option<&'static str> {
        match self {
            Self::Unset => None,
            Self::Always => Some("Always"),
            Self::IfNotPresent => Some("IfNotPresent"),
            Self::Never => Some("Never"),
        }
    }
}

/// Which pods are injected, and mesh-wide injection behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct InjectionSettings {
    /// Default for pods with no explicit choice.
    pub policy: InjectionPolicy,
    /// Pods whose labels match any of these are injected (unless they opt out).
    pub always_inject_selector: Vec<LabelSelector>,
    /// Pods whose labels match any of these are not injected; wins over
    /// `alwaysInjectSelector`.
    pub never_inject_selector: Vec<LabelSelector>,
    /// Native sidecar layout: Auto, Enabled or Disabled.
    pub native_sidecars: NativeSidecars,
    /// Start the application only once the proxy is ready (classic layout).
    pub hold_application_until_proxy_starts: bool,
    /// Rewrite application probes to go through the agent.
    pub rewrite_app_probes: bool,
    /// Merge the application's Prometheus metrics into the agent's.
    pub merge_prometheus_metrics: bool,
    /// `imagePullPolicy` of the injected containers; empty leaves it unset.
    pub image_pull_policy: PullPolicy,
    /// Image pull secrets put before the pod's own.
    pub image_pull_secrets: Vec<String>,
    /// Extra annotations put on every injected pod.
    pub injected_annotations: BTreeMap<String, String>,
    /// The injection templates a pod gets when it names none
    /// (`inject.istio.io/templates`), applied in order, as Istio's
    /// `defaultTemplates`: one of `sidecar`, `gateway`, `grpc-agent`,
    /// `grpc-simple`, optionally followed by `spire` (after `sidecar` or
    /// `gateway`). Empty means `[sidecar]`.
    pub default_templates: Vec<String>,
}

impl Default for InjectionSettings {
    fn default() -> Self {
        Self {
            policy: InjectionPolicy::Enabled,
            always_inject_selector: Vec::new(),
            never_inject_selector: Vec::new(),
            native_sidecars: NativeSidecars::Auto,
            hold_application_until_proxy_starts: false,
            rewrite_app_probes: true,
            merge_prometheus_metrics: true,
            image_pull_policy: PullPolicy::Unset,
            image_pull_secrets: Vec::new(),
            injected_annotations: BTreeMap::new(),
            default_templates: vec!["sidecar".to_owned()],
        }
    }
}

/// What the API server does when the webhook cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicy {
    /// Refuse the pod.
    #[default]
    Fail,
    /// Create the pod uninjected.
    Ignore,
}

/// Whether the API server calls the webhook again after other mutations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReinvocationPolicy {
    /// Call once.
    #[default]
    Never,
    /// Call again when a later webhook changed the pod.
    IfNeeded,
}

/// Settings of the MutatingWebhookConfiguration the operator writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct WebhookSettings {
    /// Fail or Ignore.
    pub failure_policy: FailurePolicy,
    /// Seconds the API server waits for the webhook.
    #[schemars(range(min = 1, max = 30))]
    pub timeout_seconds: i32,
    /// Never or IfNeeded.
    pub reinvocation_policy: ReinvocationPolicy,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            failure_policy: FailurePolicy::Fail,
            timeout_seconds: 10,
            reinvocation_policy: ReinvocationPolicy::Never,
        }
    }
}

/// Registration of injected pods as Istio WorkloadEntries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadRegistration {
    /// Register every injected pod while it lives.
    pub enabled: bool,
    /// Where the entries go: unset, beside each pod in this cluster;
    /// set, into the config cluster whose kubeconfig the named Secret holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<RegistrationTarget>,
}

impl Default for WorkloadRegistration {
    fn default() -> Self {
        Self {
            enabled: true,
            target: None,
        }
    }
}

/// The Secret the operator reads a config cluster's kubeconfig from, when
/// a Mesh names none.
pub const DEFAULT_TARGET_SECRET: &str = "ferrimesh-registration-target";

/// The Secret key of the kubeconfig, when a Mesh names none.
pub const DEFAULT_TARGET_KEY: &str = "kubeconfig";

/// A config cluster the operator writes this cluster's WorkloadEntries into
/// (istiod there serves them; it needs no access to this cluster).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RegistrationTarget {
    /// The Secret, in the operator's namespace, holding the kubeconfig.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub secret_name: String,
    /// The Secret's key holding the kubeconfig.
    #[schemars(length(min = 1))]
    pub secret_key: String,
    /// The config cluster's namespace of every entry of this cluster;
    /// unset, each entry goes to the namespace of its pod's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub namespace: Option<String>,
}

impl Default for RegistrationTarget {
    fn default() -> Self {
        Self {
            secret_name: DEFAULT_TARGET_SECRET.to_owned(),
            secret_key: DEFAULT_TARGET_KEY.to_owned(),
            namespace: None,
        }
    }
}

/// Whether the operator restarts workloads whose sidecar drifted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPolicy {
    /// Report only: status counts and `NeedsRestart` Events.
    #[default]
    Manual,
    /// Restart outdated and uninjected Deployments, StatefulSets and
    /// DaemonSets as `kubectl rollout restart` does.
    Automatic,
}

/// Restarting workloads whose sidecar is outdated or missing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RolloutSettings {
    /// Manual (report only) or Automatic.
    pub policy: RolloutPolicy,
    /// Workloads restarting at once, cluster-wide.
    #[schemars(range(min = 1))]
    pub max_concurrent: i32,
    /// Namespaces whose workloads may be restarted; unset means every
    /// namespace this Mesh serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Stop starting restarts (those under way finish).
    pub paused: bool,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            policy: RolloutPolicy::Manual,
            max_concurrent: 1,
            namespace_selector: None,
            paused: false,
        }
    }
}

/// What the operator observed and did for a Mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The generation the status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, WebhookConfigured, CertificateReady, NamespacesLabelled, and
    /// RolloutProgressing with `rollout.policy: Automatic`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Namespaces labelled for this Mesh.
    #[serde(default)]
    pub labelled_namespaces: i32,
    /// WorkloadEntries registered for this Mesh's pods.
    #[serde(default)]
    pub registered_workloads: i32,
    /// Live pods this Mesh would inject today that run without a sidecar
    /// (created before their namespace or they were selected).
    #[serde(default)]
    pub uninjected_pods: i32,
    /// Live pods whose sidecar is not what this Mesh (and the ProxyProfiles)
    /// would inject today: another image, revision or settings.
    #[serde(default)]
    pub outdated_pods: i32,
    /// Live pods, cluster-wide, injected by a revision no Mesh serves
    /// (the same count on every Mesh).
    #[serde(default)]
    pub orphaned_pods: i32,
}
