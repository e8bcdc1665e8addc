//! A Mesh's status as a pure function of what its reconcile found: the
//! conditions `CertificateReady`, `WebhookConfigured`, `NamespacesLabelled`,
//! `RevisionTagsConfigured`, `WorkloadsRegistered` (only for a Mesh that
//! pushes its entries into a config cluster), and `Ready` (True when the
//! others are; otherwise False with the reason and message of the first
//! that is not); and two that `Ready` does not follow: the report
//! `PodSecurityCompatible` (the operator did its part, and the fix is a
//! Mesh field or a namespace label) and, with an automatic rollout,
//! `RolloutProgressing`.

use ferrimesh_crds::ambient::AMBIENT;
use ferrimesh_crds::istio::DATAPLANE_MODE;
use ferrimesh_crds::pod_security::ENFORCE_LABEL;
use ferrimesh_crds::{Mesh, MeshStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Selector;

use super::tags::Tags;
use crate::cluster::{Certificate, Failure};
use crate::lifecycle::MeshDrift;

/// What a Mesh's reconcile found.
#[derive(Clone, Debug)]
pub struct Outcome<'a> {
    /// The certificate the cluster reconciler published, or why there is none.
    pub certificate: &'a Result<Certificate, Failure>,
    /// Applying the webhook configuration; `None` when there was no
    /// certificate to configure it with.
    pub webhook: Option<Result<String, Failure>>,
    /// Configuring the revision tags; `None` when there was no
    /// certificate to configure them with.
    pub tags: Option<Result<&'a Tags, Failure>>,
    /// Why labelling namespaces failed, if it did.
    pub labelling: Option<&'a Failure>,
    /// Namespaces labelled for the Mesh.
    pub labelled: i32,
    /// Namespaces the Mesh selects and leaves unlabelled: in ambient mode.
    pub ambient: &'a [String],
    /// The labelled namespaces whose Pod Security level refuses what the
    /// Mesh injects, each with its level and fixes.
    pub pod_security: &'a [String],
    /// WorkloadEntries registered for the Mesh's pods.
    pub registered: i32,
    /// For a Mesh that pushes its entries into a config cluster: how many
    /// are there, or why the operator cannot reach them.
    pub registration: Option<Result<i32, Failure>>,
    /// Its pods to restart, and its rollout.
    pub drift: MeshDrift,
}

/// A condition: `Ok((reason, message))` is True, `Err` False.
type Verdict = Result<(String, String), Failure>;

fn condition(type_: &str, verdict: &Verdict, mesh: &Mesh) -> Condition {
    let (status, reason, message) = match verdict {
        Ok((reason, message)) => ("True", reason.clone(), message.clone()),
        Err(f) => ("False", f.reason.clone(), f.message.clone()),
    };
    // A condition keeps its transition time while its status stays.
    let last_transition_time = mesh
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason,
        message,
        last_transition_time,
        observed_generation: mesh.metadata.generation,
    }
}

/// Why the Mesh's `namespaceSelector` selects nothing, when the API
/// server's selector rules reject it (an unknown operator, values where
/// none belong): the schema cannot say so, and such a Mesh labels nothing.
fn invalid_selector(mesh: &Mesh) -> Option<Failure> {
    let selector = mesh.spec.namespace_selector.clone()?;
    Selector::try_from(selector).err().map(|e| Failure {
        reason: "InvalidNamespaceSelector".into(),
        message: format!("spec.namespaceSelector selects nothing: {e}"),
    })
}

/// The revision tags' verdict: True when every tag the Mesh lists has its
/// webhook configuration (or it lists none); False naming the tags another
/// Mesh holds or that name a revision (`TagRefused`), or the tag `default`
/// waiting for the default revision's configuration to drop its entries
/// (`WaitingForDefaultRevision`).
fn tags(mesh: &Mesh, outcome: &Outcome) -> Verdict {
    if mesh.spec.revision_tags.is_empty() {
        return Ok(("NoTags".into(), "no revision tags".into()));
    }
    match &outcome.tags {
        None => Err(Failure {
            reason: "WaitingForCertificate".into(),
            message: "no CA bundle to configure the revision tags with yet".into(),
        }),
        Some(Err(failure)) => Err(failure.clone()),
        Some(Ok(tags)) if !tags.refused.is_empty() => Err(Failure {
            reason: "TagRefused".into(),
            message: format!("revision tags refused: {}", tags.refused.join("; ")),
        }),
        Some(Ok(Tags {
            waiting: Some(why), ..
        })) => Err(Failure {
            reason: "WaitingForDefaultRevision".into(),
            message: why.clone(),
        }),
        Some(Ok(tags)) => Ok((
            "Applied".into(),
            format!("revision tags configured: {}", tags.held.join(", ")),
        )),
    }
}

/// The status `mesh` should have after a reconcile that found `outcome`.
pub fn status(mesh: &Mesh, outcome: &Outcome) -> MeshStatus {
    let certificate: Verdict = match outcome.certificate {
        Ok(certificate) => {
            let expiry = jiff::Timestamp::from_second(certificate.serving_not_after)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let message = format!("serving certificate valid until {expiry}");
            Ok(("Valid".into(), message))
        }
        Err(failure) => Err(failure.clone()),
    };
    let webhook: Verdict = match &outcome.webhook {
        Some(Ok(name)) => Ok((
            "Applied".into(),
            format!("MutatingWebhookConfiguration {name}"),
        )),
        Some(Err(failure)) => Err(failure.clone()),
        None => Err(Failure {
            reason: "WaitingForCertificate".into(),
            message: "no CA bundle to configure the webhook with yet".into(),
        }),
    };
    let labelling: Verdict = match (invalid_selector(mesh), outcome.labelling) {
        (Some(failure), _) => Err(failure),
        (None, Some(failure)) => Err(failure.clone()),
        (None, None) if outcome.ambient.is_empty() => Ok((
            "Applied".into(),
            format!("{} namespaces labelled", outcome.labelled),
        )),
        (None, None) => Ok((
            "AmbientNamespacesSkipped".into(),
            format!(
                "{} namespaces labelled; not labelled, in ambient mode ({DATAPLANE_MODE}={AMBIENT}): {}",
                outcome.labelled,
                outcome.ambient.join(", ")
            ),
        )),
    };
    let pod_security: Verdict = if outcome.pod_security.is_empty() {
        Ok((
            "Compatible".into(),
            "no labelled namespace's Pod Security level refuses the injected pods".into(),
        ))
    } else {
        Err(Failure {
            reason: "InjectedPodsRefused".into(),
            message: format!(
                "{ENFORCE_LABEL} refuses the injected pods in: {}",
                outcome.pod_security.join(", ")
            ),
        })
    };
    let mut parts = vec![
        ("CertificateReady", certificate, "CertificateNotReady"),
        ("WebhookConfigured", webhook, "WebhookNotConfigured"),
        ("NamespacesLabelled", labelling, "NamespacesNotLabelled"),
        (
            "RevisionTagsConfigured",
            tags(mesh, outcome),
            "RevisionTagsNotConfigured",
        ),
    ];
    if let Some(registration) = &outcome.registration {
        let verdict = match registration {
            Ok(count) => Ok((
                "Pushed".into(),
                format!("{count} WorkloadEntries in the config cluster"),
            )),
            Err(failure) => Err(failure.clone()),
        };
        parts.push(("WorkloadsRegistered", verdict, "WorkloadsNotRegistered"));
    }
    let ready: Verdict = match parts
        .iter()
        .find_map(|(_, v, why)| v.as_ref().err().map(|f| (f, why)))
    {
        None => Ok((
            "Reconciled".into(),
            "webhook configured, certificate valid, namespaces labelled".into(),
        )),
        Some((failure, why)) => Err(Failure {
            reason: (*why).to_owned(),
            message: failure.message.clone(),
        }),
    };
    let mut conditions = vec![condition("Ready", &ready, mesh)];
    conditions.extend(parts.iter().map(|(type_, v, _)| condition(type_, v, mesh)));
    conditions.push(condition("PodSecurityCompatible", &pod_security, mesh));
    if let Some(rollout) = &outcome.drift.rollout {
        let verdict: Verdict = if rollout.progressing {
            Ok((rollout.reason.clone(), rollout.message.clone()))
        } else {
            Err(Failure {
                reason: rollout.reason.clone(),
                message: rollout.message.clone(),
            })
        };
        conditions.push(condition("RolloutProgressing", &verdict, mesh));
    }
    MeshStatus {
        observed_generation: mesh.metadata.generation,
        conditions,
        labelled_namespaces: outcome.labelled,
        registered_workloads: outcome.registered,
        uninjected_pods: outcome.drift.uninjected,
        outdated_pods: outcome.drift.outdated,
        orphaned_pods: outcome.drift.orphaned,
    }
}

#[cfg(test)]
mod tests {
    use ferrimesh_crds::MeshSpec;

    use super::*;

    fn certificate() -> Result<Certificate, Failure> {
        Ok(Certificate {
            ca_bundle: "ca".into(),
            serving_not_after: 1_790_000_000,
        })
    }

    fn forbidden() -> Failure {
        Failure {
            reason: "Forbidden".into(),
            message: "secrets \"ferrimesh-webhook-ca\" is forbidden".into(),
        }
    }

    /// What a reconcile that applied the webhook configuration found.
    fn configured(certificate: &Result<Certificate, Failure>) -> Outcome<'_> {
        Outcome {
            certificate,
            webhook: Some(Ok("ferrimesh-sidecar-injector".into())),
            tags: None,
            labelling: None,
            labelled: 0,
            ambient: &[],
            pod_security: &[],
            registered: 0,
            registration: None,
            drift: MeshDrift::default(),
        }
    }

    fn get<'a>(status: &'a MeshStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn ready_when_every_part_is() {
        let mut mesh = Mesh::new("default", MeshSpec::default());
        mesh.metadata.generation = Some(3);
        let certificate = certificate();
        let outcome = Outcome {
            certificate: &certificate,
            webhook: Some(Ok("ferrimesh-sidecar-injector".into())),
            tags: None,
            labelling: None,
            labelled: 2,
            ambient: &[],
            pod_security: &[],
            registered: 5,
            registration: None,
            drift: MeshDrift::default(),
        };
        let status = status(&mesh, &outcome);
        assert_eq!(get(&status, "Ready").0, "True");
        assert_eq!(
            get(&status, "NamespacesLabelled").2,
            "2 namespaces labelled"
        );
        assert!(
            get(&status, "CertificateReady")
                .2
                .contains("valid until 2026")
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            (status.labelled_namespaces, status.registered_workloads),
            (2, 5)
        );
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn a_certificate_that_failed_turns_ready_false_with_its_reason() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let failed = Err(forbidden());
        let outcome = Outcome {
            certificate: &failed,
            webhook: None,
            tags: None,
            labelling: None,
            labelled: 1,
            ambient: &[],
            pod_security: &[],
            registered: 0,
            registration: None,
            drift: MeshDrift::default(),
        };
        let status = status(&mesh, &outcome);
        let (ready, reason, message) = get(&status, "Ready");
        assert_eq!((ready, reason), ("False", "CertificateNotReady"));
        assert!(message.contains("forbidden"), "{message}");
        assert_eq!(get(&status, "CertificateReady").0, "False");
        assert_eq!(get(&status, "CertificateReady").1, "Forbidden");
        assert_eq!(get(&status, "WebhookConfigured").1, "WaitingForCertificate");
        assert_eq!(get(&status, "NamespacesLabelled").0, "True");
    }

    #[test]
    fn a_failed_label_or_webhook_write_turns_ready_false() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let denied = forbidden();
        let outcome = Outcome {
            certificate: &certificate,
            webhook: Some(Ok("ferrimesh-sidecar-injector".into())),
            tags: None,
            labelling: Some(&denied),
            labelled: 1,
            ambient: &[],
            pod_security: &[],
            registered: 0,
            registration: None,
            drift: MeshDrift::default(),
        };
        assert_eq!(
            get(&status(&mesh, &outcome), "Ready").1,
            "NamespacesNotLabelled"
        );
        let outcome = Outcome {
            webhook: Some(Err(denied.clone())),
            labelling: None,
            ..outcome
        };
        let status = status(&mesh, &outcome);
        assert_eq!(get(&status, "Ready").1, "WebhookNotConfigured");
        assert_eq!(
            get(&status, "WebhookConfigured"),
            ("False", "Forbidden", denied.message.as_str())
        );
    }

    #[test]
    fn a_config_cluster_that_refuses_the_operator_turns_ready_false() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let refused = Failure {
            reason: "TargetUnauthorized".into(),
            message: "config cluster: Unauthorized".into(),
        };
        let outcome = Outcome {
            registration: Some(Err(refused)),
            ..configured(&certificate)
        };
        let status = status(&mesh, &outcome);
        assert_eq!(get(&status, "Ready").1, "WorkloadsNotRegistered");
        assert_eq!(
            get(&status, "WorkloadsRegistered"),
            (
                "False",
                "TargetUnauthorized",
                "config cluster: Unauthorized"
            )
        );
        let outcome = Outcome {
            registration: Some(Ok(3)),
            ..configured(&certificate)
        };
        let status = self::status(&mesh, &outcome);
        assert_eq!(get(&status, "Ready").0, "True");
        assert_eq!(
            get(&status, "WorkloadsRegistered").2,
            "3 WorkloadEntries in the config cluster"
        );
        let local = self::status(&mesh, &configured(&certificate));
        assert!(
            local
                .conditions
                .iter()
                .all(|c| c.type_ != "WorkloadsRegistered"),
            "no such condition without a target"
        );
    }

    #[test]
    fn a_namespace_selector_with_an_unknown_operator_turns_ready_false() {
        let mut mesh = Mesh::new("default", MeshSpec::default());
        mesh.spec.namespace_selector = Some(
            serde_json::from_value(serde_json::json!({"matchExpressions": [
                {"key": "mesh", "operator": "Sometimes", "values": ["on"]}]}))
            .expect("selector"),
        );
        let certificate = certificate();
        let outcome = configured(&certificate);
        let status = status(&mesh, &outcome);
        assert_eq!(get(&status, "Ready").1, "NamespacesNotLabelled");
        let (labelled, reason, message) = get(&status, "NamespacesLabelled");
        assert_eq!((labelled, reason), ("False", "InvalidNamespaceSelector"));
        assert!(message.contains("operator"), "{message}");
    }

    #[test]
    fn a_refused_revision_tag_turns_ready_false_and_held_tags_are_named() {
        let mut mesh = Mesh::new("canary", MeshSpec::default());
        mesh.spec.revision_tags = vec!["stable".into(), "prod".into()];
        let certificate = certificate();
        let refused = Tags {
            held: vec!["prod".into()],
            refused: vec!["stable: held by the older Mesh main".into()],
            waiting: None,
        };
        let outcome = Outcome {
            tags: Some(Ok(&refused)),
            ..configured(&certificate)
        };
        let status = status(&mesh, &outcome);
        let (configured_, reason, message) = get(&status, "RevisionTagsConfigured");
        assert_eq!((configured_, reason), ("False", "TagRefused"));
        assert!(
            message.contains("stable: held by the older Mesh main"),
            "{message}"
        );
        assert_eq!(get(&status, "Ready").1, "RevisionTagsNotConfigured");
        let held = Tags {
            held: vec!["stable".into(), "prod".into()],
            ..Tags::default()
        };
        let outcome = Outcome {
            tags: Some(Ok(&held)),
            ..configured(&certificate)
        };
        let status = super::status(&mesh, &outcome);
        assert_eq!(
            get(&status, "RevisionTagsConfigured"),
            ("True", "Applied", "revision tags configured: stable, prod")
        );
        assert_eq!(get(&status, "Ready").0, "True");
    }

    #[test]
    fn ambient_namespaces_left_unlabelled_are_named_and_ready_stays_true() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let ambient = ["mesh-a".to_owned(), "mesh-b".to_owned()];
        let outcome = Outcome {
            labelled: 1,
            ambient: &ambient,
            ..configured(&certificate)
        };
        let status = status(&mesh, &outcome);
        let (labelled, reason, message) = get(&status, "NamespacesLabelled");
        assert_eq!((labelled, reason), ("True", "AmbientNamespacesSkipped"));
        assert_eq!(
            message,
            "1 namespaces labelled; not labelled, in ambient mode (istio.io/dataplane-mode=ambient): mesh-a, mesh-b"
        );
        assert_eq!(get(&status, "Ready").0, "True");
    }

    #[test]
    fn pod_security_refusals_turn_pod_security_compatible_false_but_not_ready() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let compatible = status(&mesh, &configured(&certificate));
        assert_eq!(get(&compatible, "PodSecurityCompatible").0, "True");
        let reports = ["shop (baseline: traffic.cni.enabled: true)".to_owned()];
        let outcome = Outcome {
            pod_security: &reports,
            ..configured(&certificate)
        };
        let status = status(&mesh, &outcome);
        let (compatible, reason, message) = get(&status, "PodSecurityCompatible");
        assert_eq!((compatible, reason), ("False", "InjectedPodsRefused"));
        assert!(
            message.contains("shop (baseline: traffic.cni.enabled: true)"),
            "{message}"
        );
        assert_eq!(get(&status, "Ready").0, "True");
    }

    #[test]
    fn reports_pods_to_restart_and_a_stalled_rollout_without_touching_ready() {
        let mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let mut outcome = configured(&certificate);
        outcome.drift = MeshDrift {
            uninjected: 1,
            outdated: 2,
            orphaned: 3,
            rollout: None,
        };
        let manual = status(&mesh, &outcome);
        assert_eq!(
            (
                manual.uninjected_pods,
                manual.outdated_pods,
                manual.orphaned_pods
            ),
            (1, 2, 3)
        );
        assert!(
            manual
                .conditions
                .iter()
                .all(|c| c.type_ != "RolloutProgressing"),
            "no rollout condition for a manual rollout"
        );
        outcome.drift.rollout = Some(crate::lifecycle::rollout::Progress {
            progressing: false,
            reason: "RolloutStalled".into(),
            message: "Deployment shop/web was restarted and has not rolled out".into(),
        });
        let stalled = status(&mesh, &outcome);
        let (progressing, reason, message) = get(&stalled, "RolloutProgressing");
        assert_eq!((progressing, reason), ("False", "RolloutStalled"));
        assert!(message.contains("shop/web"), "{message}");
        assert_eq!(get(&stalled, "Ready").0, "True");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_stays() {
        let mut mesh = Mesh::new("default", MeshSpec::default());
        let certificate = certificate();
        let outcome = configured(&certificate);
        let mut first = status(&mesh, &outcome);
        let long_ago = Time(jiff::Timestamp::from_second(1_000).expect("time"));
        for c in &mut first.conditions {
            c.last_transition_time = long_ago.clone();
        }
        mesh.status = Some(first.clone());
        assert_eq!(
            status(&mesh, &outcome),
            first,
            "nothing changed: nothing to write"
        );
        let failed = Err(forbidden());
        let outcome = Outcome {
            certificate: &failed,
            webhook: None,
            ..outcome
        };
        let second = status(&mesh, &outcome);
        let ready = second
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_ne!(ready.last_transition_time, long_ago);
        let labelled = second
            .conditions
            .iter()
            .find(|c| c.type_ == "NamespacesLabelled")
            .expect("NamespacesLabelled");
        assert_eq!(labelled.last_transition_time, long_ago);
    }
}
