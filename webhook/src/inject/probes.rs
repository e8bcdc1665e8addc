//! Probe rewriting: application probes and lifecycle hooks are sent through
//! the agent's status port, and the originals handed to the agent in
//! `ISTIO_KUBE_APP_PROBERS` (docs/injection.md, section 7).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::value::{RawValue, to_raw_value};

use super::json::Object;

use super::containers::named_ports;

/// Original probes (rendered JSON) by their rewritten path.
pub type Probers = BTreeMap<String, Box<RawValue>>;

/// The ports probe rewriting works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// Where the rewritten probes go: the effective status port.
    pub status: i32,
    /// The Mesh's status port: a probe whose port is this number is taken
    /// as already rewritten and left out of `ISTIO_KUBE_APP_PROBERS` (as
    /// Istio does, which compares with the mesh-wide port, not the pod's).
    pub rewritten: i32,
}

/// The probe's port as the agent needs it: a named port resolved in the
/// same container (`None` when it does not resolve), a number as is
/// (`None` when it is the rewritten-to port).
fn agent_port(port: &IntOrString, named: &BTreeMap<&str, i32>, rewritten: i32) -> Option<i32> {
    match port {
        IntOrString::Int(p) => (*p != rewritten).then_some(*p),
        IntOrString::String(name) => named.get(name.as_str()).copied(),
    }
}

/// The original check as the agent reads it, or `None` when it must be left
/// out (already rewritten, or a named port that does not resolve). gRPC
/// probes are always handed over.
fn original(
    http: Option<&HTTPGetAction>,
    tcp_port: Option<&IntOrString>,
    grpc: Option<(i32, Option<&String>)>,
    named: &BTreeMap<&str, i32>,
    rewritten: i32,
) -> Option<(&'static str, Object)> {
    let mut check = Object::new();
    if let Some(http) = http {
        let port = agent_port(&http.port, named, rewritten)?;
        if let Some(path) = http.path.as_ref().filter(|p| !p.is_empty()) {
            check.insert("path", path);
        }
        check.insert("port", &port);
        if let Some(host) = http.host.as_ref().filter(|h| !h.is_empty()) {
            check.insert("host", host);
        }
        if let Some(scheme) = http.scheme.as_ref().filter(|s| !s.is_empty()) {
            check.insert("scheme", scheme);
        }
        if let Some(headers) = http.http_headers.as_ref().filter(|h| !h.is_empty()) {
            check.insert("httpHeaders", headers);
        }
        return Some(("httpGet", check));
    }
    if let Some(port) = tcp_port {
        let port = agent_port(port, named, rewritten)?;
        check.insert("port", &port);
        return Some(("tcpSocket", check));
    }
    let (port, service) = grpc?;
    check.insert("port", &port);
    check.insert("service", &service);
    Some(("grpc", check))
}

fn record(out: &mut Probers, path: &str, kind: &str, check: Object, timeout: Option<i32>) {
    let mut entry = Object::new();
    entry.insert(kind, &check);
    if let Some(timeout) = timeout.filter(|t| *t != 0) {
        entry.insert("timeoutSeconds", &timeout);
    }
    if let Ok(raw) = to_raw_value(&entry) {
        out.insert(path.to_owned(), raw);
    }
}

fn redirected(path: String, status_port: i32, original: Option<&HTTPGetAction>) -> HTTPGetAction {
    let mut http = original.cloned().unwrap_or_default();
    http.path = Some(path);
    http.port = IntOrString::Int(status_port);
    if http.scheme.as_deref() == Some("HTTPS") {
        http.scheme = Some("HTTP".to_owned());
    }
    http
}

fn rewrite_probe(
    probe: &mut Probe,
    path: String,
    named: &BTreeMap<&str, i32>,
    ports: Ports,
    out: &mut Probers,
) {
    if probe.http_get.is_none() && probe.tcp_socket.is_none() && probe.grpc.is_none() {
        return; // exec probes are left alone
    }
    let grpc = probe.grpc.as_ref().map(|g| (g.port, g.service.as_ref()));
    if let Some((kind, check)) = original(
        probe.http_get.as_ref(),
        probe.tcp_socket.as_ref().map(|t| &t.port),
        grpc,
        named,
        ports.rewritten,
    ) {
        record(out, &path, kind, check, probe.timeout_seconds);
    }
    probe.http_get = Some(redirected(path, ports.status, probe.http_get.as_ref()));
    probe.tcp_socket = None;
    probe.grpc = None;
}

fn rewrite_hook(
    hook: &mut LifecycleHandler,
    path: String,
    named: &BTreeMap<&str, i32>,
    ports: Ports,
    out: &mut Probers,
) {
    if hook.http_get.is_none() && hook.tcp_socket.is_none() {
        return;
    }
    if let Some((kind, check)) = original(
        hook.http_get.as_ref(),
        hook.tcp_socket.as_ref().map(|t| &t.port),
        None,
        named,
        ports.rewritten,
    ) {
        record(out, &path, kind, check, None);
    }
    hook.http_get = Some(redirected(path, ports.status, hook.http_get.as_ref()));
    hook.tcp_socket = None;
}

/// Rewrites the probes and lifecycle hooks of `container`, adding the
/// originals to `out`.
pub fn rewrite_container(container: &mut Container, ports: Ports, out: &mut Probers) {
    let name = container.name.clone();
    let port_names: BTreeMap<String, i32> = named_ports(container)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let named: BTreeMap<&str, i32> = port_names.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for (probe, kind) in [
        (&mut container.readiness_probe, "readyz"),
        (&mut container.liveness_probe, "livez"),
        (&mut container.startup_probe, "startupz"),
    ] {
        if let Some(probe) = probe {
            rewrite_probe(
                probe,
                format!("/app-health/{name}/{kind}"),
                &named,
                ports,
                out,
            );
        }
    }
    if let Some(lifecycle) = &mut container.lifecycle {
        for (hook, kind) in [
            (&mut lifecycle.pre_stop, "prestopz"),
            (&mut lifecycle.post_start, "poststartz"),
        ] {
            if let Some(hook) = hook {
                rewrite_hook(
                    hook,
                    format!("/app-lifecycle/{name}/{kind}"),
                    &named,
                    ports,
                    out,
                );
            }
        }
    }
}

/// `ISTIO_KUBE_APP_PROBERS`: `new` entries, with `old` ones (from an earlier
/// injection) winning on clashes; `None` when there are none.
pub fn probers_env(new: Probers, old: Option<&str>) -> Option<String> {
    if new.is_empty() {
        return None;
    }
    let mut merged = new;
    if let Some(Ok(old)) = old.map(serde_json::from_str::<Probers>) {
        merged.extend(old);
    }
    serde_json::to_string(&merged).ok()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerPort, ExecAction, GRPCAction, HTTPHeader, Lifecycle, TCPSocketAction,
    };

    use super::*;

    fn container() -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/ready".into()),
                    port: IntOrString::String("http".into()),
                    scheme: Some("HTTPS".into()),
                    http_headers: Some(vec![HTTPHeader {
                        name: "X".into(),
                        value: "1".into(),
                    }]),
                    ..Default::default()
                }),
                timeout_seconds: Some(2),
                period_seconds: Some(7),
                ..Default::default()
            }),
            liveness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(9000),
                    host: None,
                }),
                ..Default::default()
            }),
            startup_probe: Some(Probe {
                grpc: Some(GRPCAction {
                    port: 9001,
                    service: None,
                }),
                ..Default::default()
            }),
            lifecycle: Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    http_get: Some(HTTPGetAction {
                        path: Some("/stop".into()),
                        port: IntOrString::Int(8080),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rewrites_http_tcp_grpc_probes_and_hooks_through_the_status_port() {
        let mut c = container();
        let mut out = Probers::new();
        rewrite_container(
            &mut c,
            Ports {
                status: 15020,
                rewritten: 15020,
            },
            &mut out,
        );
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("http");
        assert_eq!(readiness.path.as_deref(), Some("/app-health/app/readyz"));
        assert_eq!(readiness.port, IntOrString::Int(15020));
        assert_eq!(readiness.scheme.as_deref(), Some("HTTP"));
        assert_eq!(
            readiness.http_headers.as_ref().map(Vec::len),
            Some(1),
            "headers kept"
        );
        assert_eq!(
            c.readiness_probe.as_ref().and_then(|p| p.period_seconds),
            Some(7),
            "thresholds kept"
        );
        assert!(
            c.liveness_probe
                .as_ref()
                .is_some_and(|p| p.tcp_socket.is_none() && p.http_get.is_some())
        );
        assert!(
            c.startup_probe
                .as_ref()
                .is_some_and(|p| p.grpc.is_none() && p.http_get.is_some())
        );
        assert_eq!(
            probers_env(out, None).as_deref(),
            Some(concat!(
                r#"{"/app-health/app/livez":{"tcpSocket":{"port":9000}},"#,
                r#""/app-health/app/readyz":{"httpGet":{"path":"/ready","port":8080,"scheme":"HTTPS","httpHeaders":[{"name":"X","value":"1"}]},"timeoutSeconds":2},"#,
                r#""/app-health/app/startupz":{"grpc":{"port":9001,"service":null}},"#,
                r#""/app-lifecycle/app/prestopz":{"httpGet":{"path":"/stop","port":8080}}}"#
            ))
        );
    }

    #[test]
    fn leaves_exec_probes_alone() {
        let exec = Probe {
            exec: Some(ExecAction {
                command: Some(vec!["true".into()]),
            }),
            ..Default::default()
        };
        let mut c = Container {
            name: "app".into(),
            readiness_probe: Some(exec.clone()),
            ..Default::default()
        };
        let mut out = Probers::new();
        rewrite_container(
            &mut c,
            Ports {
                status: 15020,
                rewritten: 15020,
            },
            &mut out,
        );
        assert_eq!(c.readiness_probe, Some(exec));
        assert!(out.is_empty());
    }

    #[test]
    fn rewrites_but_leaves_out_status_port_and_unresolved_probes() {
        let mut c = container();
        if let Some(p) = c.readiness_probe.as_mut().and_then(|p| p.http_get.as_mut()) {
            p.port = IntOrString::String("missing".into());
        }
        let mut out = Probers::new();
        rewrite_container(
            &mut c,
            Ports {
                status: 9000,
                rewritten: 9000,
            },
            &mut out,
        );
        assert!(!out.contains_key("/app-health/app/readyz"));
        assert!(
            !out.contains_key("/app-health/app/livez"),
            "already on the status port"
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.port.clone()),
            Some(IntOrString::Int(9000))
        );
    }

    #[test]
    fn only_a_number_equal_to_the_mesh_status_port_counts_as_rewritten() {
        let mut c = container();
        c.ports = Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: 15020,
            ..Default::default()
        }]);
        if let Some(t) = c
            .liveness_probe
            .as_mut()
            .and_then(|p| p.tcp_socket.as_mut())
        {
            t.port = IntOrString::Int(16000);
        }
        if let Some(g) = c.startup_probe.as_mut().and_then(|p| p.grpc.as_mut()) {
            g.port = 15020;
        }
        let mut out = Probers::new();
        // The pod's own status port is 16000; the Mesh's is 15020.
        rewrite_container(
            &mut c,
            Ports {
                status: 16000,
                rewritten: 15020,
            },
            &mut out,
        );
        assert!(
            out.contains_key("/app-health/app/readyz"),
            "a named port resolving to 15020 is handed over"
        );
        assert!(
            out.contains_key("/app-health/app/livez"),
            "16000 is not the Mesh's status port"
        );
        assert!(
            out.contains_key("/app-health/app/startupz"),
            "gRPC probes are always handed over"
        );
    }

    #[test]
    fn old_probers_win_on_reinjection() {
        let raw = |v: &str| RawValue::from_string(v.to_owned()).expect("json");
        let new: Probers = [("/a".to_owned(), raw("1")), ("/b".to_owned(), raw("2"))].into();
        assert_eq!(
            probers_env(new, Some(r#"{"/a":0}"#)).as_deref(),
            Some(r#"{"/a":0,"/b":2}"#)
        );
        assert_eq!(probers_env(Probers::new(), Some(r#"{"/a":0}"#)), None);
    }
}
