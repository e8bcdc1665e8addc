//! cert-manager as the issuer of the webhook's serving certificate
//! (docs/operator.md, "What it does"; `config/components/cert-manager`).
//!
//! cert-manager's Certificate writes the Secret `ferrimesh-webhook-tls`
//! (`ca.crt`, `tls.crt`, `tls.key`) that the webhook mounts; the operator
//! issues nothing and only publishes that Secret's `ca.crt` as the
//! `caBundle`, as cert-manager's own cainjector would. Unlike a plain copy,
//! a CA published before stays in the bundle while it is valid: after a CA
//! rotation, replicas still serving the previous certificate (their Secret
//! volume not yet refreshed by the kubelet) stay trusted.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use x509_parser::pem::parse_x509_pem;

use super::certificate_store::{Current, SERVING_SECRET};
use super::certificates::Renewal;
use crate::{Error, Result};

/// One certificate of a PEM bundle: its text and what it says.
struct Pem<'a> {
    text: &'a str,
    der: Vec<u8>,
    not_after: i64,
}

const END: &str = "-----END CERTIFICATE-----";

/// Splits a PEM bundle into its certificates; `what` names the bundle in
/// errors.
fn certificates<'a>(bundle: &'a str, what: &str) -> Result<Vec<Pem<'a>>> {
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(end) = rest.find(END) {
        let (block, tail) = rest.split_at(end + END.len());
        rest = tail;
        let text = block.trim_start();
        let (_, pem) = parse_x509_pem(text.as_bytes())
            .map_err(|e| Error::Certificate(format!("{what}: not a PEM certificate: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| Error::Certificate(format!("{what}: not an X.509 certificate: {e}")))?;
        let not_after = cert.validity().not_after.timestamp();
        out.push(Pem {
            text,
            der: pem.contents.clone(),
            not_after,
        });
    }
    if out.is_empty() {
        return Err(Error::Certificate(format!("{what}: no certificate in it")));
    }
    Ok(out)
}

/// The `caBundle` to publish: the CA cert-manager issues from (`ca`), then
/// every other certificate of the `published` bundles (concatenated, one
/// per webhook configuration) that is still valid at `now`, each once. Fails when `ca` holds no readable certificate; an unreadable
/// published bundle is replaced.
pub fn bundle(ca: &str, published: &str, now: i64) -> Result<String> {
    let current = certificates(ca, "ca.crt")?;
    let mut out: String = current.iter().map(|c| format!("{}\n", c.text)).collect();
    let mut kept: Vec<Vec<u8>> = current.iter().map(|c| c.der.clone()).collect();
    for old in certificates(published, "published caBundle").unwrap_or_default() {
        if old.not_after > now && !kept.contains(&old.der) {
            out.push_str(old.text);
            out.push('\n');
            kept.push(old.der);
        }
    }
    Ok(out)
}

/// Reads the Secret cert-manager keeps and returns the certificate state,
/// given the `caBundle` published so far (empty for none).
pub async fn read(
    api: &Api<Secret>,
    namespace: &str,
    published: &str,
    now: i64,
) -> Result<Current> {
    let waiting = |what: &str| {
        Error::WaitingForIssuer(format!(
            "Secret {namespace}/{SERVING_SECRET} {what}: waiting for cert-manager to issue the Certificate"
        ))
    };
    let secret = api
        .get_opt(SERVING_SECRET)
        .await?
        .ok_or_else(|| waiting("does not exist"))?;
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .filter(|v| !v.0.is_empty())
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .ok_or_else(|| waiting(&format!("has no {key}")))
    };
    let (ca, serving) = (text("ca.crt")?, text("tls.crt")?);
    let serving_not_after = certificates(&serving, "tls.crt")?[0].not_after;
    let ca_bundle = bundle(&ca, published, now)?;
    // Look again when a kept CA expires, so it leaves the bundle.
    let next_change = certificates(&ca_bundle, "caBundle")?
        .iter()
        .map(|c| c.not_after)
        .chain([serving_not_after])
        .min()
        .unwrap_or(serving_not_after);
    Ok(Current {
        ca_bundle,
        serving_not_after,
        next_renewal: next_change,
        renewal: Renewal::Nothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::certificates::issue_ca;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_790_000_000;

    fn count(bundle: &str) -> usize {
        bundle.matches("BEGIN CERTIFICATE").count()
    }

    #[test]
    fn publishes_the_ca_and_keeps_previous_ones_while_valid() {
        let old = issue_ca(NOW - 5 * DAY, 10 * DAY).expect("ca");
        let new = issue_ca(NOW, 10 * DAY).expect("ca");
        assert_eq!(
            bundle(&new.cert_pem, "", NOW).expect("bundle"),
            format!("{}\n", new.cert_pem.trim_end())
        );

        let rotated = bundle(&new.cert_pem, &old.cert_pem, NOW).expect("bundle");
        assert_eq!(count(&rotated), 2);
        assert!(
            rotated.starts_with(new.cert_pem.trim_end()),
            "the current CA comes first"
        );

        // Publishing again changes nothing: the current CA is not repeated,
        // nor a previous one that several webhook configurations carry.
        assert_eq!(
            bundle(&new.cert_pem, &rotated, NOW).expect("bundle"),
            rotated
        );
        assert_eq!(
            bundle(&new.cert_pem, &format!("{rotated}{rotated}"), NOW).expect("bundle"),
            rotated
        );

        // Once the old CA has expired it leaves the bundle.
        let later = bundle(&new.cert_pem, &rotated, NOW + 6 * DAY).expect("bundle");
        assert_eq!(count(&later), 1);
    }

    #[test]
    fn refuses_what_is_not_a_certificate() {
        let e = bundle("", "", NOW).expect_err("empty");
        assert!(e.to_string().contains("ca.crt: no certificate"), "{e}");
        let e = bundle(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "",
            NOW,
        )
        .expect_err("garbage");
        assert!(e.to_string().contains("ca.crt: not"), "{e}");
        // A broken published bundle is replaced, not kept.
        let ca = issue_ca(NOW, DAY).expect("ca");
        assert_eq!(
            count(&bundle(&ca.cert_pem, "junk", NOW).expect("bundle")),
            1
        );
    }

    #[test]
    fn reads_the_expiry_of_a_certificate() {
        let ca = issue_ca(NOW, 10 * DAY).expect("ca");
        let parsed = certificates(&ca.cert_pem, "ca.crt").expect("parsed");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].not_after, NOW + 10 * DAY);
    }
}
