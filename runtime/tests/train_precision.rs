//! bf16 compute with f32 master weights (what `precision: auto` means on a GPU), exercised on
//! the CPU with `precision: bf16` so that it is tested without one: the loss curve follows the
//! f32 run's (`auto` on the CPU) within bf16 tolerance, and weights and optimizer moments stay
//! f32.

mod train_support;

use anneal_runtime::train::config::TrainConfig;
use anneal_runtime::train::trainer::Trainer;
use candle_core::{DType, Device};
use train_support::{Scratch, tiny_config};

const STEPS: u64 = 30;

fn losses(s: &Scratch, precision: &str) -> (Vec<f64>, Trainer) {
    let extra = format!("  precision: {precision}");
    let cfg = tiny_config(&s.path("model"), STEPS, &extra, "");
    let path = s.write("train.yaml", &cfg);
    let config = TrainConfig::from_file(&path).unwrap();
    let mut t = Trainer::new(config, Device::Cpu).unwrap();
    let want = if precision == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    assert_eq!(t.compute_dtype, want, "precision {precision} on the CPU");
    let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
    (losses, t)
}

#[test]
fn bf16_compute_follows_the_f32_loss_curve_with_f32_master_weights() {
    let s = Scratch::new("precision");
    let (f32_losses, _) = losses(&s, "auto");
    let (bf16_losses, t) = losses(&s, "bf16");
    let worst = f32_losses
        .iter()
        .zip(&bf16_losses)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0f64, f64::max);
    eprintln!("worst relative loss difference bf16 vs f32 over {STEPS} steps: {worst:.5}");
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        // bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, growing slowly.
        let tol = 0.02 * a.abs().max(1.0);
        assert!(
            (a - b).abs() <= tol,
            "step {step}: f32 loss {a}, bf16 loss {b}\nf32:  {f32_losses:?}\nbf16: {bf16_losses:?}"
        );
    }
    assert!(
        bf16_losses[STEPS as usize - 1] < bf16_losses[0] - 0.5,
        "bf16 training learns: {bf16_losses:?}"
    );
    assert_ne!(f32_losses, bf16_losses, "bf16 really computed in bf16");
    for (name, w) in t.tensors().unwrap() {
        assert_eq!(w.dtype(), DType::F32, "master weight {name}");
    }
    for (name, m) in t.optimizer.state_tensors() {
        assert_eq!(m.dtype(), DType::F32, "optimizer moment {name}");
    }
}
