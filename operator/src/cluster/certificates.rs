//! The webhook's serving certificate (docs/operator.md, "What it does"): a CA and a
//! serving certificate made in-process with rcgen, when each is due for
//! renewal, and the `caBundle` that keeps the old CA trusted while replicas
//! move to a certificate from the new one.
//!
//! Times are Unix seconds, so the decisions are plain arithmetic, tested
//! without a clock.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use x509_parser::pem::parse_x509_pem;

use crate::{Error, Result};

/// The CA's subject; fixed, so the CA can sign again from its stored key.
const CA_COMMON_NAME: &str = "ferrimesh webhook CA";

/// A CA: its certificate, key and validity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// A serving certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// The DNS names and IP addresses it covers, sorted.
    pub names: Vec<String>,
}

fn ca_params(not_before: i64, not_after: i64) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = timestamp(not_before)?;
    params.not_after = timestamp(not_after)?;
    Ok(params)
}

fn timestamp(seconds: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|e| Error::Certificate(format!("time {seconds}: {e}")))
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

/// Issues a new CA valid from `now` for `lifetime` seconds.
pub fn issue_ca(now: i64, lifetime: i64) -> Result<Ca> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = ca_params(now, now + lifetime)?
        .self_signed(&key)
        .map_err(cert_error)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_before: now,
        not_after: now + lifetime,
    })
}

/// `ca` as the signer of the certificates it issues.
pub fn issuer(ca: &Ca) -> Result<Issuer<'static, KeyPair>> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(cert_error)?;
    Ok(Issuer::new(ca_params(ca.not_before, ca.not_after)?, ca_key))
}

/// Issues a serving certificate for `names` (DNS names or IP addresses),
/// signed by `ca`, valid from `now` for `lifetime` seconds (never past the
/// CA's own end).
pub fn issue_serving(ca: &Ca, names: &[String], now: i64, lifetime: i64) -> Result<Serving> {
    let issuer = issuer(ca)?;
    let mut names: Vec<String> = names.to_vec();
    names.sort();
    names.dedup();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(cert_error),
        })
        .collect::<Result<_>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let not_after = (now + lifetime).min(ca.not_after);
    params.not_before = timestamp(now)?;
    params.not_after = timestamp(not_after)?;
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_before: now,
        not_after,
        names,
    })
}

/// Whether a certificate valid from `not_before` to `not_after` is due for
/// renewal at `now`: after two thirds of its lifetime.
pub fn due(now: i64, not_before: i64, not_after: i64) -> bool {
    let lifetime = (not_after - not_before).max(0);
    now >= not_before + lifetime * 2 / 3
}

/// Whether the certificate `cert_pem` was signed by the key of the CA
/// `ca_pem`: what a client trusting that CA checks. False when either does
/// not parse.
pub fn signed_by(cert_pem: &str, ca_pem: &str) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (
        parse_x509_pem(cert_pem.as_bytes()),
        parse_x509_pem(ca_pem.as_bytes()),
    ) else {
        return false;
    };
    let (Ok(cert), Ok(ca)) = (cert.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// What the certificate reconciler must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Both are current.
    Nothing,
    /// A new serving certificate from the current CA.
    Serving,
    /// A new CA, then a serving certificate from it.
    CaAndServing,
}

/// Decides renewals: a missing or due CA renews both; a missing or due
/// serving certificate, one that does not cover `names`, or one the CA did
/// not sign (so the `caBundle` would not verify it) renews it.
pub fn plan(now: i64, ca: Option<&Ca>, serving: Option<&Serving>, names: &[String]) -> Renewal {
    let Some(ca) = ca.filter(|ca| !due(now, ca.not_before, ca.not_after)) else {
        return Renewal::CaAndServing;
    };
    let mut wanted: Vec<String> = names.to_vec();
    wanted.sort();
    wanted.dedup();
    match serving {
        Some(s)
            if !due(now, s.not_before, s.not_after)
                && s.names == wanted
                && s.not_after <= ca.not_after
                && signed_by(&s.cert_pem, &ca.cert_pem) =>
        {
            Renewal::Nothing
        }
        _ => Renewal::Serving,
    }
}

/// The `caBundle`: the current CA, then the previous one while it is still
/// valid, so webhook replicas still serving a certificate from the old CA
/// are trusted until they have moved to the new one.
pub fn ca_bundle(current: &Ca, previous: Option<&Ca>, now: i64) -> String {
    let mut bundle = current.cert_pem.clone();
    if let Some(previous) = previous.filter(|p| p.not_after > now && p.cert_pem != current.cert_pem)
    {
        bundle.push_str(&previous.cert_pem);
    }
    bundle
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_790_000_000;

    fn names() -> Vec<String> {
        vec![
            "ferrimesh-webhook.ferrimesh-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ]
    }

    #[test]
    fn issues_a_ca_and_a_serving_certificate_it_signs() {
        let ca = issue_ca(NOW, 365 * DAY).expect("ca");
        let serving = issue_serving(&ca, &names(), NOW, 30 * DAY).expect("serving");
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(serving.key_pem.contains("PRIVATE KEY"));
        assert_eq!(
            serving.names,
            ["127.0.0.1", "ferrimesh-webhook.ferrimesh-system.svc"]
        );
        assert_eq!(serving.not_after, NOW + 30 * DAY);
        let short_ca = issue_ca(NOW, DAY).expect("ca");
        assert_eq!(
            issue_serving(&short_ca, &names(), NOW, 30 * DAY)
                .expect("serving")
                .not_after,
            NOW + DAY
        );
    }

    #[test]
    fn renews_at_two_thirds_of_the_lifetime() {
        assert!(!due(NOW + 19 * DAY, NOW, NOW + 30 * DAY));
        assert!(due(NOW + 20 * DAY, NOW, NOW + 30 * DAY));
    }

    #[test]
    fn plans_renewals() {
        let ca = issue_ca(NOW, 300 * DAY).expect("ca");
        let serving = issue_serving(&ca, &names(), NOW, 30 * DAY).expect("serving");
        assert_eq!(plan(NOW, None, None, &names()), Renewal::CaAndServing);
        assert_eq!(
            plan(NOW + DAY, Some(&ca), Some(&serving), &names()),
            Renewal::Nothing
        );
        assert_eq!(
            plan(NOW + 21 * DAY, Some(&ca), Some(&serving), &names()),
            Renewal::Serving
        );
        assert_eq!(plan(NOW + DAY, Some(&ca), None, &names()), Renewal::Serving);
        assert_eq!(
            plan(
                NOW + DAY,
                Some(&ca),
                Some(&serving),
                &["other.svc".to_owned()]
            ),
            Renewal::Serving
        );
        assert_eq!(
            plan(NOW + 201 * DAY, Some(&ca), Some(&serving), &names()),
            Renewal::CaAndServing
        );
    }

    #[test]
    fn renews_a_serving_certificate_another_ca_signed() {
        let ca = issue_ca(NOW, 300 * DAY).expect("ca");
        let other = issue_ca(NOW, 300 * DAY).expect("another ca, same subject");
        let foreign = issue_serving(&other, &names(), NOW, 30 * DAY).expect("serving");
        assert!(signed_by(&foreign.cert_pem, &other.cert_pem));
        assert!(!signed_by(&foreign.cert_pem, &ca.cert_pem));
        assert_eq!(
            plan(NOW + DAY, Some(&ca), Some(&foreign), &names()),
            Renewal::Serving,
            "the caBundle would not verify it"
        );
        let mut garbled = issue_serving(&ca, &names(), NOW, 30 * DAY).expect("serving");
        garbled.cert_pem = "not a certificate".into();
        assert_eq!(
            plan(NOW + DAY, Some(&ca), Some(&garbled), &names()),
            Renewal::Serving
        );
    }

    #[test]
    fn bundle_keeps_the_previous_ca_while_it_is_valid() {
        let old = issue_ca(NOW, 10 * DAY).expect("ca");
        let new = issue_ca(NOW + 7 * DAY, 10 * DAY).expect("ca");
        let bundle = ca_bundle(&new, Some(&old), NOW + 7 * DAY);
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(bundle.starts_with(&new.cert_pem));
        assert_eq!(
            ca_bundle(&new, Some(&old), NOW + 11 * DAY)
                .matches("BEGIN CERTIFICATE")
                .count(),
            1
        );
    }
}
