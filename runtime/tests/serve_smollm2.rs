//! SmolLM2-135M-Instruct (Q4_1 GGUF) served over HTTP: the right answer, greedy determinism,
//! streaming, and batched decoding giving the same text as decoding alone.

mod serve_support;

use serde_json::json;
use serve_support::{args, chat_body, request, smollm2, start};
use std::net::SocketAddr;
use std::sync::OnceLock;

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start(args(smollm2()), None))
}

async fn chat(addr: SocketAddr, user: &str, extra: serde_json::Value) -> serde_json::Value {
    let body = chat_body("You are a helpful assistant.", user, extra);
    let r = request(addr, "POST", "/v1/chat/completions", Some(&body), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn content(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn capital_of_france_is_paris_and_greedy_is_repeatable() {
    let addr = server();
    let a = chat(
        addr,
        "What is the capital of France?",
        json!({"temperature": 0, "max_tokens": 24}),
    )
    .await;
    let text = content(&a);
    assert!(text.contains("Paris"), "answer: {text}");
    assert!(a["choices"][0]["finish_reason"].is_string());
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let b = chat(
        addr,
        "What is the capital of France?",
        json!({"temperature": 0, "max_tokens": 24}),
    )
    .await;
    assert_eq!(text, content(&b));
}

#[tokio::test]
async fn streaming_gives_the_same_text() {
    let addr = server();
    let extra = json!({"temperature": 0, "max_tokens": 24});
    let whole = content(&chat(addr, "What is the capital of France?", extra.clone()).await);
    let mut extra = extra;
    extra["stream"] = json!(true);
    let body = chat_body(
        "You are a helpful assistant.",
        "What is the capital of France?",
        extra,
    );
    let r = request(addr, "POST", "/v1/chat/completions", Some(&body), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, whole);
}

#[tokio::test]
async fn concurrent_requests_decode_as_they_would_alone() {
    let addr = server();
    let questions = [
        "What is the capital of France?",
        "Name a color.",
        "What is 2+2?",
        "Say hello.",
    ];
    let extra = json!({"temperature": 0, "max_tokens": 16});
    let mut alone = Vec::new();
    for q in questions {
        alone.push(content(&chat(addr, q, extra.clone()).await));
    }
    let together =
        futures::future::join_all(questions.iter().map(|q| chat(addr, q, extra.clone()))).await;
    let together: Vec<String> = together.iter().map(content).collect();
    assert_eq!(alone, together);
}

#[tokio::test]
async fn completions_and_models() {
    let addr = server();
    let body = serde_json::to_vec(
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .unwrap();
    let r = request(addr, "POST", "/v1/completions", Some(&body), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{}",
        r.body
    );
    let r = request(addr, "GET", "/v1/models", None, &[]).await.unwrap();
    assert_eq!(r.json()["data"][0]["object"], "model");
    let r = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
    for m in [
        "anneal_serve_requests_total",
        "anneal_serve_time_to_first_token_seconds",
        "anneal_serve_kv_cache_bytes",
    ] {
        assert!(r.body.contains(m), "{m} missing from {}", r.body);
    }
}

#[tokio::test]
async fn stop_sequences_and_seeded_sampling() {
    let addr = server();
    let a = chat(
        addr,
        "Count from 1 to 10.",
        json!({"temperature": 0, "max_tokens": 40, "stop": ["5"]}),
    )
    .await;
    let text = content(&a);
    assert!(!text.contains('5') && !text.contains('6'), "{text}");
    assert_eq!(a["choices"][0]["finish_reason"], "stop");
    let extra =
        json!({"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 42, "max_tokens": 16});
    let x = content(&chat(addr, "Tell me a story.", extra.clone()).await);
    let y = content(&chat(addr, "Tell me a story.", extra).await);
    assert_eq!(x, y);
}
