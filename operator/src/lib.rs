//! ferrimesh's operator: the only writer of cluster state. [`run`] starts
//! it; docs/operator.md says what it reconciles.
//!
//! Folders by feature:
//! - [`cluster`]: what every Mesh shares, the webhook's certificate and the
//!   namespace labels (ambient namespaces left alone, the Pod Security
//!   report);
//! - [`mesh`]: each Mesh's MutatingWebhookConfiguration, those of its
//!   revision tags, and its status;
//! - [`workloads`]: a WorkloadEntry for every injected pod, beside it or
//!   pushed into a config cluster;
//! - [`lifecycle`]: pods whose sidecar is missing or outdated (counts,
//!   `NeedsRestart` Events) and the automatic rollout that restarts them;
//! - [`runtime`]: caches, triggers, the leader Lease and the admin server.
//!
//! The desired state is computed by pure functions, tested with plain
//! objects; the MutatingWebhookConfiguration itself comes from
//! `ferrimesh_crds::selection`, shared with `ferrimesh check-inject`.

pub mod cluster;
pub mod lifecycle;
pub mod mesh;
mod run;
pub mod runtime;
#[cfg(test)]
mod test_api;
pub mod workloads;

pub use run::{Config, run};
pub use runtime::lease::LeaderElection;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "ferrimesh-operator";

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Making or reading a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate's issuer (cert-manager) has not issued it yet.
    #[error("{0}")]
    WaitingForIssuer(String),
    /// Adding or removing the Mesh finalizer, or the cleanup, failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The admin server could not start.
    #[error("admin server: {0}")]
    Admin(String),
    /// Leader election failed.
    #[error("lease: {0}")]
    Lease(String),
    /// The config cluster entries are pushed into cannot be reached (its
    /// Secret is missing or holds no usable kubeconfig).
    #[error("registration target: {0}")]
    Target(String),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// A short CamelCase word for a status condition's `reason`: the API
    /// server's own (`Forbidden`, `Invalid`, ...) for a call it refused.
    pub fn reason(&self) -> String {
        match self {
            Self::Certificate(_) => "CertificateInvalid".into(),
            Self::WaitingForIssuer(_) => "WaitingForIssuer".into(),
            Self::Finalizer(_) => "FinalizerFailed".into(),
            Self::Admin(_) => "AdminServerFailed".into(),
            Self::Lease(_) => "LeaseFailed".into(),
            Self::Target(_) => "TargetUnavailable".into(),
            Self::Kube(kube::Error::Api(status)) if !status.reason.is_empty() => {
                status.reason.clone()
            }
            Self::Kube(_) => "APIServerUnavailable".into(),
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
