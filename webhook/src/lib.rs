//! ferrimesh's sidecar injector: the pure injection engine ([`inject`]), the
//! JSONPatch between a pod and its injected form ([`patch`]), and the
//! workload-manifest handling of the `ferrimesh` CLI ([`manifests`]).

pub mod error;
pub mod inject;
pub mod manifests;
pub mod patch;

pub use error::{Error, Result};
