//! The install path: `kubectl apply -k config/default` into an empty API
//! server, then the local overlay with the operator and webhook running as
//! their own ServiceAccounts (RBAC from `config/rbac` and the admission
//! policies from `config/policy`, enforced), a Mesh from
//! `config/samples`, and a workload injected and registered end to end.
//!
//! No kubelet runs here, so the Deployments `config/default` applies are
//! stored but never run: the binaries run as local processes with the local
//! overlay's flags instead. What the Deployments would do is checked
//! statically, for `config/default` and `config/overlays/cert-manager`:
//! each container's binary accepts its args and its environment, the
//! Secret it mounts is one the install produces and holds the files the
//! binary reads, and its probes and Service ports are ports the binary
//! listens on.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrimesh_crds::{Mesh, WorkloadEntry};
use ferrimesh_e2e::fixtures::{
    WAIT, create_until_injected, namespace, namespace_label, start_operator_and_webhook,
    wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, eventually, kubectl, repo_root, workspace_binary};
use ferrimesh_operator::cluster::certificate_store::SERVING_SECRET;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomize_install_with_enforced_rbac_injects_and_registers() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;

    let applied = plane.apply_kustomization("config/default")?;
    for object in [
        "namespace/ferrimesh-system",
        "customresourcedefinition.apiextensions.k8s.io/meshes.mesh.ferrimesh.io",
        "deployment.apps/ferrimesh-operator",
        "deployment.apps/ferrimesh-webhook",
        "service/ferrimesh-webhook",
        "poddisruptionbudget.policy/ferrimesh-webhook",
        "clusterrole.rbac.authorization.k8s.io/ferrimesh-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/ferrimesh-operator-namespaces",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/ferrimesh-operator-webhook-configurations",
    ] {
        assert!(applied.contains(object), "{object} not applied:\n{applied}");
    }
    plane.apply_kustomization("config/overlays/local")?;
    // The local operator calls its webhook at a loopback URL, which
    // config/default's policy ferrimesh-operator-webhook-service refuses
    // (config/overlays/local leaves it out); the other policies stay.
    let (name, params) = (
        "ferrimesh-operator-webhook-service",
        DeleteParams::default(),
    );
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(name, &params)
        .await?;
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(name, &params)
        .await?;
    wait_for_crds(&client).await?;
    plane.apply_kustomization("config/samples")?;

    let _installed = start_operator_and_webhook(&plane, &client).await?;

    namespace(&client, "demo", &[("mesh", "on")]).await?;
    eventually("demo labelled", WAIT, || {
        let client = client.clone();
        async move {
            Ok(namespace_label(&client, "demo", "istio-injection")
                .await?
                .filter(|v| v == "enabled"))
        }
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "hello-6d8f9c-", "labels": {"app": "hello", "pod-template-hash": "6d8f9c"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-6d8f9c",
                                          "uid": "7b0c1d2e-0000-4000-8000-000000000001", "controller": true}]},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "hello", "image": "registry.example/hello:1", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))?;
    let created = create_until_injected(&pods, &pod).await?;
    let name = created.name_any();
    let status = json!({"status": {"podIP": "10.9.0.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let entries: Api<WorkloadEntry> = Api::namespaced(client.clone(), "demo");
    let entry = eventually("the WorkloadEntry", WAIT, || {
        let (entries, name) = (entries.clone(), name.clone());
        async move { Ok(entries.get_opt(&name).await?) }
    })
    .await?;
    assert_eq!(entry.spec.address.as_deref(), Some("10.9.0.7"));

    let mesh = eventually("Mesh Ready", Duration::from_secs(30), || {
        let meshes: Api<Mesh> = Api::all(client.clone());
        async move {
            let mesh = meshes.get("default").await?;
            let ready = mesh.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            Ok(ready.then_some(mesh))
        }
    })
    .await?;
    assert_eq!(mesh.status.map(|s| s.labelled_namespaces), Some(1));
    Ok(())
}

/// The objects `kubectl kustomize <dir>` renders, as JSON.
fn rendered(dir: &str) -> anyhow::Result<Vec<Value>> {
    let output = Command::new(kubectl()?)
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let mut objects = Vec::new();
    for document in text.split("\n---\n") {
        let object: Value = serde_yaml::from_str(document)?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    Ok(objects)
}

/// The value `flag` takes when the binary runs with `args` and `env`: the
/// last `--flag=v` or `--flag v`, else its environment variable, else the
/// default its `--help` states.
fn effective(
    flag: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    help: &str,
) -> Option<String> {
    let long = format!("--{flag}");
    let mut value = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if let Some(v) = arg.strip_prefix(&format!("{long}=")) {
            value = Some(v.to_owned());
        } else if *arg == long {
            value = args.next().cloned();
        }
    }
    // clap's long help: the flag's line, then its description, `[env: NAME=]`
    // and `[default: value]`, up to the next flag's line.
    let flag_line = |line: &str| {
        let line = line.trim_start();
        line.starts_with("--")
            || (line.starts_with('-') && line.get(2..).is_some_and(|r| r.starts_with(", --")))
    };
    let mut lines = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(&format!("{long} ")));
    let section: Vec<&str> = lines
        .next()
        .into_iter()
        .chain(lines.take_while(|l| !flag_line(l)))
        .collect();
    let bracket = |key: &str| {
        section.iter().find_map(|l| {
            let (_, rest) = l.split_once(&format!("[{key}: "))?;
            Some(rest.split(['=', ']']).next()?.to_owned())
        })
    };
    let default = section.iter().find_map(|l| {
        let (_, rest) = l.split_once("[default: ")?;
        Some(rest.split(']').next()?.to_owned())
    });
    value
        .or_else(|| bracket("env").and_then(|name| env.get(&name).cloned()))
        .or(default)
}

/// A container port by number or by name.
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    port.as_u64().or_else(|| {
        container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == *port)?["containerPort"]
            .as_u64()
    })
}

fn port_of(address: &str) -> Option<u64> {
    address.rsplit_once(':')?.1.parse().ok()
}

/// Runs `binary` with `args` and `env` (and no cluster to talk to) until it
/// exits or 20 s pass; its exit code (None when it was still running) and
/// its error output.
fn run_without_cluster(
    binary: &std::path::Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> anyhow::Result<(Option<i32>, String)> {
    let scratch = ferrimesh_e2e::Scratch::new("deployment-args")?;
    let mut child = Command::new(binary)
        .env_clear()
        .envs(env)
        .env("KUBECONFIG", scratch.path("no-kubeconfig"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path("stderr"))?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((code, std::fs::read_to_string(scratch.path("stderr"))?))
}

fn check_deployment(deployment: &Value, objects: &[Value]) -> anyhow::Result<()> {
    let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
    let pod = &deployment["spec"]["template"]["spec"];
    for container in pod["containers"].as_array().into_iter().flatten() {
        let command = container["command"][0].as_str().unwrap_or_default();
        let binary = workspace_binary(command.trim_start_matches('/'))?;
        let what = format!("{name}: {command}");
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        // Values from the downward API stand in as placeholders.
        let env: BTreeMap<String, String> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let value = e["value"].as_str().unwrap_or("from-the-downward-api");
                (
                    e["name"].as_str().unwrap_or_default().to_owned(),
                    value.to_owned(),
                )
            })
            .collect();
        let help = Command::new(&binary).arg("--help").output()?;
        anyhow::ensure!(help.status.success(), "{what} --help failed");
        let help = String::from_utf8(help.stdout)?;

        // Every variable of ours is one the binary reads.
        for variable in env.keys().filter(|k| k.starts_with("FERRIMESH_")) {
            assert!(
                help.contains(&format!("[env: {variable}=")),
                "{what}: the binary reads no {variable}"
            );
        }
        // The args and environment get past argument parsing: the binary
        // stops later, for want of a cluster or of its certificate (clap's
        // usage errors exit with 2).
        let (code, stderr) = run_without_cluster(&binary, &args, &env)?;
        assert_ne!(
            code,
            Some(2),
            "{what} refused its args or environment: {stderr}"
        );
        assert!(!stderr.contains("Usage:"), "{what}: {stderr}");

        // Probes and named ports: what the binary listens on.
        let admin = effective("admin-listen", &args, &env, &help).and_then(|a| port_of(&a));
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let get = &container[probe]["httpGet"];
            if get.is_null() {
                continue;
            }
            assert_eq!(
                container_port(container, &get["port"]),
                admin,
                "{what}: {probe} on the admin port"
            );
        }
        let listen = effective("listen", &args, &env, &help).and_then(|a| port_of(&a));
        for port in container["ports"].as_array().into_iter().flatten() {
            let number = port["containerPort"].as_u64();
            assert!(
                number == admin || (listen.is_some() && number == listen),
                "{what}: port {port} is not one the binary listens on ({admin:?}, {listen:?})"
            );
        }

        // The mounted Secrets: produced by the install, holding what the
        // binary reads.
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == mount["name"])
                .ok_or_else(|| anyhow::anyhow!("{what}: no volume {}", mount["name"]))?;
            let Some(secret) = volume["secret"]["secretName"].as_str() else {
                continue;
            };
            let written_by_operator = secret == SERVING_SECRET
                && objects.iter().any(|o| {
                    o["kind"] == "Deployment" && o["metadata"]["name"] == "ferrimesh-operator"
                });
            let issued_by_cert_manager = objects
                .iter()
                .any(|o| o["kind"] == "Certificate" && o["spec"]["secretName"] == secret);
            let in_manifests = objects
                .iter()
                .any(|o| o["kind"] == "Secret" && o["metadata"]["name"] == secret);
            assert!(
                written_by_operator || issued_by_cert_manager || in_manifests,
                "{what}: nothing in the install produces Secret {secret}"
            );
            let path = mount["mountPath"].as_str().unwrap_or_default();
            for (flag, file) in [("tls-cert-file", "tls.crt"), ("tls-key-file", "tls.key")] {
                assert_eq!(
                    effective(flag, &args, &env, &help),
                    Some(format!("{path}/{file}")),
                    "{what}: --{flag} reads the Secret {secret} mounted at {path}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn deployments_as_installed_pass_their_binaries_valid_args_env_secrets_and_ports()
-> anyhow::Result<()> {
    for dir in ["config/default", "config/overlays/cert-manager"] {
        let objects = rendered(dir)?;
        let deployments: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .collect();
        assert_eq!(deployments.len(), 2, "{dir}: the operator and the webhook");
        for deployment in deployments {
            check_deployment(deployment, &objects)?;
        }
        // The Service sends its traffic to a port the webhook listens on.
        let service = objects
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "ferrimesh-webhook")
            .ok_or_else(|| anyhow::anyhow!("{dir}: no Service ferrimesh-webhook"))?;
        let webhook = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "ferrimesh-webhook")
            .ok_or_else(|| anyhow::anyhow!("{dir}: no Deployment ferrimesh-webhook"))?;
        // (Every container port was checked against what the binary listens on.)
        let container = &webhook["spec"]["template"]["spec"]["containers"][0];
        let target = &service["spec"]["ports"][0]["targetPort"];
        assert!(
            container_port(container, target).is_some_and(|port| container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["containerPort"] == port)),
            "{dir}: the Service targets {target}, a port of the webhook container"
        );
    }
    Ok(())
}
