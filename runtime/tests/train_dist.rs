//! Data-parallel training over the TCP ring, with the ranks as separate processes of the built
//! binary on loopback (as the pods of a gang run it):
//! - 2 workers of batch B train the model 1 worker of batch 2B trains: the same batches in the
//!   same order, the same step; the losses agree within 1e-5 relative and the weights within
//!   1e-5 (the sums differ only in rounding: one batch of 2B sums its gradient in one product,
//!   the gang sums two products of B; measured: 2e-8 and 1.5e-7). Not bitwise, even against one
//!   worker of batch B with gradientAccumulation 2: the fused step accumulates the second
//!   half-batch into the first one's products, which rounds differently from adding two sums.
//! - The gang's all-reduce overlapped with the backward pass (each block's gradients summed
//!   while the blocks below run theirs) gives bitwise the model of the same gang summing after
//!   the backward pass (`ANNEAL_OVERLAP_ALLREDUCE=0`).
//! - A gang killed mid-run (one rank SIGKILLed: the other ends with the peer-lost code at once)
//!   and started again as the next attempt resumes the last checkpoint and ends with bitwise
//!   the weights of an uninterrupted gang.
//! - A frozen rank (SIGSTOP: sockets open, nothing sent) ends the attempt after the peer timeout.

mod train_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use train_support::{BIN, Scratch, WORKER_ENV, assert_ok, events, job_env};

const STEPS: u64 = 24;

fn config(s: &Scratch, name: &str, batch: usize, accumulation: usize, ckpt: bool) -> PathBuf {
    let checkpoint = if ckpt {
        format!(
            "checkpoint: {{dir: {}, everySteps: 4, keep: 10}}",
            s.path(&format!("{name}-ckpt")).display()
        )
    } else {
        String::new()
    };
    let text = format!(
        r#"model:
  architecture: {{hiddenSize: 32, nLayers: 2, nHeads: 4, nKvHeads: 2, intermediateSize: 64, maxSeqLen: 16}}
dataset: {{uri: "builtin:arith"}}
stage: sft
hyperparameters:
  steps: {STEPS}
  batchSize: {batch}
  gradientAccumulation: {accumulation}
  learningRate: 0.003
  warmupSteps: 4
  threads: 1
  logEvery: 1
  seed: 11
{checkpoint}
output: {{path: {}}}
"#,
        s.path(&format!("{name}-model")).display()
    );
    s.write(&format!("{name}.yaml"), &text)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts rank `rank` of a gang of `world` whose rank 0 listens on `port`.
fn spawn_rank(cfg: &Path, rank: usize, world: usize, port: u16, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--config", cfg.to_str().unwrap()])
        .env_remove("KUBERNETES_SERVICE_HOST");
    for k in WORKER_ENV {
        cmd.env_remove(k);
    }
    cmd.env("ANNEAL_RANK", rank.to_string())
        .env("ANNEAL_WORLD_SIZE", world.to_string())
        .env("ANNEAL_RENDEZVOUS", format!("127.0.0.1:{port}"))
        .env("ANNEAL_PEER_TIMEOUT_SECONDS", "2")
        .env("ANNEAL_RENDEZVOUS_TIMEOUT_SECONDS", "60");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs a whole gang to its end; the outputs by rank.
fn run_gang(cfg: &Path, world: usize, env: &[(&str, String)]) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| spawn_rank(cfg, r, world, port, env))
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn run_solo(cfg: &Path) -> Output {
    let out = Command::new(BIN)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("ANNEAL_CHECKPOINT_DIR")
        .env_remove("ANNEAL_ATTEMPT")
        .output()
        .unwrap();
    assert_ok(&out);
    out
}

fn losses(out: &Output) -> Vec<f64> {
    events(out, "step")
        .iter()
        .map(|e| e["loss"].as_f64().unwrap())
        .collect()
}

fn weights(s: &Scratch, name: &str) -> Vec<(String, Vec<f32>)> {
    let path = s.path(&format!("{name}-model/model.safetensors"));
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut out: Vec<_> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn two_workers_of_batch_b_train_the_model_of_one_worker_of_batch_2b() {
    let s = Scratch::new("dist-equiv");
    let big = run_solo(&config(&s, "big", 16, 1, false));
    let gang = run_gang(&config(&s, "gang", 8, 1, false), 2, &[]);
    for out in &gang {
        assert_ok(out);
    }
    assert_eq!(events(&gang[0], "gang")[0]["world"], 2);
    // Rank 1 writes nothing: the model directory is rank 0's.
    assert!(events(&gang[1], "done")[0]["model"].is_null());

    let (l_big, l_gang) = (losses(&big), losses(&gang[0]));
    assert_eq!(l_gang.len(), STEPS as usize);
    assert_eq!(
        losses(&gang[1]),
        l_gang,
        "every rank reports the gang's loss"
    );
    let worst = l_big
        .iter()
        .zip(&l_gang)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0.0, f64::max);
    eprintln!("loss: worst relative difference gang vs batch 2B: {worst:e}");
    assert!(worst < 1e-5, "{l_big:?}\n{l_gang:?}");
    assert!(l_gang.last() < l_gang.first(), "it learns: {l_gang:?}");

    let (w_big, w_gang) = (weights(&s, "big"), weights(&s, "gang"));
    let d = max_abs_diff(&w_big, &w_gang);
    eprintln!("weights: max |gang - batch 2B| = {d:e}");
    assert!(d < 1e-5, "{d}");

    // The same gang summing its gradients after the backward pass instead of during it: with
    // two ranks every element's sum is the same addition, so the bits are the same.
    let off = [("ANNEAL_OVERLAP_ALLREDUCE", "0".to_string())];
    for out in run_gang(&config(&s, "serial", 8, 1, false), 2, &off) {
        assert_ok(&out);
    }
    assert_eq!(max_abs_diff(&w_gang, &weights(&s, "serial")), 0.0);
}

/// Spawns a gang at `attempt`, SIGKILLs rank 1 after the checkpoint of `kill_after`; returns
/// rank 0's exit code and how long it took to end after the kill.
fn gang_until_rank1_killed(cfg: &Path, attempt: &str, kill_after: u64) -> (Option<i32>, Duration) {
    let port = free_port();
    let env: Vec<(&str, String)> = job_env("dp", "uid-dp", attempt);
    let mut rank0 = spawn_rank(cfg, 0, 2, port, &env);
    let mut rank1 = spawn_rank(cfg, 1, 2, port, &env);
    let stdout = rank0.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap_or_default();
        if v["event"] == "checkpoint" && v["step"] == kill_after {
            break;
        }
    }
    rank1.kill().unwrap();
    let killed = Instant::now();
    rank1.wait().unwrap();
    let status = rank0.wait().unwrap();
    (status.code(), killed.elapsed())
}

#[test]
fn a_gang_restarted_after_losing_a_rank_ends_with_the_uninterrupted_model() {
    let s = Scratch::new("dist-resume");
    let whole = config(&s, "whole", 8, 1, true);
    let env = job_env("dp", "uid-dp", "1");
    for out in run_gang(&whole, 2, &env) {
        assert_ok(&out);
    }

    let cfg = config(&s, "broken", 8, 1, true);
    let (code, took) = gang_until_rank1_killed(&cfg, "1", 12);
    assert_eq!(code, Some(anneal_crds::contract::EXIT_PEER_LOST));
    assert!(
        took < Duration::from_secs(5),
        "rank 0 ended {took:?} after the kill"
    );

    // The next attempt: every rank resumes the same checkpoint (the digest at the handshake
    // says so), only rank 0 writes.
    let env = job_env("dp", "uid-dp", "2");
    let outs = run_gang(&cfg, 2, &env);
    for out in &outs {
        assert_ok(out);
        let resumed = events(out, "resumed");
        assert!(resumed[0]["step"].as_u64().unwrap() >= 12, "{resumed:?}");
    }
    assert_eq!(
        events(&outs[0], "gang")[0]["state"],
        events(&outs[1], "gang")[0]["state"]
    );
    assert_eq!(
        max_abs_diff(&weights(&s, "whole"), &weights(&s, "broken")),
        0.0
    );
}

#[test]
fn a_frozen_rank_ends_the_attempt_within_the_peer_timeout() {
    let s = Scratch::new("dist-frozen");
    let cfg = config(&s, "frozen", 8, 1, false);
    let port = free_port();
    let mut rank0 = spawn_rank(&cfg, 0, 2, port, &[]);
    let mut rank1 = spawn_rank(&cfg, 1, 2, port, &[]);
    let stdout = rank0.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap_or_default();
        if v["event"] == "step" && v["step"] == 3 {
            break;
        }
    }
    // SIGSTOP: the process and its sockets stay, nothing is sent (a hung node).
    let pid = rank1.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let took = stopped.elapsed();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    assert_eq!(
        out.status.code(),
        Some(anneal_crds::contract::EXIT_PEER_LOST)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sent nothing"), "{stderr}");
    // The peer timeout is 2 s; a step's compute is well under it.
    assert!(took < Duration::from_secs(6), "{took:?}");
}
