//! Pods made up from a seed, for differential injection: containers with and
//! without ports and probes (http, tcp, grpc, exec, named ports), lifecycle
//! hooks, init containers (sidecars among them), security contexts, owners,
//! a user `istio-proxy` container, every pod annotation of the README's
//! tables with a valid value, and the injection templates ferrimesh applies
//! (`sidecar,spire`, `gateway[,spire]`, `grpc-agent`, `grpc-simple`). The
//! same seed gives the same pods.

use fastrand::Rng;
use serde_json::{Map, Value, json};

/// One generated pod and the name it is reported under.
#[derive(Debug, Clone)]
pub struct GeneratedPod {
    /// `gen-<seed>-<index>`.
    pub name: String,
    /// The pod, as a client would send it.
    pub pod: Value,
}

/// `count` pods from `seed`.
pub fn generate(seed: u64, count: usize) -> Vec<GeneratedPod> {
    let mut rng = Rng::with_seed(seed);
    (0..count)
        .map(|index| {
            let name = format!("gen-{seed}-{index}");
            let pod = pod(&mut rng, &name);
            GeneratedPod { name, pod }
        })
        .collect()
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn chance(rng: &mut Rng, percent: u8) -> bool {
    rng.u8(..100) < percent
}

fn pod(rng: &mut Rng, name: &str) -> Value {
    if chance(rng, 6) {
        return gateway_pod(rng, name);
    }
    let containers: Vec<Value> = (0..rng.usize(1..=3))
        .map(|i| container(rng, &format!("app{i}"), i))
        .collect();
    let mut init_containers: Vec<Value> = (0..rng.usize(0..=2))
        .map(|i| init_container(rng, i))
        .collect();
    let mut spec = json!({
        "serviceAccountName": pick(rng, &["default", "web-sa"]),
        "containers": containers,
    });
    if chance(rng, 30) {
        spec["securityContext"] =
            json!({"runAsUser": rng.i64(1000..2000), "fsGroup": 2000, "runAsNonRoot": true});
    }
    if chance(rng, 15) {
        spec["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    }
    if chance(rng, 10) {
        spec["imagePullSecrets"] = json!([{"name": "regcred"}]);
    }
    if chance(rng, 15) {
        // The user's own proxy settings, laid over the injected proxy.
        let mut proxy = json!({"name": "istio-proxy", "image": pick(rng, &["auto", "registry.example/proxyv2:custom"])});
        if chance(rng, 50) {
            proxy["resources"] = json!({"requests": {"cpu": "200m"}, "limits": {"memory": "2Gi"}});
        }
        if chance(rng, 50) {
            proxy["env"] = json!([{"name": "USER_PROXY_ENV", "value": "1"}]);
        }
        if chance(rng, 30) {
            proxy["securityContext"] = json!({"runAsUser": 1500});
        }
        let list = if chance(rng, 50) {
            "containers"
        } else {
            "initContainers"
        };
        if list == "containers" {
            if let Some(containers) = spec["containers"].as_array_mut() {
                containers.push(proxy);
            }
        } else {
            init_containers.push(proxy);
        }
    }
    let mut annotations = annotations(rng);
    // Most pods name no template (the Mesh's default applies).
    let templates = match rng.u8(..100) {
        0..=5 => Some("sidecar,spire"),
        6..=9 => Some("grpc-agent"),
        10..=13 => Some("grpc-simple"),
        14..=16 => Some("sidecar"),
        _ => None,
    };
    if let Some(templates) = templates {
        annotations["inject.istio.io/templates"] = json!(templates);
    }
    let grpc = templates.is_some_and(|t| t.starts_with("grpc"));
    if grpc && chance(rng, 40) {
        // The app's own bootstrap path, which the template also sets.
        if let Some(first) = spec["containers"].get_mut(0) {
            first["env"] =
                json!([{"name": "GRPC_XDS_BOOTSTRAP", "value": "/custom/bootstrap.json"}]);
        }
    }
    if grpc || annotations.get("sidecar.istio.io/nativeSidecar") != Some(&json!("true")) {
        // A classic proxy is overridden from the containers only (one among
        // the init containers would be a second `istio-proxy`): only a pod
        // that asks for the native layout has its override there (the gRPC
        // templates' proxy is always among the containers).
        if let Some(at) = init_containers
            .iter()
            .position(|c| c["name"] == "istio-proxy")
        {
            let proxy = init_containers.remove(at);
            if let Some(containers) = spec["containers"].as_array_mut() {
                containers.push(proxy);
            }
        }
    }
    if !init_containers.is_empty() {
        spec["initContainers"] = Value::from(init_containers);
    }
    let mut metadata = json!({"labels": labels(rng), "annotations": annotations});
    owner(rng, name, &mut metadata);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// A pod as Istio's gateway chart makes it: opted in, the `gateway`
/// template, its own `istio-proxy` with `image: auto`.
fn gateway_pod(rng: &mut Rng, name: &str) -> Value {
    let mut proxy = json!({"name": "istio-proxy", "image": "auto"});
    if chance(rng, 60) {
        proxy["ports"] = json!([{"containerPort": 15021, "name": "status-port", "protocol": "TCP"},
                                {"containerPort": 8080, "name": "http2", "protocol": "TCP"}]);
    }
    if chance(rng, 50) {
        proxy["resources"] = json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2000m", "memory": "1024Mi"}});
    }
    if chance(rng, 50) {
        proxy["securityContext"] = json!({"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true,
                                          "capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": false});
    }
    let templates = if chance(rng, 25) {
        "gateway,spire"
    } else {
        "gateway"
    };
    let mut annotations = json!({"inject.istio.io/templates": templates});
    if chance(rng, 50) {
        annotations["prometheus.io/port"] = json!("15020");
        annotations["prometheus.io/scrape"] = json!("true");
        annotations["prometheus.io/path"] = json!("/stats/prometheus");
    }
    if chance(rng, 20) {
        annotations["sidecar.istio.io/logLevel"] = json!("debug");
    }
    let mut metadata = json!({
        "labels": {"app": "ingress", "istio": "ingressgateway", "sidecar.istio.io/inject": "true"},
        "annotations": annotations,
    });
    owner(rng, name, &mut metadata);
    let mut spec = json!({"serviceAccountName": "ingress", "containers": [proxy]});
    if chance(rng, 50) {
        spec["securityContext"] =
            json!({"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]});
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

fn owner(rng: &mut Rng, name: &str, metadata: &mut Value) {
    match rng.u8(..4) {
        0 => metadata["name"] = json!(name),
        1 => {
            let hash = format!("{:x}", rng.u32(0x1000_0000..));
            let replica_set = format!("{name}-{hash}");
            metadata["generateName"] = json!(format!("{replica_set}-"));
            metadata["labels"]["pod-template-hash"] = json!(hash);
            metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set, "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]);
        }
        2 => {
            let job = format!("{name}-{}", rng.u64(10_000_000..100_000_000));
            metadata["generateName"] = json!(format!("{job}-"));
            metadata["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": "00000000-0000-0000-0000-000000000002", "controller": true}]);
        }
        _ => {
            metadata["generateName"] = json!(format!("{name}-"));
            metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": "00000000-0000-0000-0000-000000000003", "controller": true}]);
        }
    }
}

fn labels(rng: &mut Rng) -> Value {
    let mut labels = Map::new();
    if chance(rng, 70) {
        labels.insert("app".into(), json!(pick(rng, &["web", "api"])));
    }
    if chance(rng, 30) {
        labels.insert("app.kubernetes.io/name".into(), json!("shop"));
    }
    if chance(rng, 40) {
        labels.insert("version".into(), json!(pick(rng, &["v1", "v2"])));
    }
    if chance(rng, 10) {
        labels.insert("service.istio.io/canonical-name".into(), json!("canonical"));
    }
    if chance(rng, 10) {
        labels.insert("sidecar.istio.io/inject".into(), json!("true"));
    }
    Value::Object(labels)
}

fn port(rng: &mut Rng, index: usize) -> Value {
    let number = pick(rng, &[80, 8080, 9090, 5432, 15020]) + i64::try_from(index).unwrap_or(0);
    let mut port = json!({"containerPort": number});
    if chance(rng, 70) {
        port["name"] = json!(format!(
            "{}-{index}",
            pick(rng, &["http", "grpc", "tcp", "metrics"])
        ));
    }
    if chance(rng, 20) {
        port["protocol"] = json!(pick(rng, &["TCP", "UDP"]));
    }
    if chance(rng, 5) {
        port["hostPort"] = json!(30000 + number);
    }
    port
}

fn probe(rng: &mut Rng, ports: &[Value]) -> Value {
    let named: Vec<&str> = ports.iter().filter_map(|p| p["name"].as_str()).collect();
    let port = if !named.is_empty() && chance(rng, 40) {
        json!(pick(rng, &named))
    } else {
        json!(pick(rng, &[8080, 9090, 15020]))
    };
    let mut probe = match rng.u8(..4) {
        0 => {
            let mut get = json!({"path": pick(rng, &["/healthz", "/ready", ""]), "port": port});
            if chance(rng, 20) {
                get["scheme"] = json!(pick(rng, &["HTTP", "HTTPS"]));
            }
            if chance(rng, 15) {
                get["httpHeaders"] = json!([{"name": "X-Probe", "value": "1"}]);
            }
            if chance(rng, 10) {
                get["host"] = json!("127.0.0.1");
            }
            json!({"httpGet": get})
        }
        1 => json!({"tcpSocket": {"port": port}}),
        2 => {
            let mut grpc = json!({"port": pick(rng, &[9090, 50051])});
            if chance(rng, 50) {
                grpc["service"] = json!("health");
            }
            json!({"grpc": grpc})
        }
        _ => json!({"exec": {"command": ["cat", "/tmp/ready"]}}),
    };
    if chance(rng, 40) {
        probe["timeoutSeconds"] = json!(rng.i32(1..10));
    }
    if chance(rng, 30) {
        probe["periodSeconds"] = json!(rng.i32(1..30));
    }
    probe
}

fn hook(rng: &mut Rng) -> Value {
    match rng.u8(..3) {
        0 => json!({"httpGet": {"path": "/hook", "port": 8080}}),
        1 => json!({"tcpSocket": {"port": 8080}}),
        _ => json!({"exec": {"command": ["sh", "-c", "sleep 1"]}}),
    }
}

fn container(rng: &mut Rng, name: &str, index: usize) -> Value {
    let ports: Vec<Value> = (0..rng.usize(0..=3))
        .map(|i| port(rng, index * 10 + i))
        .collect();
    let mut container = json!({"name": name, "image": format!("registry.example/{name}:1")});
    for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if chance(rng, 35) {
            container[kind] = probe(rng, &ports);
        }
    }
    if chance(rng, 15) {
        let when = pick(rng, &["preStop", "postStart"]);
        container["lifecycle"] = json!({ *when: hook(rng) });
    }
    if chance(rng, 25) {
        container["securityContext"] =
            json!({"runAsUser": rng.i64(1000..2000), "allowPrivilegeEscalation": false});
    }
    if chance(rng, 20) {
        container["env"] = json!([{"name": "MODE", "value": "prod"}]);
    }
    if chance(rng, 20) {
        container["resources"] = json!({"limits": {"cpu": "500m", "memory": "256Mi"}});
    }
    if !ports.is_empty() {
        container["ports"] = Value::from(ports);
    }
    container
}

fn init_container(rng: &mut Rng, index: usize) -> Value {
    let mut init = json!({"name": format!("init{index}"), "image": "registry.example/init:1", "command": ["sh", "-c", "true"]});
    if chance(rng, 30) {
        // A native sidecar of the user's own.
        init["restartPolicy"] = json!("Always");
        if chance(rng, 50) {
            init["readinessProbe"] = json!({"httpGet": {"path": "/ready", "port": 7070}});
        }
    }
    init
}

/// Annotations of the README's tables, each with some chance and a valid value.
fn annotations(rng: &mut Rng) -> Value {
    let mut a = Map::new();
    let mut put = |rng: &mut Rng, percent: u8, key: &str, values: &[&str]| {
        if chance(rng, percent) {
            a.insert(key.to_owned(), json!(pick(rng, values)));
        }
    };
    put(
        rng,
        40,
        "sidecar.istio.io/nativeSidecar",
        &["true", "false"],
    );
    put(
        rng,
        8,
        "sidecar.istio.io/interceptionMode",
        &["REDIRECT", "TPROXY", "NONE"],
    );
    put(
        rng,
        8,
        "status.sidecar.istio.io/port",
        &["15020", "15021", "0", "16000"],
    );
    put(
        rng,
        6,
        "readiness.status.sidecar.istio.io/initialDelaySeconds",
        &["0", "5"],
    );
    put(
        rng,
        6,
        "readiness.status.sidecar.istio.io/periodSeconds",
        &["3", "20"],
    );
    put(
        rng,
        6,
        "readiness.status.sidecar.istio.io/failureThreshold",
        &["1", "10"],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        &["*", "10.0.0.0/8,172.16.0.0/12", ""],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        &["192.168.0.0/16", "", "10.1.0.0/16, 10.2.0.0/16"],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/includeInboundPorts",
        &["*", "8080,9090", ""],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/excludeInboundPorts",
        &["9000", " 4, 5,,6 ", ""],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/includeOutboundPorts",
        &["443", ""],
    );
    put(
        rng,
        8,
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        &["5432,6379", ""],
    );
    put(
        rng,
        6,
        "traffic.sidecar.istio.io/excludeInterfaces",
        &["eth1", "eth1,eth2", ""],
    );
    put(rng, 4, "istio.io/reroute-virtual-interfaces", &["net1", ""]);
    put(
        rng,
        4,
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        &["net2", ""],
    );
    put(
        rng,
        8,
        "prometheus.istio.io/merge-metrics",
        &["true", "false"],
    );
    put(
        rng,
        8,
        "proxy.istio.io/config",
        &[
            "concurrency: 2",
            "{\"drainDuration\": \"20s\"}",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            "holdApplicationUntilProxyStarts: true",
            "discoveryAddress: istiod-other.istio-system.svc:15012\nconcurrency: 0",
        ],
    );
    put(rng, 8, "sidecar.istio.io/proxyCPU", &["200m", "1"]);
    put(rng, 6, "sidecar.istio.io/proxyMemory", &["256Mi", "1Gi"]);
    put(rng, 6, "sidecar.istio.io/proxyCPULimit", &["2000m", "4"]);
    put(
        rng,
        6,
        "sidecar.istio.io/proxyMemoryLimit",
        &["1024Mi", "2Gi"],
    );
    put(
        rng,
        6,
        "sidecar.istio.io/proxyImage",
        &["registry.example/proxyv2:override", "no-slash"],
    );
    put(rng, 6, "sidecar.istio.io/logLevel", &["debug", "info"]);
    put(
        rng,
        6,
        "sidecar.istio.io/componentLogLevel",
        &["misc:info", "upstream:debug"],
    );
    put(rng, 6, "sidecar.istio.io/agentLogLevel", &["default:debug"]);
    put(
        rng,
        10,
        "sidecar.istio.io/rewriteAppHTTPProbers",
        &["true", "false"],
    );
    put(rng, 5, "sidecar.istio.io/inject", &["true"]);
    put(rng, 15, "prometheus.io/scrape", &["true", "false"]);
    put(rng, 12, "prometheus.io/port", &["9090", "8080"]);
    put(rng, 12, "prometheus.io/path", &["/metrics", "/stats"]);
    put(
        rng,
        5,
        "prometheus.istio.io/scrape-targets",
        &["9090:/metrics", "8080:/a,9091:/b"],
    );
    put(rng, 5, "kubectl.kubernetes.io/default-container", &["app0"]);
    put(
        rng,
        6,
        "k8s.v1.cni.cncf.io/networks",
        &[
            "macvlan-conf",
            "macvlan-conf, default/istio-cni",
            "[{\"name\": \"macvlan-conf\"}]",
            "[{\"name\": \"istio-cni\", \"namespace\": \"default\"}]",
        ],
    );
    if chance(rng, 6) {
        // A user volume and the proxy's mount of it come together.
        a.insert(
            "sidecar.istio.io/userVolume".to_owned(),
            json!("{\"extra\":{\"emptyDir\":{}}}"),
        );
        a.insert(
            "sidecar.istio.io/userVolumeMount".to_owned(),
            json!("{\"extra\":{\"mountPath\":\"/extra\"}}"),
        );
    }
    Value::Object(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_pods() {
        let a: Vec<Value> = generate(7, 20).into_iter().map(|p| p.pod).collect();
        let b: Vec<Value> = generate(7, 20).into_iter().map(|p| p.pod).collect();
        let c: Vec<Value> = generate(8, 20).into_iter().map(|p| p.pod).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn generated_pods_are_valid_pods_and_cover_the_shapes() {
        let pods = generate(1, 300);
        let mut native = 0;
        let mut user_proxy = 0;
        let mut owned = 0;
        for generated in &pods {
            let pod: k8s_openapi::api::core::v1::Pod =
                serde_json::from_value(generated.pod.clone()).expect("a Pod");
            let spec = pod.spec.expect("spec");
            assert!(!spec.containers.is_empty());
            let all = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten());
            if all.clone().any(|c| c.name == "istio-proxy") {
                user_proxy += 1;
            }
            if pod.metadata.owner_references.is_some() {
                owned += 1;
            }
            if pod
                .metadata
                .annotations
                .unwrap_or_default()
                .get("sidecar.istio.io/nativeSidecar")
                == Some(&"true".to_owned())
            {
                native += 1;
            }
        }
        assert!(native > 20, "native annotation in {native} of 300");
        for template in [
            "sidecar,spire",
            "gateway,spire",
            "grpc-agent",
            "grpc-simple",
        ] {
            let named = pods
                .iter()
                .filter(|p| {
                    p.pod["metadata"]["annotations"]["inject.istio.io/templates"] == template
                })
                .count();
            assert!(named >= 3, "{template} in {named} of 300");
        }
        assert!(user_proxy > 20, "user istio-proxy in {user_proxy} of 300");
        assert!(owned > 150, "owned pods {owned} of 300");
    }
}
