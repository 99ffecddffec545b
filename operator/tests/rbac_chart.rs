//! The chart grants the operator exactly the API calls its code makes (`anneal_operator::rbac`):
//! no rule the code does not use, no call the chart does not allow.

use std::collections::BTreeSet;

use anneal_operator::rbac::{ApiCalls, CLUSTER_WIDE, LEADER_LEASE, NODE_LEASES};
use serde_yaml::Value;

/// (group, resource, verb, names) for every verb of every rule.
type Grant = (String, String, String, Vec<String>);

fn grants_of_calls(calls: &[ApiCalls]) -> BTreeSet<Grant> {
    let names_sorted = |names: &[&str]| {
        let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    calls
        .iter()
        .flat_map(|c| {
            let names = names_sorted(c.names);
            c.verbs.iter().map(move |v| {
                (
                    c.group.to_string(),
                    c.resource.to_string(),
                    v.to_string(),
                    names.clone(),
                )
            })
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn grants_of_rules(rules: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().expect("rules") {
        let mut names = strings(&rule["resourceNames"]);
        names.sort();
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    out.insert((group.clone(), resource.clone(), verb, names.clone()));
                }
            }
        }
    }
    out
}

/// The documents of the operator's RBAC template, with the lines that hold template actions
/// left out (names, namespaces from values, labels): what is left is plain YAML.
fn documents() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/anneal/templates/operator-rbac.yaml"
    );
    let text = std::fs::read_to_string(path).expect("chart template");
    text.split("\n---")
        .map(|doc| {
            let plain: Vec<&str> = doc.lines().filter(|l| !l.contains("{{")).collect();
            serde_yaml::from_str::<Value>(&plain.join("\n")).expect("YAML")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn rules_of(kind: &str, namespace: Option<&str>) -> BTreeSet<Grant> {
    let docs = documents();
    let matching: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .filter(|d| d["metadata"]["namespace"].as_str() == namespace)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "one {kind} in namespace {namespace:?} in the chart"
    );
    grants_of_rules(&matching[0]["rules"])
}

#[test]
fn the_chart_grants_exactly_the_calls_the_operator_makes() {
    assert_eq!(
        rules_of("ClusterRole", None),
        grants_of_calls(CLUSTER_WIDE),
        "ClusterRole"
    );
    assert_eq!(
        rules_of("Role", Some("kube-node-lease")),
        grants_of_calls(NODE_LEASES),
        "Role in kube-node-lease"
    );
    // The leader Role lives in the release namespace (a template value).
    assert_eq!(
        rules_of("Role", None),
        grants_of_calls(LEADER_LEASE),
        "leader Role"
    );
}
