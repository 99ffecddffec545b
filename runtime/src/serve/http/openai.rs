//! OpenAI request bodies, their validation, and response bodies.

use super::error::ApiError;
use crate::serve::chat_template::ChatMessage;
use crate::serve::sampling::SamplingParams;
use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// One string or a list of them (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// A list.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Params {
    /// Model name (any name is accepted: one model is served).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens` in chat requests.
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus mass, (0, 1].
    pub top_p: Option<f64>,
    /// Top-k (0 = off).
    pub top_k: Option<i64>,
    /// Choices per request (only 1).
    pub n: Option<i64>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop sequences.
    pub stop: Option<OneOrMany>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Scheduling priority (higher first), within the server's range.
    pub priority: Option<i32>,
    /// Keep generating past end-of-sequence (as vLLM and llama-server accept; for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `/v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: OneOrMany,
}

/// `/v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
}

/// Whether `role` is a plausible chat role (`system`, `user`, `tool_result`...): a short name,
/// which cannot spell a control token.
pub fn is_role(role: &str) -> bool {
    (1..=32).contains(&role.len())
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses a body into the endpoint's own fields and the shared [`Params`]: malformed JSON is a
/// 400, a well-formed body with a wrong field a 422 naming it. (Two passes rather than
/// `#[serde(flatten)]`, which loses the path of the field at fault.)
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Params), ApiError> {
    let value = json_body(body)?;
    Ok((typed(value.clone())?, typed(value)?))
}

/// Parses a body into one type: malformed JSON is a 400, a wrong field a 422 naming it.
pub fn parse_one<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    typed(json_body(body)?)
}

fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // A missing field is reported at its parent: name the field itself.
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let param = match (path.as_str(), missing) {
            (".", Some(field)) => field.to_string(),
            (".", None) => "body".to_string(),
            (_, Some(field)) => format!("{path}.{field}"),
            (_, None) => path,
        };
        ApiError::field(&param, format!("{param}: {inner}"))
    })
}

/// The server's limits on request fields.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// Vocabulary size (upper bound of `top_k`).
    pub vocab_size: usize,
    /// Lowest `priority` a request may ask for.
    pub min_priority: i32,
    /// Highest `priority` a request may ask for.
    pub max_priority: i32,
}

/// Validated generation settings.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Priority.
    pub priority: i32,
    /// Keep generating past end-of-sequence.
    pub ignore_eos: bool,
}

impl Params {
    /// Checks every field against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<Validated, ApiError> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => limits.default_max_tokens,
            Some(m) if m >= 1 && (m as u64) <= limits.max_tokens as u64 => m as usize,
            Some(m) => {
                return Err(ApiError::field(
                    "max_tokens",
                    format!("max_tokens {m} is not in 1..={}", limits.max_tokens),
                ));
            }
        };
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::field(
                "n",
                format!("n {n} is not supported (only 1)"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::field(
                "temperature",
                format!("temperature {temperature} is not in [0, 2]"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::field(
                "top_p",
                format!("top_p {top_p} is not in (0, 1]"),
            ));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 || top_k as u64 > limits.vocab_size as u64 {
            return Err(ApiError::field(
                "top_k",
                format!("top_k {top_k} is not in 0..={}", limits.vocab_size),
            ));
        }
        // Without one, a request gets the priority nearest 0 that the server allows.
        let priority = self
            .priority
            .unwrap_or(0.clamp(limits.min_priority, limits.max_priority));
        if !(limits.min_priority..=limits.max_priority).contains(&priority) {
            return Err(ApiError::field(
                "priority",
                format!(
                    "priority {priority} is not in {}..={}",
                    limits.min_priority, limits.max_priority
                ),
            ));
        }
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::field("stop", "at most 4 stop sequences"));
        }
        // Without a seed, sampled requests differ run to run, as clients expect.
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Validated {
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: top_k as usize,
                seed,
            },
            max_tokens,
            stop,
            priority,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole (non-streamed) response body.
pub fn full_response(
    ep: Endpoint,
    id: &str,
    model: &str,
    text: &str,
    finish: &str,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Value {
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    match ep {
        Endpoint::Completion => {
            json!({"id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}], "usage": usage})
        }
        Endpoint::Chat => {
            json!({"id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage})
        }
    }
}

/// One streamed chunk.
pub fn chunk(ep: Endpoint, id: &str, model: &str, text: &str, finish: Option<&str>) -> Value {
    match ep {
        Endpoint::Completion => {
            json!({"id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
        }
        Endpoint::Chat => {
            json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}]})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(min_priority: i32, max_priority: i32) -> Limits {
        Limits {
            max_tokens: 16,
            default_max_tokens: 8,
            vocab_size: 100,
            min_priority,
            max_priority,
        }
    }

    fn priority(p: Option<i32>, limits: &Limits) -> Result<i32, ApiError> {
        let params = Params {
            priority: p,
            ..Default::default()
        };
        params.validate(limits).map(|v| v.priority)
    }

    #[test]
    fn priority_stays_in_the_server_range() {
        let l = limits(-10, 10);
        assert_eq!(priority(Some(10), &l).unwrap(), 10);
        assert_eq!(priority(Some(-10), &l).unwrap(), -10);
        for p in [11, i32::MAX, -11, i32::MIN] {
            let e = priority(Some(p), &l).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("priority"));
            assert!(e.message.contains("priority"), "{}", e.message);
        }
    }

    #[test]
    fn no_priority_is_the_allowed_one_nearest_zero() {
        assert_eq!(priority(None, &limits(-10, 10)).unwrap(), 0);
        assert_eq!(priority(None, &limits(2, 5)).unwrap(), 2);
        assert_eq!(priority(None, &limits(-5, -1)).unwrap(), -1);
    }

    #[test]
    fn roles_are_names() {
        for ok in [
            "system",
            "user",
            "assistant",
            "tool",
            "tool_result",
            "ipython",
        ] {
            assert!(is_role(ok), "{ok}");
        }
        for bad in [
            "",
            "user<|im_end|>",
            "user\nsystem",
            "sys tem",
            &"a".repeat(33),
        ] {
            assert!(!is_role(bad), "{bad}");
        }
    }
}
