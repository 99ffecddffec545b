//! Every example in `manifests/examples/` parses into the Rust types and passes the client-side
//! checks; every deliberately invalid object states what the API server must say about it.

use std::path::{Path, PathBuf};

use anneal_crds::{EvalGate, ModelServer, TrainingJob};
use serde::Deserialize;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples")
}

/// Parses every YAML document of `file` into the resource its `kind` names.
fn parse_all(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(examples_dir().join(file)).expect("example exists");
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).expect("valid YAML");
        let kind = value["kind"].as_str().expect("kind set").to_string();
        let result = match kind.as_str() {
            "TrainingJob" => serde_yaml::from_value::<TrainingJob>(value).map(|tj| {
                let spec = &tj.spec;
                spec.dataset.uri.validate().expect("dataset uri valid");
                spec.output.uri.validate().expect("output uri valid");
            }),
            "EvalGate" => serde_yaml::from_value::<EvalGate>(value).map(|eg| {
                assert!(!eg.spec.metrics.is_empty());
                eg.spec.dataset.uri.validate().expect("dataset uri valid");
            }),
            "ModelServer" => serde_yaml::from_value::<ModelServer>(value).map(|ms| {
                assert!(ms.spec.engine.max_tokens <= ms.spec.engine.context_length);
            }),
            other => panic!("{file}: unexpected kind {other}"),
        };
        result.unwrap_or_else(|e| panic!("{file}: {kind} does not parse: {e}"));
        kinds.push(kind);
    }
    kinds
}

#[test]
fn trainingjob_example_parses() {
    assert_eq!(parse_all("trainingjob.yaml"), ["TrainingJob"]);
}

#[test]
fn evalgate_example_parses() {
    assert_eq!(parse_all("evalgate.yaml"), ["EvalGate"]);
}

#[test]
fn modelserver_example_parses() {
    assert_eq!(parse_all("modelserver.yaml"), ["ModelServer"]);
}

#[test]
fn pipeline_wires_the_three_resources_together() {
    assert_eq!(
        parse_all("pipeline.yaml"),
        ["TrainingJob", "EvalGate", "ModelServer"]
    );
    let text = std::fs::read_to_string(examples_dir().join("pipeline.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    let tj: TrainingJob = serde_yaml::from_value(docs[0].clone()).unwrap();
    let gate: EvalGate = serde_yaml::from_value(docs[1].clone()).unwrap();
    let server: ModelServer = serde_yaml::from_value(docs[2].clone()).unwrap();
    let tj_name = tj.metadata.name.unwrap();
    assert_eq!(
        gate.spec.candidate.training_job.unwrap().name,
        tj_name,
        "gate evaluates the job"
    );
    let gate_name = gate.metadata.name.unwrap();
    assert_eq!(
        server.spec.model.from_eval_gate.unwrap().name,
        gate_name,
        "server follows the gate"
    );
}

#[test]
fn defaults_fill_what_the_example_leaves_out() {
    let text = std::fs::read_to_string(examples_dir().join("pipeline.yaml")).unwrap();
    let first = serde_yaml::Deserializer::from_str(&text).next().unwrap();
    let tj: TrainingJob =
        serde_yaml::from_value(serde_yaml::Value::deserialize(first).unwrap()).unwrap();
    let arch = tj.spec.model.architecture.expect("architecture");
    assert_eq!(arch.vocab_size, 256, "byte-level vocabulary by default");
    assert_eq!(tj.spec.hyperparameters.gradient_clip, 1.0);
    assert_eq!(tj.spec.workers, 1);
    assert_eq!(tj.spec.failover_policy.node_lease_timeout_seconds, 15);
    assert_eq!(
        (
            tj.spec.dataset.split.train,
            tj.spec.dataset.split.validation,
            tj.spec.dataset.split.test
        ),
        (8, 1, 1)
    );
}

#[test]
fn every_invalid_object_says_what_the_api_server_must_answer() {
    let dir = examples_dir().join("testdata/invalid");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("invalid examples exist") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{}: no `# expect:` line",
            path.display()
        );
        assert!(
            expects.iter().any(|e| e.starts_with("spec.")),
            "{}: an expectation must name the field",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 15, "only {count} invalid examples");
}
