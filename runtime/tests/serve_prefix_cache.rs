//! The prefix cache with SmolLM2 (Q4_1, the CPU kernels): a prompt that starts like a finished
//! request's computes only the rest, and the answers are the same as computing every prompt
//! whole, for a shared system prompt, a multi-turn chat, a prefix overwritten by another
//! request, and callers with different credentials (which never share).

mod serve_support;

use serde_json::{Value, json};
use serve_support::{args, request, smollm2, start};
use std::net::SocketAddr;

/// The counter `name` from `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// 16 greedy tokens of the conversation `messages`, from `addr` as the caller `auth`.
async fn answer(addr: SocketAddr, messages: &Value, auth: &str) -> String {
    let body =
        json!({"messages": messages, "temperature": 0, "max_tokens": 16, "ignore_eos": true});
    let body = serde_json::to_vec(&body).unwrap();
    let headers = [("Authorization", auth)];
    let r = request(addr, "POST", "/v1/chat/completions", Some(&body), &headers)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn chat(system: &str, turns: &[&str]) -> Value {
    let mut messages = vec![json!({"role": "system", "content": system})];
    for (i, t) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": t}));
    }
    Value::Array(messages)
}

#[tokio::test]
async fn reused_prefixes_give_the_answers_of_whole_prompts_and_only_for_the_same_caller() {
    let model = smollm2();
    let mut cached = args(model.clone());
    cached.max_batch = 1;
    let mut whole = args(model);
    whole.prefix_cache = false;
    let (a, b) = (start(cached, None), start(whole, None));
    let reused = || metric(a, "anneal_serve_prefix_cache_tokens_total");
    let system = "You are a careful assistant for a hardware store. ".repeat(12);
    let other = "You translate English into French, word by word, without comment.";

    // A shared system prompt: the second question reuses it.
    let first = chat(&system, &["Which glue holds wood to metal?"]);
    assert_eq!(
        answer(a, &first, "Bearer k1").await,
        answer(b, &first, "Bearer k1").await
    );
    assert_eq!(reused().await, 0.0);
    let second = chat(&system, &["How long does epoxy take to cure?"]);
    assert_eq!(
        answer(a, &second, "Bearer k1").await,
        answer(b, &second, "Bearer k1").await
    );
    let shared = reused().await;
    assert!(
        shared > 100.0,
        "the system prompt was not reused: {shared} tokens"
    );

    // The next turn of that chat resends its history, the answer included: more is reused.
    let reply = answer(b, &second, "Bearer k1").await;
    let third = chat(
        &system,
        &[
            "How long does epoxy take to cure?",
            &reply,
            "And at 5 degrees?",
        ],
    );
    assert_eq!(
        answer(a, &third, "Bearer k1").await,
        answer(b, &third, "Bearer k1").await
    );
    let turn = reused().await - shared;
    assert!(
        turn > shared,
        "the history was not reused: {turn} tokens after {shared}"
    );
    eprintln!("reused: {shared} tokens of the system prompt, then {turn} of the chat history");

    // Another caller never gets this caller's prefix.
    let before = reused().await;
    assert_eq!(
        answer(a, &third, "Bearer k2").await,
        answer(b, &third, "Bearer k2").await
    );
    assert_eq!(reused().await, before);

    // One cache (max_batch 1): an unrelated request overwrites the prefix, which is then
    // computed again, with the same answer.
    let unrelated = chat(other, &["The red house is small."]);
    assert_eq!(
        answer(a, &unrelated, "Bearer k1").await,
        answer(b, &unrelated, "Bearer k1").await
    );
    let before = reused().await;
    assert_eq!(
        answer(a, &first, "Bearer k1").await,
        answer(b, &first, "Bearer k1").await
    );
    let again = reused().await - before;
    assert!(
        again < 10.0,
        "an overwritten prefix was reused: {again} tokens"
    );
    assert_eq!(
        metric(b, "anneal_serve_prefix_cache_tokens_total").await,
        0.0
    );
}
