//! The inputs the fuzzers found bugs with (`make fuzz`), and the seeds they
//! start from, replayed through the same checks as the fuzz targets
//! (`webhook/fuzz/src/check.rs`): a refusal says why, an answer is a
//! well-formed AdmissionReview, a patch applies to the object sent, and the
//! injected pod reviewed again gets no patch.
//!
//! The regression inputs are named here one by one, and must be exactly the
//! files in `tests/fuzz_regressions/admission_review/` and the inputs in
//! docs/reliability.md's table: a lost, unlisted or undocumented input fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/check.rs"]
mod check;

/// Every input a fuzzer found a bug with, by file name.
const REGRESSIONS: [&str; 6] = [
    "gateway-proxy-without-ports.json",
    "invalid-utf8-in-skipped-string.json",
    "object-without-metadata.json",
    "pod-without-containers.json",
    "probe-without-port.json",
    "reinjection-empty-patch.json",
];

fn crate_dir(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("UTF-8 file name")
        })
        .collect()
}

fn replay(path: &Path) {
    let body = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("{}", path.display());
    check::admission_review(&body);
}

#[test]
fn every_input_found_by_fuzzing_is_replayed_and_keeps_every_property() {
    let dir = crate_dir("tests/fuzz_regressions/admission_review");
    for name in REGRESSIONS {
        replay(&dir.join(name));
    }
    let listed: BTreeSet<String> = REGRESSIONS.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        file_names(&dir),
        listed,
        "the regression inputs on disk are not the ones this test names"
    );
}

#[test]
fn reliability_doc_lists_exactly_the_replayed_inputs() {
    let doc = crate_dir("../docs/reliability.md");
    let doc = std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("` |"))
        .map(|(name, _)| name.to_string())
        .filter(|name| name.ends_with(".json"))
        .collect();
    let listed: BTreeSet<String> = REGRESSIONS.iter().map(|n| n.to_string()).collect();
    assert_eq!(documented, listed);
}

#[test]
fn every_golden_pod_case_has_a_fuzzing_seed_and_every_seed_keeps_every_property() {
    let dir = crate_dir("fuzz/seeds/admission_review");
    let seeds = file_names(&dir);
    // `list.yaml` holds a DaemonSet, a ConfigMap and a ReplicationController:
    // no pod to review.
    let golden: Vec<String> = file_names(&crate_dir("testdata/inject"))
        .into_iter()
        .filter(|name| name.matches('.').count() == 1 && name.ends_with(".yaml"))
        .filter(|name| name != "list.yaml")
        .map(|name| name.replace(".yaml", ".json"))
        .collect();
    for case in &golden {
        assert!(seeds.contains(case), "no seed {case} for its golden case");
    }
    for seed in &seeds {
        replay(&dir.join(seed));
    }
}
