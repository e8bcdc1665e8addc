//! Keeps the webhook's CA and serving certificate in Secrets: the serving
//! Secret (`ca.crt`, `tls.crt`, `tls.key`, mounted by the webhook) and the
//! CA Secret (`ca.crt`, `ca.key`, `previous-ca.crt`, read by the operator
//! only). Validity is kept in annotations so no certificate is parsed back.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::certificates::{self, Ca, Renewal, Serving};
use crate::{FIELD_MANAGER, Result};

/// The Secret the webhook mounts.
pub const SERVING_SECRET: &str = "ferrimesh-webhook-tls";
/// The Secret holding the CA key.
pub const CA_SECRET: &str = "ferrimesh-webhook-ca";
const NOT_BEFORE: &str = "ferrimesh.io/not-before";
const NOT_AFTER: &str = "ferrimesh.io/not-after";
const NAMES: &str = "ferrimesh.io/names";
const PREVIOUS_NOT_AFTER: &str = "ferrimesh.io/previous-not-after";

/// Lifetimes of what the operator issues, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// The CA's.
    pub ca: i64,
    /// The serving certificate's.
    pub serving: i64,
}

/// The certificate state after reconciling.
#[derive(Clone, Debug)]
pub struct Current {
    /// PEM bundle for the webhook configuration's `caBundle`.
    pub ca_bundle: String,
    /// When the serving certificate expires (Unix seconds).
    pub serving_not_after: i64,
    /// When the next renewal is due (Unix seconds).
    pub next_renewal: i64,
    /// What this reconcile issued.
    pub renewal: Renewal,
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

fn annotation(secret: &Secret, key: &str) -> Option<i64> {
    secret.metadata.annotations.as_ref()?.get(key)?.parse().ok()
}

fn read_ca(secret: &Secret) -> Option<(Ca, Option<Ca>)> {
    let ca = Ca {
        cert_pem: text(secret, "ca.crt")?,
        key_pem: text(secret, "ca.key")?,
        not_before: annotation(secret, NOT_BEFORE)?,
        not_after: annotation(secret, NOT_AFTER)?,
    };
    let previous = text(secret, "previous-ca.crt")
        .zip(annotation(secret, PREVIOUS_NOT_AFTER))
        .map(|(cert_pem, not_after)| Ca {
            cert_pem,
            key_pem: String::new(),
            not_before: 0,
            not_after,
        });
    Some((ca, previous))
}

fn read_serving(secret: &Secret) -> Option<Serving> {
    let names = secret.metadata.annotations.as_ref()?.get(NAMES)?;
    Some(Serving {
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        not_before: annotation(secret, NOT_BEFORE)?,
        not_after: annotation(secret, NOT_AFTER)?,
        names: if names.is_empty() {
            Vec::new()
        } else {
            names.split(',').map(str::to_owned).collect()
        },
    })
}

fn secret(
    name: &str,
    namespace: &str,
    data: &[(&str, &str)],
    annotations: &[(&str, String)],
    type_: &str,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        type_: Some(type_.to_owned()),
        ..Secret::default()
    }
}

async fn apply(api: &Api<Secret>, secret: &Secret) -> Result<()> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(secret),
    )
    .await?;
    Ok(())
}

/// Makes sure a valid CA and serving certificate for `names` exist in
/// `namespace`, renewing what is due, and returns the bundle to trust.
pub async fn reconcile(
    api: &Api<Secret>,
    namespace: &str,
    names: &[String],
    lifetimes: Lifetimes,
    now: i64,
) -> Result<Current> {
    let ca_secret = api.get_opt(CA_SECRET).await?;
    let serving_secret = api.get_opt(SERVING_SECRET).await?;
    let (ca, mut previous) = match ca_secret.as_ref().and_then(read_ca) {
        Some((ca, previous)) => (Some(ca), previous),
        None => (None, None),
    };
    let serving = serving_secret.as_ref().and_then(read_serving);
    let renewal = certificates::plan(now, ca.as_ref(), serving.as_ref(), names);
    let ca = match ca.filter(|_| renewal != Renewal::CaAndServing) {
        Some(ca) => ca,
        None => {
            let new = certificates::issue_ca(now, lifetimes.ca)?;
            previous = ca_secret
                .as_ref()
                .and_then(read_ca)
                .map(|(old, _)| old)
                .filter(|old| old.not_after > now);
            let mut annotations = vec![
                (NOT_BEFORE, new.not_before.to_string()),
                (NOT_AFTER, new.not_after.to_string()),
            ];
            let mut data = vec![
                ("ca.crt", new.cert_pem.as_str()),
                ("ca.key", new.key_pem.as_str()),
            ];
            if let Some(previous) = &previous {
                data.push(("previous-ca.crt", previous.cert_pem.as_str()));
                annotations.push((PREVIOUS_NOT_AFTER, previous.not_after.to_string()));
            }
            apply(
                api,
                &secret(CA_SECRET, namespace, &data, &annotations, "Opaque"),
            )
            .await?;
            tracing::info!(not_after = new.not_after, "issued a new webhook CA");
            new
        }
    };
    let serving = match serving.filter(|_| renewal == Renewal::Nothing) {
        Some(serving) => serving,
        None => {
            let new = certificates::issue_serving(&ca, names, now, lifetimes.serving)?;
            let annotations = [
                (NOT_BEFORE, new.not_before.to_string()),
                (NOT_AFTER, new.not_after.to_string()),
                (NAMES, new.names.join(",")),
            ];
            let data = [
                ("ca.crt", ca.cert_pem.as_str()),
                ("tls.crt", new.cert_pem.as_str()),
                ("tls.key", new.key_pem.as_str()),
            ];
            apply(
                api,
                &secret(
                    SERVING_SECRET,
                    namespace,
                    &data,
                    &annotations,
                    "kubernetes.io/tls",
                ),
            )
            .await?;
            tracing::info!(not_after = new.not_after, names = ?new.names, "issued a new webhook serving certificate");
            new
        }
    };
    let due = |not_before: i64, not_after: i64| not_before + (not_after - not_before) * 2 / 3;
    Ok(Current {
        ca_bundle: certificates::ca_bundle(&ca, previous.as_ref(), now),
        serving_not_after: serving.not_after,
        next_renewal: due(serving.not_before, serving.not_after)
            .min(due(ca.not_before, ca.not_after)),
        renewal,
    })
}
