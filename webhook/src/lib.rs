//! ferrimesh's sidecar injector: the pure injection engine ([`inject`]), the
//! JSONPatch between a pod and its injected form ([`patch`]), the
//! workload-manifest handling of the `ferrimesh` CLI ([`manifests`]), Mesh
//! and ProxyProfile files ([`mesh_file`]), the TLS admission webhook
//! ([`server`]) with its configuration sources ([`config`]), and the drift
//! report of `ferrimesh status` ([`status`]).

pub mod config;
pub mod error;
pub mod inject;
pub mod manifests;
pub mod mesh_file;
pub mod patch;
pub mod server;
pub mod status;

pub use error::{Error, Result};
