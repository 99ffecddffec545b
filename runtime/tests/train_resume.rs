//! Checkpoints: a run SIGKILLed mid-way and resumed ends with bitwise the same weights as the
//! uninterrupted run; a corrupt newest checkpoint is skipped; a stale attempt is fenced out;
//! another job's or another run's checkpoints are refused, changed settings are said.
//!
//! The CPU training step gives the same bits for any thread count and on AVX-512, AVX2 or any
//! other CPU (a test below), so a job failed over to a different node still resumes exactly.

mod train_support;

use anneal_runtime::checkpoint::{CheckpointDir, atomic, committed, fence};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use train_support::{
    BIN, Scratch, assert_ok, events, job_env, run, tiny_config, train_until_killed,
};

const STEPS: u64 = 120;

fn config(s: &Scratch, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ckpt = format!(
        "checkpoint:\n  dir: {}\n  everySteps: 10\n  keep: 3",
        s.path(&format!("{name}-ckpt")).display()
    );
    let cfg = tiny_config(&s.path(&format!("{name}-model")), STEPS, "", &ckpt);
    (
        s.write(&format!("{name}.yaml"), &cfg),
        s.path(&format!("{name}-model/model.safetensors")),
    )
}

#[test]
fn sigkill_and_resume_is_bitwise_exact_and_corrupt_checkpoints_are_skipped() {
    let s = Scratch::new("resume");
    let (cfg_a, weights_a) = config(&s, "a");
    assert_ok(&run(&["train", "--config", cfg_a.to_str().unwrap()], &[]));

    let (cfg_b, weights_b) = config(&s, "b");
    train_until_killed(&cfg_b, "1", |v| {
        v["event"] == "checkpoint" && v["step"] == 30
    });
    assert!(!weights_b.exists(), "the run was killed before finishing");
    let out = run(
        &["train", "--config", cfg_b.to_str().unwrap()],
        &[("ANNEAL_ATTEMPT", "2")],
    );
    assert_ok(&out);
    let resumed = events(&out, "resumed");
    let step = resumed[0]["step"].as_u64().unwrap();
    assert!((30..STEPS).contains(&step), "resumed at {step}");
    assert_eq!(
        std::fs::read(&weights_a).unwrap(),
        std::fs::read(&weights_b).unwrap()
    );

    // Corrupt the newest checkpoint of run a and redo the tail from the one before.
    let newest = s.path(&format!("a-ckpt/step-{STEPS:08}/model.safetensors"));
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    std::fs::remove_dir_all(s.path("a-model")).unwrap();
    let out = run(
        &["train", "--config", cfg_a.to_str().unwrap()],
        &[("ANNEAL_ATTEMPT", "1")],
    );
    assert_ok(&out);
    let warnings = events(&out, "warning");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("step-{STEPS:08}"))
    );
    assert_eq!(events(&out, "resumed")[0]["step"], STEPS - 10);
    assert_eq!(
        std::fs::read(&weights_a).unwrap(),
        std::fs::read(&weights_b).unwrap()
    );
}

#[test]
fn stale_attempt_is_fenced() {
    let s = Scratch::new("fence");
    let (cfg, weights) = config(&s, "f");
    // Long enough that the run cannot finish between its first checkpoint and the claim below
    // (with STEPS it raced and once finished first on a loaded machine).
    let long = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("steps: {STEPS}"), &format!("steps: {FENCE_STEPS}"));
    assert!(long.contains(&format!("steps: {FENCE_STEPS}")));
    std::fs::write(&cfg, long).unwrap();
    let ckpt = s.path("f-ckpt");
    // A newer attempt has claimed the directory: an older one refuses to start.
    std::fs::create_dir_all(&ckpt).unwrap();
    CheckpointDir::open(&ckpt, 5).unwrap();
    let out = run(
        &["train", "--config", cfg.to_str().unwrap()],
        &[("ANNEAL_ATTEMPT", "4")],
    );
    assert_eq!(
        out.status.code(),
        Some(65),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fenced"));

    // An attempt running when a newer one claims the directory stops at its next checkpoint,
    // without committing it.
    let mut child = Command::new(BIN)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("ANNEAL_ATTEMPT", "6")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reported = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "checkpoint" {
            reported.push(v["step"].as_u64().unwrap());
            if reported.len() == 1 {
                CheckpointDir::open(&ckpt, 7).unwrap();
            }
        }
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(65),
        "checkpoints reported {reported:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fenced"));
    assert!(!weights.exists());
    // Every checkpoint on disk was committed (and reported) before the claim was seen; the
    // one the stale attempt tried after it was never committed.
    let dir = CheckpointDir {
        root: ckpt.clone(),
        attempt: 7,
    };
    let mut on_disk: Vec<u64> = dir.list().unwrap().into_iter().map(|(s, _)| s).collect();
    on_disk.reverse();
    assert_eq!(on_disk, reported[reported.len().saturating_sub(3)..]);
    assert!(reported.len() < (FENCE_STEPS / 10) as usize);
}

/// Steps of the fenced run.
const FENCE_STEPS: u64 = 5000;

/// The same run with each matrix-product instruction set (`ANNEAL_SGEMM`; one the CPU lacks
/// falls back to the best it has) and 1, 2 or 3 threads writes a model with the same sha256.
/// The batch is large enough that the products split over the threads.
#[test]
fn weights_are_the_same_bits_on_any_instruction_set_and_thread_count() {
    let s = Scratch::new("isa");
    let mut digests = Vec::new();
    for (isa, threads) in [("avx512", 2), ("avx2", 1), ("portable", 3), ("avx512", 3)] {
        let name = format!("{isa}-{threads}");
        let cfg = tiny_config(&s.path(&format!("{name}-model")), 12, "", "")
            .replace("batchSize: 16", "batchSize: 256")
            .replace("threads: 2", &format!("threads: {threads}"));
        let cfg = s.write(&format!("{name}.yaml"), &cfg);
        let out = run(
            &["train", "--config", cfg.to_str().unwrap()],
            &[("ANNEAL_SGEMM", isa)],
        );
        assert_ok(&out);
        let digest = events(&out, "done")[0]["model"]["sha256"].clone();
        assert!(digest.is_string(), "no model digest: {digest}");
        digests.push((name, digest));
    }
    for (name, digest) in &digests[1..] {
        assert_eq!(
            digest, &digests[0].1,
            "{name} differs from {}",
            digests[0].0
        );
    }
}

/// Runs `train --config cfg` as a worker of TrainingJob `team/name` with `uid` at `attempt`.
fn run_as_job(cfg: &std::path::Path, name: &str, uid: &str, attempt: &str) -> std::process::Output {
    let env = job_env(name, uid, attempt);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run(&["train", "--config", cfg.to_str().unwrap()], &env)
}

/// A short run with checkpoints every 10 steps into `name-ckpt`, its config written to
/// `file`; `edit` changes the config's text.
fn short_config(
    s: &Scratch,
    name: &str,
    file: &str,
    steps: u64,
    edit: impl Fn(String) -> String,
) -> std::path::PathBuf {
    let ckpt = format!(
        "checkpoint:\n  dir: {}\n  everySteps: 10\n  keep: 3",
        s.path(&format!("{name}-ckpt")).display()
    );
    let cfg = tiny_config(&s.path(&format!("{name}-model")), steps, "", &ckpt);
    s.write(file, &edit(cfg))
}

/// A job deleted and created again under its name (another UID) meets the old job's
/// checkpoints: it refuses them with exit 65, naming both jobs, and leaves them and the
/// directory's fence as they were. Before, it resumed the old job's weights, optimizer state
/// and data position.
#[test]
fn another_jobs_checkpoints_are_refused_and_left_alone() {
    let s = Scratch::new("foreign");
    let cfg = short_config(&s, "j", "j.yaml", 20, |c| c);
    assert_ok(&run_as_job(&cfg, "sweep", "uid-old", "3"));
    let ckpt = s.path("j-ckpt");
    let before = committed(&ckpt).unwrap();
    assert_eq!(before.len(), 2);

    std::fs::remove_dir_all(s.path("j-model")).unwrap();
    let out = run_as_job(&cfg, "sweep", "uid-new", "5");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("TrainingJob team/sweep (uid uid-old)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TrainingJob team/sweep (uid uid-new)"),
        "{stderr}"
    );
    assert!(events(&out, "resumed").is_empty());
    assert!(!s.path("j-model").exists());
    // Nothing of the old job was touched: not its checkpoints, not its fence.
    assert_eq!(committed(&ckpt).unwrap(), before);
    assert_eq!(fence::read_fence(&ckpt).unwrap(), 3);
    // A local run is not that job either.
    let out = run(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a local run"));
}

/// The same job resumes after a change of settings that keeps the run (learning rate, steps)
/// and says what changed; a change that makes another run (the seed) is refused.
#[test]
fn changed_settings_are_said_and_a_different_run_is_refused() {
    let s = Scratch::new("changed");
    let cfg = short_config(&s, "c", "c.yaml", 20, |c| c);
    assert_ok(&run_as_job(&cfg, "tune", "uid-1", "1"));

    let reseeded = short_config(&s, "c", "seed.yaml", 30, |c| {
        c.replace("  threads: 2", "  threads: 2\n  seed: 9")
    });
    let out = run_as_job(&reseeded, "tune", "uid-1", "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("hyperparameters.seed 0 -> 9"), "{stderr}");
    assert_eq!(
        fence::read_fence(&s.path("c-ckpt")).unwrap(),
        1,
        "not claimed"
    );

    let tuned = short_config(&s, "c", "tuned.yaml", 30, |c| {
        c.replace("learningRate: 0.003", "learningRate: 0.001")
    });
    let out = run_as_job(&tuned, "tune", "uid-1", "2");
    assert_ok(&out);
    let resumed = &events(&out, "resumed")[0];
    assert_eq!(resumed["step"], 20);
    assert_eq!(
        resumed["changed"],
        serde_json::json!([
            "hyperparameters.learningRate 0.003 -> 0.001",
            "hyperparameters.steps 20 -> 30",
        ])
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("with changed settings"), "{stderr}");
}

/// A checkpoint written before identities were recorded is resumed, with a warning.
#[test]
fn a_checkpoint_without_identity_resumes_with_a_warning() {
    let s = Scratch::new("unrecorded");
    let cfg = short_config(&s, "u", "u.yaml", 20, |c| c);
    assert_ok(&run_as_job(&cfg, "old", "uid-1", "1"));
    let (_, newest) = committed(&s.path("u-ckpt")).unwrap().remove(0);
    let state_path = newest.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(state["job"]["uid"], "uid-1");
    assert!(
        state["spec_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let map = state.as_object_mut().unwrap();
    map.remove("job");
    map.remove("spec_digest");
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    atomic::add_to_manifest(&newest, "state.json").unwrap();

    let longer = short_config(&s, "u", "longer.yaml", 30, |c| c);
    let out = run_as_job(&longer, "old", "uid-1", "2");
    assert_ok(&out);
    assert_eq!(events(&out, "resumed")[0]["step"], 20);
    let warnings = events(&out, "warning");
    assert!(
        warnings
            .iter()
            .any(|w| w["message"].as_str().unwrap().contains("records no job")),
        "{warnings:?}"
    );
}
