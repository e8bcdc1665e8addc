//! Golden tests of offline injection: every `testdata/inject/*.yaml` is run
//! through `ferrimesh inject`'s code path and compared with its
//! `*.golden.yaml`; every `testdata/inject/errors/*.yaml` must fail with the
//! message in its `*.error`. `NAME.mesh.yaml` and `NAME.profile.yaml`, when
//! present, are the Mesh and ProxyProfiles of a case.
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test
//! --test golden`, then read the diff.

use std::path::{Path, PathBuf};

use ferrimesh_webhook::manifests::{self, MeshConfig, Run};
use ferrimesh_webhook::mesh_file;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inject")
}

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("testdata dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".yaml") && name.matches('.').count() == 1
        })
        .collect();
    cases.sort();
    cases
}

fn sibling(case: &Path, suffix: &str) -> PathBuf {
    let stem = case.file_stem().and_then(|s| s.to_str()).expect("stem");
    case.with_file_name(format!("{stem}.{suffix}"))
}

fn config(case: &Path) -> MeshConfig {
    let mut config = MeshConfig::default();
    let mesh = sibling(case, "mesh.yaml");
    if mesh.exists() {
        let text = std::fs::read_to_string(&mesh).expect("mesh");
        config.mesh = mesh_file::read_mesh(&mesh.display().to_string(), &text).expect("valid mesh");
    }
    let profile = sibling(case, "profile.yaml");
    if profile.exists() {
        let text = std::fs::read_to_string(&profile).expect("profile");
        config.profiles =
            mesh_file::read_profiles(&profile.display().to_string(), &text).expect("valid profile");
    }
    config
}

fn run(case: &Path, input: &str) -> Result<String, String> {
    let config = config(case);
    let name = case
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    manifests::process(
        name,
        input,
        Run {
            config: &config,
            namespace_labels: None,
        },
    )
    .map_err(|e| e.to_string())
    .and_then(|p| p.to_yaml().map_err(|e| e.to_string()))
}

fn check(expected_path: &Path, actual: &str, failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(expected_path, actual).expect("write golden");
        return;
    }
    match std::fs::read_to_string(expected_path) {
        Ok(expected) if expected == actual => {}
        Ok(expected) => failures.push(format!(
            "{} differs:\n{}",
            expected_path.display(),
            pretty_assertions::StrComparison::new(&expected, actual)
        )),
        Err(_) => failures.push(format!(
            "{} is missing (run with UPDATE_GOLDEN=1)",
            expected_path.display()
        )),
    }
}

#[test]
fn injection_matches_golden_files() {
    let mut failures = Vec::new();
    let all = cases(&testdata());
    assert!(
        all.len() >= 15,
        "expected the golden cases, found {}",
        all.len()
    );
    for case in all {
        let input = std::fs::read_to_string(&case).expect("input");
        match run(&case, &input) {
            Ok(output) => check(&sibling(&case, "golden.yaml"), &output, &mut failures),
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn reinjecting_golden_outputs_changes_nothing() {
    for case in cases(&testdata()) {
        let golden = sibling(&case, "golden.yaml");
        let Ok(injected) = std::fs::read_to_string(&golden) else {
            continue;
        };
        let again = run(&case, &injected).expect("re-injection succeeds");
        pretty_assertions::assert_eq!(injected, again, "{}", case.display());
    }
}

#[test]
fn bad_annotations_fail_with_golden_messages() {
    let mut failures = Vec::new();
    let all = cases(&testdata().join("errors"));
    assert!(
        all.len() >= 20,
        "expected the error cases, found {}",
        all.len()
    );
    for case in all {
        let input = std::fs::read_to_string(&case).expect("input");
        match run(&case, &input) {
            Ok(_) => failures.push(format!("{}: was accepted", case.display())),
            Err(message) => check(
                &sibling(&case, "error"),
                &format!("{message}\n"),
                &mut failures,
            ),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
