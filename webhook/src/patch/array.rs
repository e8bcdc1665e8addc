//! Aligning two arrays: by their common prefix and suffix, then by element
//! identity (a `name`, or a scalar's value) with one hash lookup per
//! element, never by a quadratic search. Aligning by identity keeps patches
//! small and, more importantly, never rewrites a user's container or volume
//! in place as if it were another, so fields this build does not know about
//! survive the patch.

use std::collections::{HashMap, HashSet};

use json_patch::jsonptr::PointerBuf;
use serde::Serialize;

use super::writer::Writer;

/// An array element: JSON, or a typed list item such as a `Container`.
pub(super) trait Element: PartialEq + Serialize {
    /// A hash of the element's identity, if it has one. A collision only
    /// makes the patch longer, never wrong: aligned elements are diffed, not
    /// assumed equal.
    fn identity(&self) -> Option<u64>;

    /// Writes the patch from `self` to `after`, the element aligned with it,
    /// at `path`.
    fn diff(&self, after: &Self, path: &mut PointerBuf, out: &mut Writer);
}

/// Identities of every element, when each has one and none repeats.
fn identities<T: Element>(values: &[T]) -> Option<Vec<u64>> {
    let ids: Vec<u64> = values.iter().map(T::identity).collect::<Option<_>>()?;
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().all(|id| seen.insert(*id)).then_some(ids)
}

fn element<T: Serialize>(at: usize, value: Option<&T>, path: &mut PointerBuf, out: &mut Writer) {
    path.push_back(at);
    match value {
        Some(value) => out.add(path, value),
        None => out.remove(path),
    }
    path.pop_back();
}

/// Writes the patch from the array `before` to the array `after` at `path`.
pub(super) fn diff<T: Element>(before: &[T], after: &[T], path: &mut PointerBuf, out: &mut Writer) {
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
    match (identities(old), identities(new)) {
        (Some(old_ids), Some(new_ids)) => {
            let position: HashMap<u64, usize> =
                new_ids.iter().enumerate().map(|(j, id)| (*id, j)).collect();
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < new.len() {
                match (old_ids.get(i), new_ids.get(j)) {
                    (Some(o), Some(n)) if o == n => {
                        path.push_back(at);
                        old[i].diff(&new[j], path, out);
                        path.pop_back();
                        (i, j, at) = (i + 1, j + 1, at + 1);
                    }
                    // The old element comes later in the new array: insert before it.
                    (Some(o), Some(_)) if position.get(o).is_some_and(|&pos| pos > j) => {
                        element(at, Some(&new[j]), path, out);
                        (j, at) = (j + 1, at + 1);
                    }
                    (Some(_), _) => {
                        element::<T>(at, None, path, out);
                        i += 1;
                    }
                    (None, _) => {
                        element(at, Some(&new[j]), path, out);
                        (j, at) = (j + 1, at + 1);
                    }
                }
            }
        }
        _ => {
            let common = old.len().min(new.len());
            for (k, (old_value, new_value)) in old.iter().zip(new).enumerate() {
                path.push_back(at + k);
                old_value.diff(new_value, path, out);
                path.pop_back();
            }
            at += common;
            for value in &new[common..] {
                element(at, Some(value), path, out);
                at += 1;
            }
            for _ in common..old.len() {
                element::<T>(at, None, path, out);
            }
        }
    }
}
