//! The HTTP server: OpenAI-compatible routes, probes and metrics. It only turns requests into
//! engine messages and back; the model runs on the engine's thread.

pub mod auth;
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

/// The model once it is loaded and its engine runs.
pub struct Served {
    /// The engine.
    pub engine: EngineHandle,
    /// The tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The chat template.
    pub chat_template: ChatTemplate,
    /// The model's name.
    pub model_id: String,
    /// Field limits.
    pub limits: Limits,
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
}

impl AppState {
    /// The served model, or 503 while loading or draining.
    pub fn served(&self) -> Result<&Served, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        self.served.get().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading").retry_after(5)
        })
    }
}

/// The router over `state`, with bodies limited to `body_limit` bytes.
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
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
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
