//! What every AdmissionReview body must get from the webhook, whatever its
//! bytes: shared by the fuzz targets and by the test that replays the inputs
//! they found (`webhook/tests/fuzz_regressions.rs`).
//!
//! - a refusal has an HTTP error status and a message saying what was wrong;
//! - an answer is a JSON AdmissionReview with the request's uid;
//! - a patch is base64 JSONPatch that applies to the object the API server
//!   sent (the raw JSON, with whatever fields the pod type does not know);
//! - the patched pod, reviewed again (as on reinvocation), gets no patch.

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ferrimesh_crds::MeshSpec;
use ferrimesh_webhook::config::FixedSource;
use ferrimesh_webhook::server::admission::review;
use ferrimesh_webhook::server::metrics::Metrics;
use prometheus_client::registry::Registry;
use serde_json::Value;

fn server() -> &'static (FixedSource, Metrics) {
    static SERVER: OnceLock<(FixedSource, Metrics)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let metrics = Metrics::register(&mut Registry::default());
        (FixedSource::new(MeshSpec::default()), metrics)
    })
}

/// Reviews `body` as `POST /inject` and checks the answer (panics if a
/// property does not hold).
pub fn admission_review(body: &[u8]) {
    let (source, metrics) = server();
    let answer = match review("/inject", Some("application/json"), body, source, metrics) {
        Ok(answer) => answer,
        Err(refusal) => {
            assert!(
                (400..500).contains(&refusal.status()),
                "refusal status {}",
                refusal.status()
            );
            assert!(
                !refusal.message().trim().is_empty(),
                "refusal without a message"
            );
            return;
        }
    };
    let out: Value = serde_json::from_slice(&answer.body).expect("the answer is JSON");
    let response = &out["response"];
    assert!(response["uid"].as_str().is_some_and(|uid| !uid.is_empty()));
    assert!(response["allowed"].is_boolean(), "no verdict: {out}");
    let Some(patch) = response["patch"].as_str() else {
        return;
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = BASE64.decode(patch).expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("the patch is JSONPatch");
    let mut sent: Value = serde_json::from_slice(body).expect("a reviewed body is JSON");
    let object = &mut sent["request"]["object"];
    if let Err(e) = json_patch::patch(object, &patch) {
        panic!("the patch does not apply to the pod it was made for: {e}");
    }
    let again = serde_json::to_vec(&sent).expect("JSON");
    let second = review("/inject", Some("application/json"), &again, source, metrics)
        .unwrap_or_else(|refusal| panic!("the injected pod is refused: {}", refusal.message()));
    let second: Value = serde_json::from_slice(&second.body).expect("the answer is JSON");
    assert_eq!(second["response"]["allowed"], true, "{second}");
    assert!(
        second["response"]["patch"].is_null(),
        "an injected pod is patched again: {second}"
    );
}
