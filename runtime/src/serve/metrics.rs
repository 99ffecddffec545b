//! Prometheus metrics of the server. Labels are bounded (HTTP status codes only).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by response status.
    pub requests: Family<StatusLabel, Counter>,
    /// Seconds from request to the end of its response (generation requests).
    pub latency: Histogram,
    /// Seconds from request to the first generated token.
    pub ttft: Histogram,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Sequences in the last decode step.
    pub batch_size: Gauge,
    /// Requests waiting to be admitted.
    pub queue_depth: Gauge,
    /// Bytes held by KV caches.
    pub kv_cache_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("anneal_serve");
        let requests = Family::<StatusLabel, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let (generated_tokens, batch_size, queue_depth, kv_cache_bytes) = (
            Counter::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register("requests", "HTTP requests by status", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Generation request latency",
            latency.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time to first token",
            ttft.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "batch_size",
            "Sequences in the last decode step",
            batch_size.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            queue_depth.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "Bytes held by KV caches",
            kv_cache_bytes.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            ttft,
            generated_tokens,
            batch_size,
            queue_depth,
            kv_cache_bytes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
