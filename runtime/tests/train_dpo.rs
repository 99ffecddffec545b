//! Stage dpo end to end on a tiny byte-level model: the base is an sft model, DPO aligns it on
//! `builtin:preferences` (a bare number preferred to a chatty sentence), and
//! - the first step's loss is ln 2 and no pair is ahead (the policy is its reference, bit for
//!   bit: the reference log-probs come from the very forward pass the steps run);
//! - the rewards are reported with every step and grow apart;
//! - `eval --reference BASE` ranks held-out pairs by the implicit reward: accuracy >= 0.9;
//! - a run SIGKILLed after a checkpoint resumes to the same bits (the reference log-probs are
//!   in the checkpoint);
//! - a DPO config without a base model, and malformed preference lines, are refused (65).

mod train_support;

use train_support::{Scratch, assert_ok, events, run, train_until_killed};

/// The base: a tiny model fine-tuned on the same instructions (prompts up to 50 bytes).
fn base_config(output: &std::path::Path) -> String {
    format!(
        r#"model:
  architecture:
    hiddenSize: 48
    nLayers: 2
    nHeads: 4
    nKvHeads: 2
    intermediateSize: 128
    maxSeqLen: 80
dataset:
  uri: builtin:instruct
stage: sft
hyperparameters:
  steps: 60
  batchSize: 16
  learningRate: 0.003
  warmupSteps: 5
  threads: 2
  logEvery: 60
output:
  path: {}
"#,
        output.display()
    )
}

/// DPO from `base` with checkpoints every 10 steps into `ckpt`.
fn dpo_config(base: &std::path::Path, output: &std::path::Path, ckpt: &std::path::Path) -> String {
    train_support::dpo_config(
        base,
        output,
        "  steps: 40\n  batchSize: 8\n  learningRate: 0.002\n  warmupSteps: 2\n  threads: 2\n  logEvery: 1",
        &format!("checkpoint:\n  dir: {}\n  everySteps: 10", ckpt.display()),
    )
}

#[test]
fn dpo_starts_at_ln2_learns_held_out_preferences_and_resumes_exactly() {
    let s = Scratch::new("dpo");
    let base = s.path("base");
    let cfg = s.write("base.yaml", &base_config(&base));
    assert_ok(&run(&["train", "--config", cfg.to_str().unwrap()], &[]));

    let a = s.write(
        "a.yaml",
        &dpo_config(&base, &s.path("a-model"), &s.path("a-ckpt")),
    );
    let out = run(&["train", "--config", a.to_str().unwrap()], &[]);
    assert_ok(&out);
    let reference = &events(&out, "reference")[0];
    assert!(reference["pairs"].as_u64().unwrap() > 200, "{reference}");
    let steps = events(&out, "step");
    let first = &steps[0];
    let loss = first["loss"].as_f64().unwrap();
    assert!(
        (loss - std::f64::consts::LN_2).abs() < 1e-6,
        "step 1 loss {loss}"
    );
    assert_eq!(first["preference"]["rewards_accuracies"], 0.0, "{first}");
    assert_eq!(first["preference"]["rewards_margins"], 0.0, "{first}");
    let last = &steps[steps.len() - 1]["preference"];
    assert!(
        last["rewards_margins"].as_f64().unwrap() > 0.1,
        "the rewards grew apart: {last}"
    );
    assert!(steps[steps.len() - 1]["loss"].as_f64().unwrap() < loss);

    // Held-out pairs (the test split), ranked by the implicit reward against the base.
    let eval = |model: &str, reference: Option<&str>| {
        let mut args = vec!["eval", "--model", model, "--data", "builtin:preferences"];
        if let Some(r) = reference {
            args.extend(["--reference", r]);
        }
        let out = run(&args, &[]);
        assert_ok(&out);
        events(&out, "eval")[0].clone()
    };
    let model_a = s.path("a-model");
    let report = eval(model_a.to_str().unwrap(), base.to_str());
    let accuracy = report["preference_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "held-out preference accuracy {accuracy}");
    assert!(report["examples"].as_u64().unwrap() >= 20, "{report}");
    eprintln!(
        "step 1 loss {loss:.9} (ln 2 = {:.9}); step 40 {last}; held-out preference accuracy {accuracy} on {} pairs",
        std::f64::consts::LN_2,
        report["examples"]
    );
    // The base ranked against itself prefers nothing (every margin is exactly 0).
    let itself = eval(base.to_str().unwrap(), base.to_str());
    assert_eq!(itself["preference_accuracy"], 0.0, "{itself}");

    // Killed after its step-20 checkpoint, the same run resumes to the same bits.
    let b = s.write(
        "b.yaml",
        &dpo_config(&base, &s.path("b-model"), &s.path("b-ckpt")),
    );
    train_until_killed(&b, "1", |v| v["event"] == "checkpoint" && v["step"] == 20);
    assert!(!s.path("b-model").exists());
    let out = run(
        &["train", "--config", b.to_str().unwrap()],
        &[("ANNEAL_ATTEMPT", "2")],
    );
    assert_ok(&out);
    assert!(
        events(&out, "reference").is_empty(),
        "a resume reads the reference log-probs from the checkpoint"
    );
    assert!(events(&out, "resumed")[0]["step"].as_u64().unwrap() >= 20);
    assert_eq!(
        std::fs::read(s.path("a-model/model.safetensors")).unwrap(),
        std::fs::read(s.path("b-model/model.safetensors")).unwrap()
    );
}

#[test]
fn dpo_refuses_a_config_without_base_and_malformed_pairs() {
    let s = Scratch::new("dpo-refused");
    let no_base = s.write(
        "no-base.yaml",
        r#"model:
  architecture: {hiddenSize: 16, nLayers: 1, nHeads: 2, intermediateSize: 32, maxSeqLen: 16}
dataset:
  uri: builtin:preferences
stage: dpo
output:
  path: /nonexistent
"#,
    );
    let out = run(&["train", "--config", no_base.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stage dpo needs a base model"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let base = s.path("base");
    let cfg = s.write(
        "base.yaml",
        &base_config(&base).replace("steps: 60", "steps: 1"),
    );
    assert_ok(&run(&["train", "--config", cfg.to_str().unwrap()], &[]));
    let data = s.write(
        "pairs.jsonl",
        "{\"prompt\": \"1+1?\", \"chosen\": \"2\", \"rejected\": \"3\"}\n{\"prompt\": \"2+2?\", \"chosen\": \"4\"}\n",
    );
    let dpo = s.write(
        "dpo.yaml",
        &dpo_config(&base, &s.path("model"), &s.path("ckpt"))
            .replace("builtin:preferences", data.to_str().unwrap()),
    );
    let out = run(&["train", "--config", dpo.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pairs.jsonl:2: a preference pair needs \"rejected\""),
        "{stderr}"
    );
}
