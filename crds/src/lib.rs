//! Rust types of anneal's custom resources (`anneal.dev/v1alpha1`): [`TrainingJob`],
//! [`EvalGate`] and [`ModelServer`], and the generator of their CustomResourceDefinition YAML.
//!
//! The CRDs are generated from these types (`cargo run -p anneal-crds --bin crdgen`); tests fail
//! when the committed YAML drifts from what the types generate.

pub mod common;
pub mod contract;
pub mod evalgate;
pub mod generate;
pub mod modelserver;
pub mod trainingjob;

pub use common::{ComputeResources, Condition, DatasetSpec, GpuType, StorageUri};
pub use evalgate::{EvalGate, EvalGateSpec, EvalGateStatus};
pub use generate::{all_crds, all_crds_yaml, crd_yaml};
pub use modelserver::{ModelServer, ModelServerSpec, ModelServerStatus};
pub use trainingjob::{TrainingJob, TrainingJobSpec, TrainingJobStatus};

/// API group of every anneal resource.
pub const GROUP: &str = "anneal.dev";
/// API version of every anneal resource.
pub const VERSION: &str = "v1alpha1";
