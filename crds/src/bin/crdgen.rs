//! Writes the generated CRD YAML: `crdgen <config-dir>` writes
//! `<dir>/crd/bases/*.yaml` and `<dir>/istio-crds/*.yaml`; `crdgen` alone
//! prints every CRD to stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferrimesh_crds::{istio_crds, mesh_crds, to_yaml};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn write(dir: &Path, crds: &[CustomResourceDefinition]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for crd in crds {
        let file = dir.join(format!(
            "{}.yaml",
            crd.metadata.name.as_deref().unwrap_or("crd")
        ));
        let yaml = to_yaml(std::slice::from_ref(crd)).map_err(std::io::Error::other)?;
        std::fs::write(&file, yaml)?;
        println!("wrote {}", file.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match std::env::args_os().nth(1).map(PathBuf::from) {
        Some(config) => write(&config.join("crd/bases"), &mesh_crds())
            .and_then(|()| write(&config.join("istio-crds"), &istio_crds())),
        None => {
            let all: Vec<_> = mesh_crds().into_iter().chain(istio_crds()).collect();
            to_yaml(&all)
                .map(|yaml| print!("{yaml}"))
                .map_err(std::io::Error::other)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("crdgen: {err}");
            ExitCode::FAILURE
        }
    }
}
