//! The pod volumes injection adds, in Istio's order.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EmptyDirVolumeSource,
    ObjectFieldSelector, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

fn downward(path: &str, field: &str) -> DownwardAPIVolumeFile {
    DownwardAPIVolumeFile {
        path: path.to_owned(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field.to_owned(),
            api_version: None,
        }),
        ..Default::default()
    }
}

fn config_map(name: &str, config_map: &str, optional: Option<bool>) -> Volume {
    Volume {
        name: name.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.to_owned(),
            optional,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The volumes of Istio's `gateway` template: the sidecar's without the
/// CRL, with `credential-socket` and `workload-certs` as explicit emptyDirs
/// (only `workload-socket` has no source there).
pub fn gateway_volumes() -> Vec<Volume> {
    let mut volumes = injected_volumes(&[]);
    volumes.retain(|v| v.name != "istio-ca-crl");
    for volume in &mut volumes {
        if volume.name == "credential-socket" || volume.name == "workload-certs" {
            volume.empty_dir = Some(EmptyDirVolumeSource::default());
        }
    }
    volumes
}

/// The nine injected volumes, then the user's volumes (sorted by name).
pub fn injected_volumes(user_volumes: &[Volume]) -> Vec<Volume> {
    let named = |name: &str| Volume {
        name: name.to_owned(),
        ..Default::default()
    };
    let mut volumes = vec![
        // No volume source: the API server defaults these to emptyDir.
        named("workload-socket"),
        named("credential-socket"),
        named("workload-certs"),
        Volume {
            name: "istio-envoy".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: None::<Quantity>,
            }),
            ..Default::default()
        },
        Volume {
            name: "istio-data".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: "istio-podinfo".to_owned(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![
                    downward("labels", "metadata.labels"),
                    downward("annotations", "metadata.annotations"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "istio-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("istio-ca".to_owned()),
                        expiration_seconds: Some(43200),
                        path: "istio-token".to_owned(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        config_map("istiod-ca-cert", "istio-ca-root-cert", None),
        config_map("istio-ca-crl", "istio-ca-crl", Some(true)),
    ];
    volumes.extend(user_volumes.iter().cloned());
    volumes
}
