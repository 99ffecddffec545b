//! Labels the operator puts on what it makes, so that children can be found by owner.

use std::collections::BTreeMap;

/// `app.kubernetes.io/managed-by` value of every child.
pub const MANAGED_BY: &str = "anneal-operator";
/// Label naming the TrainingJob a child belongs to.
pub const TRAININGJOB: &str = "anneal.dev/trainingjob";
/// Label with a worker pod's attempt number.
pub const ATTEMPT: &str = "anneal.dev/attempt";
/// Label with a worker's index.
pub const WORKER: &str = "anneal.dev/worker";

/// The labels of every child of TrainingJob `job`.
pub fn trainingjob_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (
            "app.kubernetes.io/name".to_string(),
            "anneal-runtime".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "trainer".to_string(),
        ),
        (TRAININGJOB.to_string(), job.to_string()),
    ])
}
