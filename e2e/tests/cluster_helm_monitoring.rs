//! The chart's monitoring wiring, rendered by the pinned Helm: off by default; with
//! `monitoring.serviceMonitor.enabled` a ServiceMonitor (and its Service) for the operator and a
//! PodMonitor for the runtime pods, only where the Prometheus Operator's API exists; with
//! `monitoring.dashboard.enabled` a ConfigMap for Grafana's sidecar holding the dashboard.
//!
//! Needs the pinned tools (`e2e/cluster/build-tools.sh`), not a running cluster; ignored like the
//! cluster tier, which `e2e/test-all.sh` runs after building them.

use anneal_e2e::tools::{helm, run};
use anyhow::{Context, Result, ensure};

async fn render(extra: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/anneal");
    let text = run(helm()?
        .args(["template", "anneal", chart, "-n", "anneal-system"])
        .args(extra))
    .await?;
    Ok(text
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter(|v| !v.is_null())
        .collect())
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .filter_map(|d| d["kind"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
#[ignore = "needs the pinned tools: e2e/cluster/build-tools.sh"]
async fn monitoring_renders_only_when_asked_and_where_the_prometheus_operator_api_exists()
-> Result<()> {
    let off = kinds(&render(&[]).await?);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        ensure!(
            !off.contains(&kind.to_string()),
            "{kind} rendered by default"
        );
    }
    let on = [
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.dashboard.enabled=true",
    ];
    // Without the monitoring.coreos.com API the monitors are left out, the dashboard is not.
    let without_api = kinds(&render(&on).await?);
    ensure!(
        !without_api.contains(&"ServiceMonitor".to_string()),
        "{without_api:?}"
    );
    let mut with_api = on.to_vec();
    with_api.extend(["--api-versions", "monitoring.coreos.com/v1"]);
    let docs = render(&with_api).await?;
    let all = kinds(&docs);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        ensure!(all.contains(&kind.to_string()), "no {kind}: {all:?}");
    }
    let pod_monitor = docs
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .context("PodMonitor")?;
    let ports: Vec<&str> = pod_monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .context("endpoints")?
        .iter()
        .filter_map(|e| e["port"].as_str())
        .collect();
    ensure!(ports == ["metrics", "http"], "{ports:?}");
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .context("no dashboard ConfigMap labelled for Grafana's sidecar")?;
    let json = dashboard["data"]["anneal.json"]
        .as_str()
        .context("anneal.json")?;
    let rendered: serde_json::Value = serde_json::from_str(json)?;
    let file: serde_json::Value =
        serde_json::from_str(include_str!("../../charts/anneal/dashboards/anneal.json"))?;
    ensure!(
        rendered == file,
        "the ConfigMap's dashboard differs from the file"
    );
    Ok(())
}
