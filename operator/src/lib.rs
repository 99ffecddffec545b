//! anneal's operator: the controllers that reconcile TrainingJob, EvalGate and ModelServer,
//! node-health judgement for GPU failover, and the builders of what they own.
//!
//! Each controller is a pipeline (style.md #1): read what exists -> decide (pure) -> build the
//! children (pure) -> apply them -> write status once, only when it changed.

pub mod config;
pub mod evalgate;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod modelserver;
pub mod node_health;
pub mod pod;
pub mod rbac;
pub mod reconcile;
pub mod trainingjob;

/// Runs every controller until a shutdown signal (each ends once its in-flight reconciles
/// finish); with `namespace`, only for the resources of that namespace.
pub async fn run_controllers(
    client: kube::Client,
    config: config::OperatorConfig,
    namespace: Option<&str>,
    metrics: std::sync::Arc<metrics::Metrics>,
    gate: leader::WriteGate,
) {
    tokio::join!(
        trainingjob::run(
            client.clone(),
            config.clone(),
            namespace,
            metrics.clone(),
            gate.clone()
        ),
        evalgate::run(
            client.clone(),
            config.clone(),
            namespace,
            metrics.clone(),
            gate.clone()
        ),
        modelserver::run(client, config, namespace, metrics, gate),
    );
}

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "anneal-operator";

/// Waits until the API server serves every CRD of anneal (Established), saying what it waits
/// for every 10 s; the controllers' watches fail until then (style.md #6).
pub async fn crds_established(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    for crd in anneal_crds::generate::all_crds() {
        let name = crd.metadata.name.unwrap_or_default();
        loop {
            let wait = await_condition(api.clone(), &name, conditions::is_crd_established());
            match tokio::time::timeout(std::time::Duration::from_secs(10), wait).await {
                Ok(Ok(_)) => break,
                Ok(Err(err)) => {
                    tracing::warn!(crd = %name, error = %err, "watching the CRD");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(_) => {
                    tracing::warn!(crd = %name, "waiting for the CRD to be established (install the chart's CRDs)")
                }
            }
        }
    }
    tracing::info!("CRDs established");
}
