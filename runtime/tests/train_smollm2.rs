//! Post-training a real pretrained model on the CPU, the stages of
//! `manifests/examples/pipeline-smollm2.yaml` with the same settings: SmolLM2-135M-Instruct (its
//! Q4_1 GGUF dequantized is the starting point) answers `builtin:instruct`'s arithmetic
//! instructions in sentences, so its held-out exact match is 0; 16 steps of full sft teach it to
//! answer with the number only; 8 steps of DPO with LoRA adapters on q and v, from the sft
//! model (its reference), make it prefer the bare number to a sentence on held-out pairs, without
//! losing exact match against the sft model (the gate's noRegression). The fine-tuned models
//! keep SmolLM2's tokenizer and chat template.

#[path = "serve_support/mod.rs"]
mod serve_support;
mod train_support;

use train_support::{Scratch, assert_ok, events, run};

fn eval(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", "--max-new-tokens", "8"];
    all.extend(args);
    let out = run(&all, &[]);
    assert_ok(&out);
    events(&out, "eval")[0].clone()
}

#[test]
fn smollm2_sft_then_dpo_with_lora_learns_the_format_and_the_preference() {
    let gguf = serve_support::smollm2();
    let gguf = gguf.to_str().unwrap();
    let s = Scratch::new("smollm2");
    let base = eval(&["--model", gguf, "--data", "builtin:instruct"]);
    let base_em = base["exact_match"].as_f64().unwrap();

    let sft = s.path("sft");
    let cfg = s.write(
        "sft.yaml",
        &format!(
            r#"model:
  base: {gguf}
dataset:
  uri: builtin:instruct
stage: sft
hyperparameters:
  steps: 16
  batchSize: 8
  learningRate: 0.0001
  warmupSteps: 1
  weightDecay: 0.0
  threads: 2
  logEvery: 4
checkpoint:
  everySteps: 0
output:
  path: {}
"#,
            sft.display()
        ),
    );
    let out = run(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert_ok(&out);
    assert_eq!(events(&out, "base")[0]["kind"], "GGUF (dequantized to f32)");
    // The tokenizer and the chat template are SmolLM2's.
    let template = std::fs::read_to_string(sft.join("chat_template.jinja")).unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
    let tuned = eval(&[
        "--model",
        sft.to_str().unwrap(),
        "--data",
        "builtin:instruct",
    ]);
    let sft_em = tuned["exact_match"].as_f64().unwrap();
    eprintln!(
        "held-out exact match on builtin:instruct: base {base_em:.3}, after 16 sft steps {sft_em:.3} ({} examples)",
        tuned["examples"]
    );
    assert!(
        base_em <= 0.1,
        "the base model already answers with the number only: {base}"
    );
    assert!(sft_em >= 0.3, "sft did not teach the format: {tuned}");

    let dpo = s.path("dpo");
    // The example's dpo job: LoRA on q and v, 8 steps.
    let cfg = s.write(
        "dpo.yaml",
        &train_support::dpo_config(
            &sft,
            &dpo,
            "  steps: 8\n  batchSize: 4\n  learningRate: 0.0002\n  warmupSteps: 1\n  weightDecay: 0.0\n  threads: 2\n  logEvery: 1",
            "lora:\n  rank: 16\n  alpha: 32\n  targets: [q, v]\ncheckpoint:\n  everySteps: 0",
        ),
    );
    let out = run(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert_ok(&out);
    let steps = events(&out, "step");
    let first = steps[0]["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-6,
        "step 1 loss {first}"
    );
    let (sft_dir, dpo_dir) = (sft.to_str().unwrap(), dpo.to_str().unwrap());
    let report = eval(&[
        "--model",
        dpo_dir,
        "--reference",
        sft_dir,
        "--baseline",
        sft_dir,
        "--data",
        "builtin:preferences",
    ]);
    let accuracy = report["preference_accuracy"].as_f64().unwrap();
    let (em, baseline_em) = (
        report["exact_match"].as_f64().unwrap(),
        report["baseline"]["exact_match"].as_f64().unwrap(),
    );
    eprintln!(
        "dpo: step 1 loss {first:.9}, step 8 {}; held-out preference accuracy {accuracy:.3}, exact match {em:.3} (sft {baseline_em:.3}) on {} pairs",
        steps[steps.len() - 1]["preference"],
        report["examples"]
    );
    assert!(accuracy >= 0.9, "{report}");
    assert!(em >= baseline_em, "dpo lost exact match: {report}");
    assert!(dpo.join("adapter_model.safetensors").exists());
}
