//! ferrimesh's operator: the only writer of cluster state (operator.md).
//!
//! The desired state is computed by pure functions, tested with plain
//! objects: which labels a namespace gets ([`namespaces`]), when the
//! webhook's certificate renews ([`certificates`]), and the WorkloadEntry of
//! an injected pod ([`workloads`]). The MutatingWebhookConfiguration itself
//! comes from `ferrimesh_crds::selection`, shared with `ferrimesh
//! check-inject`.

mod admin;
pub mod cert_manager;
pub mod certificate_store;
pub mod certificates;
pub mod injected_pod;
pub mod mesh_controller;
pub mod namespaces;
pub mod reduced;
pub mod registered_entry;
mod run;
pub mod synced;
#[cfg(test)]
mod test_api;
pub mod triggers;
pub mod workload_controller;
pub mod workloads;

pub use run::{Config, LeaderElection, run};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "ferrimesh-operator";

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Making or reading a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Adding or removing the Mesh finalizer, or the cleanup, failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The admin server could not start.
    #[error("admin server: {0}")]
    Admin(String),
    /// Leader election failed.
    #[error("lease: {0}")]
    Lease(String),
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
