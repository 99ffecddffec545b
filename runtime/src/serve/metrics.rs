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
    /// KV caches held by running sequences (back to 0 when the load stops: none leaked).
    pub kv_caches_in_use: Gauge,
    /// KV caches allocated and waiting in the pool for a sequence.
    pub kv_caches_free: Gauge,
    /// Requests in the engine, queued or running: each holds a place until it ends.
    pub requests_in_engine: Gauge,
    /// Deterministic requests answered from the response cache.
    pub response_cache_hits: Counter,
    /// Deterministic requests the response cache did not hold (answered by the engine).
    pub response_cache_misses: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache (not computed again).
    pub prefix_cache_tokens: Counter,
    /// Answers in the response cache.
    pub response_cache_entries: Gauge,
    /// Bytes the response cache holds.
    pub response_cache_bytes: Gauge,
    /// Inputs embedded (`/v1/embeddings`).
    pub embedded_inputs: Counter,
    /// Tokens of the inputs embedded.
    pub embedded_tokens: Counter,
    /// Token slots (inputs times the longest of them) of the last embedding batch.
    pub embedding_batch_tokens: Gauge,
    /// Bytes of weights one decode step reads (0 on the candle path, where it is not counted).
    pub weight_bytes_per_step: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("anneal_serve");
        let requests = Family::<StatusLabel, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let generated_tokens = Counter::default();
        let [
            response_cache_hits,
            response_cache_misses,
            prefix_cache_tokens,
        ]: [Counter; 3] = Default::default();
        registry.register(
            "prefix_cache_tokens",
            "Prompt tokens whose keys and values were reused from a cached prefix",
            prefix_cache_tokens.clone(),
        );
        let [response_cache_entries, response_cache_bytes]: [Gauge; 2] = Default::default();
        let [embedded_inputs, embedded_tokens]: [Counter; 2] = Default::default();
        let embedding_batch_tokens = Gauge::default();
        let weight_bytes_per_step = Gauge::default();
        registry.register(
            "weight_bytes_per_step",
            "Bytes of weights one decode step reads, however many sequences it advances",
            weight_bytes_per_step.clone(),
        );
        registry.register(
            "embedded_inputs",
            "Inputs embedded",
            embedded_inputs.clone(),
        );
        registry.register(
            "embedded_tokens",
            "Tokens of the inputs embedded",
            embedded_tokens.clone(),
        );
        registry.register(
            "embedding_batch_tokens",
            "Token slots (inputs times the longest) of the last embedding batch",
            embedding_batch_tokens.clone(),
        );
        registry.register(
            "response_cache_hits",
            "Deterministic requests answered from the response cache",
            response_cache_hits.clone(),
        );
        registry.register(
            "response_cache_misses",
            "Deterministic requests the response cache did not hold",
            response_cache_misses.clone(),
        );
        registry.register(
            "response_cache_entries",
            "Answers in the response cache",
            response_cache_entries.clone(),
        );
        registry.register(
            "response_cache_bytes",
            "Bytes the response cache holds",
            response_cache_bytes.clone(),
        );
        let [
            batch_size,
            queue_depth,
            kv_cache_bytes,
            kv_caches_in_use,
            kv_caches_free,
            requests_in_engine,
        ]: [Gauge; 6] = Default::default();
        registry.register("requests", "HTTP requests by status", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Request latency (generation and embeddings)",
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
        registry.register(
            "kv_caches_in_use",
            "KV caches held by running sequences",
            kv_caches_in_use.clone(),
        );
        registry.register(
            "kv_caches_free",
            "KV caches allocated and free for a new sequence",
            kv_caches_free.clone(),
        );
        registry.register(
            "requests_in_engine",
            "Requests queued or running in the engine",
            requests_in_engine.clone(),
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
            kv_caches_in_use,
            kv_caches_free,
            requests_in_engine,
            response_cache_hits,
            response_cache_misses,
            prefix_cache_tokens,
            response_cache_entries,
            response_cache_bytes,
            embedded_inputs,
            embedded_tokens,
            embedding_batch_tokens,
            weight_bytes_per_step,
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
