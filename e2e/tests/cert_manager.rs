//! cert-manager issuing the webhook's certificate
//! (`config/components/cert-manager`): the component's Issuers and
//! Certificates are accepted by cert-manager's real CRDs, and the operator,
//! run with `--certificate-issuer cert-manager`, issues nothing: it waits
//! for the Secret, publishes its `ca.crt` as the `caBundle`, and keeps the
//! previous CA in it across a CA rotation, so no admission fails. The test
//! plays cert-manager (as the rest of the suite plays the kubelet): it writes
//! the Secret its Certificate would produce.

use std::collections::BTreeMap;
use std::path::Path;

use ferrimesh_crds::Mesh;
use ferrimesh_e2e::fixtures::{
    self, WAIT, namespace, start_operator_with, start_webhook, wait_for_crds,
};
use ferrimesh_e2e::{ControlPlane, cert_manager_crds, eventually, free_port, write_private};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::json;

/// What cert-manager's CA Issuer writes into a Certificate's Secret.
struct Issued {
    ca: String,
    cert: String,
    key: String,
}

fn issue(ca_name: &str) -> anyhow::Result<Issued> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(Issued {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes the Secret as cert-manager does, and the webhook's files as the
/// kubelet does for its Secret volume.
async fn publish(client: &Client, issued: &Issued, files: &Path) -> anyhow::Result<()> {
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &issued.ca),
        ("tls.crt", &issued.cert),
        ("tls.key", &issued.key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "ferrimesh-webhook-tls", "namespace": "ferrimesh-system",
                     "annotations": {"cert-manager.io/certificate-name": "ferrimesh-webhook"}},
        "data": data,
    }))?;
    Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
        .patch(
            "ferrimesh-webhook-tls",
            &PatchParams::apply("cert-manager-certificates-issuing").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    for (name, text) in [("tls.key", &issued.key), ("tls.crt", &issued.cert)] {
        let tmp = files.join(format!("{name}.tmp"));
        write_private(&tmp, text)?;
        std::fs::rename(&tmp, files.join(name))?;
    }
    Ok(())
}

async fn ca_bundle(client: &Client) -> anyhow::Result<Option<String>> {
    let config = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt("ferrimesh-sidecar-injector")
        .await?;
    Ok(config
        .and_then(|c| c.webhooks)
        .and_then(|w| w.into_iter().next())
        .and_then(|w| w.client_config.ca_bundle)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned()))
}

async fn condition(client: &Client, type_: &str) -> anyhow::Result<Option<(String, String)>> {
    let mesh = Api::<Mesh>::all(client.clone()).get("default").await?;
    Ok(mesh
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
        .map(|c| (c.status, c.message)))
}

async fn create_injected_pod(client: &Client, name: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?;
    let created = Api::<Pod>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await?;
    let spec = created.spec.unwrap_or_default();
    anyhow::ensure!(
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| c.name == "istio-proxy"),
        "pod {name} was not injected"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_issues_and_the_operator_publishes_its_ca() -> anyhow::Result<()> {
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    plane.apply_files(&cert_manager_crds()?)?;
    // The component's objects need cert-manager's CRDs established first.
    eventually(
        "config/overlays/local-cert-manager applied",
        WAIT,
        || async {
            Ok(plane
                .apply_kustomization("config/overlays/local-cert-manager")
                .ok())
        },
    )
    .await?;
    wait_for_crds(&client).await?;
    let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate");
    let certificates: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "ferrimesh-system",
        &ApiResource::from_gvk(&gvk),
    );
    let certificate = certificates.get("ferrimesh-webhook").await?;
    assert_eq!(
        certificate.data["spec"]["secretName"], "ferrimesh-webhook-tls",
        "the Certificate writes the Secret the webhook mounts"
    );
    assert_eq!(
        certificate.data["spec"]["issuerRef"]["name"],
        "ferrimesh-webhook-ca"
    );

    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}/inject");
    let _operator = start_operator_with(
        &plane,
        &plane.kubeconfig_for("ferrimesh-operator")?,
        "operator",
        &url,
        &["--certificate-issuer", "cert-manager"],
    )?;
    fixtures::mesh_selecting_mesh_on(&client).await?;
    namespace(&client, "shop", &[("mesh", "on")]).await?;

    // Before cert-manager has issued: the Mesh says why, nothing is configured.
    let (_, message) = eventually("CertificateReady=False", WAIT, || async {
        Ok(condition(&client, "CertificateReady")
            .await?
            .filter(|(status, _)| status == "False"))
    })
    .await?;
    assert!(message.contains("waiting for cert-manager"), "{message}");
    assert_eq!(
        ca_bundle(&client).await?,
        None,
        "no caBundle to publish yet"
    );

    let files = plane.scratch().path("");
    let first = issue("cert-manager CA 1")?;
    publish(&client, &first, &files).await?;
    let _webhook = start_webhook(
        &plane,
        &plane.kubeconfig_for("ferrimesh-webhook")?,
        port,
        &files.join("tls.crt"),
        &files.join("tls.key"),
    )
    .await?;
    eventually("the caBundle is cert-manager's CA", WAIT, || async {
        Ok(ca_bundle(&client)
            .await?
            .filter(|b| b.trim() == first.ca.trim()))
    })
    .await?;
    let (_, message) = eventually("CertificateReady=True", WAIT, || async {
        Ok(condition(&client, "CertificateReady")
            .await?
            .filter(|(status, _)| status == "True"))
    })
    .await?;
    assert!(message.contains("valid until"), "{message}");
    create_injected_pod(&client, "before-rotation").await?;

    // cert-manager renews the CA: the new one leads, the old one stays trusted.
    let second = issue("cert-manager CA 2")?;
    publish(&client, &second, &files).await?;
    let bundle = eventually("the caBundle holds both CAs", WAIT, || async {
        Ok(ca_bundle(&client)
            .await?
            .filter(|b| b.matches("BEGIN CERTIFICATE").count() == 2))
    })
    .await?;
    assert!(bundle.starts_with(second.ca.trim()), "{bundle}");
    assert!(bundle.contains(first.ca.trim()), "{bundle}");
    create_injected_pod(&client, "after-rotation").await?;

    // The operator never wrote the Secret: cert-manager owns it.
    let secret = Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
        .get("ferrimesh-webhook-tls")
        .await?;
    let managers: Vec<String> = secret
        .managed_fields()
        .iter()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(managers, ["cert-manager-certificates-issuing"]);
    assert!(
        Api::<Secret>::namespaced(client.clone(), "ferrimesh-system")
            .get_opt("ferrimesh-webhook-ca")
            .await?
            .is_none(),
        "no operator CA in cert-manager mode"
    );
    Ok(())
}
