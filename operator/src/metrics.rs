//! The operator's Prometheus metrics and its `/metrics`, `/healthz`, `/readyz` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a reconcile outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `trainingjob`, `evalgate` or `modelserver`.
    pub controller: String,
    /// `ok` or the error category (bounded: see `reconcile::Error::category`).
    pub result: String,
}

/// Labels of a gate verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `Passed` or `Failed`.
    pub result: String,
    /// Why, in a word (`Passed`, `ThresholdFailed`, `Regression`, `Timeout`, ...).
    pub reason: String,
}

/// Labels of a failover.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    /// The `FailoverReason`.
    pub reason: String,
}

/// Labels of a write request to the API server.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// The resource written (`trainingjobs/status`, `pods`, ...).
    pub resource: String,
    /// `apply`, `delete` or `create`.
    pub verb: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// Reconciles by outcome.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Failovers started, by reason.
    pub failovers: Family<FailoverLabels, Counter>,
    /// Seconds from detecting a failure to the replacement worker Running.
    pub failover_seconds: Histogram,
    /// Write requests sent to the API server: a steady state sends none.
    pub writes: Family<WriteLabels, Counter>,
    /// EvalGate verdicts, by result and reason.
    pub verdicts: Family<VerdictLabels, Counter>,
    /// Models a gate promoted.
    pub promotions: Counter,
    /// ModelServer roll-backs to the previous model.
    pub rollbacks: Counter,
    /// Seconds from the start of a ModelServer roll-out to every replica Ready.
    pub rollout_seconds: Histogram,
    registry: Registry,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let failovers = Family::<FailoverLabels, Counter>::default();
        let failover_seconds = Histogram::new([1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0]);
        let writes = Family::<WriteLabels, Counter>::default();
        let verdicts = Family::<VerdictLabels, Counter>::default();
        let promotions = Counter::default();
        let rollbacks = Counter::default();
        let rollout_seconds =
            Histogram::new([1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]);
        let mut registry = Registry::with_prefix("anneal_operator");
        registry.register(
            "gate_verdicts",
            "EvalGate verdicts, by result and reason",
            verdicts.clone(),
        );
        registry.register(
            "promotions",
            "Models an EvalGate promoted",
            promotions.clone(),
        );
        registry.register(
            "rollbacks",
            "ModelServer roll-backs to the previous model",
            rollbacks.clone(),
        );
        registry.register(
            "rollout_seconds",
            "Seconds from the start of a ModelServer roll-out to every replica Ready",
            rollout_seconds.clone(),
        );
        registry.register(
            "api_writes",
            "Write requests the operator sent to the API server, by resource and verb",
            writes.clone(),
        );
        registry.register("reconciles", "Reconciles by outcome", reconciles.clone());
        registry.register(
            "failovers",
            "Worker failovers started, by reason",
            failovers.clone(),
        );
        registry.register(
            "failover_seconds",
            "Seconds from detecting a failed node or device to the replacement worker Running",
            failover_seconds.clone(),
        );
        Self {
            reconciles,
            failovers,
            failover_seconds,
            writes,
            verdicts,
            promotions,
            rollbacks,
            rollout_seconds,
            registry,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts one reconcile outcome of `controller`.
    pub fn reconciled(&self, controller: &str, result: &str) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts one write request.
    pub fn wrote(&self, resource: &str, verb: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource: resource.to_string(),
                verb: verb.to_string(),
            })
            .inc();
    }

    /// Marks the operator ready (its caches are filled and the controllers run).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> Result<String, StatusCode> {
    m.render().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn ready(State(m): State<Arc<Metrics>>) -> StatusCode {
    if m.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Serves `/metrics`, `/healthz` (the process is alive) and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await
}

use metrics as metrics_handler;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_counters_and_the_failover_histogram() {
        let m = Metrics::default();
        m.reconciled("trainingjob", "ok");
        m.failovers
            .get_or_create(&FailoverLabels {
                reason: "NodeNotReady".into(),
            })
            .inc();
        m.failover_seconds.observe(9.5);
        m.wrote("pods", "create");
        let text = m.render().unwrap();
        assert!(
            text.contains(
                r#"anneal_operator_reconciles_total{controller="trainingjob",result="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"anneal_operator_failovers_total{reason="NodeNotReady"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("anneal_operator_failover_seconds_bucket{le=\"10.0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"anneal_operator_api_writes_total{resource="pods",verb="create"} 1"#),
            "{text}"
        );
    }
}
