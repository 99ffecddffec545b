//! CustomResourceDefinition YAML, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{EvalGate, ModelServer, TrainingJob};

/// First line of every generated file: says where it comes from.
pub const HEADER: &str = "# Generated from the Rust types in crds/ by `cargo run -p anneal-crds --bin crdgen`. Do not edit.\n";

/// The three CRDs, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![TrainingJob::crd(), EvalGate::crd(), ModelServer::crd()]
}

/// One CRD as a YAML document with the generator header. The file name the generator uses is
/// `<plural>.<group>.yaml`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("{HEADER}{}", serde_yaml::to_string(crd)?))
}

/// All CRDs as one multi-document YAML stream (what `kubectl apply -f` takes).
pub fn all_crds_yaml() -> Result<String, serde_yaml::Error> {
    let docs = all_crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).map(|y| format!("---\n{y}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("{HEADER}{}", docs.concat()))
}

/// File name of a CRD in `manifests/crds/` and the chart's `crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Directories (relative to the repository root) that hold the generated CRD files.
pub const OUTPUT_DIRS: &[&str] = &["manifests/crds", "charts/anneal/crds"];

/// Every generated file: path relative to the repository root, and contents.
pub fn generated_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    let mut files = Vec::new();
    for crd in all_crds() {
        let yaml = crd_yaml(&crd)?;
        for dir in OUTPUT_DIRS {
            files.push((format!("{dir}/{}", file_name(&crd)), yaml.clone()));
        }
    }
    Ok(files)
}
