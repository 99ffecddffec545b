//! The generated schema carries the validation the API server must enforce.

use anneal_crds::generate::all_crds;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn crd(kind: &str) -> CustomResourceDefinition {
    all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("kind generated")
}

fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Walks `a.b.c` through `properties` (and `items` for `[]`).
fn at<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(schema, |s, part| match part {
        "[]" => &s["items"],
        name => &s["properties"][name],
    })
}

/// A numeric keyword of a schema, whether serialised as an integer or a float.
fn num(schema: &Value, keyword: &str) -> f64 {
    schema[keyword]
        .as_f64()
        .unwrap_or_else(|| panic!("no numeric {keyword} in {schema}"))
}

fn rules(schema: &Value) -> Vec<String> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["rule"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_scope_and_subresources() {
    for (kind, short, plural) in [
        ("TrainingJob", "tj", "trainingjobs"),
        ("EvalGate", "eg", "evalgates"),
        ("ModelServer", "ms", "modelservers"),
    ] {
        let crd = crd(kind);
        assert_eq!(crd.spec.group, "anneal.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_string()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["anneal".to_string()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version.subresources.as_ref().unwrap().status.is_some(),
            "{kind} has /status"
        );
    }
    let ms = crd("ModelServer");
    assert!(
        ms.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .scale
            .is_some(),
        "ModelServer scales"
    );
}

#[test]
fn printer_columns_tell_the_state() {
    let columns = |kind: &str| -> Vec<String> {
        crd(kind).spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(
        columns("TrainingJob"),
        ["Phase", "Step", "Loss", "GPU", "Restarts", "Age"]
    );
    assert_eq!(
        columns("EvalGate"),
        ["Phase", "Candidate", "Promoted", "Age"]
    );
    assert_eq!(columns("ModelServer"), ["Phase", "Model", "Ready", "Age"]);
}

#[test]
fn numeric_bounds() {
    let tj = schema("TrainingJob");
    let spec = at(&tj, "spec");
    assert_eq!(num(at(spec, "resources.gpus"), "minimum"), 0.0);
    assert_eq!(num(at(spec, "resources.gpus"), "maximum"), 64.0);
    assert_eq!(num(at(spec, "hyperparameters.steps"), "minimum"), 1.0);
    assert_eq!(
        at(spec, "hyperparameters.learningRate")["exclusiveMinimum"],
        true
    );
    assert_eq!(
        num(at(spec, "hyperparameters.learningRate"), "minimum"),
        0.0
    );
    assert_eq!(
        num(at(spec, "hyperparameters.learningRate"), "maximum"),
        1.0
    );
    assert_eq!(
        at(spec, "hyperparameters.frozenLayerFraction")["exclusiveMaximum"],
        true
    );
    let required = spec["required"].as_array().unwrap();
    for field in ["model", "dataset", "hyperparameters", "output"] {
        assert!(
            required.contains(&Value::from(field)),
            "spec.{field} required"
        );
    }
}

#[test]
fn enums_are_closed() {
    let tj = schema("TrainingJob");
    let gpu = at(&tj, "spec.resources.gpuType");
    assert_eq!(gpu["enum"], serde_json::json!(["A100", "H100", "any"]));
    assert_eq!(
        at(&tj, "spec.stage")["enum"],
        serde_json::json!(["pretrain", "sft", "dpo"])
    );
    let eg = schema("EvalGate");
    assert_eq!(
        at(&eg, "spec.metrics.[].metric")["enum"],
        serde_json::json!([
            "loss",
            "perplexity",
            "accuracy",
            "tokenAccuracy",
            "preferenceAccuracy"
        ])
    );
}

#[test]
fn uris_are_limited_to_allowed_schemes_without_dotdot() {
    let tj = schema("TrainingJob");
    for path in [
        "spec.dataset.uri",
        "spec.output.uri",
        "spec.model.baseModel",
    ] {
        let uri = at(&tj, path);
        assert!(
            rules(uri)
                .iter()
                .any(|r| r.contains("'pvc://'") && !r.contains("s3://")),
            "{path} is limited to the schemes the runtime reads"
        );
        assert!(
            rules(uri).iter().any(|r| r.contains("'..'")),
            "{path} refuses '..'"
        );
        assert_eq!(num(uri, "maxLength"), 2048.0);
    }
}

#[test]
fn cel_rules_for_cross_field_and_immutability() {
    let tj = schema("TrainingJob");
    let root = rules(&tj);
    assert!(
        root.iter()
            .any(|r| r.contains("self.spec.model == oldSelf.spec.model"))
    );
    assert!(
        root.iter()
            .any(|r| r.contains("self.spec.dataset == oldSelf.spec.dataset"))
    );
    assert!(
        rules(at(&tj, "spec.model"))
            .iter()
            .any(|r| r.contains("has(self.fromTrainingJob)") && r.ends_with("== 1"))
    );
    let eg = schema("EvalGate");
    assert_eq!(
        num(at(&eg, "spec.metrics"), "minItems"),
        1.0,
        "at least one threshold per gate"
    );
    assert!(
        rules(at(&eg, "spec.metrics.[]"))
            .iter()
            .any(|r| r == "has(self.min) || has(self.max)")
    );
    let ms = schema("ModelServer");
    assert!(
        rules(at(&ms, "spec.model"))
            .iter()
            .any(|r| r == "has(self.uri) != has(self.fromEvalGate)")
    );
}

#[test]
fn conditions_follow_api_conventions() {
    for kind in ["TrainingJob", "EvalGate", "ModelServer"] {
        let s = schema(kind);
        let conditions = at(&s, "status.conditions");
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind}");
        let item = &conditions["items"];
        for field in [
            "type",
            "status",
            "lastTransitionTime",
            "reason",
            "message",
            "observedGeneration",
        ] {
            assert!(
                item["properties"][field].is_object(),
                "{kind} condition has {field}"
            );
        }
        assert!(
            at(&s, "status.observedGeneration").is_object(),
            "{kind} status.observedGeneration"
        );
        assert!(at(&s, "status.phase").is_object(), "{kind} status.phase");
    }
}
