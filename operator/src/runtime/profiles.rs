//! The ProxyProfiles of the cache, grouped by namespace, as the Pod
//! Security report and the drift classification read them.

use std::collections::HashMap;

use ferrimesh_crds::ProxyProfile;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

/// Every cached ProxyProfile under its namespace: one pass over the cache,
/// each profile copied once (profile selection reads them as a slice).
pub fn by_namespace(profiles: &Store<ProxyProfile>) -> HashMap<String, Vec<ProxyProfile>> {
    let mut grouped: HashMap<String, Vec<ProxyProfile>> = HashMap::new();
    for profile in profiles.state() {
        grouped
            .entry(profile.namespace().unwrap_or_default())
            .or_default()
            .push(ProxyProfile::clone(&profile));
    }
    grouped
}
