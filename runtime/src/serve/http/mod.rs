//! The HTTP server: OpenAI-compatible routes, probes and metrics. It only turns requests into
//! engine messages and back; the model runs on the engine's thread.

pub mod auth;
mod embeddings;
pub mod error;
mod generate;
pub mod openai;

use super::chat_template::ChatTemplate;
use super::engine::EngineHandle;
use super::metrics::{Metrics, StatusLabel};
use crate::tokenizer::Tokenizer;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use openai::Limits;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The model once it is loaded and its worker runs.
pub struct Served {
    /// The model's name.
    pub model_id: String,
    /// What it does.
    pub backend: Backend,
}

/// A generative model or an embedding model.
pub enum Backend {
    /// Completions and chat.
    Generate(Box<Generator>),
    /// Sentence vectors.
    Embed(Embedder),
}

/// A generative model: its engine, tokenizer and template.
pub struct Generator {
    /// The engine.
    pub engine: EngineHandle,
    /// The tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The chat template.
    pub chat_template: ChatTemplate,
    /// Field limits.
    pub limits: Limits,
}

/// An embedding model and its worker.
pub struct Embedder {
    /// The model (tokenizer and limits; the worker runs it).
    pub model: Arc<crate::embed::EmbeddingModel>,
    /// The worker.
    pub worker: crate::embed::batcher::EmbedHandle,
    /// Most inputs per request.
    pub max_inputs: usize,
}

impl Served {
    /// The generative model, or 400 naming the endpoint to use instead.
    pub fn generator(&self) -> Result<&Generator, ApiError> {
        match &self.backend {
            Backend::Generate(g) => Ok(g),
            Backend::Embed(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{}` is an embedding model: it answers /v1/embeddings only",
                    self.model_id
                ),
            )
            .with_param("model")),
        }
    }

    /// The embedding model, or 400 naming the endpoints to use instead.
    pub fn embedder(&self) -> Result<&Embedder, ApiError> {
        match &self.backend {
            Backend::Embed(e) => Ok(e),
            Backend::Generate(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "`{}` is a generative model: it answers /v1/completions and /v1/chat/completions, not /v1/embeddings",
                    self.model_id
                ),
            )
            .with_param("model")),
        }
    }

    /// The worker thread's supervision (the engine or the embedder).
    pub fn thread(&self) -> &super::worker::Supervised {
        match &self.backend {
            Backend::Generate(g) => g.engine.thread(),
            Backend::Embed(e) => e.worker.thread(),
        }
    }

    /// 404 `model_not_found` when a request names another model than this one.
    pub fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        match asked {
            Some(asked) if asked != self.model_id => {
                Err(ApiError::model_not_found(asked, &self.model_id))
            }
            _ => Ok(()),
        }
    }
}

/// State shared by every handler.
pub struct AppState {
    /// Set once the model is loaded: until then the server is not ready.
    pub served: OnceLock<Served>,
    /// Set on SIGTERM: readiness fails and new generation requests are refused.
    pub draining: AtomicBool,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The API key, when one is required.
    pub api_key: Option<String>,
    /// Longest a generation request may take.
    pub request_timeout: Duration,
    /// Whole answers to deterministic requests, when turned on.
    pub response_cache: Option<crate::serve::response_cache::ResponseCache>,
}

impl AppState {
    /// The served model, or 503 while loading or draining, or once the engine has died.
    pub fn served(&self) -> Result<&Served, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        let served = self.served.get().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading").retry_after(5)
        })?;
        self.engine_alive()?;
        Ok(served)
    }

    /// 503 once the engine thread has died (before the model loads there is none to die).
    fn engine_alive(&self) -> Result<(), ApiError> {
        match self.served.get().and_then(|s| s.thread().stopped()) {
            Some(why) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)),
            None => Ok(()),
        }
    }
}

/// The router over `state`, with bodies limited to `body_limit` bytes.
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .with_state(state)
}

async fn count_status(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .get_or_create(&StatusLabel {
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// Liveness: a server whose engine died can never answer again, so the kubelet restarts it.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.engine_alive() {
        Ok(()) => "ok".into_response(),
        Err(e) => (e.status, e.message).into_response(),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.served() {
        Ok(_) => "ready".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message).into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<_> = state
        .served
        .get()
        .map(|s| json!({"id": s.model_id, "object": "model", "created": 0, "owned_by": "anneal"}))
        .into_iter()
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(cache) = &state.response_cache {
        let usage = cache.usage();
        state
            .metrics
            .response_cache_entries
            .set(usage.entries as i64);
        state.metrics.response_cache_bytes.set(usage.bytes as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::engine;
    use crate::tokenizer::ByteTokenizer;

    fn state(engine: EngineHandle) -> Arc<AppState> {
        let state = AppState {
            served: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics: Default::default(),
            api_key: None,
            request_timeout: Duration::from_secs(1),
            response_cache: None,
        };
        let served = Served {
            model_id: "test".into(),
            backend: Backend::Generate(Box::new(Generator {
                engine,
                tokenizer: Arc::new(ByteTokenizer),
                chat_template: ChatTemplate::new(None, "", "").unwrap(),
                limits: Limits {
                    max_tokens: 8,
                    default_max_tokens: 8,
                    vocab_size: 258,
                    min_priority: 0,
                    max_priority: 0,
                },
            })),
        };
        assert!(state.served.set(served).is_ok());
        Arc::new(state)
    }

    #[tokio::test]
    async fn a_dead_engine_fails_both_probes() {
        let dead = engine::panicked("boom");
        dead.wait_stopped().await;
        let state = state(dead);
        for probe in [
            healthz(State(state.clone())).await,
            readyz(State(state.clone())).await,
        ] {
            assert_eq!(probe.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let err = state.served().err().unwrap();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(err.message.contains("boom"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_live_engine_passes_both_probes() {
        let state = state(engine::idle());
        for probe in [
            healthz(State(state.clone())).await,
            readyz(State(state.clone())).await,
        ] {
            assert_eq!(probe.status(), StatusCode::OK);
        }
    }
}
