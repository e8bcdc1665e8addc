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
use std::hash::{DefaultHasher, Hash, Hasher};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// The patch from `before` to `after`. `after` is consumed: its subtrees
/// move into the patch rather than being copied.
pub fn diff(before: &Value, after: Value) -> Patch {
    let mut ops = Vec::new();
    diff_value(before, after, &mut PointerBuf::new(), &mut ops, false);
    Patch(ops)
}

fn push(ops: &mut Vec<PatchOperation>, path: &PointerBuf, op: Op) {
    ops.push(match op {
        Op::Add(value) => PatchOperation::Add(AddOperation {
            path: path.clone(),
            value,
        }),
        Op::Replace(value) => PatchOperation::Replace(ReplaceOperation {
            path: path.clone(),
            value,
        }),
        Op::Remove => PatchOperation::Remove(RemoveOperation { path: path.clone() }),
    });
}

enum Op {
    Add(Value),
    Replace(Value),
    Remove,
}

/// `member`: `path` names an object member. A changed member is written
/// with `add`, which sets it whether or not it exists: the typed pod fills in
/// required fields the object sent may lack (a probe's `port`, say), and the
/// patch must apply to what was sent.
fn diff_value(
    before: &Value,
    after: Value,
    path: &mut PointerBuf,
    ops: &mut Vec<PatchOperation>,
    member: bool,
) {
    match (before, after) {
        // An empty object or list in `before` may be one the typed pod filled
        // in where the object sent has nothing (`metadata`, `containers`):
        // set the member whole.
        (Value::Object(b), after @ Value::Object(_))
            if member && b.is_empty() && after.as_object().is_some_and(|a| !a.is_empty()) =>
        {
            push(ops, path, Op::Add(after))
        }
        (Value::Array(b), after @ Value::Array(_))
            if member && b.is_empty() && after.as_array().is_some_and(|a| !a.is_empty()) =>
        {
            push(ops, path, Op::Add(after))
        }
        (Value::Object(b), Value::Object(a)) => {
            for key in b.keys() {
                if !a.contains_key(key) {
                    path.push_back(key.as_str());
                    push(ops, path, Op::Remove);
                    path.pop_back();
                }
            }
            for (key, new) in a {
                path.push_back(key.as_str());
                match b.get(&key) {
                    Some(old) => diff_value(old, new, path, ops, true),
                    None => push(ops, path, Op::Add(new)),
                }
                path.pop_back();
            }
        }
        (Value::Array(b), Value::Array(a)) => diff_array(b, a, path, ops),
        (before, after) if *before == after => {}
        (_, after) if member => push(ops, path, Op::Add(after)),
        (_, after) => push(ops, path, Op::Replace(after)),
    }
}

/// A hash of an element's identity: the `name` of an object, or a scalar's
/// value. A collision only makes the patch longer, never wrong: aligned
/// elements are diffed, not assumed equal.
fn identity(value: &Value) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    match value {
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

/// Identities of every element, when each has one and none repeats.
fn identities(values: &[Value]) -> Option<Vec<u64>> {
    let ids: Vec<u64> = values.iter().map(identity).collect::<Option<_>>()?;
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().all(|id| seen.insert(*id)).then_some(ids)
}

fn diff_array(
    before: &[Value],
    mut after: Vec<Value>,
    path: &mut PointerBuf,
    ops: &mut Vec<PatchOperation>,
) {
    let prefix = before
        .iter()
        .zip(&after)
        .take_while(|(b, a)| b == a)
        .count();
    let suffix = before[prefix..]
        .iter()
        .rev()
        .zip(after[prefix..].iter().rev())
        .take_while(|(b, a)| b == a)
        .count();
    after.truncate(after.len() - suffix);
    let new: Vec<Value> = after.drain(prefix..).collect();
    let old = &before[prefix..before.len() - suffix];
    let mut at = prefix; // index in the array as patched so far
    let element = |at: usize, op: Op, path: &mut PointerBuf, ops: &mut Vec<PatchOperation>| {
        path.push_back(at);
        push(ops, path, op);
        path.pop_back();
    };
    match (identities(old), identities(&new)) {
        (Some(old_ids), Some(new_ids)) => {
            let position: HashMap<u64, usize> =
                new_ids.iter().enumerate().map(|(j, id)| (*id, j)).collect();
            let mut new = new.into_iter().enumerate().peekable();
            let mut i = 0;
            while i < old.len() || new.peek().is_some() {
                match (old_ids.get(i), new.peek().map(|(j, _)| *j)) {
                    (Some(o), Some(j)) if *o == new_ids[j] => {
                        let (_, value) = new.next().expect("peeked");
                        path.push_back(at);
                        diff_value(&old[i], value, path, ops, false);
                        path.pop_back();
                        (i, at) = (i + 1, at + 1);
                    }
                    // The old element comes later in the new array: insert before it.
                    (Some(o), Some(j)) if position.get(o).is_some_and(|&pos| pos > j) => {
                        let (_, value) = new.next().expect("peeked");
                        element(at, Op::Add(value), path, ops);
                        at += 1;
                    }
                    (Some(_), _) => {
                        element(at, Op::Remove, path, ops);
                        i += 1;
                    }
                    (None, _) => {
                        let (_, value) = new.next().expect("peeked");
                        element(at, Op::Add(value), path, ops);
                        at += 1;
                    }
                }
            }
        }
        _ => {
            let common = old.len().min(new.len());
            let mut new = new.into_iter();
            for (k, old_value) in old.iter().enumerate().take(common) {
                let value = new.next().expect("common length");
                path.push_back(at + k);
                diff_value(old_value, value, path, ops, false);
                path.pop_back();
            }
            at += common;
            for value in new {
                element(at, Op::Add(value), path, ops);
                at += 1;
            }
            for _ in common..old.len() {
                element(at, Op::Remove, path, ops);
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
        let patch = diff(&before, after.clone());
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
        let patch = diff(&before, after.clone());
        assert_eq!(apply(&before, &patch), after);
        assert!(patch.0.iter().any(|op| *op.path() == "/c/1/x"), "{patch:?}");
    }

    #[test]
    fn removes_and_replaces() {
        let before = json!({"a": 1, "b": [1, 2, 3], "c": {"d": true}});
        let after = json!({"b": [1, 3], "c": "x"});
        assert_eq!(apply(&before, &diff(&before, after.clone())), after);
    }

    #[test]
    fn equal_documents_give_an_empty_patch() {
        let doc = json!({"a": [1, {"b": null}]});
        assert!(diff(&doc, doc.clone()).0.is_empty());
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
            prop_assert_eq!(apply(&before, &diff(&before, after.clone())), after);
        }
    }
}
