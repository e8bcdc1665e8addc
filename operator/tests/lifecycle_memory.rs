//! What the lifecycle's pod cache costs, measured on this process's
//! resident memory: 100,000 pods shaped as `make bench-operator` creates
//! them (bare, 50 apps over 100 namespaces), then 100,000 Deployment pods
//! (1,000 ReplicaSets), each parsed, reduced and dropped one at a time (so
//! the growth is the cache's, plus whatever the allocator keeps), and the
//! peak over a drift pass (`VmHWM`, reset through /proc/self/clear_refs).
//! Printed for docs/operator.md, and bounded. The only test of its binary,
//! so nothing else allocates meanwhile.

use std::collections::HashSet;

use ferrimesh_crds::drift::Configuration;
use ferrimesh_crds::istio::SYSTEM_NAMESPACES;
use ferrimesh_crds::{Mesh, MeshSpec};
use ferrimesh_operator::lifecycle::Caches;
use ferrimesh_operator::lifecycle::survey::{World, survey};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use serde_json::json;

/// A line of /proc/self/status, in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Pod `i` of `make bench-operator`: bare, injected (status, no revision:
/// the default one).
fn bench_pod(i: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"), "namespace": format!("bench-{}", i % 100),
                     "uid": format!("00000000-0000-4000-8000-{i:012}"),
                     "labels": {"app": format!("app-{}", i % 50), "security.istio.io/tlsMode": "istio"},
                     "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null}"}},
        "spec": {"serviceAccountName": "default", "containers": [
            {"name": "app", "image": "registry.example/app:1", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIP": "10.0.0.1", "phase": "Running"}
    }))
    .expect("pod")
}

/// Pod `i` of one of 1,000 Deployments (its ReplicaSet's).
fn replica(i: usize) -> Pod {
    let rs = format!("web-{}-5d8f7c", i % 1000);
    serde_json::from_value(json!({
        "metadata": {"name": format!("{rs}-{i:05}"), "namespace": format!("apps-{}", i % 10),
                     "uid": format!("00000000-0000-4000-9000-{i:012}"),
                     "labels": {"app": format!("web-{}", i % 1000), "pod-template-hash": "5d8f7c"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                          "uid": format!("rs-{}", i % 1000), "controller": true}]},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {"phase": "Running"}
    }))
    .expect("pod")
}

/// Bytes of resident memory per pod the cache grew by.
fn fill(caches: &Caches, pods: impl Iterator<Item = Pod>) -> usize {
    let before = status_bytes("VmRSS:");
    for pod in pods {
        caches
            .pods
            .apply(&Event::Apply(pod), |p: &Pod| caches.reduce_pod(p));
    }
    caches.shapes.collect();
    status_bytes("VmRSS:").saturating_sub(before) / PODS
}

const PODS: usize = 100_000;

#[test]
fn a_cached_pod_costs_about_a_hundred_bytes_and_a_pass_a_few_megabytes() {
    let caches = Caches::default();
    // Warm the allocator up with what parsing one pod takes.
    fill(&caches, (0..100).map(bench_pod));
    let bench = fill(&caches, (0..PODS).map(bench_pod));
    let owned = fill(&caches, (0..PODS).map(replica));
    let meshes = [Mesh::new("default", MeshSpec::default())];
    let namespaces = (0..10)
        .map(|n| {
            let labels = [("istio-injection".to_owned(), "enabled".to_owned())].into();
            (format!("apps-{n}"), labels)
        })
        .collect();
    let profiles = Default::default();
    let world = World {
        config: Configuration {
            meshes: &meshes,
            excluded_namespaces: &SYSTEM_NAMESPACES,
        },
        namespaces: &namespaces,
        profiles: &profiles,
    };
    let before = status_bytes("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let found = caches.pods.read(|pods| {
        caches
            .replica_sets
            .read(|rs| survey(&world, pods, rs, &HashSet::new(), 30))
    });
    let pass = status_bytes("VmHWM:").saturating_sub(before);
    println!(
        "per cached pod: {bench} bytes (bench pods, no controller), {owned} bytes (Deployment pods); \
         a pass over {} pods ({} findings): {pass} bytes at its peak",
        2 * PODS,
        found.keys.len()
    );
    // The bench's pods name no revision (the default one, then) and sit in
    // namespaces no Mesh selects here: outdated, as the default revision
    // would no longer inject them; the Deployments' pods are uninjected.
    assert_eq!(found.orphaned, 0);
    let counts = found
        .counts
        .get("default")
        .expect("the default Mesh's counts");
    assert_eq!(counts.outdated as usize, PODS);
    assert_eq!(counts.uninjected as usize, PODS);
    assert!(bench <= 300, "{bench}");
    assert!(owned <= 300, "{owned}");
    assert!(pass <= 32 << 20, "{pass}");
}
