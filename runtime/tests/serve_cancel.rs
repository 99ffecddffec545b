//! Clients that give up: the engine outlives them. Many clients with short timeouts against a
//! small queue (once, the engine thread died on them and every later request got 503 while
//! the probes said 200), then a normal request is answered.

mod serve_support;

use anneal_runtime::rng::Rng;
use serde_json::json;
use serve_support::{args, await_metric, chat_body, give_up_after, request, smollm2, start};
use std::time::Duration;

#[tokio::test]
async fn clients_giving_up_do_not_kill_the_engine() {
    let mut a = args(smollm2());
    a.max_queue = 8;
    let addr = start(a, None);
    let mut rng = Rng::new(12, 0);
    let mut answered = 0;
    // Several waves: the engine died when, in one iteration, every admitted request had been
    // cancelled and nothing else ran; each wave gives it chances to meet that moment.
    for wave in 0..3 {
        let clients: Vec<_> = (0..40)
            .map(|i| {
                let after = Duration::from_millis(50 + rng.below(201) as u64);
                let body = chat_body(
                    "You are a helpful assistant.",
                    "Write a long story about a dragon.",
                    json!({"max_tokens": 200, "ignore_eos": true, "stream": i % 2 == 0}),
                );
                tokio::spawn(async move {
                    give_up_after(addr, "/v1/chat/completions", &body, after).await
                })
            })
            .collect();
        for c in clients {
            if let Some(r) = c.await.unwrap().unwrap() {
                // A refusal, or on a fast machine a whole answer, can come back first.
                assert!(
                    r.status == 429 || r.status == 200,
                    "wave {wave}: {} {}",
                    r.status,
                    r.body
                );
                answered += 1;
            }
        }
    }
    assert!(
        answered < 120,
        "every client was answered: nothing was cancelled"
    );
    // Every request the engine took ends (cancelled or finished) and gives its place back.
    let started = std::time::Instant::now();
    let left = await_metric(
        addr,
        "anneal_serve_requests_in_engine",
        Duration::from_secs(120),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(left, Some(0.0), "requests still in the engine");
    eprintln!(
        "the engine emptied {:?} after the last wave",
        started.elapsed()
    );
    let body = chat_body(
        "You are a helpful assistant.",
        "What is the capital of France?",
        json!({"max_tokens": 8, "temperature": 0}),
    );
    let r = request(addr, "POST", "/v1/chat/completions", Some(&body), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let health = request(addr, "GET", "/healthz", None, &[]).await.unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
}
