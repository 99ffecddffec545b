//! Serving a model directory as `anneal-runtime train` writes it (safetensors + config.json +
//! tokenizer_config.json + MANIFEST.json): the same endpoints, batched decoding included.

mod serve_support;

use anneal_runtime::checkpoint::model_dir;
use anneal_runtime::model::{ModelConfig, init_params};
use anneal_runtime::tokenizer::TokenizerSpec;
use candle_core::Device;
use serde_json::json;
use serve_support::{args, chat_body, request, start};
use std::collections::HashMap;

fn tiny_model_dir(root: &std::path::Path) -> std::path::PathBuf {
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
    model_dir::save(&dir, &config, &tensors, &TokenizerSpec::Byte, root).unwrap();
    dir
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
