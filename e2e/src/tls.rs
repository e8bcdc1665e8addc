//! Certificates for tests and benches, issued as the operator issues the
//! webhook's (`ferrimesh_operator::cluster::certificates`): a CA, serving
//! certificates for loopback, and client certificates signed by the same CA.

use std::path::Path;

use ferrimesh_operator::cluster::certificates::{Ca, Serving, issue_ca, issue_serving, issuer};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

use crate::write_private;

/// How long test certificates are valid: a day, far longer than any run.
const LIFETIME_SECONDS: i64 = 24 * 3600;

/// The names a loopback server answers to.
const LOOPBACK: [&str; 2] = ["localhost", "127.0.0.1"];

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct KeyedCertificate {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
}

impl KeyedCertificate {
    /// The certificate's DER bytes (what a TLS peer presents).
    pub fn der(&self) -> anyhow::Result<Vec<u8>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        Ok(CertificateDer::from_pem_slice(self.cert_pem.as_bytes())?.to_vec())
    }

    /// The certificate then the key, as `reqwest::Identity::from_pem` reads it.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

impl From<Serving> for KeyedCertificate {
    fn from(serving: Serving) -> Self {
        Self {
            cert_pem: serving.cert_pem,
            key_pem: serving.key_pem,
        }
    }
}

/// A CA that issues serving and client certificates.
#[derive(Clone, Debug)]
pub struct Authority {
    ca: Ca,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Authority {
    /// A new CA, valid from now for a day.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            ca: issue_ca(now() - 60, LIFETIME_SECONDS)?,
        })
    }

    /// The CA certificate, PEM (a `caBundle`, a client's trust root).
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// A serving certificate for `localhost` and `127.0.0.1`.
    pub fn loopback(&self) -> anyhow::Result<KeyedCertificate> {
        let names = LOOPBACK.map(str::to_owned);
        Ok(issue_serving(&self.ca, &names, now() - 60, LIFETIME_SECONDS)?.into())
    }

    /// A client certificate (extended key usage `clientAuth`) for
    /// `common_name`.
    pub fn client(&self, common_name: &str) -> anyhow::Result<KeyedCertificate> {
        let issuer = issuer(&self.ca)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(KeyedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA to `ca`, and a loopback serving certificate and its
    /// key (0600) to `cert` and `key`.
    pub fn write_loopback(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        let serving = self.loopback()?;
        std::fs::write(cert, &serving.cert_pem)?;
        write_private(key, &serving.key_pem)
    }
}
