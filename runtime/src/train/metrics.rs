//! `train --metrics-addr ADDR`: Prometheus `/metrics` of a training run (step, loss, learning
//! rate, gradient norm, tokens/s, tokens and checkpoints so far), served from a background thread.

use super::progress::StepReport;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

type FloatGauge = Gauge<f64, AtomicU64>;

/// The training run's metrics.
pub struct TrainMetrics {
    registry: Registry,
    step: Gauge,
    total_steps: Gauge,
    loss: FloatGauge,
    learning_rate: FloatGauge,
    grad_norm: FloatGauge,
    tokens_per_second: FloatGauge,
    tokens: Counter,
    checkpoints: Counter,
    last_checkpoint: FloatGauge,
    /// DPO's rewards, by `kind` (chosen, rejected, margins, accuracies).
    rewards: Family<Vec<(&'static str, &'static str)>, FloatGauge>,
}

impl Default for TrainMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("anneal_train");
        let step = Gauge::default();
        let total_steps = Gauge::default();
        let loss = FloatGauge::default();
        let learning_rate = FloatGauge::default();
        let grad_norm = FloatGauge::default();
        let tokens_per_second = FloatGauge::default();
        let tokens = Counter::default();
        let checkpoints = Counter::default();
        let last_checkpoint = FloatGauge::default();
        registry.register("step", "Optimizer steps done", step.clone());
        registry.register(
            "total_steps",
            "Optimizer steps of the run",
            total_steps.clone(),
        );
        registry.register(
            "loss",
            "Training loss at the last logged step",
            loss.clone(),
        );
        registry.register(
            "learning_rate",
            "Learning rate at the last logged step",
            learning_rate.clone(),
        );
        registry.register(
            "grad_norm",
            "Global gradient norm (before clipping) at the last logged step",
            grad_norm.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Training tokens per second over the last logging window",
            tokens_per_second.clone(),
        );
        registry.register("tokens", "Training tokens processed", tokens.clone());
        registry.register("checkpoints", "Checkpoints written", checkpoints.clone());
        registry.register(
            "last_checkpoint_timestamp_seconds",
            "When the last checkpoint was written (Unix time; the age is time() minus this)",
            last_checkpoint.clone(),
        );
        let rewards = Family::<Vec<(&'static str, &'static str)>, FloatGauge>::default();
        registry.register(
            "dpo_rewards",
            "DPO implicit rewards at the last logged step (stage dpo): kind chosen, rejected, margins (means of beta times the log-probability ratio to the reference) or accuracies (share of pairs ranked right)",
            rewards.clone(),
        );
        Self {
            registry,
            rewards,
            step,
            total_steps,
            loss,
            learning_rate,
            grad_norm,
            tokens_per_second,
            tokens,
            checkpoints,
            last_checkpoint,
        }
    }
}

impl TrainMetrics {
    /// Records a logged step and the tokens trained since the previous one.
    pub fn step(&self, f: &StepReport, tokens: u64) {
        self.step.set(i64::try_from(f.step).unwrap_or(i64::MAX));
        self.total_steps
            .set(i64::try_from(f.total_steps).unwrap_or(i64::MAX));
        self.loss.set(f.loss);
        self.learning_rate.set(f.lr);
        self.grad_norm.set(f.grad_norm);
        self.tokens_per_second.set(f.tokens_per_sec);
        self.tokens.inc_by(tokens);
        if let Some(p) = &f.preference {
            for (kind, v) in [
                ("chosen", p.rewards_chosen),
                ("rejected", p.rewards_rejected),
                ("margins", p.rewards_margins),
                ("accuracies", p.rewards_accuracies),
            ] {
                self.rewards.get_or_create(&vec![("kind", kind)]).set(v);
            }
        }
    }

    /// Records a checkpoint.
    pub fn checkpoint(&self) {
        self.checkpoints.inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_checkpoint.set(now);
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on `addr` from a background thread for the rest of the process. Binds
/// before returning, so that a taken port is a clear error at start.
pub fn serve(addr: SocketAddr, metrics: Arc<TrainMetrics>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("train-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("anneal-runtime: warning: /metrics: {e}"),
            };
            rt.block_on(async move {
                let app = Router::new()
                    .route(
                        "/metrics",
                        get(|State(m): State<Arc<TrainMetrics>>| async move { m.render() }),
                    )
                    .with_state(metrics);
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(e) = axum::serve(listener, app).await {
                            eprintln!("anneal-runtime: warning: /metrics stopped: {e}");
                        }
                    }
                    Err(e) => eprintln!("anneal-runtime: warning: /metrics: {e}"),
                }
            });
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_last_logged_step() {
        let metrics = Arc::new(TrainMetrics::default());
        let report = StepReport {
            event: "step",
            step: 20,
            total_steps: 100,
            loss: 1.25,
            lr: 0.001,
            grad_norm: 0.5,
            tokens_per_sec: 1000.0,
            epoch: 0,
            preference: Some(crate::train::dpo::Stats {
                rewards_accuracies: 0.75,
                ..Default::default()
            }),
        };
        metrics.step(&report, 4096);
        metrics.checkpoint();
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{Read, Write};
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(text.contains("anneal_train_step 20"), "{text}");
        assert!(text.contains("anneal_train_loss 1.25"), "{text}");
        assert!(text.contains("anneal_train_tokens_total 4096"), "{text}");
        assert!(text.contains("anneal_train_checkpoints_total 1"), "{text}");
        assert!(
            text.contains("anneal_train_dpo_rewards{kind=\"accuracies\"} 0.75"),
            "{text}"
        );
    }
}
