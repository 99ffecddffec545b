//! Helpers shared by the training and evaluation integration tests: a scratch directory, a
//! config writer and a runner for the built binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_anneal-runtime");

/// A fresh directory under the target's temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

/// A suffix no other test process picks: the process id, the time and a counter (test
/// processes run side by side, and a pid is reused).
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("anneal-test-{name}-{}", unique()));
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

/// The worker environment the operator sets, none of which a test inherits.
pub const WORKER_ENV: [&str; 6] = [
    "ANNEAL_CHECKPOINT_DIR",
    "ANNEAL_ATTEMPT",
    "ANNEAL_JOB_NAME",
    "ANNEAL_JOB_NAMESPACE",
    "ANNEAL_JOB_UID",
    "ANNEAL_POD_NAME",
];

/// The environment of a worker of TrainingJob `team/name` with `uid` at `attempt`; no cluster
/// is reachable (`KUBECONFIG` names no file), so status reports give up with a warning.
pub fn job_env(name: &str, uid: &str, attempt: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ANNEAL_JOB_NAMESPACE", "team".into()),
        ("ANNEAL_JOB_NAME", name.into()),
        ("ANNEAL_JOB_UID", uid.into()),
        ("ANNEAL_ATTEMPT", attempt.into()),
        ("ANNEAL_POD_NAME", format!("{name}-a{attempt}-w0")),
        ("KUBECONFIG", "/nonexistent/kubeconfig".into()),
    ]
}

/// Runs the binary to completion with `args` and extra environment.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("KUBERNETES_SERVICE_HOST");
    for k in WORKER_ENV {
        cmd.env_remove(k);
    }
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

/// Spawns `train`, reads its progress until `stop(event)` is true, then SIGKILLs it.
pub fn train_until_killed(
    cfg: &std::path::Path,
    attempt: &str,
    stop: impl Fn(&serde_json::Value) -> bool,
) {
    let mut child = Command::new(BIN)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("ANNEAL_ATTEMPT", attempt)
        .env_remove("ANNEAL_CHECKPOINT_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if stop(&v) {
            break;
        }
    }
    // Child::kill sends SIGKILL: no handler runs, exactly like a node dying.
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A dpo config from `base` on `builtin:preferences` (beta 0.1), with `extra` top-level YAML
/// (lora, checkpoints) and `hyper` hyperparameter lines, writing its model to `output`.
pub fn dpo_config(base: &Path, output: &Path, hyper: &str, extra: &str) -> String {
    format!(
        "model:\n  base: {}\ndataset:\n  uri: builtin:preferences\nstage: dpo\ndpo:\n  beta: 0.1\n{extra}\nhyperparameters:\n{hyper}\noutput:\n  path: {}\n",
        base.display(),
        output.display()
    )
}
