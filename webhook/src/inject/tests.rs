//! Behaviour of the whole engine, one rule of docs/injection.md per test.

use std::collections::BTreeMap;

use ferrimesh_crds::mesh::{MeshSpec, NativeSidecars, PullPolicy};
use ferrimesh_crds::settings::InterceptionMode;
use ferrimesh_crds::{ProxyProfile, ProxyProfileSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::json;

use super::*;

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("valid pod")
}

fn app_pod(annotations: serde_json::Value) -> Pod {
    pod(json!({
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}, "annotations": annotations},
        "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
}

fn run_with(pod: &Pod, mesh: &MeshSpec, profiles: &[ProxyProfile]) -> Result<Injection> {
    let environment = Environment::default();
    inject(&Request {
        pod,
        namespace: "shop",
        mesh,
        profiles,
        environment: &environment,
        workload: None,
    })
}

fn injected(pod: &Pod, mesh: &MeshSpec) -> Pod {
    run_with(pod, mesh, &[])
        .expect("injects")
        .pod
        .expect("injected")
}

fn container<'p>(pod: &'p Pod, name: &str) -> &'p Container {
    let spec = pod.spec.as_ref().expect("spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .expect(name)
}

fn args(pod: &Pod) -> Vec<String> {
    container(pod, "istio-init")
        .args
        .clone()
        .unwrap_or_default()
}

fn env<'p>(pod: &'p Pod, name: &str) -> Option<&'p str> {
    container(pod, "istio-proxy")
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn env_names(pod: &Pod) -> Vec<&str> {
    container(pod, "istio-proxy")
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect()
}

fn names(list: &[Container]) -> Vec<&str> {
    list.iter().map(|c| c.name.as_str()).collect()
}

fn label<'p>(pod: &'p Pod, name: &str) -> Option<&'p str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(name))
        .map(String::as_str)
}

fn annotation<'p>(pod: &'p Pod, name: &str) -> Option<&'p str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

fn rejection(pod: &Pod) -> String {
    run_with(pod, &MeshSpec::default(), &[])
        .expect_err("rejected")
        .to_string()
}

fn classic() -> MeshSpec {
    let mut mesh = MeshSpec::default();
    mesh.injection.native_sidecars = NativeSidecars::Disabled;
    mesh
}

#[test]
fn native_layout_puts_init_then_proxy_before_user_init_containers() {
    let mut p = app_pod(json!({}));
    p.spec.as_mut().expect("spec").init_containers = Some(vec![Container {
        name: "migrate".into(),
        ..Default::default()
    }]);
    let out = injected(&p, &MeshSpec::default());
    let spec = out.spec.as_ref().expect("spec");
    assert_eq!(
        names(spec.init_containers.as_deref().expect("init")),
        ["istio-init", "istio-proxy", "migrate"]
    );
    assert_eq!(names(&spec.containers), ["web"]);
    assert_eq!(
        container(&out, "istio-proxy").restart_policy.as_deref(),
        Some("Always")
    );
}

#[test]
fn classic_layout_appends_proxy_and_init_after_user_containers() {
    let mut p = app_pod(json!({}));
    p.spec.as_mut().expect("spec").init_containers = Some(vec![Container {
        name: "migrate".into(),
        ..Default::default()
    }]);
    let out = injected(&p, &classic());
    let spec = out.spec.as_ref().expect("spec");
    assert_eq!(
        names(spec.init_containers.as_deref().expect("init")),
        ["migrate", "istio-init"]
    );
    assert_eq!(names(&spec.containers), ["web", "istio-proxy"]);
    assert!(
        container(&out, "istio-proxy").lifecycle.is_none(),
        "no preStop in classic mode"
    );
    assert!(
        annotation(&out, annotations::STATUS)
            .expect("status")
            .contains(r#""containers":["istio-proxy"]"#)
    );
}

#[test]
fn native_sidecar_annotation_overrides_the_mesh() {
    let out = injected(
        &app_pod(json!({"sidecar.istio.io/nativeSidecar": "false"})),
        &MeshSpec::default(),
    );
    assert_eq!(
        names(&out.spec.as_ref().expect("spec").containers),
        ["web", "istio-proxy"]
    );
    let out = injected(
        &app_pod(json!({"sidecar.istio.io/nativeSidecar": "yes"})),
        &classic(),
    );
    assert_eq!(names(&out.spec.as_ref().expect("spec").containers), ["web"]);
}

#[test]
fn auto_native_sidecars_follow_the_cluster() {
    let environment = Environment {
        native_sidecars_supported: false,
        ..Default::default()
    };
    let p = app_pod(json!({}));
    let mesh = MeshSpec::default();
    let request = Request {
        pod: &p,
        namespace: "shop",
        mesh: &mesh,
        profiles: &[],
        environment: &environment,
        workload: None,
    };
    let out = inject(&request).expect("injects").pod.expect("injected");
    assert_eq!(
        names(&out.spec.as_ref().expect("spec").containers),
        ["web", "istio-proxy"]
    );
}

#[test]
fn iptables_args_follow_istio_order_with_optional_pairs() {
    let out = injected(
        &app_pod(json!({
            "traffic.sidecar.istio.io/excludeInboundPorts": "4, 5, 6",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "",
            "traffic.sidecar.istio.io/includeOutboundPorts": "7",
            "traffic.sidecar.istio.io/kubevirtInterfaces": "old0",
            "istio.io/reroute-virtual-interfaces": "net1",
            "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
            "sidecar.istio.io/agentLogLevel": "default:debug"
        })),
        &MeshSpec::default(),
    );
    assert_eq!(
        args(&out),
        [
            "istio-iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,4,5,6,15020",
            "-q",
            "7",
            "-o",
            "",
            "-k",
            "net1",
            "-c",
            "eth9",
            "--log_output_level=default:debug"
        ]
    );
}

#[test]
fn optional_iptables_pairs_are_absent_by_default() {
    let a = args(&injected(&app_pod(json!({})), &MeshSpec::default()));
    for flag in ["-q", "-o", "-k", "-c"] {
        assert!(!a.iter().any(|x| x == flag), "{flag} in {a:?}");
    }
}

#[test]
fn tproxy_runs_the_proxy_as_root_with_net_admin() {
    let mut mesh = MeshSpec::default();
    mesh.traffic.interception_mode = InterceptionMode::Tproxy;
    mesh.proxy.uid = 2000;
    let out = injected(&app_pod(json!({})), &mesh);
    let sc = container(&out, "istio-proxy")
        .security_context
        .clone()
        .expect("sc");
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.run_as_group, Some(2000));
    assert_eq!(sc.run_as_non_root, Some(false));
    assert_eq!(
        sc.capabilities.and_then(|c| c.add),
        Some(vec!["NET_ADMIN".to_owned()])
    );
    let a = args(&out);
    assert_eq!(a[6], "1337", "-u is 1337 in TPROXY");
    assert_eq!(a[8], "TPROXY");
    assert_eq!(
        env(&out, "PROXY_CONFIG"),
        Some("{\"interceptionMode\":\"TPROXY\"}\n")
    );
}

#[test]
fn interception_none_injects_no_init_container() {
    let out = injected(
        &app_pod(json!({"sidecar.istio.io/interceptionMode": "NONE"})),
        &MeshSpec::default(),
    );
    let init = out
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .expect("init");
    assert_eq!(names(init), ["istio-proxy"]);
    assert_eq!(
        env(&out, "PROXY_CONFIG"),
        Some("{}\n"),
        "the annotation does not show in PROXY_CONFIG"
    );
    assert_eq!(env(&out, "ISTIO_META_INTERCEPTION_MODE"), Some("NONE"));
}

#[test]
fn status_port_zero_disables_probes_and_metrics_merge() {
    let mut mesh = MeshSpec::default();
    mesh.proxy.status_port = 0;
    let out = injected(&app_pod(json!({})), &mesh);
    let proxy = container(&out, "istio-proxy");
    assert!(proxy.readiness_probe.is_none() && proxy.startup_probe.is_none());
    assert_eq!(args(&out)[16], "15090,15021");
    assert!(annotation(&out, "prometheus.io/port").is_none());
    assert_eq!(env(&out, "PROXY_CONFIG"), Some("{\"statusPort\":0}\n"));
    let pre_stop = proxy
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref());
    assert!(
        pre_stop
            .and_then(|e| e.command.as_ref())
            .is_some_and(|c| c.contains(&"--debug-port=0".to_owned()))
    );
}

#[test]
fn status_port_annotation_moves_probes_but_not_prometheus() {
    let out = injected(
        &app_pod(json!({"status.sidecar.istio.io/port": "15555"})),
        &MeshSpec::default(),
    );
    assert!(args(&out)[16].ends_with(",15555"));
    assert_eq!(annotation(&out, "prometheus.io/port"), Some("15020"));
}

#[test]
fn env_follows_istio_order() {
    let mut mesh = MeshSpec::default();
    mesh.proxy.proxy_metadata = [
        ("B_META".to_owned(), "b".to_owned()),
        ("A_META".to_owned(), "a".to_owned()),
    ]
    .into();
    let out = injected(&app_pod(json!({})), &mesh);
    assert_eq!(
        env_names(&out),
        [
            "PILOT_CERT_PROVIDER",
            "CA_ADDR",
            "POD_NAME",
            "POD_NAMESPACE",
            "INSTANCE_IP",
            "SERVICE_ACCOUNT",
            "HOST_IP",
            "ISTIO_CPU_LIMIT",
            "PROXY_CONFIG",
            "ISTIO_META_POD_PORTS",
            "ISTIO_META_APP_CONTAINERS",
            "GOMEMLIMIT",
            "GOMAXPROCS",
            "ISTIO_META_CLUSTER_ID",
            "ISTIO_META_NODE_NAME",
            "ISTIO_META_INTERCEPTION_MODE",
            "ISTIO_META_WORKLOAD_NAME",
            "ISTIO_META_OWNER",
            "ISTIO_META_MESH_ID",
            "TRUST_DOMAIN",
            "A_META",
            "B_META"
        ]
    );
    let init_env: Vec<_> = container(&out, "istio-init")
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(init_env, ["A_META", "B_META"]);
}

#[test]
fn network_and_cluster_go_to_a_sorted_block_at_the_end() {
    let mesh = MeshSpec {
        cluster_id: "east".into(),
        ..Default::default()
    };
    let environment =
        Environment::from_path("/inject/cluster/c1/net/n1/foo/a--slash--b").expect("path");
    let mut p = app_pod(json!({}));
    p.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("topology.istio.io/network".into(), "n2".into());
    let request = Request {
        pod: &p,
        namespace: "shop",
        mesh: &mesh,
        profiles: &[],
        environment: &environment,
        workload: None,
    };
    let out = inject(&request).expect("injects").pod.expect("injected");
    let names = env_names(&out);
    assert_eq!(
        names[names.len() - 3..],
        ["FOO", "ISTIO_META_CLUSTER_ID", "ISTIO_META_NETWORK"]
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "ISTIO_META_CLUSTER_ID")
            .count(),
        1
    );
    assert_eq!(env(&out, "ISTIO_META_CLUSTER_ID"), Some("c1"));
    assert_eq!(
        env(&out, "ISTIO_META_NETWORK"),
        Some("n2"),
        "the pod label wins"
    );
    assert_eq!(env(&out, "FOO"), Some("a/b"));
    assert_eq!(label(&out, "topology.istio.io/network"), Some("n2"));
}

#[test]
fn resource_annotations_replace_mesh_resources_in_canonical_form() {
    let out = injected(
        &app_pod(
            json!({"sidecar.istio.io/proxyCPU": "0.5", "sidecar.istio.io/proxyMemoryLimit": "1024Mi"}),
        ),
        &MeshSpec::default(),
    );
    let resources =
        serde_json::to_value(container(&out, "istio-proxy").resources.as_ref()).expect("json");
    assert_eq!(
        resources,
        json!({"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}})
    );
}

#[test]
fn mesh_resources_are_canonical() {
    let out = injected(&app_pod(json!({})), &MeshSpec::default());
    let resources =
        serde_json::to_value(container(&out, "istio-proxy").resources.as_ref()).expect("json");
    assert_eq!(
        resources,
        json!({"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "128Mi"}})
    );
}

#[test]
fn rejects_each_invalid_annotation_naming_it_and_its_value() {
    for (name, value) in [
        ("sidecar.istio.io/interceptionMode", "MAGIC"),
        ("status.sidecar.istio.io/port", "70000"),
        (
            "readiness.status.sidecar.istio.io/initialDelaySeconds",
            "-1",
        ),
        ("readiness.status.sidecar.istio.io/periodSeconds", "x"),
        ("readiness.status.sidecar.istio.io/failureThreshold", "1.5"),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "*"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "99999"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "bad iface"),
        ("istio.io/reroute-virtual-interfaces", "bad iface"),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "bad iface"),
        ("prometheus.istio.io/merge-metrics", "maybe"),
        ("proxy.istio.io/config", "concurrency: lots"),
        ("sidecar.istio.io/proxyCPU", "fast"),
        ("sidecar.istio.io/proxyMemory", "1Gb"),
        ("sidecar.istio.io/proxyCPULimit", "-"),
        ("sidecar.istio.io/proxyMemoryLimit", "x1"),
    ] {
        let message = rejection(&app_pod(json!({ name: value })));
        assert!(
            message.contains(name) && message.contains(&format!("{value:?}")),
            "{name}: {message}"
        );
    }
}

#[test]
fn empty_list_annotations_are_valid() {
    for name in [
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInterfaces",
    ] {
        assert!(
            run_with(&app_pod(json!({ name: "" })), &MeshSpec::default(), &[]).is_ok(),
            "{name}"
        );
    }
}

#[test]
fn unusable_unvalidated_annotations_give_warnings() {
    let result = run_with(
        &app_pod(json!({
            "sidecar.istio.io/proxyImage": "proxyv2",
            "sidecar.istio.io/userVolume": "not json",
            "sidecar.istio.io/rewriteAppHTTPProbers": "sure",
            "traffic.sidecar.istio.io/includeOutboundPorts": "web"
        })),
        &MeshSpec::default(),
        &[],
    )
    .expect("injects");
    assert_eq!(result.warnings.len(), 4, "{:?}", result.warnings);
    let out = result.pod.expect("injected");
    assert_eq!(
        container(&out, "istio-proxy").image.as_deref(),
        Some(ferrimesh_crds::settings::DEFAULT_PROXY_IMAGE)
    );
}

#[test]
fn proxy_image_annotation_replaces_both_images() {
    let out = injected(
        &app_pod(json!({"sidecar.istio.io/proxyImage": "my.reg/proxy:2"})),
        &MeshSpec::default(),
    );
    assert_eq!(
        container(&out, "istio-proxy").image.as_deref(),
        Some("my.reg/proxy:2")
    );
    assert_eq!(
        container(&out, "istio-init").image.as_deref(),
        Some("my.reg/proxy:2")
    );
}

#[test]
fn proxy_config_annotation_layers_over_the_mesh() {
    let mut mesh = MeshSpec::default();
    mesh.proxy.drain_duration = Some("23s".into());
    mesh.proxy.proxy_metadata = [("A".to_owned(), "mesh".to_owned())].into();
    let out = injected(
        &app_pod(
            json!({"proxy.istio.io/config": "discoveryAddress: foo:123\nconcurrency: 0\nproxyMetadata: {B: pod}\n"}),
        ),
        &mesh,
    );
    assert_eq!(
        env(&out, "PROXY_CONFIG"),
        Some(
            "{\"drainDuration\":\"23s\",\"discoveryAddress\":\"foo:123\",\"concurrency\":0,\"proxyMetadata\":{\"A\":\"mesh\",\"B\":\"pod\"}}\n"
        )
    );
    assert_eq!(env(&out, "B"), Some("pod"));
}

#[test]
fn hold_application_puts_proxy_first_in_classic_mode_only() {
    let mut mesh = classic();
    mesh.injection.hold_application_until_proxy_starts = true;
    let out = injected(&app_pod(json!({})), &mesh);
    assert_eq!(
        names(&out.spec.as_ref().expect("spec").containers),
        ["istio-proxy", "web"]
    );
    let post_start = container(&out, "istio-proxy")
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref());
    assert_eq!(
        post_start
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone()),
        Some(vec!["pilot-agent".into(), "wait".into()])
    );
    let native = injected(
        &app_pod(json!({"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"})),
        &MeshSpec::default(),
    );
    assert!(
        container(&native, "istio-proxy")
            .lifecycle
            .as_ref()
            .is_some_and(|l| l.post_start.is_none())
    );
    assert_eq!(
        env(&native, "PROXY_CONFIG"),
        Some("{\"holdApplicationUntilProxyStarts\":true}\n")
    );
}

#[test]
fn labels_and_annotations_are_added_and_existing_values_kept() {
    let p = pod(json!({
        "metadata": {"name": "x", "labels": {"app.kubernetes.io/name": "-shop_", "version": "v2", "security.istio.io/tlsMode": "disabled"},
                     "annotations": {"kubectl.kubernetes.io/default-container": "sidecar", "istio.io/rev": "old"}},
        "spec": {"containers": [{"name": "sidecar"}, {"name": "main"}]}
    }));
    let mut mesh = MeshSpec::default();
    mesh.injection.injected_annotations = [("team".to_owned(), "mesh".to_owned())].into();
    let out = injected(&p, &mesh);
    let labels = out.metadata.labels.clone().expect("labels");
    assert_eq!(labels["security.istio.io/tlsMode"], "disabled");
    assert_eq!(labels["service.istio.io/canonical-name"], "shop");
    assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
    assert_eq!(annotation(&out, "istio.io/rev"), Some("default"));
    assert_eq!(
        annotation(&out, "kubectl.kubernetes.io/default-container"),
        Some("sidecar")
    );
    assert_eq!(
        annotation(&out, "kubectl.kubernetes.io/default-logs-container"),
        Some("sidecar")
    );
    assert_eq!(annotation(&out, "team"), Some("mesh"));
}

#[test]
fn pull_secrets_and_policy_come_from_the_mesh() {
    let mut mesh = MeshSpec::default();
    mesh.injection.image_pull_secrets = vec!["barSecret".into(), "shared".into()];
    mesh.injection.image_pull_policy = PullPolicy::Always;
    let mut p = app_pod(json!({}));
    p.spec.as_mut().expect("spec").image_pull_secrets = Some(vec![
        k8s_openapi::api::core::v1::LocalObjectReference {
            name: "shared".into(),
        },
        k8s_openapi::api::core::v1::LocalObjectReference { name: "own".into() },
    ]);
    let out = injected(&p, &mesh);
    let secrets: Vec<_> = out
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .expect("secrets")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(secrets, ["barSecret", "shared", "own"]);
    assert!(
        annotation(&out, annotations::STATUS)
            .expect("status")
            .contains(r#""imagePullSecrets":["barSecret","shared"]"#)
    );
    assert_eq!(
        container(&out, "istio-proxy").image_pull_policy.as_deref(),
        Some("Always")
    );
    assert_eq!(
        container(&out, "istio-init").image_pull_policy.as_deref(),
        Some("Always")
    );
}

#[test]
fn user_volumes_and_mounts_come_after_the_injected_ones_sorted() {
    let out = injected(
        &app_pod(json!({
            "sidecar.istio.io/userVolume": r#"{"zcerts":{"secret":{"secretName":"z"}},"acerts":{"secret":{"secretName":"a"}}}"#,
            "sidecar.istio.io/userVolumeMount": r#"{"zcerts":{"mountPath":"/z","readOnly":true},"acerts":{"mountPath":"/a"}}"#
        })),
        &MeshSpec::default(),
    );
    let volumes: Vec<_> = out
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .expect("volumes")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(volumes[9..], ["acerts", "zcerts"]);
    let mounts: Vec<_> = container(&out, "istio-proxy")
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.clone())
        .collect();
    assert_eq!(mounts[9..], ["acerts", "zcerts"]);
    assert!(
        annotation(&out, annotations::STATUS)
            .expect("status")
            .contains(r#""istio-ca-crl","acerts","zcerts"]"#)
    );
}

#[test]
fn user_proxy_override_is_laid_over_and_recorded() {
    let p = pod(json!({
        "metadata": {"name": "x"},
        "spec": {"containers": [
            {"name": "app"},
            {"name": "istio-proxy", "image": "auto", "env": [{"name": "EXTRA", "value": "1"}], "securityContext": {"runAsUser": 1500}}
        ]}
    }));
    let out = injected(&p, &MeshSpec::default());
    let spec = out.spec.as_ref().expect("spec");
    assert_eq!(
        names(&spec.containers),
        ["app"],
        "moved to initContainers in native mode"
    );
    let proxy = container(&out, "istio-proxy");
    assert_eq!(
        proxy.image.as_deref(),
        Some(ferrimesh_crds::settings::DEFAULT_PROXY_IMAGE)
    );
    assert_eq!(
        proxy.env.as_ref().and_then(|e| e.last()),
        Some(&EnvVar {
            name: "EXTRA".into(),
            value: Some("1".into()),
            value_from: None
        })
    );
    assert_eq!(
        proxy.security_context.as_ref().and_then(|s| s.run_as_user),
        Some(1500)
    );
    assert_eq!(args(&out)[6], "1500", "a user runAsUser goes to -u");
    assert_eq!(env(&out, "ISTIO_META_APP_CONTAINERS"), Some("app"));
    assert_eq!(
        annotation(&out, annotations::PROXY_OVERRIDES),
        Some(
            r#"{"initContainers":[{"name":"istio-proxy","env":[{"name":"EXTRA","value":"1"}],"resources":{},"securityContext":{"runAsUser":1500}}]}"#
        )
    );
}

#[test]
fn tproxy_in_the_mesh_puts_a_user_proxy_uid_back_to_root_when_traffic_is_captured() {
    let mut mesh = MeshSpec::default();
    mesh.traffic.interception_mode = ferrimesh_crds::settings::InterceptionMode::Tproxy;
    let with_mode = |mode: &str| {
        pod(json!({
            "metadata": {"name": "x", "annotations": {"sidecar.istio.io/interceptionMode": mode}},
            "spec": {"containers": [
                {"name": "app"},
                {"name": "istio-proxy", "image": "auto", "securityContext": {"runAsUser": 1500}}
            ]}
        }))
    };
    let uid = |out: &Pod| {
        container(out, "istio-proxy")
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
    };
    // The pod chose REDIRECT, but the Mesh's TPROXY still forces root, as in Istio.
    let out = injected(&with_mode("REDIRECT"), &mesh);
    assert_eq!(uid(&out), Some(0));
    assert_eq!(args(&out)[6], "1500", "-u still takes the user's UID");
    // No capture, no istio-init: the user's UID stays.
    let out = injected(&with_mode("NONE"), &mesh);
    assert_eq!(uid(&out), Some(1500));
}

#[test]
fn reinjection_with_unchanged_settings_is_idempotent() {
    for mesh in [MeshSpec::default(), classic()] {
        let p = pod(json!({
            "metadata": {"name": "x", "annotations": {"prometheus.io/port": "9090"}},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 80}],
                 "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}}},
                {"name": "istio-proxy", "image": "auto", "env": [{"name": "EXTRA", "value": "1"}]}
            ]}
        }));
        let once = injected(&p, &mesh);
        let twice = injected(&once, &mesh);
        pretty_assertions::assert_eq!(once, twice);
        assert!(
            env(&twice, "ISTIO_KUBE_APP_PROBERS").is_some()
                && env(&twice, "ISTIO_PROMETHEUS_ANNOTATIONS").is_some()
        );
    }
}

#[test]
fn reinjection_moves_a_classic_proxy_to_native() {
    let classic_pod = injected(&app_pod(json!({})), &classic());
    let native = injected(&classic_pod, &MeshSpec::default());
    let spec = native.spec.as_ref().expect("spec");
    assert_eq!(names(&spec.containers), ["web"]);
    assert_eq!(
        names(spec.init_containers.as_deref().expect("init")),
        ["istio-init", "istio-proxy"]
    );
}

#[test]
fn profiles_layer_namespace_then_workload_then_annotations() {
    let profile =
        |name: &str, selector: Option<LabelSelector>, spec: serde_json::Value, created: &str| {
            let mut p = ProxyProfile::new(
                name,
                serde_json::from_value::<ProxyProfileSpec>(spec).expect("spec"),
            );
            p.spec.selector = selector;
            p.metadata = ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                creation_timestamp: Some(serde_json::from_value(json!(created)).expect("time")),
                ..Default::default()
            };
            p
        };
    let web = LabelSelector {
        match_labels: Some([("app".to_owned(), "web".to_owned())].into()),
        ..Default::default()
    };
    let profiles = [
        profile(
            "ns",
            None,
            json!({"proxy": {"resources": {"requests": {"cpu": "300m"}}, "logLevel": "info"}, "traffic": {"excludeOutboundPorts": "5432"}}),
            "2026-01-01T00:00:00Z",
        ),
        profile(
            "ns-newer",
            None,
            json!({"proxy": {"logLevel": "trace"}}),
            "2026-02-01T00:00:00Z",
        ),
        profile(
            "web",
            Some(web),
            json!({"proxy": {"logLevel": "debug", "proxyMetadata": {"X": "1"}}}),
            "2026-03-01T00:00:00Z",
        ),
    ];
    let result = run_with(
        &app_pod(json!({"sidecar.istio.io/componentLogLevel": "misc:info"})),
        &MeshSpec::default(),
        &profiles,
    )
    .expect("ok");
    assert_eq!(
        result.warnings.len(),
        1,
        "the newer namespace profile is named: {:?}",
        result.warnings
    );
    assert!(result.warnings[0].contains("shop/ns-newer"));
    let out = result.pod.expect("injected");
    let proxy_args = container(&out, "istio-proxy").args.clone().expect("args");
    assert!(
        proxy_args.contains(&"--proxyLogLevel=debug".to_owned()),
        "{proxy_args:?}"
    );
    assert!(proxy_args.contains(&"--proxyComponentLogLevel=misc:info".to_owned()));
    let resources =
        serde_json::to_value(container(&out, "istio-proxy").resources.as_ref()).expect("json");
    assert_eq!(
        resources["requests"],
        json!({"cpu": "300m", "memory": "128Mi"}),
        "field-by-field merge"
    );
    assert!(args(&out).windows(2).any(|w| w == ["-o", "5432"]));
    assert_eq!(env(&out, "X"), Some("1"));
}

#[test]
fn bad_mesh_and_profile_values_name_the_field() {
    let mut mesh = MeshSpec::default();
    mesh.traffic.exclude_outbound_ip_ranges = "10.0.0.0/40".into();
    let err = run_with(&app_pod(json!({})), &mesh, &[])
        .expect_err("bad mesh")
        .to_string();
    assert!(
        err.contains("traffic.excludeOutboundIPRanges") && err.contains("10.0.0.0/40"),
        "{err}"
    );
}

#[test]
fn proxy_metadata_side_effects() {
    let mut mesh = MeshSpec::default();
    mesh.proxy.proxy_metadata = [
        ("ISTIO_META_ENABLE_HBONE".to_owned(), "true".to_owned()),
        ("IPTABLES_TRACE_LOGGING".to_owned(), "true".to_owned()),
        (
            "ENVOY_SECURE_MERGED_METRICS_PORT".to_owned(),
            "15091".to_owned(),
        ),
    ]
    .into();
    let out = injected(&app_pod(json!({})), &mesh);
    assert_eq!(label(&out, "networking.istio.io/tunnel"), Some("http"));
    let sc = container(&out, "istio-proxy")
        .security_context
        .clone()
        .expect("sc");
    assert_eq!((sc.privileged, sc.run_as_user), (Some(true), Some(0)));
    assert_eq!(
        annotation(&out, "prometheus.istio.io/secure-port"),
        Some("15091")
    );
}

#[test]
fn workload_and_owner_come_from_the_controller() {
    let p = pod(json!({
        "metadata": {"generateName": "api-7c9f-", "labels": {"pod-template-hash": "7c9f"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7c9f", "uid": "u", "controller": true}]},
        "spec": {"containers": [{"name": "api"}]}
    }));
    let out = injected(&p, &MeshSpec::default());
    assert_eq!(env(&out, "ISTIO_META_WORKLOAD_NAME"), Some("api"));
    assert_eq!(
        env(&out, "ISTIO_META_OWNER"),
        Some("kubernetes://apis/apps/v1/namespaces/shop/deployments/api")
    );
    assert_eq!(label(&out, "service.istio.io/canonical-name"), Some("api"));
}

#[test]
fn skipped_pods_are_returned_without_a_pod() {
    let result = run_with(
        &app_pod(json!({"sidecar.istio.io/inject": "false"})),
        &MeshSpec::default(),
        &[],
    )
    .expect("ok");
    assert!(!result.decision.inject && result.pod.is_none());
}

#[test]
fn non_default_revision_uses_its_own_istiod() {
    let mesh = MeshSpec {
        revision: "canary".into(),
        ..Default::default()
    };
    let out = injected(&app_pod(json!({})), &mesh);
    assert_eq!(
        env(&out, "CA_ADDR"),
        Some("istiod-canary.istio-system.svc:15012")
    );
    assert_eq!(
        env(&out, "PROXY_CONFIG"),
        Some("{\"discoveryAddress\":\"istiod-canary.istio-system.svc:15012\"}\n")
    );
    assert_eq!(annotation(&out, "istio.io/rev"), Some("canary"));
}

#[test]
fn empty_canonical_labels_count_as_absent() {
    let p = pod(json!({
        "metadata": {"name": "x", "labels": {"app": "shop", "service.istio.io/canonical-name": "", "service.istio.io/canonical-revision": "r1"}},
        "spec": {"containers": [{"name": "main"}]}
    }));
    let out = injected(&p, &MeshSpec::default());
    assert_eq!(label(&out, "service.istio.io/canonical-name"), Some("shop"));
    assert_eq!(
        label(&out, "service.istio.io/canonical-revision"),
        Some("r1")
    );
}

#[test]
fn probe_rewriting_follows_the_pod_annotation() {
    let probed = |annotations: serde_json::Value| {
        pod(json!({
            "metadata": {"name": "x", "annotations": annotations},
            "spec": {"containers": [{"name": "main", "readinessProbe": {"httpGet": {"path": "/r", "port": 80}}}]}
        }))
    };
    let off = injected(
        &probed(json!({"sidecar.istio.io/rewriteAppHTTPProbers": "false"})),
        &MeshSpec::default(),
    );
    let http = |p: &Pod| {
        container(p, "main")
            .readiness_probe
            .as_ref()
            .and_then(|r| r.http_get.clone())
            .expect("http")
    };
    assert_eq!(http(&off).path.as_deref(), Some("/r"));
    assert!(env(&off, "ISTIO_KUBE_APP_PROBERS").is_none());
    let mut mesh = MeshSpec::default();
    mesh.injection.rewrite_app_probes = false;
    let on = injected(
        &probed(json!({"sidecar.istio.io/rewriteAppHTTPProbers": "true"})),
        &mesh,
    );
    assert_eq!(http(&on).path.as_deref(), Some("/app-health/main/readyz"));
}

#[test]
fn metrics_merge_follows_the_pod_annotation() {
    let mut mesh = MeshSpec::default();
    mesh.injection.merge_prometheus_metrics = false;
    let off = injected(&app_pod(json!({"prometheus.io/port": "9090"})), &mesh);
    assert_eq!(annotation(&off, "prometheus.io/port"), Some("9090"));
    let on = injected(
        &app_pod(
            json!({"prometheus.io/port": "9090", "prometheus.istio.io/merge-metrics": "true"}),
        ),
        &mesh,
    );
    assert_eq!(annotation(&on, "prometheus.io/port"), Some("15020"));
    assert_eq!(
        env(&on, "ISTIO_PROMETHEUS_ANNOTATIONS"),
        Some(r#"{"scrape":"","path":"","port":"9090"}"#)
    );
}

#[test]
fn log_level_annotations_set_proxy_and_init_arguments() {
    let out = injected(
        &app_pod(
            json!({"sidecar.istio.io/logLevel": "debug", "sidecar.istio.io/componentLogLevel": "rbac:debug", "sidecar.istio.io/agentLogLevel": "all:warn"}),
        ),
        &MeshSpec::default(),
    );
    let proxy_args = container(&out, "istio-proxy").args.clone().expect("args");
    assert_eq!(
        proxy_args[4..],
        [
            "--proxyLogLevel=debug",
            "--proxyComponentLogLevel=rbac:debug",
            "--log_output_level=all:warn"
        ]
    );
    assert_eq!(
        args(&out).last().map(String::as_str),
        Some("--log_output_level=all:warn")
    );
}

/// Annotations with one entry.
fn one(name: &str, value: &str) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(name.to_owned(), value.into());
    annotations.into()
}

#[test]
fn rejects_yaml_aliases_in_proxy_config_naming_the_annotation() {
    let bomb = "a: &a [x, x, x, x, x, x, x, x]\nb: [*a, *a, *a, *a, *a, *a, *a, *a]\n";
    let message = rejection(&app_pod(one(ann::PROXY_CONFIG, bomb)));
    assert!(message.contains(ann::PROXY_CONFIG), "{message}");
    assert!(message.contains("anchors and aliases"), "{message}");
}

#[test]
fn rejects_parsed_annotations_over_the_size_limit_naming_them() {
    let big = format!(
        "{{\"v\": {{\"emptyDir\": {{}}, \"x\": \"{}\"}}}}",
        "y".repeat(ann::MAX_PARSED_ANNOTATION_BYTES)
    );
    for name in [
        ann::PROXY_CONFIG,
        ann::USER_VOLUME,
        ann::USER_VOLUME_MOUNT,
        ann::SCRAPE_TARGETS,
    ] {
        let message = rejection(&app_pod(one(name, &big)));
        assert!(message.contains(name), "{message}");
        assert!(
            message.contains("over the limit of 65536 bytes"),
            "{message}"
        );
        assert!(message.len() < 1000, "the value is not echoed: {message}");
    }
    let fits = format!("meshId: {}\n", "m".repeat(1000));
    assert!(
        run_with(
            &app_pod(one(ann::PROXY_CONFIG, &fits)),
            &MeshSpec::default(),
            &[]
        )
        .is_ok()
    );
}

fn cni_mesh(native: NativeSidecars) -> MeshSpec {
    let mut mesh = MeshSpec::default();
    mesh.traffic.cni.enabled = true;
    mesh.injection.native_sidecars = native;
    mesh
}

#[test]
fn cni_mode_injects_an_unprivileged_validation_container_instead_of_istio_init() {
    let pod = injected(&app_pod(json!({})), &cni_mesh(NativeSidecars::Enabled));
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        names(spec.init_containers.as_deref().unwrap_or_default()),
        ["istio-validation", "istio-proxy"]
    );
    let validation = container(&pod, "istio-validation");
    let args = validation.args.as_deref().unwrap_or_default();
    assert_eq!(args[0], "istio-iptables");
    assert_eq!(
        args[args.len() - 2..],
        ["--run-validation", "--skip-rule-apply"]
    );
    let security = validation
        .security_context
        .as_ref()
        .expect("securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.add, None);
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(security.run_as_user, Some(1337));
    assert_eq!(security.run_as_group, Some(1337));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let status = &pod.metadata.annotations.as_ref().expect("annotations")[ann::STATUS];
    assert!(
        status.starts_with(
            r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null"#
        ),
        "{status}"
    );
}

#[test]
fn cni_mode_classic_puts_validation_before_the_users_init_containers() {
    let pod = pod(json!({
        "metadata": {"name": "web"},
        "spec": {
            "initContainers": [{"name": "setup", "image": "setup:1"}],
            "containers": [{"name": "web", "image": "web:1"}],
        }
    }));
    let pod = injected(&pod, &cni_mesh(NativeSidecars::Disabled));
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        names(spec.init_containers.as_deref().unwrap_or_default()),
        ["istio-validation", "setup"]
    );
    assert_eq!(names(&spec.containers), ["web", "istio-proxy"]);
}

#[test]
fn cni_mode_writes_the_capture_settings_the_cni_plugin_reads() {
    let pod = injected(
        &app_pod(json!({
            "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
        })),
        &cni_mesh(NativeSidecars::Enabled),
    );
    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    let get = |key: &str| annotations.get(key).map(String::as_str);
    assert_eq!(get(ann::INTERCEPTION_MODE), Some("REDIRECT"));
    assert_eq!(get(ann::INCLUDE_OUTBOUND_IP_RANGES), Some("*"));
    assert_eq!(
        get(ann::EXCLUDE_OUTBOUND_IP_RANGES),
        None,
        "empty: not written"
    );
    assert_eq!(get(ann::INCLUDE_INBOUND_PORTS), Some("*"));
    assert_eq!(get(ann::EXCLUDE_INBOUND_PORTS), Some("9000,15020"));
    assert_eq!(get(ann::EXCLUDE_OUTBOUND_PORTS), Some("5432"));
    assert_eq!(get(ann::INCLUDE_OUTBOUND_PORTS), None);
    assert_eq!(get(cni::MULTUS_NETWORKS), None, "default provider");
}

#[test]
fn cni_multus_appends_the_istio_cni_network_once() {
    let mut mesh = cni_mesh(NativeSidecars::Enabled);
    mesh.traffic.cni.provider = ferrimesh_crds::settings::CniProvider::Multus;
    let pod = injected(&app_pod(json!({cni::MULTUS_NETWORKS: "macvlan"})), &mesh);
    let networks = |pod: &Pod| {
        pod.metadata.annotations.as_ref().expect("annotations")[cni::MULTUS_NETWORKS].clone()
    };
    assert_eq!(networks(&pod), "macvlan, default/istio-cni");
    let again = injected(&pod, &mesh);
    assert_eq!(networks(&again), "macvlan, default/istio-cni");
}

#[test]
fn cni_validation_runs_as_1337_under_tproxy_and_as_the_users_proxy_otherwise() {
    let mut mesh = cni_mesh(NativeSidecars::Enabled);
    mesh.proxy.uid = 2000;
    let tproxy = injected(
        &app_pod(json!({"sidecar.istio.io/interceptionMode": "TPROXY"})),
        &mesh,
    );
    let security = |pod: &Pod| {
        let sc = container(pod, "istio-validation")
            .security_context
            .clone()
            .expect("securityContext");
        (sc.run_as_user, sc.run_as_group)
    };
    assert_eq!(security(&tproxy), (Some(1337), Some(1337)));
    let overridden = pod(json!({
        "metadata": {"name": "web"},
        "spec": {"containers": [
            {"name": "web", "image": "web:1"},
            {"name": "istio-proxy", "image": "auto", "securityContext": {"runAsUser": 1500, "runAsGroup": 1501}},
        ]}
    }));
    let overridden = injected(&overridden, &mesh);
    assert_eq!(security(&overridden), (Some(1500), Some(1501)));
    let args = container(&overridden, "istio-validation")
        .args
        .clone()
        .unwrap_or_default();
    let u = args.iter().position(|a| a == "-u").expect("-u");
    assert_eq!(args[u + 1], "1500");
}

#[test]
fn seccomp_profile_goes_on_both_injected_containers() {
    let mut mesh = MeshSpec::default();
    mesh.proxy.seccomp_profile = Some(k8s_openapi::api::core::v1::SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    });
    for mesh in [mesh.clone(), {
        let mut cni = mesh;
        cni.traffic.cni.enabled = true;
        cni
    }] {
        let pod = injected(&app_pod(json!({})), &mesh);
        let spec = pod.spec.as_ref().expect("spec");
        let injected_containers = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.name.starts_with("istio-"));
        let mut count = 0;
        for c in injected_containers {
            count += 1;
            let profile = c
                .security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.as_str());
            assert_eq!(profile, Some("RuntimeDefault"), "{}", c.name);
        }
        assert_eq!(count, 2);
    }
}

#[test]
fn cni_mode_leaves_a_users_own_istio_init_container_alone() {
    let pod = pod(json!({
        "metadata": {"name": "web"},
        "spec": {
            "initContainers": [{"name": "istio-init", "image": "mine:1"}],
            "containers": [{"name": "web", "image": "web:1"}],
        }
    }));
    let pod = injected(&pod, &cni_mesh(NativeSidecars::Enabled));
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        names(spec.init_containers.as_deref().unwrap_or_default()),
        ["istio-validation", "istio-proxy", "istio-init"]
    );
    assert_eq!(
        container(&pod, "istio-init").image.as_deref(),
        Some("mine:1")
    );
}

#[test]
fn stamps_the_hash_a_reader_of_the_running_pod_recomputes() {
    let mut profile = ProxyProfile::new(
        "web",
        serde_json::from_value::<ProxyProfileSpec>(
            json!({"selector": {"matchLabels": {"app": "web"}}, "proxy": {"logLevel": "debug"}}),
        )
        .expect("spec"),
    );
    profile.metadata.namespace = Some("shop".into());
    let mesh = MeshSpec::default();
    let stamp_of = |pod: &Pod| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ferrimesh_crds::stamp::INJECTION_HASH))
            .cloned()
            .expect("stamped")
    };
    let p = app_pod(json!({"sidecar.istio.io/agentLogLevel": "default:debug"}));
    let profiled = run_with(&p, &mesh, std::slice::from_ref(&profile))
        .expect("injects")
        .pod
        .expect("injected");
    let plain = injected(&p, &mesh);
    assert_ne!(stamp_of(&profiled), stamp_of(&plain));
    let annotations = profiled.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        stamp_of(&profiled),
        ferrimesh_crds::stamp::injection_hash(&mesh, &[&profile], &annotations)
    );
    let mut newer = mesh.clone();
    newer.proxy.image = "example.com/proxyv2:1.29.0".into();
    assert_ne!(stamp_of(&injected(&p, &newer)), stamp_of(&plain));
}

#[test]
fn warns_when_injecting_a_pod_that_asks_for_ambient() {
    let mut p = app_pod(json!({}));
    p.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    let result = run_with(&p, &MeshSpec::default(), &[]).expect("injects");
    assert!(result.pod.is_some());
    assert!(
        result
            .warnings
            .iter()
            .any(|w| w.starts_with("the pod label istio.io/dataplane-mode=ambient")),
        "{:?}",
        result.warnings
    );
    let plain = run_with(&app_pod(json!({})), &MeshSpec::default(), &[]).expect("injects");
    assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);
}

#[test]
fn mesh_default_templates_apply_to_pods_that_name_none() {
    let mut mesh = MeshSpec::default();
    mesh.injection.default_templates = vec!["sidecar".to_owned(), "spire".to_owned()];
    let plain = injected(&app_pod(json!({})), &mesh);
    assert_eq!(
        plain
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(templates::spire::LABEL))
            .map(String::as_str),
        Some("true"),
        "the Mesh's spire applies"
    );
    let named = injected(
        &app_pod(json!({"inject.istio.io/templates": "sidecar"})),
        &mesh,
    );
    assert!(
        named
            .metadata
            .labels
            .as_ref()
            .is_none_or(|l| !l.contains_key(templates::spire::LABEL)),
        "the pod's own list wins"
    );
}

#[test]
fn refuses_a_mesh_whose_default_templates_ferrimesh_does_not_apply() {
    let mut mesh = MeshSpec::default();
    mesh.injection.default_templates = vec!["spire".to_owned()];
    let error = run_with(&app_pod(json!({})), &mesh, &[]).expect_err("spire alone");
    assert!(
        error.to_string().contains("injection.defaultTemplates"),
        "{error}"
    );
}

fn gateway_pod(proxy_ports: serde_json::Value) -> Pod {
    pod(json!({
        "metadata": {"name": "ingress", "namespace": "shop", "labels": {"app": "ingress"},
                     "annotations": {"inject.istio.io/templates": "gateway"}},
        "spec": {"containers": [{"name": "istio-proxy", "image": "auto", "ports": proxy_ports}]}
    }))
}

#[test]
fn gateway_pod_ports_are_the_users_on_first_injection_and_on_reinjection() {
    let mesh = MeshSpec::default();
    for (ports, expected) in [
        (json!([]), "[\n]"),
        (
            json!([{"name": "https", "containerPort": 8443}]),
            "[\n    {\"name\":\"https\",\"containerPort\":8443}\n]",
        ),
    ] {
        let once = injected(&gateway_pod(ports), &mesh);
        let twice = injected(&once, &mesh);
        assert_eq!(env(&once, "ISTIO_META_POD_PORTS"), Some(expected));
        assert_eq!(
            env(&twice, "ISTIO_META_POD_PORTS"),
            Some(expected),
            "the injected proxy's own 15090 is not the pod's"
        );
        assert_eq!(container(&twice, "istio-proxy").resources, None);
        assert_eq!(once, twice, "re-injection changes nothing");
    }
}
