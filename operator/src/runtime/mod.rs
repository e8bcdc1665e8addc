//! The machinery the controllers run on: caches of reduced objects, knowing
//! when a cache has synced, turning watch events into few reconciles, the
//! leader Lease, the ProxyProfiles by namespace, and the admin server.

pub mod admin;
pub mod lease;
pub mod profiles;
pub mod reduced;
pub mod synced;
pub mod triggers;
