//! `POST /v1/embeddings` (OpenAI's request and response, plus text-embeddings-inference's
//! `truncate`): tokenize and check every input, hand them to the embedding worker, and answer
//! with one vector per input, as floats or base64 of little-endian f32.

use super::AppState;
use super::error::ApiError;
use super::openai;
use crate::embed::batcher::SubmitError;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

/// The `input` field: one text or a list of texts. (OpenAI's token-id arrays are refused with
/// a message: ids of another tokenizer would embed nonsense.)
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Ids(#[allow(dead_code)] Vec<serde::de::IgnoredAny>),
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    input: Input,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    /// Accepted and ignored, as OpenAI's end-user id.
    #[allow(dead_code)]
    user: Option<String>,
    /// Cut inputs longer than the model takes instead of refusing them (TEI's flag).
    #[serde(default)]
    truncate: bool,
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let arrived = Instant::now();
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let req: EmbeddingRequest = openai::parse_one(&body)?;
        let served = state.served()?;
        served.check_model(req.model.as_deref())?;
        let embedder = served.embedder()?;
        let model = &embedder.model;
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::field(
                    "encoding_format",
                    format!("encoding_format must be `float` or `base64`, not `{other}`"),
                ));
            }
        };
        let dims = match req.dimensions {
            None => model.dimensions,
            Some(d) if d >= 1 && d as usize <= model.dimensions => d as usize,
            Some(d) => {
                return Err(ApiError::field(
                    "dimensions",
                    format!(
                        "dimensions must be between 1 and {} (the model's), not {d}",
                        model.dimensions
                    ),
                ));
            }
        };
        let texts = match req.input {
            Input::One(t) => vec![t],
            Input::Many(v) => v,
            Input::Ids(_) => {
                return Err(ApiError::field(
                    "input",
                    "input must be a string or a list of strings (token ids are not accepted)",
                ));
            }
        };
        if texts.is_empty() {
            return Err(ApiError::field("input", "input must not be empty"));
        }
        if texts.len() > embedder.max_inputs {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "input: {} inputs; this server takes at most {} per request",
                    texts.len(),
                    embedder.max_inputs
                ),
            )
            .with_param("input"));
        }
        let mut inputs = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let field = if texts.len() == 1 {
                "input".to_string()
            } else {
                format!("input[{i}]")
            };
            if text.is_empty() {
                return Err(ApiError::field(
                    &field,
                    format!("{field} must not be empty"),
                ));
            }
            let mut ids = model
                .encode(text)
                .map_err(|e| ApiError::field(&field, format!("{field}: {e}")))?;
            if ids.len() > model.max_tokens {
                if !req.truncate {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "{field} is {} tokens; the model takes at most {} (send \"truncate\": true to cut it)",
                            ids.len(),
                            model.max_tokens
                        ),
                    )
                    .with_param(&field));
                }
                // As the tokenizer truncates: the text is cut, the closing token kept.
                let last = ids[ids.len() - 1];
                ids.truncate(model.max_tokens - 1);
                ids.push(last);
            }
            inputs.push(ids);
        }
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        let reply = embedder.worker.submit(inputs).map_err(|e| match e {
            SubmitError::QueueFull => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).retry_after(1)
            }
            SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })?;
        let deadline = tokio::time::Instant::from_std(arrived + state.request_timeout);
        let vectors = tokio::time::timeout_at(deadline, reply)
            .await
            .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the request timed out"))?
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the embedding worker dropped the request",
                )
            })?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let v = crate::embed::shorten(v, dims, model.normalize);
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        state
            .metrics
            .latency
            .observe(arrived.elapsed().as_secs_f64());
        Ok(axum::Json(json!({
            "object": "list",
            "data": data,
            "model": served.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}
