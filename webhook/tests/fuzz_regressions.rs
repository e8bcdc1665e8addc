//! The inputs the fuzzers found bugs with (`make fuzz`), and the seeds they
//! start from, replayed through the same checks as the fuzz targets
//! (`webhook/fuzz/src/check.rs`): a refusal says why, an answer is a
//! well-formed AdmissionReview, a patch applies to the object sent, and the
//! injected pod reviewed again gets no patch.

use std::path::Path;

#[path = "../fuzz/src/check.rs"]
mod check;

fn replay(dir: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("inputs") {
        let path = entry.expect("entry").path();
        let body = std::fs::read(&path).expect("input");
        println!("{}", path.display());
        check::admission_review(&body);
        replayed += 1;
    }
    replayed
}

#[test]
fn inputs_found_by_fuzzing_keep_every_property() {
    assert!(replay("tests/fuzz_regressions/admission_review") >= 2);
}

#[test]
fn fuzzing_seeds_keep_every_property() {
    assert!(replay("fuzz/seeds/admission_review") >= 10);
}
