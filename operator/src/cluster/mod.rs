//! What every Mesh shares: the webhook's CA and serving certificate, and
//! the injection labels of the namespaces the Meshes select.

pub mod cert_manager;
pub mod certificate_store;
pub mod certificates;
pub mod namespaces;
