//! A Mesh's status as a pure function of what its reconcile found: the
//! conditions `CertificateReady`, `WebhookConfigured`, `NamespacesLabelled`,
//! and `Ready` (True when the three are; otherwise False with the reason and
//! message of the first that is not); with an automatic rollout,
//! `RolloutProgressing` (which `Ready` does not include).

use ferrimesh_crds::{Mesh, MeshStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Selector;

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
    /// Why labelling namespaces failed, if it did.
    pub labelling: Option<&'a Failure>,
    /// Namespaces labelled for the Mesh.
    pub labelled: i32,
    /// WorkloadEntries registered for the Mesh's pods.
    pub registered: i32,
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
        (None, None) => Ok((
            "Applied".into(),
            format!("{} namespaces labelled", outcome.labelled),
        )),
    };
    let parts = [
        ("CertificateReady", certificate, "CertificateNotReady"),
        ("WebhookConfigured", webhook, "WebhookNotConfigured"),
        ("NamespacesLabelled", labelling, "NamespacesNotLabelled"),
    ];
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
            labelling: None,
            labelled: 0,
            registered: 0,
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
            labelling: None,
            labelled: 2,
            registered: 5,
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
            labelling: None,
            labelled: 1,
            registered: 0,
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
            labelling: Some(&denied),
            labelled: 1,
            registered: 0,
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
