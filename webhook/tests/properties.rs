//! Properties of the engine over generated pods: injecting an injected pod
//! changes nothing, and the JSONPatch turns the original into the injected
//! pod exactly.

use std::collections::BTreeMap;

use ferrimesh_crds::mesh::{MeshSpec, NativeSidecars};
use ferrimesh_crds::settings::InterceptionMode;
use ferrimesh_webhook::inject::{Environment, Request, inject};
use ferrimesh_webhook::patch;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, Pod, PodSpec, Probe, TCPSocketAction, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

fn probe() -> impl Strategy<Value = Option<Probe>> {
    prop_oneof![
        Just(None),
        (1..65535i32, "/[a-z]{0,6}").prop_map(|(port, path)| Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(port),
                ..Default::default()
            }),
            ..Default::default()
        })),
        Just(Some(Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("p0".into()),
                ..Default::default()
            }),
            timeout_seconds: Some(4),
            ..Default::default()
        })),
        (1..65535i32).prop_map(|port| Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(port),
                host: None
            }),
            ..Default::default()
        })),
    ]
}

fn container(index: usize) -> impl Strategy<Value = Container> {
    (
        prop::collection::vec(1..65535i32, 0..3),
        prop::collection::vec(("[A-Z]{1,6}", "[a-z0-9]{0,8}"), 0..4),
        probe(),
        probe(),
    )
        .prop_map(move |(ports, env, readiness, liveness)| Container {
            name: format!("c{index}"),
            image: Some("registry.example/app:1".into()),
            ports: Some(
                ports
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| ContainerPort {
                        name: Some(format!("p{i}")),
                        container_port: p,
                        ..Default::default()
                    })
                    .collect(),
            ),
            env: Some(
                env.into_iter()
                    .map(|(n, v)| EnvVar {
                        name: n,
                        value: Some(v),
                        value_from: None,
                    })
                    .collect(),
            ),
            readiness_probe: readiness,
            liveness_probe: liveness,
            ..Default::default()
        })
}

fn pod() -> impl Strategy<Value = Pod> {
    (
        prop::collection::vec(any::<u8>(), 1..4),
        prop::collection::vec(any::<u8>(), 0..3),
        prop::collection::btree_map("[a-z]{1,5}", "[a-z0-9]{0,5}", 0..3),
        prop::collection::btree_map(
            prop_oneof![
                Just("prometheus.io/port".to_owned()),
                Just("prometheus.io/scrape".to_owned()),
                Just("sidecar.istio.io/nativeSidecar".to_owned()),
                Just("sidecar.istio.io/interceptionMode".to_owned()),
                "[a-z]{1,5}",
            ],
            prop_oneof![
                Just("9090".to_owned()),
                Just("false".to_owned()),
                Just("TPROXY".to_owned()),
                "[a-z]{0,4}"
            ],
            0..3,
        ),
        prop::collection::vec("[a-z]{1,6}", 0..3),
    )
        .prop_flat_map(|(containers, inits, labels, annotations, volumes)| {
            let containers: Vec<_> = (0..containers.len()).map(container).collect();
            let inits: Vec<_> = (0..inits.len()).map(|i| container(10 + i)).collect();
            (
                containers,
                inits,
                Just(labels),
                Just(annotations),
                Just(volumes),
            )
        })
        .prop_map(|(containers, inits, labels, annotations, volumes)| Pod {
            metadata: ObjectMeta {
                name: Some("gen".into()),
                namespace: Some("ns".into()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                init_containers: (!inits.is_empty()).then_some(inits),
                volumes: Some(
                    volumes
                        .into_iter()
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .map(|name| Volume {
                            name: format!("user-{name}"),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        })
}

fn mesh() -> impl Strategy<Value = MeshSpec> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0), Just(15020), Just(15555)],
        0..3u8,
    )
        .prop_map(|(native, hold, status_port, mode)| {
            let mut mesh = MeshSpec::default();
            mesh.injection.native_sidecars = if native {
                NativeSidecars::Enabled
            } else {
                NativeSidecars::Disabled
            };
            mesh.injection.hold_application_until_proxy_starts = hold;
            mesh.proxy.status_port = status_port;
            mesh.traffic.interception_mode = [
                InterceptionMode::Redirect,
                InterceptionMode::Tproxy,
                InterceptionMode::None,
            ][mode as usize];
            mesh.proxy.proxy_metadata = BTreeMap::from([("EXTRA".to_owned(), "1".to_owned())]);
            mesh
        })
}

fn run(pod: &Pod, mesh: &MeshSpec) -> Option<Pod> {
    let environment = Environment::default();
    let request = Request {
        pod,
        namespace: "ns",
        mesh,
        profiles: &[],
        environment: &environment,
        workload: None,
    };
    // Generated annotations may be invalid: a rejection is a valid outcome.
    inject(&request).ok().and_then(|i| i.pod)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn injecting_twice_equals_injecting_once(pod in pod(), mesh in mesh()) {
        if let Some(once) = run(&pod, &mesh) {
            let twice = run(&once, &mesh).expect("an injected pod injects again");
            prop_assert_eq!(once, twice);
        }
    }

    #[test]
    fn patch_turns_the_original_into_the_injected_pod(pod in pod(), mesh in mesh()) {
        if let Some(injected) = run(&pod, &mesh) {
            let before = serde_json::to_value(&pod).expect("json");
            let after = serde_json::to_value(&injected).expect("json");
            let mut patched = before.clone();
            let patch = patch::between(&pod, &injected).expect("json").expect("a change");
            let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("JSONPatch");
            json_patch::patch(&mut patched, &patch.0).expect("patch applies");
            prop_assert_eq!(patched, after);
        }
    }
}
