//! Types shared by the three resources: storage URIs, data sets, compute resources, object
//! references and conditions.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The URI schemes a model or data set may be read from or written to: the ones the runtime can
/// open. Object stores (`s3://`), the Hugging Face Hub (`hf://`) and `http(s)://` are refused by
/// the API server with [`URI_SCHEME_MESSAGE`] until the runtime can read them, so that what the
/// API accepts works.
pub const URI_SCHEMES: &[&str] = &["pvc://", "file://", "builtin:"];

/// What the API server says about a URI with another scheme.
pub const URI_SCHEME_MESSAGE: &str = "must start with pvc://, file:// or builtin: (s3://, hf:// and http(s):// storage is not supported yet: copy the data into a PersistentVolumeClaim and use pvc://<claim>/<path>)";

/// Longest URI accepted; it also bounds the cost of the CEL rules that read it.
pub const URI_MAX_LENGTH: u32 = 2048;

/// A model or data set location: `pvc://<claim>/<path>` (the claim is mounted into the pod),
/// `file:///<path>` (a path inside the container image) or `builtin:<name>` (a data set the
/// runtime makes). A `..` path segment is refused, so a URI cannot climb out of the volume it
/// names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StorageUri(pub String);

impl StorageUri {
    /// The URI as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The scheme prefix (`"pvc://"`, `"builtin:"`, ...) when the URI has an allowed one.
    pub fn scheme(&self) -> Option<&'static str> {
        URI_SCHEMES.iter().copied().find(|s| self.0.starts_with(s))
    }

    /// The same check the API server makes (pattern + CEL rule below), for objects that did not
    /// come through it (files, tests).
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > URI_MAX_LENGTH as usize {
            return Err(format!("longer than {URI_MAX_LENGTH} characters"));
        }
        if self.scheme().is_none() {
            return Err(URI_SCHEME_MESSAGE.into());
        }
        if self.0.split('/').any(|segment| segment == "..") {
            return Err("must not contain a '..' path segment".into());
        }
        Ok(())
    }
}

impl From<&str> for StorageUri {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl std::fmt::Display for StorageUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for StorageUri {
    fn schema_name() -> Cow<'static, str> {
        "StorageUri".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "Location of a model or data set: pvc://<claim>/<path> (the claim is mounted into the pod), file:///<path> (inside the container image) or builtin:<name>. s3://, hf:// and http(s):// are not supported yet.",
            "minLength": 1,
            "maxLength": URI_MAX_LENGTH,
            "x-kubernetes-validations": [
                {
                    "rule": "self.startsWith('pvc://') || self.startsWith('file://') || self.startsWith('builtin:')",
                    "message": URI_SCHEME_MESSAGE,
                },
                {
                    "rule": "!self.split('/').exists(s, s == '..')",
                    "message": "must not contain a '..' path segment",
                },
            ],
        })
    }
}

/// Reference to an object in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Format of a data set's files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// Chosen from the file name (`.jsonl` or text); built-in sets know their own.
    #[default]
    Auto,
    /// Plain text, one document per file or blank-line separated.
    Text,
    /// JSON lines: `{"text": ...}` for pretraining, `{"prompt": ..., "response": ...}` for sft.
    Jsonl,
}

/// How a data set is divided into train, validation and test parts (relative weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.train + self.validation + self.test > 0",
    "message": "the split weights must not all be zero",
}]))]
pub struct DatasetSplit {
    /// Weight of the training part.
    #[schemars(range(min = 0, max = 1000))]
    pub train: u32,
    /// Weight of the validation part.
    #[schemars(range(min = 0, max = 1000))]
    pub validation: u32,
    /// Weight of the test part (what an EvalGate measures by default).
    #[schemars(range(min = 0, max = 1000))]
    pub test: u32,
}

impl Default for DatasetSplit {
    fn default() -> Self {
        Self {
            train: 8,
            validation: 1,
            test: 1,
        }
    }
}

/// Which part of a data set an evaluation reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SplitPart {
    /// The training part.
    Train,
    /// The validation part.
    Validation,
    /// The held-out test part.
    #[default]
    Test,
}

/// A data set: where it is, how it is read and how it is split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// Where the data is: a file or directory (`file://`, `pvc://`) or a built-in set (`builtin:arith`).
    pub uri: StorageUri,
    /// File format.
    #[serde(default)]
    pub format: DatasetFormat,
    /// Train/validation/test weights; 8:1:1 when not given.
    #[serde(default)]
    pub split: DatasetSplit,
}

/// GPU model a pod is placed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum GpuType {
    /// NVIDIA A100 nodes.
    A100,
    /// NVIDIA H100 nodes.
    H100,
    /// Any GPU node.
    #[default]
    #[serde(rename = "any")]
    Any,
}

impl GpuType {
    /// The name used in spec, labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuType::A100 => "A100",
            GpuType::H100 => "H100",
            GpuType::Any => "any",
        }
    }
}

/// Compute a pod asks for and where it may be placed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeResources {
    /// GPUs per pod (`nvidia.com/gpu`); 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: u32,
    /// GPU model; placement uses node affinity on `nvidia.com/gpu.product`.
    #[serde(default)]
    pub gpu_type: GpuType,
    /// CPU request and limit, e.g. `"4"` or `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `"16Gi"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Extra tolerations, e.g. of a team's dedicated-node taint (the `nvidia.com/gpu` taint is
    /// tolerated already when `gpus > 0`). The pods are created by the operator, so a toleration
    /// here lets them onto nodes their author could not place pods on otherwise: tolerating every
    /// taint (no key), control-plane taints (`node-role.kubernetes.io/*`) and the node-lifecycle
    /// taints (`node.kubernetes.io/*`, which the operator sets itself for fail-over) is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(t, has(t.key) && t.key != '')",
            "message": "a toleration must name a taint key: tolerating every taint is not allowed",
        },
        {
            "rule": "self.all(t, !has(t.key) || (!t.key.startsWith('node-role.kubernetes.io/') && !t.key.startsWith('node.kubernetes.io/')))",
            "message": "tolerations of node-role.kubernetes.io/* (control plane) and node.kubernetes.io/* (node lifecycle, set by the operator) taints are not allowed",
        },
    ]))]
    pub tolerations: Vec<Toleration>,
    /// Extra node labels the pod must match (on top of the GPU product the operator selects).
    /// Labels of the control plane (`node-role.kubernetes.io/*`) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "x-kubernetes-validations" = [{
        "rule": "self.all(k, !k.startsWith('node-role.kubernetes.io/'))",
        "message": "nodeSelector must not select control-plane nodes (node-role.kubernetes.io/*)",
    }]))]
    pub node_selector: BTreeMap<String, String>,
}

/// Replaces the condition of the same type in `conditions` (or adds it), keeping its
/// `lastTransitionTime` unless the status flips (Kubernetes API conventions).
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: transition,
                ..new
            };
        }
        None => conditions.push(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn storage_uri_accepts_allowed_schemes_only() {
        for ok in ["pvc://models/a", "file:///data/x.jsonl", "builtin:arith"] {
            assert_eq!(StorageUri::from(ok).validate(), Ok(()), "{ok}");
        }
        // Object stores and the Hub are refused until the runtime reads them.
        for bad in [
            "ftp://h/x",
            "/abs/path",
            "",
            "pvcs://x",
            "https://h/x",
            "s3://b/k",
            "hf://org/repo",
        ] {
            assert!(StorageUri::from(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn storage_uri_refuses_dotdot_segments_but_not_dots_in_names() {
        assert!(StorageUri::from("pvc://models/../etc").validate().is_err());
        assert!(StorageUri::from("file:///data/..").validate().is_err());
        assert_eq!(
            StorageUri::from("pvc://models/v1..2/a.b").validate(),
            Ok(())
        );
    }

    fn condition(status: &str, at: i64, reason: &str) -> Condition {
        let time = k8s_openapi::jiff::Timestamp::from_second(at).expect("valid time");
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            last_transition_time: Time(time),
            message: String::new(),
            observed_generation: Some(1),
            reason: reason.into(),
        }
    }

    #[test]
    fn set_condition_keeps_transition_time_unless_status_flips() {
        let mut conditions = vec![condition("False", 100, "Starting")];
        set_condition(&mut conditions, condition("False", 200, "StillStarting"));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason, "StillStarting");
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 100);
        set_condition(&mut conditions, condition("True", 300, "Running"));
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 300);
    }
}
