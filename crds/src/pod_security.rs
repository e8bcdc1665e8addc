//! Pod Security admission against what ferrimesh injects: from a
//! namespace's `pod-security.kubernetes.io/enforce` level and the effective
//! proxy and traffic settings, whether the API server would refuse an
//! injected pod because of the injected containers (a pod that passed its
//! level before injection), and which Mesh field fixes it.
//!
//! The rules are the API server's Pod Security Standards, as they apply to
//! the containers ferrimesh injects:
//! - `baseline`: no capabilities beyond the baseline set (`NET_ADMIN` and
//!   `NET_RAW` are not in it), not privileged, seccomp not `Unconfined`;
//! - `restricted`, in addition: `allowPrivilegeEscalation: false`, drop
//!   `ALL` and add nothing but `NET_BIND_SERVICE`, `runAsNonRoot: true` (no
//!   container may set it false), `runAsUser` not 0, and a seccomp profile
//!   `RuntimeDefault` or `Localhost` on every container or on the pod.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::SeccompProfile;

use crate::settings::{InterceptionMode, ProxySettings, TrafficSettings};

/// The namespace label that sets the level Pod Security admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// A Pod Security Standards level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Anything goes.
    Privileged,
    /// Known privilege escalations are refused.
    Baseline,
    /// Hardened pods only.
    Restricted,
}

impl Level {
    /// The level as the label spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }

    /// The level a namespace's labels make the API server enforce: none
    /// when the label is absent (the cluster default, `privileged` unless
    /// configured otherwise); a value that is not a level is enforced as
    /// `restricted`, as the API server does.
    pub fn enforced(namespace_labels: &BTreeMap<String, String>) -> Option<Self> {
        namespace_labels
            .get(ENFORCE_LABEL)
            .map(|value| match value.as_str() {
                "privileged" => Self::Privileged,
                "baseline" => Self::Baseline,
                _ => Self::Restricted,
            })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What decides the privileges of the injected containers.
#[derive(Clone, Debug, PartialEq)]
pub struct Injected {
    /// Istio CNI mode (`istio-validation` instead of `istio-init`).
    pub cni: bool,
    /// The effective interception mode (TPROXY runs the proxy as root with
    /// `NET_ADMIN`; NONE injects no init container).
    pub interception_mode: InterceptionMode,
    /// The proxy's UID.
    pub uid: i64,
    /// The seccomp profile set on the injected containers.
    pub seccomp_profile: Option<SeccompProfile>,
    /// Whether the pod sets a seccomp profile of its own at the pod level,
    /// which the injected containers inherit (unknown: false).
    pub pod_seccomp: bool,
    /// `IPTABLES_TRACE_LOGGING=true` in the proxy metadata (a privileged
    /// proxy).
    pub trace_logging: bool,
}

impl Injected {
    /// The injection a Mesh (or Mesh and ProxyProfiles) gives a pod that
    /// adds nothing of its own.
    pub fn of(proxy: &ProxySettings, traffic: &TrafficSettings) -> Self {
        Self {
            cni: traffic.cni.enabled,
            interception_mode: traffic.interception_mode,
            uid: proxy.uid,
            seccomp_profile: proxy.seccomp_profile.clone(),
            pod_seccomp: false,
            trace_logging: proxy
                .proxy_metadata
                .get("IPTABLES_TRACE_LOGGING")
                .is_some_and(|v| v == "true"),
        }
    }
}

/// One reason Pod Security admission refuses an injected pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The lowest level that refuses it.
    pub level: Level,
    /// The injected container at fault.
    pub container: &'static str,
    /// What is wrong, in the API server's terms.
    pub problem: &'static str,
    /// The Mesh (or ProxyProfile) field that fixes it, and how.
    pub fix: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (refused from Pod Security level {}); fix: {}",
            self.container, self.problem, self.level, self.fix
        )
    }
}

/// The reasons a namespace enforcing `level` refuses a pod because of what
/// is injected into it; empty when the injected containers pass.
pub fn violations(level: Level, injected: &Injected) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut add = |at: Level, container, problem, fix| {
        if level >= at {
            found.push(Violation {
                level: at,
                container,
                problem,
                fix,
            });
        }
    };
    let capture = injected.interception_mode != InterceptionMode::None;
    if capture && !injected.cni {
        add(
            Level::Baseline,
            "istio-init",
            "adds capabilities NET_ADMIN and NET_RAW",
            "traffic.cni.enabled: true (Istio CNI mode: no istio-init)",
        );
        add(
            Level::Restricted,
            "istio-init",
            "runs as root (runAsUser 0, runAsNonRoot false)",
            "traffic.cni.enabled: true (Istio CNI mode: no istio-init)",
        );
    }
    if injected.interception_mode == InterceptionMode::Tproxy {
        add(
            Level::Baseline,
            "istio-proxy",
            "adds capability NET_ADMIN for TPROXY",
            "traffic.interceptionMode: REDIRECT (and no sidecar.istio.io/interceptionMode: TPROXY)",
        );
        add(
            Level::Restricted,
            "istio-proxy",
            "runs as root for TPROXY (runAsUser 0, runAsNonRoot false)",
            "traffic.interceptionMode: REDIRECT (and no sidecar.istio.io/interceptionMode: TPROXY)",
        );
    }
    if injected.trace_logging {
        add(
            Level::Baseline,
            "istio-proxy",
            "is privileged with NET_ADMIN (IPTABLES_TRACE_LOGGING)",
            "proxy.proxyMetadata: remove IPTABLES_TRACE_LOGGING",
        );
    }
    if injected.uid == 0 {
        add(
            Level::Restricted,
            "istio-proxy",
            "runs as UID 0",
            "proxy.uid: a non-zero UID (1337)",
        );
    }
    match injected.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault" | "Localhost") => {}
        Some("Unconfined") => add(
            Level::Baseline,
            "istio-proxy",
            "sets seccomp profile Unconfined",
            "proxy.seccompProfile: {type: RuntimeDefault}",
        ),
        Some(_) => add(
            Level::Restricted,
            "istio-proxy",
            "sets a seccomp profile other than RuntimeDefault or Localhost",
            "proxy.seccompProfile: {type: RuntimeDefault}",
        ),
        None if !injected.pod_seccomp => add(
            Level::Restricted,
            "istio-proxy",
            "has no seccomp profile (the pod sets none at the pod level)",
            "proxy.seccompProfile: {type: RuntimeDefault}",
        ),
        None => {}
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(level: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(ENFORCE_LABEL.to_owned(), level.to_owned())])
    }

    fn runtime_default() -> SeccompProfile {
        SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }
    }

    fn mesh(cni: bool, seccomp: Option<SeccompProfile>) -> (ProxySettings, TrafficSettings) {
        let proxy = ProxySettings {
            seccomp_profile: seccomp,
            ..ProxySettings::default()
        };
        let mut traffic = TrafficSettings::default();
        traffic.cni.enabled = cni;
        (proxy, traffic)
    }

    fn fixes(level: Level, injected: &Injected) -> Vec<&'static str> {
        violations(level, injected).iter().map(|v| v.fix).collect()
    }

    #[test]
    fn reads_the_enforced_level_and_treats_an_unknown_one_as_restricted() {
        assert_eq!(Level::enforced(&BTreeMap::new()), None);
        assert_eq!(Level::enforced(&labels("baseline")), Some(Level::Baseline));
        assert_eq!(
            Level::enforced(&labels("privileged")),
            Some(Level::Privileged)
        );
        assert_eq!(Level::enforced(&labels("strict")), Some(Level::Restricted));
    }

    #[test]
    fn iptables_mode_is_refused_by_baseline_and_restricted_and_cni_mode_fixes_it() {
        let (proxy, traffic) = mesh(false, Some(runtime_default()));
        let injected = Injected::of(&proxy, &traffic);
        assert!(violations(Level::Privileged, &injected).is_empty());
        let baseline = violations(Level::Baseline, &injected);
        assert_eq!(baseline.len(), 1);
        assert_eq!(baseline[0].container, "istio-init");
        assert!(baseline[0].fix.starts_with("traffic.cni.enabled"));
        assert_eq!(violations(Level::Restricted, &injected).len(), 2);
    }

    #[test]
    fn cni_mode_with_runtime_default_seccomp_passes_restricted() {
        let (proxy, traffic) = mesh(true, Some(runtime_default()));
        assert!(violations(Level::Restricted, &Injected::of(&proxy, &traffic)).is_empty());
    }

    #[test]
    fn restricted_needs_a_seccomp_profile_on_the_proxy_or_the_pod() {
        let (proxy, traffic) = mesh(true, None);
        let mut injected = Injected::of(&proxy, &traffic);
        assert_eq!(
            fixes(Level::Restricted, &injected),
            ["proxy.seccompProfile: {type: RuntimeDefault}"]
        );
        assert!(violations(Level::Baseline, &injected).is_empty());
        injected.pod_seccomp = true;
        assert!(violations(Level::Restricted, &injected).is_empty());
    }

    #[test]
    fn unconfined_seccomp_is_refused_by_baseline() {
        let unconfined = SeccompProfile {
            type_: "Unconfined".to_owned(),
            localhost_profile: None,
        };
        let (proxy, traffic) = mesh(true, Some(unconfined));
        let found = violations(Level::Baseline, &Injected::of(&proxy, &traffic));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].level, Level::Baseline);
    }

    #[test]
    fn tproxy_trace_logging_and_uid_zero_are_refused_even_in_cni_mode() {
        let (mut proxy, mut traffic) = mesh(true, Some(runtime_default()));
        traffic.interception_mode = InterceptionMode::Tproxy;
        assert_eq!(
            violations(Level::Baseline, &Injected::of(&proxy, &traffic)).len(),
            1
        );
        traffic.interception_mode = InterceptionMode::Redirect;
        proxy
            .proxy_metadata
            .insert("IPTABLES_TRACE_LOGGING".to_owned(), "true".to_owned());
        assert_eq!(
            fixes(Level::Baseline, &Injected::of(&proxy, &traffic)),
            ["proxy.proxyMetadata: remove IPTABLES_TRACE_LOGGING"]
        );
        proxy.proxy_metadata.clear();
        proxy.uid = 0;
        assert_eq!(
            fixes(Level::Restricted, &Injected::of(&proxy, &traffic)),
            ["proxy.uid: a non-zero UID (1337)"]
        );
    }

    #[test]
    fn no_capture_injects_no_init_container_to_refuse() {
        let (proxy, mut traffic) = mesh(false, Some(runtime_default()));
        traffic.interception_mode = InterceptionMode::None;
        assert!(violations(Level::Restricted, &Injected::of(&proxy, &traffic)).is_empty());
    }
}
