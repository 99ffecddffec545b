//! `/v1/embeddings` with all-MiniLM-L6-v2 (from the PyPI package, as the model a user would
//! serve): vectors equal sentence-transformers' (PyTorch) within cosine 0.9999, batched or not;
//! the OpenAI fields work or are refused naming the field; a generative server refuses it.

mod serve_support;

use base64::Engine as _;
use serde_json::{Value, json};
use serve_support::{args, minilm, request, start};
use std::net::SocketAddr;

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm-reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

async fn embed(addr: SocketAddr, body: Value) -> (u16, Value) {
    let r = request(
        addr,
        "POST",
        "/v1/embeddings",
        Some(body.to_string().as_bytes()),
        &[],
    )
    .await
    .unwrap();
    (r.status, r.json())
}

fn vectors(resp: &Value) -> Vec<Vec<f32>> {
    resp["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn minilm_vectors_match_sentence_transformers_batched_or_alone() {
    let dir = minilm();
    let mut a = args(dir.clone());
    // A small token budget, so the list below runs as several batches of different widths.
    a.max_batch_tokens = 256;
    let addr = start(a, None);
    let want = reference();

    let models = request(addr, "GET", "/v1/models", None, &[]).await.unwrap();
    assert_eq!(models.json()["data"][0]["id"], "all-MiniLM-L6-v2");

    // The whole list in one request; the long last sentence is cut as sentence-transformers
    // cuts it (256 tokens).
    let (status, resp) = embed(
        addr,
        json!({"model": "all-MiniLM-L6-v2", "input": want.sentences, "truncate": true}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let got = vectors(&resp);
    assert_eq!(got.len(), want.vectors.len());
    let mut worst = 1.0f64;
    for (i, (g, w)) in got.iter().zip(&want.vectors).enumerate() {
        assert_eq!(g.len(), 384);
        let c = cosine(g, w);
        assert!(
            c >= 0.9999,
            "sentence {i} ({:?}): cosine {c}",
            want.sentences[i]
        );
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "sentence {i}: norm {norm}");
        worst = worst.min(c);
    }
    eprintln!("worst cosine to sentence-transformers: {worst:.9}");
    let tokens = resp["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 256 + 12 * 3, "usage counts every token: {tokens}");
    assert_eq!(resp["usage"]["total_tokens"], tokens);

    // One at a time (no padding at all): the same vectors.
    for (i, s) in want.sentences.iter().enumerate().take(4) {
        let (status, one) = embed(addr, json!({"input": s})).await;
        assert_eq!(status, 200, "{one}");
        let c = cosine(&vectors(&one)[0], &got[i]);
        assert!(c >= 0.99999, "sentence {i} alone vs in a batch: cosine {c}");
    }

    // base64 is the same floats, little-endian; dimensions cuts and normalises again.
    let (_, alone) = embed(addr, json!({"input": want.sentences[0]})).await;
    let (_, b64) = embed(
        addr,
        json!({"input": want.sentences[0], "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, vectors(&alone)[0]);
    let (_, short) = embed(addr, json!({"input": want.sentences[0], "dimensions": 64})).await;
    let short = &vectors(&short)[0];
    assert_eq!(short.len(), 64);
    let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    assert!(cosine(short, &got[0][..64]) > 0.99999);

    // Similar sentences are nearer than unrelated ones (the vectors mean something).
    assert!(cosine(&got[0], &got[1]) > cosine(&got[0], &got[4]) + 0.2);

    let metrics = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
    assert!(
        metrics.body.contains("anneal_serve_embedded_inputs_total"),
        "{}",
        metrics.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_embedding_requests_are_refused_naming_the_field() {
    let mut a = args(minilm());
    a.max_client_batch_size = 4;
    a.served_model_name = Some("minilm".into());
    let addr = start(a, None);
    let long = "word ".repeat(400);
    let cases = [
        (json!({"input": []}), 422, "input"),
        (json!({"input": ["a", ""]}), 422, "input[1]"),
        (json!({"input": ["a", "b", "c", "d", "e"]}), 413, "input"),
        (json!({"input": long}), 413, "input"),
        (json!({"input": [1, 2, 3]}), 422, "input"),
        (json!({"input": "a", "dimensions": 0}), 422, "dimensions"),
        (json!({"input": "a", "dimensions": 385}), 422, "dimensions"),
        (
            json!({"input": "a", "encoding_format": "int8"}),
            422,
            "encoding_format",
        ),
        (json!({"input": "a", "model": "gpt-4"}), 404, "model"),
        (json!({"model": "minilm"}), 422, "input"),
    ];
    for (body, status, param) in cases {
        let (got, resp) = embed(addr, body.clone()).await;
        assert_eq!(got, status, "{body} -> {resp}");
        assert_eq!(resp["error"]["param"], param, "{body} -> {resp}");
    }
    // An embedding model does not generate.
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(br#"{"messages":[{"role":"user","content":"hi"}]}"#),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("embedding model"), "{}", r.body);
    // The server still answers after all of that.
    let (got, _) = embed(addr, json!({"input": "still here", "model": "minilm"})).await;
    assert_eq!(got, 200);
}
