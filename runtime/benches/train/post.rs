//! Post-training a pretrained model, the runtime's side of `post-bench.sh`: prints JSON, writes
//! what the PyTorch references (`dpo_reference.py`, `finetune_reference.py`) need; not a test.
//!
//! ```text
//! cargo bench -p anneal-runtime --bench train-post -- dpo-check --model M --out DIR [options]
//! cargo bench -p anneal-runtime --bench train-post -- speed --model M --out DIR --stage sft|dpo [options]
//! cargo bench -p anneal-runtime --bench train-post -- export --model M --out DIR
//! ```
//!
//! - `dpo-check`: a DPO run from base model `M` (an anneal model directory, a GGUF or a Hugging
//!   Face directory) on `--data` (default `builtin:preferences`), through the runtime's own
//!   `Trainer` (its data `Format`, reference pass, loader). Step 1 is the trainer's first
//!   `train_step` (policy = reference: the loss must be ln 2); it moves the policy away from the
//!   reference, and the batch of step 2 is then scored three ways at the same weights: the
//!   fused CPU step (`FusedStep`, what `ANNEAL_FUSED_STEP` unset runs), candle's autograd
//!   (`ANNEAL_FUSED_STEP=0`), and the trainer's own `train_step`. Writes `DIR/base` and
//!   `DIR/policy` (Hugging Face llama layout: `config.json`, `model.safetensors`), and
//!   `DIR/check.json` (both batches' token ids, targets, masks, pair rows and reference
//!   log-probs, and the runtime's figures).
//! - `speed`: `--steps` steps of `Trainer::train_step` (what `anneal-runtime train` runs, after
//!   the same thread and allocator settings), each timed; prints tokens/s (steps after the
//!   first) and the peak RSS, and writes each step's batch into `DIR/batches.json`.
//!   `--lora-rank 16` trains LoRA adapters (`lora: {rank, alpha, targets}` in the config)
//!   instead of the weights.
//! - `phases`: where an sft step's time goes: the pieces `train_step` runs, timed one by one
//!   (the fused step's forward + backward with its copy of the weights, handing the gradients
//!   over as tensors, the gradient norm, AdamW), medians over the steps after the first.
//! - `export`: the base model's weights in Hugging Face layout into `DIR`.

use anneal_runtime::data::{Batch, Loader, PairSample, Sample};
use anneal_runtime::model::ModelConfig;
use anneal_runtime::train::config::TrainConfig;
use anneal_runtime::train::dpo;
use anneal_runtime::train::fused::FusedStep;
use anneal_runtime::train::loss::{self, Objective};
use anneal_runtime::train::optim;
use anneal_runtime::train::trainer::{StepStats, TrainData, Trainer};
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Command-line options: `--key value` pairs after the command.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Self {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            if let Some(key) = k.strip_prefix("--") {
                let v = it.next().cloned().unwrap_or_default();
                map.insert(key.to_string(), v);
            }
        }
        Self(map)
    }
    fn get(&self, key: &str, default: &str) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| default.into())
    }
    fn need(&self, key: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("--{key} is required"))
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        self.0
            .get(key)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("--{key} {v}: not a number"))
            })
            .unwrap_or(default)
    }
}

fn main() -> Res<()> {
    // cargo bench passes `--bench`; drop it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(cmd) = args.first() else {
        eprintln!("usage: train-post dpo-check|speed|export --model M --out DIR [--key value...]");
        std::process::exit(2);
    };
    let o = Opts::parse(&args[1..]);
    let threads: usize = o.num("threads", 2);
    // What `anneal-runtime train` does before anything else.
    anneal_runtime::device::set_cpu_threads(threads);
    anneal_runtime::device::keep_freed_memory();
    anneal_runtime::device::serial_elementwise();
    match cmd.as_str() {
        "dpo-check" => dpo_check(&o, threads),
        "speed" => speed(&o, threads),
        "phases" => phases(&o, threads),
        "export" => {
            let out = PathBuf::from(o.need("out"));
            let t = Trainer::new(config(&o, "sft", threads, 1, 1)?, Device::Cpu)?;
            export_hf(&t, &out)?;
            println!("{}", json!({"exported": out.display().to_string()}));
            Ok(())
        }
        other => Err(format!("unknown command {other}").into()),
    }
}

/// A run's configuration: base model `--model`, data `--data`, `batch` items per step
/// (sequences cut to `--seq-len`, default the model's context); LoRA adapters with
/// `--lora-rank R [--lora-alpha A] [--lora-targets q,v]`.
fn config(o: &Opts, stage: &str, threads: usize, batch: usize, steps: u64) -> Res<TrainConfig> {
    let default_data = if stage == "dpo" {
        "builtin:preferences"
    } else {
        "builtin:instruct"
    };
    let mut c = json!({
        "model": {"base": o.need("model")},
        "dataset": {"uri": o.get("data", default_data)},
        "stage": stage,
        "dpo": {"beta": o.num("beta", 0.1)},
        "hyperparameters": {
            "steps": steps, "batchSize": batch,
            "learningRate": o.num("lr", 1e-4), "warmupSteps": 0, "schedule": "constant",
            "weightDecay": o.num("weight-decay", 0.1), "gradClip": o.num("grad-clip", 1.0),
            "freezeFraction": o.num("freeze", 0.0), "threads": threads, "seed": o.num("seed", 0u64),
            "logEvery": 1,
        },
        "output": {"path": "/nonexistent/not-written"},
    });
    if let Some(rank) = o.0.get("lora-rank") {
        // `lora: {rank, alpha, targets}`; a runtime without LoRA refuses the unknown field.
        let targets: Vec<String> = o
            .get("lora-targets", "q,v")
            .split(',')
            .map(str::to_string)
            .collect();
        c["lora"] = json!({"rank": rank.parse::<usize>()?, "alpha": o.num("lora-alpha", 32.0),
                           "targets": targets});
    }
    if let Some(len) = o.0.get("seq-len") {
        c["hyperparameters"]["seqLen"] = json!(len.parse::<usize>()?);
    }
    let c: TrainConfig = serde_json::from_value(c)?;
    c.validate()?;
    Ok(c)
}

/// `config.json` of a Hugging Face `LlamaForCausalLM` with the runtime's architecture.
fn hf_config(c: &ModelConfig) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "torch_dtype": "float32", "head_dim": c.head_dim(),
    })
}

/// The trainer's current weights in Hugging Face llama layout (`base::to_hf_names`).
fn export_hf(t: &Trainer, dir: &Path) -> Res<()> {
    std::fs::create_dir_all(dir)?;
    let hf = anneal_runtime::train::base::to_hf_names(&t.model_config, &t.tensors()?)?;
    candle_core::safetensors::save(&hf, dir.join("model.safetensors"))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&hf_config(&t.model_config))?,
    )?;
    Ok(())
}

/// The items the trainer's next `train_step` will draw (a copy of its loader at its cursor).
fn next_items<T: Clone>(loader: &Loader<T>, seed: u64, n: usize) -> Vec<T> {
    Loader::new(loader.items().to_vec(), seed, loader.cursor)
        .next_samples(n)
        .into_iter()
        .cloned()
        .collect()
}

fn batch_json(batch: &Batch) -> Res<Value> {
    Ok(json!({
        "inputs": batch.inputs.to_vec2::<u32>()?,
        "targets": batch.targets.to_vec2::<u32>()?,
        "mask": batch.mask.to_vec2::<f32>()?,
        "n_inputs": batch.n_inputs, "n_tokens": batch.n_tokens,
    }))
}

/// A DPO batch as the trainer builds it: chosen and rejected of each pair one after the other.
fn pair_batch(pairs: &[PairSample]) -> Res<(Batch, Vec<dpo::Pair>)> {
    let samples: Vec<&Sample> = pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect();
    let batch = Batch::new(&samples, pad_of(), &Device::Cpu)?;
    let t = batch.inputs.dim(1)?;
    let rows = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (ref_chosen, ref_rejected) = p.reference.ok_or("no reference log-probs")?;
            Ok(dpo::Pair {
                chosen: 2 * i * t..(2 * i + 1) * t,
                rejected: (2 * i + 1) * t..(2 * i + 2) * t,
                ref_chosen,
                ref_rejected,
            })
        })
        .collect::<Res<Vec<_>>>()?;
    Ok((batch, rows))
}

/// The pad id the trainer uses (its tokenizer's EOS), set once the trainer exists.
static PAD: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
fn pad_of() -> u32 {
    *PAD.get().expect("pad id set")
}

fn pairs_json(batch: &Batch, pairs: &[dpo::Pair]) -> Res<Value> {
    let t = batch.inputs.dim(1)?;
    let mut v = batch_json(batch)?;
    v["pairs"] = pairs
        .iter()
        .map(|p| {
            json!({"chosen_row": p.chosen.start / t, "rejected_row": p.rejected.start / t,
                   "ref_chosen": p.ref_chosen, "ref_rejected": p.ref_rejected})
        })
        .collect();
    Ok(v)
}

fn stats_json(s: &dpo::Stats, grad_norm: f64) -> Value {
    json!({"loss": s.loss, "rewards_chosen": s.rewards_chosen, "rewards_rejected": s.rewards_rejected,
           "rewards_margins": s.rewards_margins, "rewards_accuracies": s.rewards_accuracies,
           "grad_norm": grad_norm})
}

fn step_json(s: &StepStats) -> Res<Value> {
    let p = s
        .preference
        .ok_or("a DPO step without preference figures")?;
    Ok(stats_json(&p, s.grad_norm))
}

fn dpo_check(o: &Opts, threads: usize) -> Res<()> {
    let out = PathBuf::from(o.need("out"));
    let n: usize = o.num("pairs", 4);
    let seed: u64 = o.num("seed", 0);
    let mut t = Trainer::new(config(o, "dpo", threads, n, 2)?, Device::Cpu)?;
    let _ = PAD.set(t.tokenizer.eos_id().unwrap_or(0));
    let started = Instant::now();
    let scored = t.compute_reference()?;
    eprintln!(
        "reference log-probs of {scored} pairs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    export_hf(&t, &out.join("base"))?;
    let pick = |t: &Trainer| -> Res<Vec<PairSample>> {
        match &t.data {
            TrainData::Pairs { loader, .. } => Ok(next_items(loader, seed, n)),
            TrainData::Samples(_) => Err("not a DPO run".into()),
        }
    };
    // Step 1: the policy is the reference.
    let (batch0, pairs0) = pair_batch(&pick(&t)?)?;
    let step1 = t.train_step()?;
    export_hf(&t, &out.join("policy"))?;
    // Step 2's batch at the moved weights: the fused step, candle's autograd, train_step.
    let (batch1, pairs1) = pair_batch(&pick(&t)?)?;
    let objective = Objective::Dpo {
        pairs: &pairs1,
        beta: o.num("beta", 0.1),
    };
    let names = param_shapes(&t);
    let scale = 1.0 / pairs1.len() as f64;
    let mut fused = FusedStep::new(&t.model, names.iter().map(|(n, _)| n.clone()).collect())?;
    let f = fused.accumulate(&t.model, &batch1, &objective)?;
    let f_norm = optim::global_norm(&fused.take_grads(&names)?, scale)?;
    drop(fused);
    let logits = t.model.forward(&batch1.inputs, 0, None)?;
    let (loss_t, a) = loss::loss_tensor(&logits, &batch1, &objective)?;
    let store = loss_t.backward()?;
    let grads: Vec<Tensor> = t
        .optimizer
        .params
        .iter()
        .map(|p| {
            store
                .get(p.var.as_tensor())
                .cloned()
                .map_or_else(|| p.var.as_tensor().zeros_like(), Ok)
        })
        .collect::<candle_core::Result<_>>()?;
    let a_norm = optim::global_norm(&grads, scale)?;
    drop((store, grads, loss_t));
    // Each sequence's summed completion log-probability under the policy (candle's forward).
    let (b, tt) = batch1.inputs.dims2()?;
    let flat = logits
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rows: Vec<_> = (0..b).map(|r| r * tt..(r + 1) * tt).collect();
    let logps = dpo::sequence_logps(
        &flat,
        &batch1.targets.flatten_all()?.to_vec1()?,
        &batch1.mask.flatten_all()?.to_vec1()?,
        t.model_config.vocab_size,
        &rows,
    );
    drop((logits, flat));
    let step2 = t.train_step()?;
    let means = |d: Option<dpo::Sums>| d.map(|s| s.means()).ok_or("no DPO sums");
    let report = json!({
        "beta": o.num("beta", 0.1), "model": o.need("model"), "base_kind": t.base_kind,
        "parameters": t.model_config.param_count(), "vocab": t.model_config.vocab_size,
        "threads": threads, "lr": o.num("lr", 1e-4),
        "step0": {"batch": pairs_json(&batch0, &pairs0)?, "train_step": step_json(&step1)?},
        "step1": {
            "batch": pairs_json(&batch1, &pairs1)?,
            "fused": stats_json(&means(f.dpo)?, f_norm),
            "autograd": stats_json(&means(a.dpo)?, a_norm),
            "train_step": step_json(&step2)?,
            "policy_logps": logps,
        },
    });
    std::fs::write(out.join("check.json"), serde_json::to_vec(&report)?)?;
    println!(
        "{}",
        json!({"out": out.display().to_string(), "step0_loss": step1.loss, "step1_loss": step2.loss})
    );
    Ok(())
}

/// Peak resident memory of this process (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system, all threads) this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn speed(o: &Opts, threads: usize) -> Res<()> {
    let out = PathBuf::from(o.need("out"));
    std::fs::create_dir_all(&out)?;
    let stage = o.get("stage", "sft");
    let batch: usize = o.num("batch", 8);
    let steps: u64 = o.num("steps", 5);
    let seed: u64 = o.num("seed", 0);
    // A DPO step of `batch` sequences: batch / 2 pairs.
    let items = if stage == "dpo" { batch / 2 } else { batch };
    let load = Instant::now();
    let mut t = Trainer::new(config(o, &stage, threads, items, steps)?, Device::Cpu)?;
    let _ = PAD.set(t.tokenizer.eos_id().unwrap_or(0));
    let load_s = load.elapsed().as_secs_f64();
    let r = Instant::now();
    let scored = t.compute_reference()?;
    let reference_s = r.elapsed().as_secs_f64();
    let trainable: usize = t.optimizer.params.iter().map(|p| p.var.elem_count()).sum();
    let (mut secs, mut cpu, mut tokens, mut losses, mut batches) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..steps {
        let b = match &t.data {
            TrainData::Pairs { loader, .. } => {
                let (b, p) = pair_batch(&next_items(loader, seed, items))?;
                pairs_json(&b, &p)?
            }
            TrainData::Samples(loader) => {
                let s = next_items(loader, seed, items);
                batch_json(&Batch::new(
                    &s.iter().collect::<Vec<_>>(),
                    pad_of(),
                    &Device::Cpu,
                )?)?
            }
        };
        batches.push(b);
        let (start, cpu_start) = (Instant::now(), cpu_secs());
        let s = t.train_step()?;
        secs.push(start.elapsed().as_secs_f64());
        cpu.push(cpu_secs() - cpu_start);
        tokens.push(s.tokens);
        losses.push(s.loss);
    }
    let peak = peak_rss_mib();
    let timed: f64 = secs[1..].iter().sum();
    let timed_tokens: usize = tokens[1..].iter().sum();
    std::fs::write(
        out.join("batches.json"),
        serde_json::to_vec(
            &json!({"stage": stage, "beta": o.num("beta", 0.1), "batches": batches}),
        )?,
    )?;
    println!(
        "{}",
        json!({
            "stage": stage, "freeze": o.num("freeze", 0.0), "batch_sequences": batch,
            "steps": steps, "threads": threads, "trainable": trainable,
            "parameters": t.model_config.param_count(),
            "tokens_per_sec": timed_tokens as f64 / timed, "step_secs": secs,
            "step_cpu_secs": cpu, "tokens": tokens, "losses": losses, "peak_rss_mib": peak,
            "load_secs": load_s, "reference_secs": reference_s, "reference_pairs": scored,
            "fused": std::env::var("ANNEAL_FUSED_STEP").map_or(true, |v| v != "0"),
        })
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn phases(o: &Opts, threads: usize) -> Res<()> {
    let batch: usize = o.num("batch", 8);
    let steps: u64 = o.num("steps", 5);
    let seed: u64 = o.num("seed", 0);
    let mut t = Trainer::new(config(o, "sft", threads, batch, steps)?, Device::Cpu)?;
    let _ = PAD.set(t.tokenizer.eos_id().unwrap_or(0));
    let TrainData::Samples(loader) = &t.data else {
        return Err("not an sft run".into());
    };
    let mut order = Loader::new(loader.items().to_vec(), seed, loader.cursor);
    let names = param_shapes(&t);
    let mut fused = FusedStep::new(&t.model, names.iter().map(|(n, _)| n.clone()).collect())?;
    let mut rows: Vec<[f64; 4]> = Vec::new();
    let mut padded = 0;
    for _ in 0..steps {
        let samples = order.next_samples(batch);
        let b = Batch::new(&samples, pad_of(), &Device::Cpu)?;
        padded = b.inputs.elem_count();
        let t0 = Instant::now();
        let out = fused.accumulate(&t.model, &b, &Objective::Nll)?;
        let t1 = Instant::now();
        let grads = fused.take_grads(&names)?;
        let t2 = Instant::now();
        let scale = 1.0 / b.n_tokens.max(1) as f64;
        let norm = optim::global_norm(&grads, scale)?;
        let t3 = Instant::now();
        let clip = optim::clip_factor(norm, t.config.hyperparameters.grad_clip);
        t.optimizer
            .step(&grads, scale * clip, t.config.hyperparameters.learning_rate)?;
        let t4 = Instant::now();
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        rows.push([s(t0, t1), s(t1, t2), s(t2, t3), s(t3, t4)]);
        eprintln!("loss {:.4}", out.loss_sum * scale);
    }
    let col = |i: usize| median(rows[1..].iter().map(|r| r[i]).collect());
    let (fb, take, norm, adam) = (col(0), col(1), col(2), col(3));
    let c = &t.model_config;
    // Multiply-adds of the projections and the head per token (attention's own are left out).
    let per_token = c.n_layers
        * c.hidden_size
        * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim()
            + c.n_heads * c.head_dim()
            + 3 * c.intermediate_size)
        + c.hidden_size * c.vocab_size;
    println!(
        "{}",
        json!({
            "freeze": o.num("freeze", 0.0), "batch": batch, "padded_tokens": padded,
            "forward_backward_secs": fb, "take_grads_secs": take, "grad_norm_secs": norm,
            "adamw_secs": adam, "step_secs": fb + take + norm + adam,
            // Forward 2, backward 4 flops per multiply-add (input and weight gradients).
            "forward_backward_gflops": 6.0 * per_token as f64 * padded as f64 / fb / 1e9,
            "trainable": t.optimizer.params.iter().map(|p| p.var.elem_count()).sum::<usize>(),
        })
    );
    Ok(())
}

/// The optimizer's parameters by name and shape (what a fused step computes gradients for).
fn param_shapes(t: &Trainer) -> Vec<(String, Vec<usize>)> {
    t.optimizer
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.dims().to_vec()))
        .collect()
}
