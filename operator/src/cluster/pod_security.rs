//! The Pod Security report: whether the Pod Security level a namespace
//! enforces (`pod-security.kubernetes.io/enforce`) refuses the pods a Mesh
//! injects there, as a pure function of the namespace, the Mesh and the
//! namespace's ProxyProfiles. The rules are `ferrimesh_crds::pod_security`'s,
//! the same the webhook's warning and `ferrimesh check-inject` apply.

use std::collections::BTreeMap;

use ferrimesh_crds::pod_security::{Injected, Level, Violation, violations};
use ferrimesh_crds::proxy_profile::select;
use ferrimesh_crds::stamp::layered_mesh;
use ferrimesh_crds::{Mesh, ProxyProfile};
use k8s_openapi::api::core::v1::Namespace;

/// The level `namespace` enforces and the reasons it refuses what `mesh`
/// injects into a pod that sets nothing of its own, the oldest
/// namespace-wide ProxyProfile of `profiles` (the namespace's) layered over
/// the Mesh; `None` when it enforces no level or the injected containers
/// pass it.
pub fn refused(
    namespace: &Namespace,
    mesh: &Mesh,
    profiles: &[ProxyProfile],
) -> Option<(Level, Vec<Violation>)> {
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    let level = Level::enforced(&labels)?;
    let namespace_wide: Vec<ProxyProfile> = profiles
        .iter()
        .filter(|p| p.is_namespace_wide())
        .cloned()
        .collect();
    let selected = select(&BTreeMap::new(), &namespace_wide, &mut Vec::new());
    let layered = layered_mesh(&mesh.spec, &selected);
    let found = violations(level, &Injected::of(&layered.proxy, &layered.traffic));
    (!found.is_empty()).then_some((level, found))
}

/// What a namespace's report says: its level and each distinct fix, e.g.
/// `shop (restricted: traffic.cni.enabled: true (...); proxy.seccompProfile: ...)`.
pub fn describe(namespace: &str, level: Level, found: &[Violation]) -> String {
    let mut fixes: Vec<&str> = found.iter().map(|v| v.fix).collect();
    fixes.dedup();
    format!("{namespace} ({level}: {})", fixes.join("; "))
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::MeshSpec;
    use serde_json::json;

    use super::*;

    fn namespace(level: Option<&str>) -> Namespace {
        let labels = level.map_or(
            json!({}),
            |l| json!({"pod-security.kubernetes.io/enforce": l}),
        );
        serde_json::from_value(json!({"metadata": {"name": "shop", "labels": labels}}))
            .expect("namespace")
    }

    fn profile(
        name: &str,
        selector: Option<serde_json::Value>,
        spec: serde_json::Value,
    ) -> ProxyProfile {
        let mut spec = spec;
        if let Some(selector) = selector {
            spec["selector"] = selector;
        }
        serde_json::from_value(json!({
            "apiVersion": "mesh.ferrimesh.io/v1alpha1", "kind": "ProxyProfile",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec
        }))
        .expect("profile")
    }

    fn fixes(found: &[Violation]) -> Vec<&'static str> {
        found.iter().map(|v| v.fix).collect()
    }

    #[test]
    fn classic_istio_init_is_refused_from_baseline_and_cni_fixes_it() {
        let mesh = Mesh::new("default", MeshSpec::default());
        assert_eq!(
            refused(&namespace(None), &mesh, &[]),
            None,
            "no level enforced"
        );
        assert_eq!(refused(&namespace(Some("privileged")), &mesh, &[]), None);
        let (level, found) = refused(&namespace(Some("baseline")), &mesh, &[]).expect("refused");
        assert_eq!(level, Level::Baseline);
        assert!(
            fixes(&found)
                .iter()
                .all(|f| f.starts_with("traffic.cni.enabled")),
            "{found:?}"
        );
        let mut cni = Mesh::new("default", MeshSpec::default());
        cni.spec.traffic.cni.enabled = true;
        assert_eq!(refused(&namespace(Some("baseline")), &cni, &[]), None);
        let (_, restricted) =
            refused(&namespace(Some("restricted")), &cni, &[]).expect("no seccomp profile");
        assert_eq!(
            fixes(&restricted),
            ["proxy.seccompProfile: {type: RuntimeDefault}"]
        );
    }

    #[test]
    fn a_namespace_wide_profile_counts_and_a_workload_profile_does_not() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let cni = profile("cni", None, json!({"traffic": {"cni": {"enabled": true}}}));
        assert_eq!(refused(&namespace(Some("baseline")), &mesh, &[cni]), None);
        let some_pods = profile(
            "api",
            Some(json!({"matchLabels": {"app": "api"}})),
            json!({"traffic": {"cni": {"enabled": true}}}),
        );
        assert!(refused(&namespace(Some("baseline")), &mesh, &[some_pods]).is_some());
    }

    #[test]
    fn the_description_names_the_namespace_level_and_each_fix_once() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let (level, found) = refused(&namespace(Some("restricted")), &mesh, &[]).expect("refused");
        let text = describe("shop", level, &found);
        assert!(
            text.starts_with("shop (restricted: traffic.cni.enabled"),
            "{text}"
        );
        assert_eq!(text.matches("traffic.cni.enabled").count(), 1, "{text}");
        assert!(text.contains("proxy.seccompProfile"), "{text}");
    }
}
