//! A scripted API server for reconciler tests (tower-test): a test states
//! the requests it expects, in order, and what the server answers.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

/// The server side of the mocked client.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client whose requests arrive at the returned handle.
pub fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers the next request after checking its method and path; returns
/// the body the client sent.
pub async fn answer(
    handle: &mut Handle,
    method: &str,
    path: &str,
    status: StatusCode,
    body: Value,
) -> Value {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!(
        (request.method().as_str(), request.uri().path()),
        (method, path)
    );
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let sent = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    respond(send, status, &body);
    sent
}

/// A `Status` failure body.
pub fn failure(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

/// Sends `body` with `status` as the answer to a request.
pub fn respond(
    send: tower_test::mock::SendResponse<Response<Body>>,
    status: StatusCode,
    body: &Value,
) {
    let response = Response::builder()
        .status(status)
        .body(Body::from(body.to_string().into_bytes()));
    send.send_response(response.expect("response"));
}

/// A cache holding `objects`, as a synced reflector would.
pub fn store<K>(objects: &[K]) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(object.clone()));
    }
    store
}

/// Runs a reconcile; an unexpected API call leaves it waiting for an
/// answer that never comes, and the test fails here.
pub async fn within<T>(reconcile: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(5), reconcile)
        .await
        .expect("no unexpected API call")
}

/// A Recorder publishing through `client`, as the reconcilers' does.
pub fn recorder(client: Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "test".into(),
            instance: None,
        },
    )
}
