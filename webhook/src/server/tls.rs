//! TLS for the admission endpoint: TLS 1.2 and 1.3 with rustls, and a
//! certificate that is re-read whenever its files change, so a rotated
//! Secret is served on the next handshake without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::config::stamp;

type Stamp = Vec<Option<(u64, std::time::SystemTime)>>;

/// A server certificate read from PEM files and re-read when they change.
pub struct ReloadingCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading certificate {}: {e}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("reading key {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| anyhow::anyhow!("certificate and key do not match: {e}"))
}

impl ReloadingCertificate {
    /// Reads the certificate and key; fails when they cannot be used.
    pub fn load(
        cert_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let stamp = stamp(&cert_path, std::slice::from_ref(&key_path));
        let key = load(&cert_path, &key_path, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            current: Mutex::new((stamp, Arc::new(key))),
        })
    }

    /// The certificate to serve now, re-read first when the files changed.
    /// Files caught half-written keep the previous certificate in service.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.cert_path, std::slice::from_ref(&self.key_path));
        let mut current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.0 != now {
            match load(&self.cert_path, &self.key_path, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                    *current = (now, Arc::new(key));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the previous one")
                }
            }
        }
        Arc::clone(&current.1)
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls configuration: TLS 1.2 and 1.3, HTTP/1.1, the reloading
/// certificate, and client certificates required when a CA is given.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    certificate: Arc<ReloadingCertificate>,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("reading client CA {}: {e}", path.display()))?
            {
                roots.add(
                    cert.map_err(|e| anyhow::anyhow!("reading client CA {}: {e}", path.display()))?,
                )?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
