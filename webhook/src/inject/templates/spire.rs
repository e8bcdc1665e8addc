//! The `spire` template of Istio's SPIRE integration, applied after
//! `sidecar` or `gateway` (`inject.istio.io/templates: sidecar,spire`): the
//! SPIRE agent's Workload API socket, shared by the SPIFFE CSI driver, takes
//! the place of the `workload-socket` volume and is mounted read-only where
//! the proxy looks for an SDS socket; the pod is labelled for SPIRE's
//! controller manager to register it.
//!
//! Istio's documentation gives this template to add to the injector's
//! configuration; ferrimesh applies it as written there, with the label
//! under the pod's labels and the mount on the proxy in whichever list the
//! proxy is in (the native sidecar's `initContainers` included).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{CSIVolumeSource, Container, Pod, Volume, VolumeMount};

use super::super::containers::PROXY;
use super::super::overrides::{merge_named, overlay};
use super::merge_list;
use crate::Result;

/// The label SPIRE's controller manager selects pods by.
pub const LABEL: &str = "spiffe.io/spire-managed-identity";
/// The SPIFFE CSI driver.
pub const CSI_DRIVER: &str = "csi.spiffe.io";
/// Where the proxy finds the SPIRE agent's socket.
pub const SOCKET_DIR: &str = "/run/secrets/workload-spiffe-uds";
/// The volume that carries the socket.
const VOLUME: &str = "workload-socket";

/// The proxy with the SPIRE socket mounted (read-only).
pub fn proxy(proxy: &Container) -> Result<Container> {
    overlay(
        proxy,
        &Container {
            name: PROXY.to_owned(),
            volume_mounts: Some(vec![VolumeMount {
                name: VOLUME.to_owned(),
                mount_path: SOCKET_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
    )
}

/// The pod labelled for SPIRE, its `workload-socket` volume served by the
/// SPIFFE CSI driver (read-only).
pub fn pod(pod: &mut Pod) -> Result<()> {
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL.to_owned(), "true".to_owned());
    if let Some(spec) = pod.spec.as_mut() {
        let socket = Volume {
            name: VOLUME.to_owned(),
            csi: Some(CSIVolumeSource {
                driver: CSI_DRIVER.to_owned(),
                read_only: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        merge_list(&mut spec.volumes, &[socket], merge_named)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    #[test]
    fn mounts_the_socket_read_only_beside_the_proxys_own_mounts() {
        let base = Container {
            name: PROXY.to_owned(),
            volume_mounts: Some(vec![VolumeMount {
                name: VOLUME.to_owned(),
                mount_path: "/var/run/secrets/workload-spiffe-uds".to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let mounts = proxy(&base).expect("merged").volume_mounts.expect("mounts");
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        let spire = mounts
            .iter()
            .find(|m| m.mount_path == SOCKET_DIR)
            .expect("the SPIRE mount");
        assert_eq!(spire.read_only, Some(true));
    }

    #[test]
    fn serves_the_workload_socket_from_the_csi_driver_and_labels_the_pod() {
        let mut injected = Pod {
            spec: Some(PodSpec {
                volumes: Some(vec![
                    Volume {
                        name: VOLUME.to_owned(),
                        ..Default::default()
                    },
                    Volume {
                        name: "data".to_owned(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        pod(&mut injected).expect("applied");
        let volumes = injected.spec.and_then(|s| s.volumes).expect("volumes");
        assert_eq!(volumes.len(), 2, "merged by name, none added");
        let csi = volumes[0].csi.as_ref().expect("a CSI volume");
        assert_eq!(csi.driver, CSI_DRIVER);
        assert_eq!(csi.read_only, Some(true));
        assert_eq!(
            injected.metadata.labels.and_then(|l| l.get(LABEL).cloned()),
            Some("true".to_owned())
        );
    }
}
