//! Bad configuration, data and model inputs end with one line on stderr and the user-error
//! exit code (65: the operator does not retry), never a panic.

mod train_support;

use train_support::{Scratch, run, tiny_config};

fn assert_user_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.starts_with("anneal-runtime: error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn train_with(s: &Scratch, config: &str) -> std::process::Output {
    let path = s.write("train.yaml", config);
    run(&["train", "--config", path.to_str().unwrap()], &[])
}

#[test]
fn missing_config_file() {
    let out = run(&["train", "--config", "/nonexistent/train.yaml"], &[]);
    assert_user_error(&out, "cannot read config");
}

#[test]
fn malformed_or_invalid_config() {
    let s = Scratch::new("badcfg");
    let out = train_with(&s, "model: [unclosed");
    assert_user_error(&out, "invalid config");
    let cfg = tiny_config(&s.path("m"), 10, "  bogusField: 1", "");
    assert_user_error(&train_with(&s, &cfg), "bogusField");
    let cfg = tiny_config(&s.path("m"), 0, "", "");
    assert_user_error(&train_with(&s, &cfg), "steps must be positive");
    let cfg = tiny_config(&s.path("m"), 10, "", "").replace("nKvHeads: 2", "nKvHeads: 3");
    assert_user_error(&train_with(&s, &cfg), "nKvHeads");
}

#[test]
fn bad_data_uris_and_files() {
    let s = Scratch::new("baddata");
    let base = tiny_config(&s.path("m"), 10, "", "");
    let with_uri = |uri: &str| base.replace("uri: builtin:arith", &format!("uri: {uri}"));
    assert_user_error(
        &train_with(&s, &with_uri("s3://bucket/data.jsonl")),
        "unsupported data URI",
    );
    assert_user_error(
        &train_with(&s, &with_uri("builtin:nope")),
        "builtin data set",
    );
    let missing = s.path("missing.jsonl");
    let cfg = with_uri(&format!("file://{}", missing.display()));
    assert_user_error(&train_with(&s, &cfg), "cannot read data file");
    let bad = s.write(
        "bad.jsonl",
        "{\"prompt\":\"1+1=\",\"response\":\"2\"}\n{\"prompt\": 3}\n",
    );
    let cfg = with_uri(&format!("file://{}", bad.display()));
    assert_user_error(&train_with(&s, &cfg), "bad.jsonl:2:");
    let text = s.write("plain.txt", "some free text\n\nmore text\n");
    let cfg = with_uri(&format!("file://{}", text.display()));
    assert_user_error(&train_with(&s, &cfg), "stage sft needs");
}

#[test]
fn eval_bad_inputs() {
    let s = Scratch::new("badeval");
    let missing = s.path("nomodel");
    let out = run(
        &[
            "eval",
            "--model",
            missing.to_str().unwrap(),
            "--data",
            "builtin:arith",
        ],
        &[],
    );
    assert_user_error(&out, "no such model");
    std::fs::create_dir_all(s.path("broken")).unwrap();
    let broken = s.path("broken");
    let out = run(
        &[
            "eval",
            "--model",
            broken.to_str().unwrap(),
            "--data",
            "builtin:arith",
        ],
        &[],
    );
    assert_user_error(&out, "MANIFEST.json");
    let out = run(
        &[
            "eval",
            "--model",
            broken.to_str().unwrap(),
            "--data",
            "ftp://x",
        ],
        &[],
    );
    assert_user_error(&out, "");
}
