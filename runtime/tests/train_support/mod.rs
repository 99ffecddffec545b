//! Helpers shared by the training and evaluation integration tests: a scratch directory, a
//! config writer and a runner for the built binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_anneal-runtime");

/// A fresh directory under the target's temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("anneal-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Writes `contents` to `rel` and returns its path.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny sft config on `builtin:arith` writing its model to `output`.
pub fn tiny_config(output: &Path, steps: u64, extra_hyper: &str, checkpoint: &str) -> String {
    format!(
        r#"model:
  architecture:
    hiddenSize: 32
    nLayers: 2
    nHeads: 4
    nKvHeads: 2
    intermediateSize: 64
    maxSeqLen: 16
dataset:
  uri: builtin:arith
stage: sft
hyperparameters:
  steps: {steps}
  batchSize: 16
  learningRate: 0.003
  warmupSteps: 5
  threads: 2
{extra_hyper}
{checkpoint}
output:
  path: {}
"#,
        output.display()
    )
}

/// Runs the binary to completion with `args` and extra environment.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("ANNEAL_CHECKPOINT_DIR")
        .env_remove("ANNEAL_ATTEMPT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

/// JSON lines of stdout whose `event` is `event`.
pub fn events(out: &Output, event: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

/// Asserts success, showing stderr otherwise.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}\nstdout: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}
