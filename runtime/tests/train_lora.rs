//! LoRA on a tiny model: the adapters train, the base weights do not move (bit for bit, outside
//! the adapted ones), the output is the merged model that `eval` loads, with the adapters
//! beside it in PEFT's format, and a SIGKILLed run resumes to the same bits.

mod train_support;

use std::collections::HashMap;
use train_support::{Scratch, assert_ok, events, run, tiny_config, train_until_killed};

fn weights(dir: &std::path::Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn lora_config(base: &std::path::Path, output: &std::path::Path, ckpt: &std::path::Path) -> String {
    format!(
        r#"model:
  base: {}
dataset:
  uri: builtin:arith
stage: sft
lora:
  rank: 4
  alpha: 8
  targets: [q, v, down]
hyperparameters:
  steps: 40
  batchSize: 16
  learningRate: 0.01
  warmupSteps: 2
  threads: 2
  logEvery: 1
checkpoint:
  dir: {}
  everySteps: 10
output:
  path: {}
"#,
        base.display(),
        ckpt.display(),
        output.display()
    )
}

#[test]
fn lora_trains_adapters_only_and_resumes_exactly() {
    let s = Scratch::new("lora");
    let base = s.path("base");
    let cfg = s.write("base.yaml", &tiny_config(&base, 100, "", ""));
    assert_ok(&run(&["train", "--config", cfg.to_str().unwrap()], &[]));

    let a = s.write(
        "a.yaml",
        &lora_config(&base, &s.path("a-model"), &s.path("a-ckpt")),
    );
    let out = run(&["train", "--config", a.to_str().unwrap()], &[]);
    assert_ok(&out);
    let steps = events(&out, "step");
    let (first, last) = (
        steps[0]["loss"].as_f64().unwrap(),
        steps[steps.len() - 1]["loss"].as_f64().unwrap(),
    );
    assert!(last < first * 0.9, "loss {first} -> {last}");

    let (before, after) = (weights(&base), weights(&s.path("a-model")));
    let adapted = |n: &str| {
        ["attn_q.weight", "attn_v.weight", "ffn_down.weight"]
            .iter()
            .any(|t| n.ends_with(t))
    };
    for (name, w) in &before {
        if adapted(name) {
            assert_ne!(w, &after[name], "{name} was adapted");
        } else {
            assert_eq!(w, &after[name], "{name} is not adapted and must not move");
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("a-model/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );
    let adapters = candle_core::safetensors::load(
        s.path("a-model/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a0 = &adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a0.dims(), &[4, 32]);
    // The merged model evaluates like any model directory (the manifest covers the adapters).
    let model_a = s.path("a-model");
    assert_ok(&run(
        &[
            "eval",
            "--model",
            model_a.to_str().unwrap(),
            "--data",
            "builtin:arith",
            "--max-examples",
            "8",
        ],
        &[],
    ));

    let b = s.write(
        "b.yaml",
        &lora_config(&base, &s.path("b-model"), &s.path("b-ckpt")),
    );
    train_until_killed(&b, "1", |v| v["event"] == "checkpoint" && v["step"] == 20);
    let out = run(
        &["train", "--config", b.to_str().unwrap()],
        &[("ANNEAL_ATTEMPT", "2")],
    );
    assert_ok(&out);
    assert!(events(&out, "resumed")[0]["step"].as_u64().unwrap() >= 20);
    assert_eq!(
        std::fs::read(s.path("a-model/model.safetensors")).unwrap(),
        std::fs::read(s.path("b-model/model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(s.path("a-model/adapter_model.safetensors")).unwrap(),
        std::fs::read(s.path("b-model/adapter_model.safetensors")).unwrap()
    );
}
