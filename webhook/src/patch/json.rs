//! The patch between two JSON trees, for the parts of a pod compared as
//! JSON (see [`super`]): objects key by key, arrays aligned by
//! [`array::diff`].

use std::hash::{DefaultHasher, Hash, Hasher};

use json_patch::jsonptr::PointerBuf;
use serde_json::Value;

use super::array::{self, Element};
use super::writer::Writer;

/// Writes the patch from `before` to `after` at `path`.
///
/// `member`: `path` names an object member. A changed member is written
/// with `add`, which sets it whether or not it exists: the typed pod fills in
/// required fields the object sent may lack (a probe's `port`, say), and the
/// patch must apply to what was sent.
pub(super) fn diff(
    before: &Value,
    after: &Value,
    path: &mut PointerBuf,
    out: &mut Writer,
    member: bool,
) {
    match (before, after) {
        // An empty object or list in `before` may be one the typed pod filled
        // in where the object sent has nothing (`metadata`, `containers`):
        // set the member whole.
        (Value::Object(b), Value::Object(a)) if member && b.is_empty() && !a.is_empty() => {
            out.add(path, after)
        }
        (Value::Array(b), Value::Array(a)) if member && b.is_empty() && !a.is_empty() => {
            out.add(path, after)
        }
        (Value::Object(b), Value::Object(a)) => {
            for key in b.keys() {
                if !a.contains_key(key) {
                    path.push_back(key.as_str());
                    out.remove(path);
                    path.pop_back();
                }
            }
            for (key, new) in a {
                path.push_back(key.as_str());
                match b.get(key) {
                    Some(old) => diff(old, new, path, out, true),
                    None => out.add(path, new),
                }
                path.pop_back();
            }
        }
        (Value::Array(b), Value::Array(a)) => array::diff(b, a, path, out),
        (before, after) if before == after => {}
        (_, after) if member => out.add(path, after),
        (_, after) => out.replace(path, after),
    }
}

impl Element for Value {
    /// The `name` of an object, or a scalar's value.
    fn identity(&self) -> Option<u64> {
        let mut hasher = DefaultHasher::new();
        match self {
            Value::Object(m) => ("n", m.get("name")?.as_str()?).hash(&mut hasher),
            Value::String(s) => ("s", s.as_str()).hash(&mut hasher),
            Value::Number(n) => {
                ("#", n.as_i64(), n.as_u64(), n.as_f64().map(f64::to_bits)).hash(&mut hasher)
            }
            Value::Bool(b) => ("b", *b).hash(&mut hasher),
            _ => return None,
        }
        Some(hasher.finish())
    }

    fn diff(&self, after: &Self, path: &mut PointerBuf, out: &mut Writer) {
        diff(self, after, path, out, false);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// The patch from `before` to `after`, parsed.
    fn patch(before: &Value, after: &Value) -> json_patch::Patch {
        let mut out = Writer::with_capacity(0);
        diff(before, after, &mut PointerBuf::new(), &mut out, false);
        let json = out
            .finish()
            .expect("serialises")
            .unwrap_or_else(|| b"[]".to_vec());
        serde_json::from_slice(&json).expect("a JSONPatch")
    }

    fn apply(before: &Value, patch: &json_patch::Patch) -> Value {
        let mut doc = before.clone();
        json_patch::patch(&mut doc, patch).expect("patch applies");
        doc
    }

    #[test]
    fn prepends_without_touching_existing_elements() {
        // The raw document has a field the typed view (before) does not know.
        let raw = json!({"volumes": [{"name": "data", "unknownField": 1}]});
        let before = json!({"volumes": [{"name": "data"}]});
        let after = json!({"volumes": [{"name": "a"}, {"name": "b"}, {"name": "data"}]});
        let patch = patch(&before, &after);
        assert_eq!(patch.0.len(), 2, "{patch:?}");
        let patched = apply(&raw, &patch);
        assert_eq!(
            patched["volumes"][2]["unknownField"], 1,
            "the user's field survives"
        );
    }

    #[test]
    fn aligns_moved_and_modified_named_elements() {
        let before = json!({"c": [{"name": "app", "x": 1}, {"name": "side"}]});
        let after = json!({"c": [{"name": "proxy"}, {"name": "app", "x": 2}, {"name": "side"}]});
        let patch = patch(&before, &after);
        assert_eq!(apply(&before, &patch), after);
        assert!(patch.0.iter().any(|op| *op.path() == "/c/1/x"), "{patch:?}");
    }

    #[test]
    fn removes_and_replaces() {
        let before = json!({"a": 1, "b": [1, 2, 3], "c": {"d": true}});
        let after = json!({"b": [1, 3], "c": "x"});
        assert_eq!(apply(&before, &patch(&before, &after)), after);
    }

    #[test]
    fn equal_documents_give_an_empty_patch() {
        let doc = json!({"a": [1, {"b": null}]});
        assert!(patch(&doc, &doc).0.is_empty());
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0..5i64).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]|name", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn patch_turns_before_into_after(before in arb_json(), after in arb_json()) {
            prop_assert_eq!(apply(&before, &patch(&before, &after)), after);
        }
    }
}
