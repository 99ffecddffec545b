//! `anneal-runtime serve`: an OpenAI-compatible HTTP server over continuous batching.
//!
//! The pieces are separate (style.md #10): [`loaded_model`] holds the network and tokenizer,
//! [`batch_forward`] is the batched decode step on the shared model, [`kv_pool`] owns the
//! per-sequence preallocated caches, [`scheduler`] decides who runs, [`engine`] loops on its
//! own thread, and [`http`] only turns requests into engine messages and back.

pub mod batch_forward;
pub use crate::tokenizer::chat_template;
pub mod cpu_model;
pub mod decode_weights;
pub mod engine;
pub mod http;
pub mod kv_pool;
pub mod loaded_model;
pub mod metrics;
pub mod response_cache;
pub mod sampling;
pub mod scheduler;
pub mod text_stream;
pub mod worker;

use crate::error::{Result, RuntimeError};
use crate::gguf::Q41Policy;
use http::openai::Limits;
use http::{AppState, Backend, Embedder, Generator, Served};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Arguments of `anneal-runtime serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A GGUF file (llama family), a model directory written by `train`, or a
    /// sentence-transformers directory of a BERT-family encoder (served on `/v1/embeddings`): a
    /// path, `file://` or `pvc://` URI.
    #[arg(long, env = "ANNEAL_MODEL")]
    pub model: PathBuf,
    /// Refuse to serve (exit 65) unless the weights have this sha256 (hex): of
    /// `model.safetensors` for a model directory, of the file for GGUF. The operator pins the
    /// model its gate passed this way.
    #[arg(long)]
    pub model_sha256: Option<String>,
    /// Largest `max_tokens` a request may ask for (at most the context length minus one);
    /// larger is refused with 422.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// The model's name in `/v1/models` and in requests (a request naming another model is
    /// answered 404 `model_not_found`); the model's own name when not given.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds a deterministic request's answer (temperature 0, or a seed) is kept and served
    /// again without the engine; 0 turns the response cache off.
    #[arg(long, default_value_t = 300)]
    pub response_cache_ttl_secs: u64,
    /// Reuse the keys and values of a finished request's prompt for a new prompt that starts the
    /// same way (the same caller only; CPU kernels): `--prefix-cache false` computes every prompt
    /// whole.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Bytes the response cache may hold (least recently used answers go first).
    #[arg(long, default_value_t = 64 << 20)]
    pub response_cache_max_bytes: usize,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// File holding the API key (first line); without it no key is required.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Embedding models: most token slots (inputs times the longest input, padding included) in
    /// one forward pass; waiting inputs are batched up to it (text-embeddings-inference's flag).
    #[arg(long, default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Embedding models: most inputs in one `/v1/embeddings` request; more are answered 413.
    #[arg(long, default_value_t = 128)]
    pub max_client_batch_size: usize,
    /// Most requests waiting for a batch slot (beyond those that fit free slots); more are
    /// answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Lowest `priority` a request may ask for.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    pub min_priority: i32,
    /// Highest `priority` a request may ask for: clients choose their own priority, so the
    /// range is what any client can jump the queue by (0 lets them only lower theirs). A
    /// request outside the range is answered 422 naming `priority`.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub max_priority: i32,
    /// Context length (prompt plus generation) per sequence; at most the model's.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a generation request may take.
    #[arg(long, default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Seconds between SIGTERM (readiness fails at once) and closing the listener.
    #[arg(long, default_value_t = 0)]
    pub drain_delay_secs: u64,
    /// What to do with Q4_1 weights. `keep` (exact) runs them through anneal's own SIMD
    /// kernels on the CPU (candle has no SIMD Q4_1 kernel).
    #[arg(long, value_enum, default_value_t = Q41Policy::Keep)]
    pub q4_1: Q41Policy,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device: auto, cpu or cuda:N (weights, KV caches and the batched decode all live there).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs `anneal-runtime serve` until SIGTERM or Ctrl-C, then drains.
pub fn run(args: Args) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // candle's workers spin 25k rounds before parking; on a node whose cores are shared
        // (other pods, the HTTP threads) the spinning steals the CPU from the thread being
        // waited for: single-stream decode measured 2.8x faster with short spins on 2 cores.
        // SAFETY: set before any other thread of this process exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100") };
    }
    if let Some(n) = args.threads {
        // candle's CPU kernels size their pool from this variable.
        // SAFETY: set before any other thread of this process exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let api_key = match &args.api_key_file {
        Some(p) => Some(http::auth::read_key_file(p).map_err(RuntimeError::User)?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Internal(format!("tokio runtime: {e}")))?;
    rt.block_on(serve(args, api_key))
}

async fn serve(args: Args, api_key: Option<String>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| RuntimeError::User(format!("listening on {}: {e}", args.listen)))?;
    serve_on(listener, args, api_key, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes, then drains: readiness fails at once,
/// `drain_delay_secs` later the listener closes, in-flight requests finish, and this returns.
/// The model loads in the background; until it has, the server is alive but not ready.
/// Should the engine thread die, the probes fail and this returns the error at once.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    args: Args,
    api_key: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if args.min_priority > args.max_priority {
        return Err(RuntimeError::user(format!(
            "--min-priority {} is above --max-priority {}",
            args.min_priority, args.max_priority
        )));
    }
    let state = Arc::new(AppState {
        served: Default::default(),
        draining: Default::default(),
        metrics: Default::default(),
        api_key,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        response_cache: response_cache::ResponseCache::new(
            Duration::from_secs(args.response_cache_ttl_secs),
            args.response_cache_max_bytes,
        ),
    });
    tracing::info!(addr = ?listener.local_addr().ok(), "listening; loading {}", args.model.display());
    let load_args = args.clone();
    let load_state = state.clone();
    let loading = tokio::task::spawn_blocking(move || load(&load_args, &load_state));
    let app = http::router(state.clone(), args.max_body_bytes);
    let shutdown_state = state.clone();
    let drain_delay = Duration::from_secs(args.drain_delay_secs);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        shutdown_state.draining.store(true, Ordering::SeqCst);
        tracing::info!("draining: readiness fails, in-flight requests finish");
        tokio::time::sleep(drain_delay).await;
    });
    let server = tokio::spawn(async move { server.await });
    match loading.await {
        Ok(Ok(())) => tracing::info!("model loaded; ready"),
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(RuntimeError::Internal(format!(
                "model loading panicked: {e}"
            )));
        }
    }
    let worker = state
        .served
        .get()
        .map(|s| s.thread().clone())
        .ok_or_else(|| RuntimeError::Internal("the model loaded without a worker".into()))?;
    until_server_or_engine_ends(server, &worker).await
}

/// Waits for the server to end (after the shutdown signal) or for the engine thread to end
/// (a panic). A server without an engine can only answer 503, so then it stops at once and
/// this is an error: the process exits non-zero and Kubernetes restarts the pod.
async fn until_server_or_engine_ends(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: &worker::Supervised,
) -> Result<()> {
    tokio::select! {
        ended = &mut server => ended
            .map_err(|e| RuntimeError::Internal(format!("server task: {e}")))?
            .map_err(|e| RuntimeError::Internal(format!("server: {e}"))),
        why = engine.wait_stopped() => {
            server.abort();
            Err(RuntimeError::Internal(why))
        }
    }
}

fn load(args: &Args, state: &AppState) -> Result<()> {
    let started = std::time::Instant::now();
    let device = crate::device::parse_device(&args.device)?;
    let path = model_path(&args.model)?;
    if let Some(want) = &args.model_sha256 {
        check_digest(&path, want)?;
    }
    if path.is_dir() && crate::embed::is_embedding_model(&path) {
        return load_embedder(args, state, &path, &device, started);
    }
    let model = loaded_model::load(&path, args.q4_1, Some(args.max_seq_len), &device)?;
    tracing::info!(model = %model.id, secs = started.elapsed().as_secs_f64(), "loaded");
    let max_tokens = model
        .transformer
        .config
        .max_seq_len
        .saturating_sub(1)
        .min(args.max_tokens.unwrap_or(usize::MAX))
        .max(1);
    let limits = Limits {
        max_tokens,
        default_max_tokens: args.default_max_tokens.min(max_tokens),
        vocab_size: model.tokenizer.vocab_size(),
        min_priority: args.min_priority,
        max_priority: args.max_priority,
    };
    let engine = engine::start(
        engine::EngineModel {
            transformer: model.transformer,
            tokenizer: model.tokenizer.clone(),
            stop_ids: model.stop_ids,
        },
        engine::EngineConfig {
            max_batch: args.max_batch,
            max_queue: args.max_queue,
            prefix_cache: args.prefix_cache,
        },
        state.metrics.clone(),
    )
    .map_err(|e| RuntimeError::Internal(format!("starting the engine thread: {e}")))?;
    let served = Served {
        model_id: args.served_model_name.clone().unwrap_or(model.id),
        backend: Backend::Generate(Box::new(Generator {
            engine,
            tokenizer: model.tokenizer,
            chat_template: model.chat_template,
            limits,
        })),
    };
    let _ = state.served.set(served);
    Ok(())
}

/// Loads a sentence-transformers directory and starts its embedding worker.
fn load_embedder(
    args: &Args,
    state: &AppState,
    path: &std::path::Path,
    device: &candle_core::Device,
    started: std::time::Instant,
) -> Result<()> {
    let model = crate::embed::EmbeddingModel::load(path, device)
        .map_err(|e| RuntimeError::User(e.to_string()))?;
    // The directory's own name, as sentence-transformers models are known by theirs.
    let id = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embeddings".into());
    tracing::info!(model = %id, dimensions = model.dimensions, max_tokens = model.max_tokens,
        secs = started.elapsed().as_secs_f64(), "loaded an embedding model");
    let model = Arc::new(model);
    let worker = crate::embed::batcher::start(
        model.clone(),
        args.max_batch_tokens,
        args.max_queue.max(1),
        state.metrics.clone(),
    )
    .map_err(|e| RuntimeError::Internal(format!("starting the embedding thread: {e}")))?;
    let served = Served {
        model_id: args.served_model_name.clone().unwrap_or(id),
        backend: Backend::Embed(Embedder {
            model,
            worker,
            max_inputs: args.max_client_batch_size.max(1),
        }),
    };
    let _ = state.served.set(served);
    Ok(())
}

/// The file or directory `--model` names (a `file://` or `pvc://` URI, or a path).
fn model_path(model: &std::path::Path) -> Result<PathBuf> {
    let text = model.to_string_lossy();
    if text.starts_with("file://") || text.starts_with("pvc://") {
        let path =
            crate::data::resolve_path(&text).map_err(|e| RuntimeError::User(e.to_string()))?;
        return path.ok_or_else(|| RuntimeError::User(format!("--model {text}: not a model")));
    }
    Ok(model.to_path_buf())
}

/// Refuses a model whose weights are not the ones pinned by `want`.
fn check_digest(path: &std::path::Path, want: &str) -> Result<()> {
    let weights = if path.is_dir() {
        path.join(crate::checkpoint::model_dir::WEIGHTS)
    } else {
        path.to_path_buf()
    };
    let got = crate::checkpoint::atomic::sha256_file(&weights)
        .map_err(|e| RuntimeError::User(format!("--model-sha256: {e}")))?;
    if !got.eq_ignore_ascii_case(want) {
        return Err(RuntimeError::User(format!(
            "{}: sha256 {got} is not the pinned {want} (--model-sha256): the model was replaced after it was gated",
            weights.display()
        )));
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_crds::contract;

    #[tokio::test]
    async fn a_dead_engine_ends_the_server_with_an_internal_error() {
        let server = tokio::spawn(std::future::pending::<std::io::Result<()>>());
        let engine = engine::panicked("boom");
        let err = until_server_or_engine_ends(server, engine.thread())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        assert_eq!(err.exit_code(), contract::EXIT_INTERNAL);
    }

    #[tokio::test]
    async fn the_server_ending_first_is_not_an_error() {
        let server = tokio::spawn(async { Ok(()) });
        let engine = engine::idle();
        until_server_or_engine_ends(server, engine.thread())
            .await
            .unwrap();
    }
}
