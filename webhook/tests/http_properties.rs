//! Whatever a client posts to `/inject`, the HTTP server answers with a
//! well-formed response and keeps serving: a 200 AdmissionReview with the
//! request's uid, or a 4xx with a message; never a 5xx, a dropped
//! connection or a panic. Bodies are generated: arbitrary bytes, arbitrary
//! JSON, and AdmissionReviews with arbitrary JSON at one of their fields;
//! bodies as large as the 3 MiB limit; values nested hundreds deep.

mod support;

use ferrimesh_webhook::server::MAX_BODY_BYTES;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use support::{MESH, TestServer, pod, review};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        Just(json!("CREATE")),
        Just(json!("Pod")),
        Just(json!("istio-proxy")),
    ];
    leaf.prop_recursive(8, 256, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-zA-Z]{1,8}",
                    Just("metadata".to_owned()),
                    Just("spec".to_owned()),
                    Just("containers".to_owned()),
                    Just("name".to_owned()),
                    Just("annotations".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Where in a pod review the arbitrary value goes.
const PATHS: &[&str] = &[
    "/request/uid",
    "/request/kind",
    "/request/operation",
    "/request/dryRun",
    "/request/namespace",
    "/request/object",
    "/request/object/metadata",
    "/request/object/metadata/annotations",
    "/request/object/metadata/labels",
    "/request/object/spec",
    "/request/object/spec/containers",
    "/request/object/spec/containers/0",
    "/request/object/spec/containers/0/ports",
    "/request/object/spec/volumes",
    "/request",
    "/apiVersion",
];

fn review_with_anything() -> impl Strategy<Value = Vec<u8>> {
    (0..PATHS.len(), any_json()).prop_map(|(i, value)| {
        let mut body = review("prop", pod(json!({})));
        if let Some(slot) = body.pointer_mut(PATHS[i]) {
            *slot = value;
        }
        serde_json::to_vec(&body).expect("JSON")
    })
}

/// Bytes up to the body limit: a generated piece repeated to a length.
fn large_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<u8>(), 1..64),
        0..=MAX_BODY_BYTES,
    )
        .prop_map(|(piece, len)| piece.iter().copied().cycle().take(len).collect())
}

/// A pod review padded by an annotation to at most the body limit.
fn large_review() -> impl Strategy<Value = Vec<u8>> {
    (0..=MAX_BODY_BYTES - 4096).prop_map(|len| {
        let body = review("prop", pod(json!({"example.com/pad": "x".repeat(len)})));
        serde_json::to_vec(&body).expect("JSON")
    })
}

/// A review with an array or object nested up to 400 deep at one of
/// [`PATHS`] (serde_json refuses more than 128 levels).
fn deep_review() -> impl Strategy<Value = Vec<u8>> {
    (0..PATHS.len(), 1..400usize, any::<bool>()).prop_map(|(i, depth, arrays)| {
        let mut value = json!("leaf");
        for _ in 0..depth {
            value = if arrays {
                json!([value])
            } else {
                json!({"name": value})
            };
        }
        let mut body = review("prop", pod(json!({})));
        if let Some(slot) = body.pointer_mut(PATHS[i]) {
            *slot = value;
        }
        serde_json::to_vec(&body).expect("JSON")
    })
}

fn bodies() -> impl Strategy<Value = Vec<u8>> {
    // Large bodies cost tens of milliseconds each in a debug build: one
    // case in eight.
    prop_oneof![
        5 => prop::collection::vec(any::<u8>(), 0..256),
        5 => any_json().prop_map(|v| serde_json::to_vec(&v).expect("JSON")),
        3 => review_with_anything(),
        2 => deep_review(),
        1 => large_bytes(),
        1 => large_review(),
    ]
}

#[test]
fn any_body_gets_a_well_formed_answer() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime.block_on(TestServer::start("http-properties", MESH));
    let mut runner = TestRunner::new(Config::with_cases(384));
    let result = runner.run(&bodies(), |body| {
        let (status, text) = runtime.block_on(async {
            let response = server
                .client
                .post(server.url("/inject"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("an answer, not a dropped connection");
            let status = response.status().as_u16();
            (status, response.text().await.expect("a body"))
        });
        prop_assert!(
            status == 200 || (400..500).contains(&status),
            "status {status}: {text}"
        );
        if status != 200 {
            prop_assert!(!text.trim().is_empty(), "{status} without a message");
            return Ok(());
        }
        let answer: Value = serde_json::from_str(&text).expect("a JSON answer");
        // The server reads `request` apart from the envelope, so it takes
        // one more level of nesting than a whole-body parse here: such a
        // body is a deep review, with the uid and version it was made with.
        let sent: Value =
            serde_json::from_slice(&body).unwrap_or_else(|_| json!({"request": {"uid": "prop"}}));
        prop_assert_eq!(&answer["kind"], "AdmissionReview");
        // A review without apiVersion is read, and answered, as v1.
        let version = sent["apiVersion"].as_str().unwrap_or("admission.k8s.io/v1");
        prop_assert_eq!(&answer["apiVersion"], version);
        prop_assert_eq!(&answer["response"]["uid"], &sent["request"]["uid"]);
        prop_assert!(answer["response"]["allowed"].is_boolean(), "{text}");
        if answer["response"]["allowed"] == false {
            let message = answer["response"]["status"]["message"]
                .as_str()
                .unwrap_or_default();
            prop_assert!(!message.is_empty(), "a denial says why: {text}");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let healthy = runtime.block_on(async {
        reqwest::get(server.admin_url("/healthz"))
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(healthy.ok(), Some(200), "the server still serves");
}
