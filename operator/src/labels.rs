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
/// Label naming the EvalGate a child belongs to.
pub const EVALGATE: &str = "anneal.dev/evalgate";
/// Label with the round an evaluation pod measures.
pub const ROUND: &str = "anneal.dev/round";
/// Label with an evaluation pod's try.
pub const TRY: &str = "anneal.dev/try";
/// Label naming the ModelServer a child belongs to.
pub const MODELSERVER: &str = "anneal.dev/modelserver";
/// Pod-template annotation: the URI of the model a server pod serves.
pub const MODEL_URI: &str = "anneal.dev/model-uri";
/// Pod-template annotation: the sha256 of the model a server pod serves.
pub const MODEL_SHA256: &str = "anneal.dev/model-sha256";

fn labels(component: &str, owner_label: &str, owner: &str) -> BTreeMap<String, String> {
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
            component.to_string(),
        ),
        (owner_label.to_string(), owner.to_string()),
    ])
}

/// The labels of every child of TrainingJob `job`.
pub fn trainingjob_labels(job: &str) -> BTreeMap<String, String> {
    labels("trainer", TRAININGJOB, job)
}

/// The labels of every child of EvalGate `gate`.
pub fn evalgate_labels(gate: &str) -> BTreeMap<String, String> {
    labels("evaluator", EVALGATE, gate)
}

/// The labels of every child of ModelServer `server` (also its pods' selector).
pub fn modelserver_labels(server: &str) -> BTreeMap<String, String> {
    labels("server", MODELSERVER, server)
}
