//! The two generation endpoints: validate, tokenize, hand to the engine, and answer whole or
//! as server-sent events. Dropping the event receiver (client gone, timeout) cancels the work.

use super::AppState;
use super::error::ApiError;
use super::openai::{self, ChatRequest, CompletionRequest, Endpoint, Validated};
use crate::serve::engine::{Event, GenRequest, SubmitError};
use crate::serve::response_cache::{Cached, Key, KeyBuilder};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (req, params): (CompletionRequest, _) = openai::parse(&body)?;
        let served = state.served()?.generator()?;
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
        generate(
            &state,
            Endpoint::Completion,
            ids,
            &params,
            "prompt",
            &headers,
        )
        .await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (req, params): (ChatRequest, _) = openai::parse(&body)?;
        let served = state.served()?.generator()?;
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
        generate(&state, Endpoint::Chat, ids, &params, "messages", &headers).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// Header saying whether the response cache answered (`hit`) or the engine did (`miss`);
/// absent for requests the cache does not take (sampled without a seed, `no-cache`).
pub const CACHE_HEADER: &str = "x-anneal-cache";

/// Whether the request asks not to be answered from (or stored in) a cache.
fn opts_out(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            let d = d.trim();
            d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store")
        })
}

/// The response-cache key of a deterministic request: the model, the endpoint, the prompt's
/// ids, every setting that changes the answer, and the caller's credentials (answers are never
/// shared across API keys).
fn cache_key(model: &str, ep: Endpoint, prompt: &[u32], v: &Validated, headers: &HeaderMap) -> Key {
    let s = &v.sampling;
    // Greedy decoding never draws: its seed (random when not given) changes nothing.
    let seed = if s.temperature == 0.0 { 0 } else { s.seed };
    let settings = format!(
        "{}|{:08x}|{:08x}|{}|{}|{}",
        v.max_tokens,
        s.temperature.to_bits(),
        s.top_p.to_bits(),
        s.top_k,
        seed,
        v.ignore_eos
    );
    let mut key = KeyBuilder::default()
        .field(model.as_bytes())
        .field(&[ep as u8])
        .ids(prompt)
        .field(settings.as_bytes());
    for stop in &v.stop {
        key = key.field(stop.as_bytes());
    }
    let credentials = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    key.field(b"auth").field(credentials).finish()
}

/// Whose request this is, for the prefix cache: a hash of the caller's credentials.
fn owner(headers: &HeaderMap) -> u64 {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let key = KeyBuilder::default().field(credentials).finish();
    u64::from_le_bytes(key[..8].try_into().unwrap_or_default())
}

fn with_cache_header(mut resp: Response, value: &'static str) -> Response {
    resp.headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(value));
    resp
}

/// A cached answer, whole or streamed as the request asks.
fn cached_response(ep: Endpoint, stream: bool, model: &str, hit: &Cached) -> Response {
    let id = request_id(ep);
    let resp = if stream {
        let events = [
            openai::chunk(ep, &id, model, &hit.text, None).to_string(),
            openai::chunk(ep, &id, model, "", Some(&hit.finish_reason)).to_string(),
            "[DONE]".to_string(),
        ]
        .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
        Sse::new(futures::stream::iter(events)).into_response()
    } else {
        axum::Json(openai::full_response(
            ep,
            &id,
            model,
            &hit.text,
            &hit.finish_reason,
            hit.prompt_tokens,
            hit.completion_tokens,
        ))
        .into_response()
    };
    with_cache_header(resp, "hit")
}

async fn generate(
    state: &Arc<AppState>,
    ep: Endpoint,
    prompt: Vec<u32>,
    params: &openai::Params,
    prompt_field: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    served.check_model(params.model.as_deref())?;
    let model_id = &served.model_id;
    let served = served.generator()?;
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
    let deterministic = v.sampling.temperature == 0.0 || params.seed.is_some();
    let cache_key = (state.response_cache.is_some() && deterministic && !opts_out(headers))
        .then(|| cache_key(model_id, ep, &prompt, &v, headers));
    if let (Some(cache), Some(key)) = (&state.response_cache, &cache_key) {
        if let Some(hit) = cache.get(key, Instant::now()) {
            state.metrics.response_cache_hits.inc();
            return Ok(cached_response(ep, params.stream, model_id, &hit));
        }
        state.metrics.response_cache_misses.inc();
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
        cache_owner: owner(headers),
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
        let reply = Reply {
            ep,
            id,
            model: model_id.clone(),
            deadline,
            arrived,
            cache_key,
        };
        let resp = stream(state.clone(), rx, reply);
        return Ok(match cache_key {
            Some(_) => with_cache_header(resp, "miss"),
            None => resp,
        });
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
                    model_id,
                    &text,
                    reason.as_str(),
                    prompt_tokens,
                    completion_tokens,
                );
                let resp = axum::Json(body).into_response();
                let Some(key) = cache_key else {
                    return Ok(resp);
                };
                remember(
                    state,
                    key,
                    Cached {
                        text,
                        finish_reason: reason.as_str().to_string(),
                        prompt_tokens,
                        completion_tokens,
                    },
                );
                return Ok(with_cache_header(resp, "miss"));
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

/// Stores a whole answer in the response cache.
fn remember(state: &AppState, key: Key, answer: Cached) {
    if let Some(cache) = &state.response_cache {
        cache.put(key, answer, Instant::now());
    }
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    /// The text so far, kept when the answer goes into the response cache.
    text: Option<String>,
    /// The last data event is out; `[DONE]` follows.
    finished: bool,
    done: bool,
}

/// What a streamed answer is: its endpoint, id and model, when it must end, when it arrived,
/// and where it goes in the response cache.
struct Reply {
    ep: Endpoint,
    id: String,
    model: String,
    deadline: tokio::time::Instant,
    arrived: Instant,
    cache_key: Option<Key>,
}

fn stream(state: Arc<AppState>, rx: UnboundedReceiver<Event>, reply: Reply) -> Response {
    let Reply {
        ep,
        id,
        model,
        deadline,
        arrived,
        cache_key,
    } = reply;
    let events = futures::stream::unfold(
        StreamState {
            rx,
            text: cache_key.map(|_| String::new()),
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
                        if let Some(text) = &mut s.text {
                            text.push_str(&d);
                        }
                        openai::chunk(ep, &id, &model, &d, None).to_string()
                    }
                    Ok(Some(Event::Done {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    })) => {
                        state
                            .metrics
                            .latency
                            .observe(arrived.elapsed().as_secs_f64());
                        s.finished = true;
                        if let (Some(key), Some(text)) = (cache_key, s.text.take()) {
                            let answer = Cached {
                                text,
                                finish_reason: reason.as_str().to_string(),
                                prompt_tokens,
                                completion_tokens,
                            };
                            remember(&state, key, answer);
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::sampling::SamplingParams;

    #[test]
    fn answers_are_never_shared_across_api_keys_or_settings() {
        let v = Validated {
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: 8,
            stop: vec![],
            priority: 0,
            ignore_eos: false,
        };
        let with_key = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(key).unwrap());
            h
        };
        let k = |v: &Validated, h: &HeaderMap| cache_key("m", Endpoint::Chat, &[1, 2, 3], v, h);
        let none = HeaderMap::new();
        assert_eq!(k(&v, &none), k(&v, &none));
        assert_ne!(k(&v, &with_key("Bearer a")), k(&v, &with_key("Bearer b")));
        assert_ne!(
            k(&v, &none),
            k(
                &Validated {
                    max_tokens: 9,
                    ..v.clone()
                },
                &none
            )
        );
        assert_ne!(
            k(&v, &none),
            cache_key("m", Endpoint::Completion, &[1, 2, 3], &v, &none)
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert!(opts_out(&h));
        assert!(!opts_out(&none));
    }
}
