//! The JSONPatch (RFC 6902) that turns a pod into its injected form.
//!
//! Computed in time linear in the size of the two documents: objects are
//! compared key by key, and arrays are aligned by a common prefix and
//! suffix, then by element identity (`name`, or the value itself for
//! scalars) with one hash lookup per element, never by a quadratic search.
//! Aligning by identity keeps patches small and, more importantly, never
//! rewrites a user's container or volume in place as if it were another,
//! so fields this build does not know about survive the patch.

use std::collections::HashMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// The patch from `before` to `after`.
pub fn diff(before: &Value, after: &Value) -> Patch {
    let mut ops = Vec::new();
    diff_value(before, after, &mut PointerBuf::new(), &mut ops);
    Patch(ops)
}

fn diff_value(before: &Value, after: &Value, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for key in b.keys() {
                if !a.contains_key(key) {
                    path.push_back(key.as_str());
                    ops.push(PatchOperation::Remove(RemoveOperation {
                        path: path.clone(),
                    }));
                    path.pop_back();
                }
            }
            for (key, new) in a {
                path.push_back(key.as_str());
                match b.get(key) {
                    Some(old) => diff_value(old, new, path, ops),
                    None => ops.push(PatchOperation::Add(AddOperation {
                        path: path.clone(),
                        value: new.clone(),
                    })),
                }
                path.pop_back();
            }
        }
        (Value::Array(b), Value::Array(a)) => diff_array(b, a, path, ops),
        _ if before == after => {}
        _ => ops.push(PatchOperation::Replace(ReplaceOperation {
            path: path.clone(),
            value: after.clone(),
        })),
    }
}

/// An element's identity: the `name` of an object, or a scalar's value.
fn identity(value: &Value) -> Option<String> {
    match value {
        Value::Object(m) => m
            .get("name")
            .and_then(Value::as_str)
            .map(|n| format!("n:{n}")),
        Value::String(s) => Some(format!("s:{s}")),
        Value::Number(n) => Some(format!("#:{n}")),
        Value::Bool(b) => Some(format!("b:{b}")),
        _ => None,
    }
}

/// Identities of every element, when each has one and none repeats.
fn identities(values: &[Value]) -> Option<HashMap<String, usize>> {
    let mut map = HashMap::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if map.insert(identity(v)?, i).is_some() {
            return None;
        }
    }
    Some(map)
}

fn diff_array(
    before: &[Value],
    after: &[Value],
    path: &mut PointerBuf,
    ops: &mut Vec<PatchOperation>,
) {
    let prefix = before.iter().zip(after).take_while(|(b, a)| b == a).count();
    let suffix = before[prefix..]
        .iter()
        .rev()
        .zip(after[prefix..].iter().rev())
        .take_while(|(b, a)| b == a)
        .count();
    let old = &before[prefix..before.len() - suffix];
    let new = &after[prefix..after.len() - suffix];
    let mut at = prefix; // index in the array as patched so far
    let add = |at: usize, value: &Value, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>| {
        path.push_back(at);
        ops.push(PatchOperation::Add(AddOperation {
            path: path.clone(),
            value: value.clone(),
        }));
        path.pop_back();
    };
    let remove = |at: usize, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>| {
        path.push_back(at);
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: path.clone(),
        }));
        path.pop_back();
    };
    match (identities(old), identities(new)) {
        (Some(_), Some(new_ids)) => {
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < new.len() {
                let old_id = old.get(i).and_then(identity);
                let new_id = new.get(j).and_then(identity);
                match (old_id, new_id) {
                    (Some(o), Some(n)) if o == n => {
                        path.push_back(at);
                        diff_value(&old[i], &new[j], path, ops);
                        path.pop_back();
                        (i, j, at) = (i + 1, j + 1, at + 1);
                    }
                    // The old element comes later in the new array: insert before it.
                    (Some(o), Some(_)) if new_ids.get(&o).is_some_and(|&pos| pos > j) => {
                        add(at, &new[j], path, ops);
                        (j, at) = (j + 1, at + 1);
                    }
                    (Some(_), _) => {
                        remove(at, path, ops);
                        i += 1;
                    }
                    (None, Some(_)) => {
                        add(at, &new[j], path, ops);
                        (j, at) = (j + 1, at + 1);
                    }
                    (None, None) => break,
                }
            }
        }
        _ => {
            let common = old.len().min(new.len());
            for k in 0..common {
                path.push_back(at + k);
                diff_value(&old[k], &new[k], path, ops);
                path.pop_back();
            }
            at += common;
            for value in &new[common..] {
                add(at, value, path, ops);
                at += 1;
            }
            for _ in common..old.len() {
                remove(at, path, ops);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn apply(before: &Value, patch: &Patch) -> Value {
        let mut doc = before.clone();
        json_patch::patch(&mut doc, &patch.0).expect("patch applies");
        doc
    }

    #[test]
    fn prepends_without_touching_existing_elements() {
        // The raw document has a field the typed view (before) does not know.
        let raw = json!({"volumes": [{"name": "data", "unknownField": 1}]});
        let before = json!({"volumes": [{"name": "data"}]});
        let after = json!({"volumes": [{"name": "a"}, {"name": "b"}, {"name": "data"}]});
        let patch = diff(&before, &after);
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
        let patch = diff(&before, &after);
        assert_eq!(apply(&before, &patch), after);
        assert!(patch.0.iter().any(|op| *op.path() == "/c/1/x"), "{patch:?}");
    }

    #[test]
    fn removes_and_replaces() {
        let before = json!({"a": 1, "b": [1, 2, 3], "c": {"d": true}});
        let after = json!({"b": [1, 3], "c": "x"});
        assert_eq!(apply(&before, &diff(&before, &after)), after);
    }

    #[test]
    fn equal_documents_give_an_empty_patch() {
        let doc = json!({"a": [1, {"b": null}]});
        assert!(diff(&doc, &doc).0.is_empty());
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
            prop_assert_eq!(apply(&before, &diff(&before, &after)), after);
        }
    }
}
