//! Mesh and ProxyProfile files: what the webhook serves with `--mesh-file`
//! and `--profile-file`, and what `ferrimesh inject` runs with (`--mesh`,
//! `--profile`). Both read them here, with the same errors: the file, the
//! document, the object and the failing field.

use std::path::Path;

use ferrimesh_crds::ProxyProfile;
use ferrimesh_crds::mesh::{Mesh, MeshSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// Deserialises (from a `Value`, or a `&Value` without copying it) with the
/// failing field's path in the error.
pub(crate) fn typed<'de, T: Deserialize<'de>>(
    value: impl serde::Deserializer<'de>,
) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("field {path}: {inner}")
        }
    })
}

/// `Kind/name` of a document, when it has a kind.
pub(crate) fn object_name(doc: &Value) -> Option<String> {
    let kind = doc.get("kind").and_then(Value::as_str)?;
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    Some(format!("{kind}/{name}"))
}

fn error(file: &str, document: usize, object: Option<String>, message: String) -> Error {
    Error::ConfigFile {
        file: file.to_owned(),
        document,
        object,
        message,
    }
}

/// The non-empty documents of `input` as JSON, with their index in the
/// stream; YAML anchors and aliases are refused.
fn documents(file: &str, input: &str) -> Result<Vec<(usize, Value)>> {
    // A scan error is left for the YAML parser below to report.
    if crate::inject::annotations::has_yaml_aliases(input).unwrap_or(false) {
        return Err(error(
            file,
            0,
            None,
            "YAML anchors and aliases are not accepted (expanding them multiplies the input)"
                .to_owned(),
        ));
    }
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| error(file, index, None, format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| {
            error(
                file,
                index,
                None,
                format!("not a JSON-compatible document: {e}"),
            )
        })?;
        out.push((index, json));
    }
    Ok(out)
}

/// Reads a Mesh file's text: exactly one `Mesh`.
pub fn read_mesh(file: &str, input: &str) -> Result<MeshSpec> {
    let docs = documents(file, input)?;
    let [(index, doc)] = docs.as_slice() else {
        return Err(error(
            file,
            0,
            None,
            format!("expected exactly one Mesh, found {} documents", docs.len()),
        ));
    };
    let object = object_name(doc);
    if doc.get("kind").and_then(Value::as_str) != Some("Mesh") {
        return Err(error(file, *index, object, "expected kind Mesh".into()));
    }
    typed::<Mesh>(doc.clone())
        .map(|m| m.spec)
        .map_err(|message| error(file, *index, object, message))
}

/// Reads a ProxyProfile file's text: one or more `ProxyProfile`s (in the
/// `default` namespace when they name none).
pub fn read_profiles(file: &str, input: &str) -> Result<Vec<ProxyProfile>> {
    documents(file, input)?
        .into_iter()
        .map(|(index, doc)| {
            let object = object_name(&doc);
            if doc.get("kind").and_then(Value::as_str) != Some("ProxyProfile") {
                return Err(error(
                    file,
                    index,
                    object,
                    "expected kind ProxyProfile".into(),
                ));
            }
            let mut profile: ProxyProfile =
                typed(doc).map_err(|message| error(file, index, object, message))?;
            profile
                .metadata
                .namespace
                .get_or_insert_with(|| "default".to_owned());
            Ok(profile)
        })
        .collect()
}

fn read_text(path: &Path) -> Result<(String, String)> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFileUnreadable {
        file: name.clone(),
        reason: e.to_string(),
    })?;
    Ok((name, text))
}

/// Reads the Mesh file at `path`.
pub fn read_mesh_file(path: &Path) -> Result<MeshSpec> {
    let (name, text) = read_text(path)?;
    read_mesh(&name, &text)
}

/// Reads the ProxyProfile file at `path`.
pub fn read_profile_file(path: &Path) -> Result<Vec<ProxyProfile>> {
    let (name, text) = read_text(path)?;
    read_profiles(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mesh_and_profile_files_with_clear_errors() {
        assert!(read_mesh("m.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").is_err());
        let err = read_mesh("m.yaml", "kind: Mesh\napiVersion: mesh.ferrimesh.io/v1alpha1\nmetadata: {name: m}\nspec: {proxy: {statusPort: many}}\n")
            .expect_err("bad");
        assert!(err.to_string().contains("spec.proxy.statusPort"), "{err}");
        assert!(
            err.to_string().starts_with("m.yaml: document 0 (Mesh/m): "),
            "{err}"
        );
        let profiles = read_profiles("p.yaml", "kind: ProxyProfile\napiVersion: mesh.ferrimesh.io/v1alpha1\nmetadata: {name: p}\nspec: {}\n").expect("ok");
        assert_eq!(profiles[0].metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn names_the_document_of_a_profile_of_the_wrong_kind() {
        let err = read_profiles(
            "p.yaml",
            "kind: ProxyProfile\nmetadata: {name: p}\nspec: {}\n---\nkind: Mesh\nmetadata: {name: m}\n",
        )
        .expect_err("a Mesh is not a profile")
        .to_string();
        assert_eq!(
            err,
            "p.yaml: document 1 (Mesh/m): expected kind ProxyProfile"
        );
    }

    #[test]
    fn rejects_yaml_aliases_in_a_mesh_file() {
        let err = read_mesh(
            "m.yaml",
            "kind: Mesh\nmetadata: {name: &n m}\nspec: {meshID: *n}\n",
        )
        .expect_err("aliases are refused")
        .to_string();
        assert!(err.contains("anchors and aliases"), "{err}");
    }

    #[test]
    fn names_a_file_that_cannot_be_read() {
        let err = read_mesh_file(Path::new("/nonexistent/mesh.yaml"))
            .expect_err("no such file")
            .to_string();
        assert!(err.starts_with("reading /nonexistent/mesh.yaml: "), "{err}");
    }
}
