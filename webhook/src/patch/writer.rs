//! A JSONPatch written as its operations are found: each goes straight into
//! JSON text, its value serialised from whatever holds it (a typed pod's
//! field or a JSON tree), with no intermediate list of operations.

use json_patch::jsonptr::Pointer;
use serde::Serialize;

/// The JSON text of a patch under construction.
pub(crate) struct Writer {
    json: Vec<u8>,
    error: Option<serde_json::Error>,
}

impl Writer {
    /// An empty patch with room for `capacity` bytes of JSON.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            json: Vec::with_capacity(capacity),
            error: None,
        }
    }

    /// `add`: sets the member or inserts the array element at `path`.
    pub(crate) fn add<T: Serialize + ?Sized>(&mut self, path: &Pointer, value: &T) {
        self.operation("add", path, Some(value));
    }

    /// `replace`: the value at `path` (which exists) becomes `value`.
    pub(crate) fn replace<T: Serialize + ?Sized>(&mut self, path: &Pointer, value: &T) {
        self.operation("replace", path, Some(value));
    }

    /// `remove`: the member or array element at `path` goes.
    pub(crate) fn remove(&mut self, path: &Pointer) {
        self.operation::<()>("remove", path, None);
    }

    /// Records a value that could not be serialised: [`Writer::finish`]
    /// returns the first such error.
    pub(crate) fn fail(&mut self, error: serde_json::Error) {
        self.error.get_or_insert(error);
    }

    fn operation<T: Serialize + ?Sized>(&mut self, op: &str, path: &Pointer, value: Option<&T>) {
        self.json
            .push(if self.json.is_empty() { b'[' } else { b',' });
        self.json.extend_from_slice(b"{\"op\":\"");
        self.json.extend_from_slice(op.as_bytes());
        self.json.extend_from_slice(b"\",\"path\":");
        // A pointer is a string like any other: quotes and control
        // characters in a key are escaped.
        let written =
            serde_json::to_writer(&mut self.json, path.as_str()).and_then(|()| match value {
                Some(value) => {
                    self.json.extend_from_slice(b",\"value\":");
                    serde_json::to_writer(&mut self.json, value)
                }
                None => Ok(()),
            });
        if let Err(e) = written {
            self.fail(e);
        }
        self.json.push(b'}');
    }

    /// The patch's JSON text, or none when it has no operation; the first
    /// value that failed to serialise, if any did.
    pub(crate) fn finish(mut self) -> serde_json::Result<Option<Vec<u8>>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.json.is_empty() {
            return Ok(None);
        }
        self.json.push(b']');
        Ok(Some(self.json))
    }
}

#[cfg(test)]
mod tests {
    use json_patch::jsonptr::PointerBuf;
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn writes_each_operation_as_rfc6902_json() {
        let mut writer = Writer::with_capacity(0);
        writer.add(
            &PointerBuf::from_tokens(["a", "b~c/d\"e"]),
            &json!({"x": 1}),
        );
        writer.replace(&PointerBuf::from_tokens(["n"]), &2);
        writer.remove(&PointerBuf::from_tokens(["gone"]));
        let json = writer
            .finish()
            .expect("serialises")
            .expect("three operations");
        let patch: Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(
            patch,
            json!([
                {"op": "add", "path": "/a/b~0c~1d\"e", "value": {"x": 1}},
                {"op": "replace", "path": "/n", "value": 2},
                {"op": "remove", "path": "/gone"},
            ])
        );
        let parsed: json_patch::Patch = serde_json::from_value(patch).expect("a JSONPatch");
        assert_eq!(parsed.0.len(), 3);
    }

    #[test]
    fn no_operation_is_no_patch() {
        assert_eq!(Writer::with_capacity(16).finish().expect("empty"), None);
    }
}
