//! The two generation endpoints: validate, tokenize, hand to the engine, and answer whole or
//! as server-sent events. Dropping the event receiver (client gone, timeout) cancels the work.

use super::AppState;
use super::error::ApiError;
use super::openai::{self, ChatRequest, CompletionRequest, Endpoint, Validated};
use crate::serve::engine::{Event, GenRequest, SubmitError};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (req, params): (CompletionRequest, _) = openai::parse(&body)?;
        let served = state.served()?;
        let prompt = match req.prompt {
            openai::OneOrMany::One(p) => p,
            openai::OneOrMany::Many(mut v) if v.len() == 1 => v.remove(0),
            openai::OneOrMany::Many(_) => {
                return Err(ApiError::field("prompt", "exactly one prompt is supported"));
            }
        };
        let mut ids: Vec<u32> = served.tokenizer.bos_id().into_iter().collect();
        ids.extend(
            served
                .tokenizer
                .encode(&prompt)
                .map_err(|e| ApiError::field("prompt", e.to_string()))?,
        );
        generate(&state, Endpoint::Completion, ids, &params, "prompt").await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (req, params): (ChatRequest, _) = openai::parse(&body)?;
        let served = state.served()?;
        if req.messages.is_empty() {
            return Err(ApiError::field("messages", "messages must not be empty"));
        }
        // A role goes into the template's markup, where control tokens are recognised.
        if let Some(i) = req.messages.iter().position(|m| !openai::is_role(&m.role)) {
            let field = format!("messages[{i}].role");
            return Err(ApiError::field(
                &field,
                format!("{field} must be a name of letters, digits, '_' or '-'"),
            ));
        }
        let ids = served
            .chat_template
            .render(&req.messages)
            .map_err(|e| ApiError::field("messages", e.to_string()))?
            .encode(served.tokenizer.as_ref())
            .map_err(|e| ApiError::field("messages", e.to_string()))?;
        generate(&state, Endpoint::Chat, ids, &params, "messages").await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    state: &Arc<AppState>,
    ep: Endpoint,
    prompt: Vec<u32>,
    params: &openai::Params,
    prompt_field: &str,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    let v: Validated = params.validate(&served.limits)?;
    let context = served.engine.max_seq_len;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{prompt_field}: the prompt is {} tokens; the context holds {context}",
                prompt.len()
            ),
        )
        .with_param(prompt_field));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let arrived = Instant::now();
    let gen_req = GenRequest {
        prompt,
        sampling: v.sampling,
        max_tokens: v.max_tokens,
        stop: v.stop,
        priority: v.priority,
        ignore_eos: v.ignore_eos,
        events: tx,
        arrived,
    };
    served.engine.submit(gen_req).map_err(|e| match e {
        SubmitError::QueueFull => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).retry_after(1)
        }
        SubmitError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    })?;
    let id = request_id(ep);
    let deadline = tokio::time::Instant::from_std(arrived + state.request_timeout);
    if params.stream {
        return Ok(stream(
            state.clone(),
            ep,
            id,
            served.model_id.clone(),
            rx,
            deadline,
            arrived,
        ));
    }
    let mut rx = rx;
    let mut text = String::new();
    loop {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the request timed out"))?;
        match event {
            Some(Event::Delta(d)) => text.push_str(&d),
            Some(Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                state
                    .metrics
                    .latency
                    .observe(arrived.elapsed().as_secs_f64());
                let body = openai::full_response(
                    ep,
                    &id,
                    &served.model_id,
                    &text,
                    reason.as_str(),
                    prompt_tokens,
                    completion_tokens,
                );
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Error(e)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine dropped the request",
                ));
            }
        }
    }
}

fn request_id(ep: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = if ep == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    format!(
        "{prefix}-{}-{}",
        openai::now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    /// The last data event is out; `[DONE]` follows.
    finished: bool,
    done: bool,
}

fn stream(
    state: Arc<AppState>,
    ep: Endpoint,
    id: String,
    model: String,
    rx: UnboundedReceiver<Event>,
    deadline: tokio::time::Instant,
    arrived: Instant,
) -> Response {
    let events = futures::stream::unfold(
        StreamState {
            rx,
            finished: false,
            done: false,
        },
        move |mut s| {
            let (id, model, state) = (id.clone(), model.clone(), state.clone());
            async move {
                if s.done {
                    return None;
                }
                if s.finished {
                    s.done = true;
                    return Some((Ok(SseEvent::default().data("[DONE]")), s));
                }
                let data = match tokio::time::timeout_at(deadline, s.rx.recv()).await {
                    Ok(Some(Event::Delta(d))) => {
                        openai::chunk(ep, &id, &model, &d, None).to_string()
                    }
                    Ok(Some(Event::Done { reason, .. })) => {
                        state
                            .metrics
                            .latency
                            .observe(arrived.elapsed().as_secs_f64());
                        s.finished = true;
                        openai::chunk(ep, &id, &model, "", Some(reason.as_str())).to_string()
                    }
                    Ok(Some(Event::Error(e))) => {
                        s.finished = true;
                        serde_json::json!({"error": {"message": e, "type": "server_error"}})
                            .to_string()
                    }
                    Ok(None) => return None,
                    Err(_) => {
                        s.finished = true;
                        serde_json::json!({"error": {"message": "the request timed out", "type": "server_error"}})
                        .to_string()
                    }
                };
                Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s))
            }
        },
    );
    Sse::new(events).into_response()
}
