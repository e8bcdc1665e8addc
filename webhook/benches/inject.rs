//! Inject + JSONPatch, the work of one admission: a typical Deployment pod,
//! a pod with 2,000 env vars, a 64 KB pod spec, a size sweep showing that
//! cost grows linearly with the pod, and whole reviews of pods of up to
//! 1,000 containers and the 3 MiB request limit.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrimesh_crds::MeshSpec;
use ferrimesh_webhook::config::FixedSource;
use ferrimesh_webhook::inject::{Environment, Request, inject};
use ferrimesh_webhook::patch;
use ferrimesh_webhook::server::admission::review as review_fn;
use ferrimesh_webhook::server::metrics::Metrics;
use k8s_openapi::api::core::v1::Pod;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

// Injection allocates many small JSON nodes; mimalloc does that about twice
// as fast as the system allocator (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Deployment-created pod as the API server sends it.
fn typical() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5d4f8c7b9-", "namespace": "bookinfo",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d4f8c7b9"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9080"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-5d4f8c7b9",
                                 "uid": "8f1a2b3c", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "bookinfo-reviews",
            "containers": [{
                "name": "reviews", "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                "ports": [{"containerPort": 9080, "name": "http", "protocol": "TCP"}],
                "env": [{"name": "LOG_DIR", "value": "/tmp/logs"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/health", "port": 9080}, "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": 9080}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}]
        }
    })
}

/// The typical pod with `n` env vars on its container.
fn with_env(n: usize) -> Value {
    let mut pod = typical();
    let env: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("VAR_{i}"), "value": format!("value-{i}")}))
        .collect();
    pod["spec"]["containers"][0]["env"] = Value::Array(env);
    pod
}

/// Inject and diff, as the webhook does for one request.
fn admit(pod: &Pod, mesh: &MeshSpec, environment: &Environment) -> usize {
    let request = Request {
        pod,
        namespace: "bookinfo",
        mesh,
        profiles: &[],
        environment,
        workload: None,
    };
    let injected = inject(&request).expect("valid pod").pod.expect("injected");
    patch::between(pod, &injected)
        .expect("json")
        .map_or(0, |patch| patch.len())
}

fn bench(c: &mut Criterion) {
    let mesh = MeshSpec::default();
    let environment = Environment::default();
    let mut group = c.benchmark_group("inject+patch");
    for (name, value) in [("typical", typical()), ("env-2000", with_env(2000))] {
        let pod: Pod = serde_json::from_value(value).expect("pod");
        group.bench_function(name, |b| {
            b.iter(|| admit(black_box(&pod), &mesh, &environment))
        });
    }
    // A 64 KB pod spec: env vars until the serialised pod reaches 64 KiB.
    let mut n = 0;
    while serde_json::to_vec(&with_env(n)).expect("json").len() < 64 * 1024 {
        n += 50;
    }
    let pod: Pod = serde_json::from_value(with_env(n)).expect("pod");
    group.bench_function("spec-64KiB", |b| {
        b.iter(|| admit(black_box(&pod), &mesh, &environment))
    });
    group.finish();

    // The whole review as the server runs it, without HTTP and TLS: parse
    // the AdmissionReview, inject, diff, encode the response.
    let review = review_of(typical());
    let source = FixedSource::new(MeshSpec::default());
    let metrics = Metrics::register(&mut Registry::default());
    c.bench_function("admission-review/typical", |b| {
        b.iter(|| {
            review_fn(
                "/inject",
                Some("application/json"),
                black_box(review.as_bytes()),
                &source,
                &metrics,
            )
        })
    });

    let mut sweep = c.benchmark_group("size-sweep");
    for n in [250, 500, 1000, 2000, 4000] {
        let value = with_env(n);
        let bytes = serde_json::to_vec(&value).expect("json").len();
        let pod: Pod = serde_json::from_value(value).expect("pod");
        sweep.throughput(Throughput::Bytes(bytes as u64));
        sweep.bench_with_input(BenchmarkId::new("env-vars", n), &pod, |b, pod| {
            b.iter(|| admit(black_box(pod), &mesh, &environment))
        });
    }
    sweep.finish();

    // Whole reviews of pods of 100 to 1,000 containers (the most the
    // webhook reviews), each about 3 KiB (a port, a probe, an env var and
    // 40 args), up to the API server's 3 MiB request limit.
    let mut reviews = c.benchmark_group("review-sweep");
    reviews.sample_size(10);
    for n in [100, 250, 500, 1000] {
        let body = review_of(many_containers(n));
        reviews.throughput(Throughput::Bytes(body.len() as u64));
        reviews.bench_with_input(BenchmarkId::new("containers", n), &body, |b, body| {
            b.iter(|| {
                review_fn(
                    "/inject",
                    Some("application/json"),
                    black_box(body.as_bytes()),
                    &source,
                    &metrics,
                )
            })
        });
    }
    reviews.finish();
}

/// A pod of `n` containers of about 3 KiB each: a named port, an HTTP
/// readiness probe (rewritten by injection), an env var and 40 args.
fn many_containers(n: usize) -> Value {
    let mut pod = typical();
    let containers: Vec<Value> = (0..n)
        .map(|i| {
            let args: Vec<String> = (0..40)
                .map(|a| {
                    format!("--option-{a:02}=a-value-long-enough-to-look-like-a-real-flag-{i:05}")
                })
                .collect();
            json!({
                "name": format!("app-{i:05}"), "image": "registry.example.com/team/app:1.0.0",
                "args": args,
                "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                "env": [{"name": "INDEX", "value": i.to_string()}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}
            })
        })
        .collect();
    pod["spec"]["containers"] = Value::Array(containers);
    pod
}

/// An AdmissionReview of `pod`, serialised.
fn review_of(pod: Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "bookinfo",
                    "operation": "CREATE", "userInfo": {"username": "bench"}, "object": pod}
    })
    .to_string()
}

criterion_group!(benches, bench);
criterion_main!(benches);
