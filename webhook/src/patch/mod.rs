//! The JSONPatch (RFC 6902) that turns a pod into its injected form.
//!
//! The two typed pods are compared field by field ([`pod`]): equal parts are
//! skipped without a copy, new parts (the proxy container, its volumes) are
//! serialised once, straight into the patch ([`writer`]), and only a field
//! changed in place is compared as JSON ([`json`]). Lists of containers
//! and volumes are aligned by name ([`array`]), so a user's container is
//! never rewritten in place as if it were another and fields this build
//! does not know about survive the patch. The cost is linear in the size of
//! the two pods.

mod array;
mod json;
mod pod;
mod writer;

use k8s_openapi::api::core::v1::Pod;

/// Room for a typical pod's patch (about 6 KiB), so it is written without
/// growing its buffer.
const CAPACITY: usize = 8 * 1024;

/// The JSON text of the patch from `before` to `after`, or none when they
/// are equal. Fails only if a value cannot be serialised.
pub fn between(before: &Pod, after: &Pod) -> serde_json::Result<Option<Vec<u8>>> {
    let mut out = writer::Writer::with_capacity(CAPACITY);
    pod::diff(before, after, &mut out);
    out.finish()
}
