//! Clients that give up: the engine outlives them. Many clients with short timeouts against a
//! small queue (once, the engine thread died on them and every later request got 503 while
//! the probes said 200), then a normal request is answered. And a random mix (fixed seed) of
//! cancelled, timed-out, refused and normal requests: every request that was not given up
//! gets a whole answer or error, and when the load stops nothing is left in the engine and
//! every KV cache is back in the pool.

mod serve_support;

use anneal_runtime::rng::Rng;
use serde_json::json;
use serve_support::{
    args, await_metric, chat_body, give_up_after, metric, request, smollm2, start,
};
use std::net::SocketAddr;
use std::time::Duration;

/// Waits until no request holds a place in the engine (each ended: answered, failed or
/// cancelled), for at most two minutes.
async fn assert_engine_empties(addr: SocketAddr, when: &str) {
    let name = "anneal_serve_requests_in_engine";
    let left = await_metric(addr, name, Duration::from_secs(120), |v| v == 0.0).await;
    assert_eq!(left, Some(0.0), "requests left in the engine {when}");
}

/// A normal request is answered and the liveness probe passes.
async fn assert_still_serving(addr: SocketAddr) {
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
    assert_engine_empties(addr, "after the last wave").await;
    eprintln!(
        "the engine emptied {:?} after the last wave",
        started.elapsed()
    );
    assert_still_serving(addr).await;
}

/// How one request of the random load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Answered,
    TimedOut,
    Refused,
    GaveUp,
}

/// What a request that was not given up must have got: an answer, a timeout or a refusal,
/// each complete. Anything else (a 500, a 503, a stream cut short) fails the test.
fn judge(r: &serve_support::Response, stream: bool) -> Outcome {
    match r.status {
        429 => Outcome::Refused,
        504 => Outcome::TimedOut,
        200 if stream => {
            let data = r.sse_data();
            assert_eq!(
                data.last().map(String::as_str),
                Some("[DONE]"),
                "{}",
                r.body
            );
            let last: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
            if last["choices"][0]["finish_reason"].is_string() {
                Outcome::Answered
            } else {
                assert_eq!(
                    last["error"]["message"], "the request timed out",
                    "{}",
                    r.body
                );
                Outcome::TimedOut
            }
        }
        200 => {
            assert!(
                r.json()["choices"][0]["finish_reason"].is_string(),
                "{}",
                r.body
            );
            Outcome::Answered
        }
        s => panic!("status {s}: {}", r.body),
    }
}

#[tokio::test]
async fn random_load_leaves_the_engine_alive_and_the_kv_pool_full() {
    let mut a = args(smollm2());
    a.max_batch = 4;
    a.max_queue = 4;
    // Long enough to answer a short request while long ones run, too short for a long one.
    a.request_timeout_secs = 2;
    let addr = start(a, None);
    let mut rng = Rng::new(6, 0);
    let mut outcomes = std::collections::HashMap::<Outcome, usize>::new();
    for round in 0..12 {
        let n = 4 + rng.below(13);
        let requests: Vec<_> = (0..n)
            .map(|_| {
                let stream = rng.below(2) == 0;
                let kind = rng.below(3);
                let give_up = Duration::from_millis(rng.below(300) as u64);
                let seed = rng.next_u64();
                let body = match kind {
                    // Short: answered, unless refused or stuck behind long ones.
                    0 => json!({"max_tokens": 1 + rng.below(16), "seed": seed}),
                    // Long: the whole context, which takes more than 2 s on a CPU: timed out.
                    _ => json!({"max_tokens": 480, "ignore_eos": true, "seed": seed}),
                };
                let mut body = body;
                body["stream"] = json!(stream);
                let body = chat_body("You are a helpful assistant.", "Tell me a story.", body);
                tokio::spawn(async move {
                    if kind == 2 {
                        let r = give_up_after(addr, "/v1/chat/completions", &body, give_up);
                        match r.await.unwrap() {
                            Some(r) => judge(&r, stream),
                            None => Outcome::GaveUp,
                        }
                    } else {
                        let r = request(addr, "POST", "/v1/chat/completions", Some(&body), &[]);
                        let r = tokio::time::timeout(Duration::from_secs(60), r).await;
                        judge(&r.expect("no answer in 60 s").unwrap(), stream)
                    }
                })
            })
            .collect();
        for r in requests {
            let outcome = r.await.unwrap_or_else(|e| panic!("round {round}: {e}"));
            *outcomes.entry(outcome).or_default() += 1;
        }
        // A round's requests have all ended for their clients; the engine lets go of them at
        // its next step (a step can outlast a timeout). Each round starts from an idle
        // engine, or the later rounds would all be refused while it finishes a long step.
        assert_engine_empties(addr, &format!("after round {round}")).await;
    }
    eprintln!("outcomes: {outcomes:?}");
    for kind in [
        Outcome::Answered,
        Outcome::TimedOut,
        Outcome::Refused,
        Outcome::GaveUp,
    ] {
        assert!(outcomes.contains_key(&kind), "no {kind:?} in {outcomes:?}");
    }
    // The load has stopped: nothing waits and every KV cache is back in the pool.
    // (The engine publishes these at the end of its step, just after the places go back.)
    for name in ["anneal_serve_queue_depth", "anneal_serve_kv_caches_in_use"] {
        let v = await_metric(addr, name, Duration::from_secs(10), |v| v == 0.0).await;
        assert_eq!(v, Some(0.0), "{name}");
    }
    let free = metric(addr, "anneal_serve_kv_caches_free").await.unwrap();
    assert!(free >= 1.0, "{free} free KV caches");
    assert_still_serving(addr).await;
}
