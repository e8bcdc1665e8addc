//! Where the API server reaches the webhook: the names its serving
//! certificate covers and the webhook configuration's `clientConfig`.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{ServiceReference, WebhookClientConfig};

/// Where the API server reaches the webhook.
#[derive(Clone, Debug)]
pub enum WebhookTarget {
    /// A Service in the cluster (port, path `/inject`).
    Service {
        /// Service name.
        name: String,
        /// Service namespace.
        namespace: String,
        /// Service port.
        port: i32,
    },
    /// A URL (local control planes).
    Url(String),
}

impl WebhookTarget {
    /// The names the serving certificate must cover.
    pub fn certificate_names(&self) -> Vec<String> {
        match self {
            Self::Service {
                name, namespace, ..
            } => {
                vec![
                    format!("{name}.{namespace}.svc"),
                    format!("{name}.{namespace}.svc.cluster.local"),
                ]
            }
            Self::Url(url) => {
                let host = url
                    .split("://")
                    .nth(1)
                    .unwrap_or(url)
                    .split(['/', '?'])
                    .next()
                    .unwrap_or_default();
                let host = match host.rsplit_once(':') {
                    Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                    _ => host,
                };
                vec![
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                ]
            }
        }
    }

    /// The webhook configuration's `clientConfig`: this target, trusting
    /// `ca_bundle`.
    pub fn client_config(&self, ca_bundle: &str) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_bundle.as_bytes().to_vec()));
        match self {
            Self::Service {
                name,
                namespace,
                port,
            } => WebhookClientConfig {
                ca_bundle,
                service: Some(ServiceReference {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    path: Some("/inject".to_owned()),
                    port: Some(*port),
                }),
                url: None,
            },
            Self::Url(url) => WebhookClientConfig {
                ca_bundle,
                service: None,
                url: Some(url.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WebhookTarget;

    #[test]
    fn certificate_names_follow_the_target() {
        let service = WebhookTarget::Service {
            name: "ferrimesh-webhook".into(),
            namespace: "ferrimesh-system".into(),
            port: 443,
        };
        assert_eq!(
            service.certificate_names(),
            [
                "ferrimesh-webhook.ferrimesh-system.svc",
                "ferrimesh-webhook.ferrimesh-system.svc.cluster.local"
            ]
        );
        assert_eq!(
            WebhookTarget::Url("https://127.0.0.1:9443/inject".into()).certificate_names(),
            ["127.0.0.1"]
        );
        assert_eq!(
            WebhookTarget::Url("https://[::1]:9443/inject".into()).certificate_names(),
            ["::1"]
        );
        assert_eq!(
            WebhookTarget::Url("https://webhook.example/inject".into()).certificate_names(),
            ["webhook.example"]
        );
    }
}
