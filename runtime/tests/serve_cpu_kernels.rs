//! The serving engine's CPU kernels on SmolLM2's Q4_1 weights as stored, against the exact
//! model (the same weights dequantized to f32, candle's dense path): logits error, next-token
//! agreement, and that a prompt, a token-by-token decode and a batch of sequences give the
//! same logits. Prints the figures BENCHMARKS.md quotes. The ignored test times the kernels.

mod serve_support;

use anneal_runtime::gguf::{GgufFile, GgufTokenizer, GgufWeights, Q41Policy, model_config};
use anneal_runtime::model::Transformer;
use anneal_runtime::serve::cpu_model::{CpuKv, CpuModel, Scratch, Segment};
use anneal_runtime::tokenizer::Tokenizer;
use candle_core::{Device, Tensor};
use std::time::Instant;

const TEXT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes.";

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0
}

#[test]
fn cpu_kernels_match_the_exact_model() {
    let file = GgufFile::open(&serve_support::smollm2()).unwrap();
    let dev = Device::Cpu;
    let mut config = model_config(&file.header).unwrap();
    config.max_seq_len = 256;
    let load = |p| Transformer::new(&config, &GgufWeights::new(&file, &dev, p), &dev).unwrap();
    let exact = load(Q41Policy::F32);
    let cpu = CpuModel::new(&load(Q41Policy::Keep)).expect("Q4_1 weights take the CPU kernels");
    let tok = GgufTokenizer::from_header(&file.header).unwrap();
    let prompt = tok.encode(TEXT).unwrap();
    let n = prompt.len();
    let want = exact
        .forward(
            &Tensor::new(prompt.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();

    // Token by token, as decode steps.
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let mut kv = CpuKv::new(&config, 256);
    let (mut err2, mut norm2, mut max_abs, mut agree) = (0f64, 0f64, 0f32, 0);
    let mut last = Vec::new();
    for (pos, t) in prompt.iter().enumerate() {
        let mut seg = [Segment {
            tokens: std::slice::from_ref(t),
            start: pos,
            cache: &mut kv,
        }];
        cpu.forward(&mut seg, &mut scratch, &mut logits).unwrap();
        for (a, b) in logits.iter().zip(&want[pos]) {
            err2 += ((a - b) as f64).powi(2);
            norm2 += (*b as f64).powi(2);
            max_abs = max_abs.max((a - b).abs());
        }
        agree += (argmax(&logits) == argmax(&want[pos])) as usize;
        last = logits.clone();
    }
    let rel = (err2 / norm2).sqrt();
    println!(
        "CPU kernels (Q4_1 weights, 8-bit activations) vs exact f32: logits rel. RMS error {rel:.4}, max abs diff {max_abs:.3}, top-1 agreement {agree}/{n}"
    );
    assert!(rel < 0.05, "{rel}");
    assert!(agree * 100 >= n * 95, "{agree}/{n}");

    // The whole prompt as one prefill segment gives the same last logits, and so does a
    // batch of three sequences (rows of one product do not interact).
    let mut kvs: Vec<CpuKv> = (0..3).map(|_| CpuKv::new(&config, 256)).collect();
    let cut = [n, 5, n - 3];
    let mut segs: Vec<Segment> = kvs
        .iter_mut()
        .zip(cut)
        .map(|(cache, c)| Segment {
            tokens: &prompt[..c],
            start: 0,
            cache,
        })
        .collect();
    cpu.forward(&mut segs, &mut scratch, &mut logits).unwrap();
    let v = config.vocab_size;
    assert_eq!(&logits[..v], last.as_slice(), "prefill vs token by token");
    let mut alone = Vec::new();
    let mut kv = CpuKv::new(&config, 256);
    let mut seg = [Segment {
        tokens: &prompt[..5],
        start: 0,
        cache: &mut kv,
    }];
    cpu.forward(&mut seg, &mut scratch, &mut alone).unwrap();
    assert_eq!(&logits[v..2 * v], alone.as_slice(), "batched vs alone");
}

/// Times prefill (512 tokens), single-stream decode and a 16-sequence decode step.
/// `cargo test --release --test serve_cpu_kernels -- --ignored --nocapture`
#[test]
#[ignore]
fn time_the_kernels() {
    let file = GgufFile::open(&serve_support::smollm2()).unwrap();
    let dev = Device::Cpu;
    let mut config = model_config(&file.header).unwrap();
    config.max_seq_len = 1024;
    let model = Transformer::new(
        &config,
        &GgufWeights::new(&file, &dev, Q41Policy::Keep),
        &dev,
    )
    .unwrap();
    let cpu = CpuModel::new(&model).unwrap();
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let prompt: Vec<u32> = (0..512u32).map(|i| 1000 + i * 7 % 5000).collect();
    // ANNEAL_TIME_ONLY=prefill|decode1|decode4|decode16 times one part (for a profiler).
    let only = std::env::var("ANNEAL_TIME_ONLY").ok();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    // On a shared machine other processes preempt some steps: the median step is quoted.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut kv = CpuKv::new(&config, 1024);
    if run("prefill") {
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let mut seg = [Segment {
                tokens: &prompt,
                start: 0,
                cache: &mut kv,
            }];
            cpu.forward(&mut seg, &mut scratch, &mut logits).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        println!("prefill 512: {:.1} tok/s", 512.0 / median(times));
    }
    let steps = 128;
    for batch in [1usize, 4, 16] {
        if !run(&format!("decode{batch}")) {
            continue;
        }
        let mut kvs: Vec<CpuKv> = (0..batch).map(|_| CpuKv::new(&config, 1024)).collect();
        // Decode after a short prompt, as the benchmark's requests do.
        let start = 16;
        {
            let mut segs: Vec<Segment> = kvs
                .iter_mut()
                .map(|cache| Segment {
                    tokens: &prompt[..start],
                    start: 0,
                    cache,
                })
                .collect();
            cpu.forward(&mut segs, &mut scratch, &mut logits).unwrap();
        }
        let mut times = Vec::new();
        for i in 0..steps {
            let toks: Vec<u32> = (0..batch as u32).map(|b| 2000 + b + i as u32).collect();
            let mut segs: Vec<Segment> = kvs
                .iter_mut()
                .zip(&toks)
                .map(|(cache, t)| Segment {
                    tokens: std::slice::from_ref(t),
                    start: start + i,
                    cache,
                })
                .collect();
            let t = Instant::now();
            cpu.forward(&mut segs, &mut scratch, &mut logits).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        let mean = times.iter().sum::<f64>() / steps as f64;
        println!(
            "decode {batch} streams: {:.1} tok/s aggregate (median step; mean: {:.1})",
            batch as f64 / median(times),
            batch as f64 / mean
        );
    }
}
