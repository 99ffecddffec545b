//! The chart's Grafana dashboard (`charts/anneal/dashboards/anneal.json`) queries only metrics the
//! code exports: the operator's, the training runtime's and the server's registries, rendered here.
//! A renamed metric fails this test instead of leaving an empty panel.

use std::collections::{BTreeMap, BTreeSet};

/// Family name -> type, from a Prometheus text exposition's `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Whether `name` is a sample name of an exported family.
fn exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    families.iter().any(|(family, kind)| match kind.as_str() {
        "counter" => name == format!("{family}_total"),
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name == format!("{family}{suffix}")),
        _ => name == family,
    })
}

/// Every `anneal_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("anneal_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `anneal_dev_*` are label names (the pods' anneal.dev/* labels, as Prometheus writes them).
        if !tail.starts_with("anneal_dev_") {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_dashboard_query_names_a_metric_the_code_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../charts/anneal/dashboards/anneal.json")).unwrap();
    let mut all = BTreeMap::new();
    // A labelled family is rendered once it has a sample: give each one.
    let operator = anneal_operator::metrics::Metrics::default();
    operator.reconciled("trainingjob", "ok");
    operator.wrote("pods", "apply");
    operator
        .failovers
        .get_or_create(&anneal_operator::metrics::FailoverLabels {
            reason: "NodeNotReady".into(),
        })
        .inc();
    operator
        .verdicts
        .get_or_create(&anneal_operator::metrics::VerdictLabels {
            result: "Passed".into(),
            reason: "Passed".into(),
        })
        .inc();
    all.extend(families(&operator.render().unwrap()));
    let serve = anneal_runtime::serve::metrics::Metrics::default();
    serve
        .requests
        .get_or_create(&anneal_runtime::serve::metrics::StatusLabel { status: 200 })
        .inc();
    all.extend(families(&serve.encode()));
    all.extend(families(
        &anneal_runtime::train::metrics::TrainMetrics::default().render(),
    ));
    let mut queried = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} names no anneal metric");
            for name in names {
                assert!(
                    exported(&name, &all),
                    "panel {}: {name} is not exported (families: {:?})",
                    panel["title"],
                    all.keys().collect::<Vec<_>>()
                );
                queried.insert(name);
            }
        }
    }
    // What the issue asks the dashboard to show, by family.
    for family in [
        "anneal_train_loss",
        "anneal_train_tokens_per_second",
        "anneal_train_last_checkpoint_timestamp_seconds",
        "anneal_operator_failovers_total",
        "anneal_serve_generated_tokens_total",
        "anneal_serve_request_duration_seconds_bucket",
        "anneal_serve_queue_depth",
        "anneal_serve_response_cache_hits_total",
        "anneal_operator_gate_verdicts_total",
    ] {
        assert!(queried.contains(family), "no panel shows {family}");
    }
}

#[test]
fn label_names_are_not_taken_for_metrics() {
    assert_eq!(
        metric_names(
            "sum by (namespace, anneal_dev_modelserver) (rate(anneal_serve_generated_tokens_total[1m]))"
        ),
        ["anneal_serve_generated_tokens_total"]
    );
}
