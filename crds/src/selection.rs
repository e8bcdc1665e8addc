//! Which pods the API server sends to the injector: the namespace and object
//! selectors of each entry of the MutatingWebhookConfiguration, as Istio's
//! chart lays them out. The operator writes these; `ferrimesh check-inject`
//! evaluates them, so both read one table.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::core::{Selector, SelectorExt};

use crate::istio::{INJECT, INJECTION_LABEL, REVISION};
use crate::mesh::{DEFAULT_REVISION, FailurePolicy, MeshSpec, ReinvocationPolicy};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One webhook entry's selectors.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookSelectors {
    /// The entry's name, e.g. `rev.namespace.sidecar-injector.ferrimesh.io`.
    pub name: String,
    /// Which namespaces it covers.
    pub namespace_selector: LabelSelector,
    /// Which pods in them.
    pub object_selector: LabelSelector,
}

fn req(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn selector(requirements: Vec<LabelSelectorRequirement>) -> LabelSelector {
    LabelSelector {
        match_expressions: Some(requirements),
        match_labels: None,
    }
}

/// The webhook entries for `revision`; `excluded` namespaces (the system
/// ones, [`crate::istio::SYSTEM_NAMESPACES`], plus the operator's own) are
/// left out of every entry.
pub fn webhook_selectors(revision: &str, excluded: &[&str]) -> Vec<WebhookSelectors> {
    let not_excluded = || req(NAMESPACE_NAME_LABEL, "NotIn", excluded);
    let opt_out = || req(INJECT, "NotIn", &["false"]);
    let entry =
        |name: &str, ns: Vec<LabelSelectorRequirement>, obj: Vec<LabelSelectorRequirement>| {
            let mut ns = ns;
            ns.push(not_excluded());
            WebhookSelectors {
                name: format!("{name}.sidecar-injector.ferrimesh.io"),
                namespace_selector: selector(ns),
                object_selector: selector(obj),
            }
        };
    let mut entries = vec![
        entry(
            "rev.namespace",
            vec![
                req(REVISION, "In", &[revision]),
                req(INJECTION_LABEL, "DoesNotExist", &[]),
            ],
            vec![opt_out()],
        ),
        entry(
            "rev.object",
            vec![
                req(REVISION, "DoesNotExist", &[]),
                req(INJECTION_LABEL, "DoesNotExist", &[]),
            ],
            vec![opt_out(), req(REVISION, "In", &[revision])],
        ),
    ];
    if revision == DEFAULT_REVISION {
        entries.push(entry(
            "namespace",
            vec![req(INJECTION_LABEL, "In", &["enabled"])],
            vec![opt_out()],
        ));
        entries.push(entry(
            "object",
            vec![
                req(INJECTION_LABEL, "DoesNotExist", &[]),
                req(REVISION, "DoesNotExist", &[]),
            ],
            vec![
                req(INJECT, "In", &["true"]),
                req(REVISION, "DoesNotExist", &[]),
            ],
        ));
    }
    entries
}

/// Evaluates a selector the way the API server does (an empty selector
/// matches everything); a selector that does not parse matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The first entry that would send a pod with `pod_labels`, created in a
/// namespace with `namespace_labels`, to the injector for `revision`.
pub fn selecting_entry(
    revision: &str,
    excluded: &[&str],
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Option<WebhookSelectors> {
    webhook_selectors(revision, excluded).into_iter().find(|e| {
        matches(&e.namespace_selector, namespace_labels) && matches(&e.object_selector, pod_labels)
    })
}

/// Name of the MutatingWebhookConfiguration of `revision`:
/// `ferrimesh-sidecar-injector`, or `ferrimesh-sidecar-injector-<revision>`.
pub fn webhook_configuration_name(revision: &str) -> String {
    if revision == DEFAULT_REVISION {
        "ferrimesh-sidecar-injector".to_owned()
    } else {
        format!("ferrimesh-sidecar-injector-{revision}")
    }
}

/// The MutatingWebhookConfiguration for a Mesh: one entry per row of the
/// selector matrix, all calling `client_config`, with the Mesh's failure,
/// timeout and reinvocation policies.
pub fn webhook_configuration(
    mesh: &MeshSpec,
    client_config: &WebhookClientConfig,
    excluded_namespaces: &[&str],
) -> MutatingWebhookConfiguration {
    configuration(
        webhook_configuration_name(&mesh.revision),
        &mesh.revision,
        mesh,
        client_config,
        excluded_namespaces,
        BTreeMap::new(),
    )
}

/// The label naming the revision tag a webhook configuration serves.
pub const TAG_LABEL: &str = "istio.io/tag";

/// Name of the MutatingWebhookConfiguration of a revision tag:
/// `ferrimesh-revision-tag-<tag>` (Istio's is `istio-revision-tag-<tag>`).
pub fn tag_configuration_name(tag: &str) -> String {
    format!("ferrimesh-revision-tag-{tag}")
}

/// One MutatingWebhookConfiguration per revision tag of `mesh`
/// (`revisionTags`), as `istioctl tag set` writes them: Istio's selector
/// matrix for `istio.io/rev=<tag>` (the tag `default` also taking over
/// `istio-injection=enabled` and the pod opt-in), calling the Mesh's webhook
/// (`client_config`) with the Mesh's policies. The configurations are
/// labelled with the tag and the Mesh's revision, so moving a tag to
/// another Mesh rewrites the same object.
pub fn tag_webhook_configurations(
    mesh: &MeshSpec,
    client_config: &WebhookClientConfig,
    excluded_namespaces: &[&str],
) -> Vec<MutatingWebhookConfiguration> {
    mesh.revision_tags
        .iter()
        .map(|tag| {
            configuration(
                tag_configuration_name(tag),
                tag,
                mesh,
                client_config,
                excluded_namespaces,
                BTreeMap::from([(TAG_LABEL.to_owned(), tag.clone())]),
            )
        })
        .collect()
}

/// A configuration named `name` with the selector matrix of `revision`.
fn configuration(
    name: String,
    revision: &str,
    mesh: &MeshSpec,
    client_config: &WebhookClientConfig,
    excluded_namespaces: &[&str],
    extra_labels: BTreeMap<String, String>,
) -> MutatingWebhookConfiguration {
    let failure_policy = match mesh.webhook.failure_policy {
        FailurePolicy::Fail => "Fail",
        FailurePolicy::Ignore => "Ignore",
    };
    let reinvocation_policy = match mesh.webhook.reinvocation_policy {
        ReinvocationPolicy::Never => "Never",
        ReinvocationPolicy::IfNeeded => "IfNeeded",
    };
    let webhooks = webhook_selectors(revision, excluded_namespaces)
        .into_iter()
        .map(|entry| MutatingWebhook {
            name: entry.name,
            admission_review_versions: vec!["v1".to_owned()],
            client_config: client_config.clone(),
            failure_policy: Some(failure_policy.to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            namespace_selector: Some(entry.namespace_selector),
            object_selector: Some(entry.object_selector),
            reinvocation_policy: Some(reinvocation_policy.to_owned()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned()]),
                resources: Some(vec!["pods".to_owned()]),
                scope: None,
            }]),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(mesh.webhook.timeout_seconds),
            match_conditions: None,
        })
        .collect();
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "ferrimesh-operator".to_owned(),
        ),
        (REVISION.to_owned(), mesh.revision.clone()),
    ]);
    labels.extend(extra_labels);
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        webhooks: Some(webhooks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::SYSTEM_NAMESPACES;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn entry(revision: &str, ns: &[(&str, &str)], pod: &[(&str, &str)]) -> Option<String> {
        selecting_entry(revision, &SYSTEM_NAMESPACES, &labels(ns), &labels(pod)).map(|e| e.name)
    }

    #[test]
    fn follows_istio_selector_matrix_for_default_revision() {
        assert_eq!(
            entry("default", &[(INJECTION_LABEL, "enabled")], &[]).as_deref(),
            Some("namespace.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(
            entry(
                "default",
                &[(INJECTION_LABEL, "enabled")],
                &[(INJECT, "false")]
            ),
            None
        );
        assert_eq!(
            entry(
                "default",
                &[(INJECTION_LABEL, "disabled")],
                &[(INJECT, "true")]
            ),
            None
        );
        assert_eq!(entry("default", &[], &[]), None);
        assert_eq!(
            entry("default", &[], &[(INJECT, "true")]).as_deref(),
            Some("object.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(
            entry("default", &[(REVISION, "default")], &[]).as_deref(),
            Some("rev.namespace.sidecar-injector.ferrimesh.io")
        );
    }

    #[test]
    fn revisions_only_serve_their_own_label() {
        assert_eq!(
            entry("canary", &[(REVISION, "canary")], &[]).as_deref(),
            Some("rev.namespace.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(entry("canary", &[(INJECTION_LABEL, "enabled")], &[]), None);
        assert_eq!(
            entry("canary", &[], &[(REVISION, "canary")]).as_deref(),
            Some("rev.object.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(entry("canary", &[], &[(INJECT, "true")]), None);
    }

    #[test]
    fn webhook_configuration_carries_the_mesh_policies() {
        let mut mesh = MeshSpec {
            revision: "canary".into(),
            ..MeshSpec::default()
        };
        mesh.webhook.failure_policy = FailurePolicy::Ignore;
        mesh.webhook.timeout_seconds = 7;
        let client = WebhookClientConfig {
            url: Some("https://127.0.0.1:1/inject".into()),
            ..Default::default()
        };
        let config = webhook_configuration(&mesh, &client, &SYSTEM_NAMESPACES);
        assert_eq!(
            config.metadata.name.as_deref(),
            Some("ferrimesh-sidecar-injector-canary")
        );
        let webhooks = config.webhooks.expect("webhooks");
        assert_eq!(
            webhooks.len(),
            2,
            "a non-default revision has only the rev.* entries"
        );
        for webhook in &webhooks {
            assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
            assert_eq!(webhook.timeout_seconds, Some(7));
            assert_eq!(webhook.side_effects, "None");
            assert_eq!(webhook.admission_review_versions, ["v1"]);
            assert_eq!(webhook.client_config, client);
        }
        let default = webhook_configuration(&MeshSpec::default(), &client, &SYSTEM_NAMESPACES);
        assert_eq!(
            default.metadata.name.as_deref(),
            Some("ferrimesh-sidecar-injector")
        );
        assert_eq!(default.webhooks.map(|w| w.len()), Some(4));
    }

    fn tag_entry(
        config: &MutatingWebhookConfiguration,
        ns: &[(&str, &str)],
        pod: &[(&str, &str)],
    ) -> Option<String> {
        let (ns, pod) = (labels(ns), labels(pod));
        config.webhooks.iter().flatten().find_map(|w| {
            let selects = |s: &Option<LabelSelector>, l| s.as_ref().is_some_and(|s| matches(s, l));
            (selects(&w.namespace_selector, &ns) && selects(&w.object_selector, &pod))
                .then(|| w.name.clone())
        })
    }

    #[test]
    fn revision_tags_follow_istio_selector_matrix_for_the_tag() {
        let mesh = MeshSpec {
            revision: "1-29".into(),
            revision_tags: vec!["stable".into(), "default".into()],
            ..MeshSpec::default()
        };
        let client = WebhookClientConfig {
            url: Some("https://127.0.0.1:1/inject".into()),
            ..Default::default()
        };
        let configs = tag_webhook_configurations(&mesh, &client, &SYSTEM_NAMESPACES);
        let names: Vec<_> = configs.iter().map(|c| c.metadata.name.clone()).collect();
        assert_eq!(
            names,
            [
                Some("ferrimesh-revision-tag-stable".to_owned()),
                Some("ferrimesh-revision-tag-default".to_owned())
            ]
        );
        let (stable, default) = (&configs[0], &configs[1]);
        let labels = stable.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(TAG_LABEL).map(String::as_str), Some("stable"));
        assert_eq!(labels.get(REVISION).map(String::as_str), Some("1-29"));
        assert!(
            stable
                .webhooks
                .iter()
                .flatten()
                .all(|w| w.client_config == client)
        );

        assert_eq!(
            tag_entry(stable, &[(REVISION, "stable")], &[]).as_deref(),
            Some("rev.namespace.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(
            tag_entry(stable, &[], &[(REVISION, "stable")]).as_deref(),
            Some("rev.object.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(tag_entry(stable, &[(REVISION, "1-29")], &[]), None);
        assert_eq!(
            tag_entry(stable, &[(INJECTION_LABEL, "enabled")], &[]),
            None
        );
        assert_eq!(
            tag_entry(stable, &[(REVISION, "stable")], &[(INJECT, "false")]),
            None
        );

        assert_eq!(
            tag_entry(default, &[(INJECTION_LABEL, "enabled")], &[]).as_deref(),
            Some("namespace.sidecar-injector.ferrimesh.io"),
            "the default tag takes over istio-injection=enabled"
        );
        assert_eq!(
            tag_entry(default, &[], &[(INJECT, "true")]).as_deref(),
            Some("object.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(
            tag_entry(default, &[(REVISION, "default")], &[]).as_deref(),
            Some("rev.namespace.sidecar-injector.ferrimesh.io")
        );
        assert_eq!(
            tag_entry(default, &[(INJECTION_LABEL, "disabled")], &[]),
            None
        );
        assert!(
            tag_webhook_configurations(&MeshSpec::default(), &client, &SYSTEM_NAMESPACES)
                .is_empty(),
            "no tags, no configurations"
        );
    }

    #[test]
    fn never_selects_excluded_namespaces() {
        let ns = labels(&[
            (INJECTION_LABEL, "enabled"),
            (NAMESPACE_NAME_LABEL, "kube-system"),
        ]);
        assert!(selecting_entry("default", &SYSTEM_NAMESPACES, &ns, &BTreeMap::new()).is_none());
    }
}
