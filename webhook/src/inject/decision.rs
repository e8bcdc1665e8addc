//! Whether a pod gets a sidecar, and why (docs/injection.md, section 1). The rules
//! live in `ferrimesh_crds::decision`, where the operator reads them too.

pub use ferrimesh_crds::decision::*;
