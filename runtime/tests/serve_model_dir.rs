//! Serving a model directory as `anneal-runtime train` writes it (safetensors + config.json +
//! tokenizer_config.json + MANIFEST.json): the same endpoints, batched decoding included.

mod serve_support;

use anneal_runtime::checkpoint::model_dir;
use anneal_runtime::model::{ModelConfig, init_params};
use candle_core::Device;
use serde_json::json;
use serve_support::{args, chat_body, request, start};
use std::collections::HashMap;

fn tiny_model_dir(root: &std::path::Path) -> std::path::PathBuf {
    tiny_model_dir_with_digest(root).0
}

/// The directory and its weights' sha256.
fn tiny_model_dir_with_digest(root: &std::path::Path) -> (std::path::PathBuf, String) {
    let config = ModelConfig {
        vocab_size: 258,
        hidden_size: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        intermediate_size: 128,
        max_seq_len: 256,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_embeddings: true,
    };
    let vars = init_params(&config, 7, &Device::Cpu).unwrap();
    let tensors: HashMap<_, _> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let dir = root.join("model");
    let sha = model_dir::save(&dir, &config, &tensors, &model_dir::TextFiles::byte()).unwrap();
    (dir, sha)
}

#[tokio::test]
async fn a_model_pinned_by_digest_is_served_only_with_those_weights_and_max_tokens_is_bounded() {
    let root = std::env::temp_dir().join(format!("anneal-serve-pinned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (dir, sha) = tiny_model_dir_with_digest(&root);
    // Other weights than the gate passed: refused before loading, as a user error (exit 65).
    let mut wrong = args(dir.clone());
    wrong.model_sha256 = Some("0".repeat(64));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = anneal_runtime::serve::serve_on(listener, wrong, None, std::future::pending())
        .await
        .expect_err("a model with another digest must not be served");
    assert_eq!(refused.exit_code(), anneal_crds::contract::EXIT_USER_ERROR);
    assert!(refused.to_string().contains(&sha), "{refused}");
    // The pinned weights, named by a file:// URI as the operator does, with max_tokens 4.
    let mut pinned = args(format!("file://{}", dir.display()).into());
    pinned.model_sha256 = Some(sha.to_uppercase());
    pinned.max_seq_len = 256;
    pinned.max_tokens = Some(4);
    let addr = start(pinned, None);
    let too_long = chat_body("s", "Hi", json!({"max_tokens": 8}));
    let r = request(addr, "POST", "/v1/chat/completions", Some(&too_long), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("max_tokens"), "{}", r.body);
    let fits = chat_body(
        "s",
        "Hi",
        json!({"max_tokens": 4, "ignore_eos": true, "temperature": 0}),
    );
    let r = request(addr, "POST", "/v1/chat/completions", Some(&fits), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn trained_model_directory_is_served() {
    // A fresh directory per run (no tempfile dependency needed for one directory).
    let root = std::env::temp_dir().join(format!("anneal-serve-model-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = tiny_model_dir(&root);
    let mut a = args(dir);
    a.max_seq_len = 256;
    let addr = start(a, None);
    let r = request(addr, "GET", "/v1/models", None, &[]).await.unwrap();
    assert!(
        r.json()["data"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("model@"),
        "{}",
        r.body
    );
    let body = chat_body(
        "s",
        "Hi",
        json!({"temperature": 0, "max_tokens": 8, "ignore_eos": true}),
    );
    let one = request(addr, "POST", "/v1/chat/completions", Some(&body), &[])
        .await
        .unwrap();
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["usage"]["completion_tokens"], 8);
    // Batched with others, the same greedy text.
    let many = futures::future::join_all(
        (0..4).map(|_| request(addr, "POST", "/v1/chat/completions", Some(&body), &[])),
    )
    .await;
    for r in many {
        let r = r.unwrap();
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            one.json()["choices"][0]["message"]["content"]
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The `anneal_serve_*` metric `name` from `/metrics`.
async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn deterministic_answers_come_from_the_response_cache_and_other_model_names_are_404() {
    let root = std::env::temp_dir().join(format!("anneal-serve-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut a = args(tiny_model_dir(&root));
    a.max_seq_len = 256;
    a.served_model_name = Some("arith".into());
    a.response_cache_ttl_secs = 300;
    a.response_cache_max_bytes = 1 << 20;
    let addr = start(a, None);

    // The served name is listed and used; another name is OpenAI's 404 model_not_found.
    let r = request(addr, "GET", "/v1/models", None, &[]).await.unwrap();
    assert_eq!(r.json()["data"][0]["id"], "arith", "{}", r.body);
    let other = chat_body("s", "Hi", json!({"model": "gpt-4", "max_tokens": 4}));
    let r = request(addr, "POST", "/v1/chat/completions", Some(&other), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // A generative model does not embed: 400 naming the endpoints it answers.
    let r = request(
        addr,
        "POST",
        "/v1/embeddings",
        Some(br#"{"input": "hi", "model": "arith"}"#),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("/v1/chat/completions"), "{}", r.body);

    let greedy = chat_body(
        "s",
        "Hi",
        json!({"model": "arith", "temperature": 0, "max_tokens": 6, "ignore_eos": true}),
    );
    let post = |body: Vec<u8>, headers: &'static [(&'static str, &'static str)]| async move {
        request(addr, "POST", "/v1/chat/completions", Some(&body), headers)
            .await
            .unwrap()
    };
    let generated = || metric(addr, "anneal_serve_generated_tokens_total");
    let first = post(greedy.clone(), &[]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-anneal-cache"), Some("miss"));
    let engine_tokens = generated().await;
    let second = post(greedy.clone(), &[]).await;
    assert_eq!(second.header("x-anneal-cache"), Some("hit"));
    let content =
        |r: &serve_support::Response| r.json()["choices"][0]["message"]["content"].clone();
    assert_eq!(content(&second), content(&first));
    assert_eq!(second.json()["usage"], first.json()["usage"]);
    assert_eq!(generated().await, engine_tokens, "a hit ran the engine");

    // Streamed from the cache, it still streams: the same text, then [DONE].
    let mut streamed: serde_json::Value = serde_json::from_slice(&greedy).unwrap();
    streamed["stream"] = json!(true);
    let s = post(serde_json::to_vec(&streamed).unwrap(), &[]).await;
    assert_eq!(s.header("x-anneal-cache"), Some("hit"));
    let data = s.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(json!(text), content(&first));

    // Opting out, or sampling without a seed: the engine answers, nothing is marked.
    let fresh = post(greedy.clone(), &[("Cache-Control", "no-cache")]).await;
    assert_eq!(fresh.header("x-anneal-cache"), None);
    assert_eq!(content(&fresh), content(&first));
    let sampled = chat_body("s", "Hi", json!({"temperature": 1.0, "max_tokens": 4}));
    let r = post(sampled, &[]).await;
    assert_eq!((r.status, r.header("x-anneal-cache")), (200, None));
    assert!(generated().await > engine_tokens);
    assert_eq!(
        metric(addr, "anneal_serve_response_cache_hits_total").await,
        2.0
    );
    assert_eq!(
        metric(addr, "anneal_serve_response_cache_entries").await,
        1.0
    );
    let _ = std::fs::remove_dir_all(&root);
}
