//! AdamW with its moments in the open (so checkpoints can store them), the warm-up + cosine
//! learning-rate schedule, and global-norm gradient clipping.

use super::config::Hyperparameters;
use crate::kernels;
use crate::kernels::pool;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use std::collections::HashMap;

/// Elements per parallel task of the in-place update and of the gradient norm's partial sums.
const CHUNK: usize = 1 << 14;

/// One trainable parameter and its AdamW moments.
#[derive(Debug)]
pub struct Param {
    /// GGUF-style name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// The variable.
    pub var: Var,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
    /// Whether weight decay applies (matrices yes, norm scales no).
    pub decay: bool,
}

/// AdamW over a fixed, name-ordered list of parameters; the order fixes the summation order
/// of the gradient norm, which keeps runs bitwise reproducible.
#[derive(Debug)]
pub struct AdamW {
    /// Parameters in name order.
    pub params: Vec<Param>,
    /// Optimizer steps taken (bias correction).
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Zero moments for `vars` (sorted by name here).
    pub fn new(mut vars: Vec<(String, Var)>, h: &Hyperparameters) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                let decay = var.as_tensor().rank() >= 2;
                Ok(Param {
                    name,
                    var,
                    m,
                    v,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            t: 0,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
        })
    }

    /// Applies one update with learning rate `lr` and gradients `grads` (aligned with
    /// `params`), each multiplied by `scale` first (1/tokens and the clipping factor).
    pub fn step(&mut self, grads: &[Tensor], scale: f64, lr: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let theta = p.var.as_tensor();
            if [theta, &p.m, &p.v, g]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
            {
                // In place, one pass per buffer: the composite version below allocates ten
                // temporaries of the parameter's size.
                let (scale, lr) = (scale as f32, lr as f32);
                p.m.inplace_op2(
                    g,
                    &Moment {
                        beta: b1 as f32,
                        scale,
                        square: false,
                    },
                )?;
                p.v.inplace_op2(
                    g,
                    &Moment {
                        beta: b2 as f32,
                        scale,
                        square: true,
                    },
                )?;
                let decay = if p.decay {
                    self.weight_decay as f32
                } else {
                    0.0
                };
                let update = Update {
                    lr,
                    decay: 1.0 - lr * decay,
                    bias1: bias1 as f32,
                    bias2: bias2 as f32,
                    eps: self.eps as f32,
                };
                theta.inplace_op3(&p.m, &p.v, &update)?;
                continue;
            }
            let g = (g * scale)?;
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&p.v / bias2)?.sqrt()? + self.eps)?;
            let update = ((&p.m / bias1)? / denom)?;
            let theta = p.var.as_tensor();
            let theta = if p.decay {
                (theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta.clone()
            };
            p.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as `m.<name>` / `v.<name>` tensors, for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.clone());
            out.insert(format!("v.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) and the step count.
    pub fn load_state(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        t: u64,
    ) -> std::result::Result<(), String> {
        for p in &mut self.params {
            let mut take = |k: String| {
                let x = tensors
                    .remove(&k)
                    .ok_or_else(|| format!("optimizer state lacks {k}"))?;
                if x.shape() != p.var.shape() {
                    return Err(format!("optimizer state {k} has shape {:?}", x.shape()));
                }
                Ok(x)
            };
            p.m = take(format!("m.{}", p.name))?;
            p.v = take(format!("v.{}", p.name))?;
        }
        self.t = t;
        Ok(())
    }
}

/// `m = beta * m + (1 - beta) * (scale * g)` (or of its square), in place on `m`.
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "anneal-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let g = kernels::slice(gs, gl, self.name())?;
        let m = slice_mut(ms, ml, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!(
                "{}: {} moments for {} gradients",
                self.name(),
                m.len(),
                g.len()
            );
        }
        let (a, b) = (self.beta, 1.0 - self.beta);
        pool::chunks_mut(m, CHUNK, |i, m| {
            let g = &g[i * CHUNK..];
            if self.square {
                m.iter_mut().zip(g).for_each(|(m, g)| {
                    let g = g * self.scale;
                    *m = a * *m + b * (g * g);
                });
            } else {
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, g)| *m = a * *m + b * (g * self.scale));
            }
        });
        Ok(())
    }
}

/// `theta = decay * theta - lr * (m / bias1) / (sqrt(v / bias2) + eps)`, in place on `theta`.
struct Update {
    lr: f32,
    decay: f32,
    bias1: f32,
    bias2: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "anneal-adamw-update"
    }

    fn cpu_fwd(
        &self,
        ts: &mut CpuStorage,
        tl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let m = kernels::slice(ms, ml, self.name())?;
        let v = kernels::slice(vs, vl, self.name())?;
        let theta = slice_mut(ts, tl, self.name())?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("{}: moments do not match the parameter", self.name());
        }
        pool::chunks_mut(theta, CHUNK, |i, theta| {
            let (m, v) = (&m[i * CHUNK..], &v[i * CHUNK..]);
            for ((theta, m), v) in theta.iter_mut().zip(m).zip(v) {
                let update = (m / self.bias1) / ((v / self.bias2).sqrt() + self.eps);
                *theta = *theta * self.decay - self.lr * update;
            }
        });
        Ok(())
    }
}

/// The f32 values of a contiguous CPU storage, mutably.
fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(&mut v[start..end])
}

/// Learning rate at `step` (0-based): linear warm-up to the peak, then the schedule's decay:
/// cosine to the minimum, linear to zero at the last step, or none.
pub fn learning_rate(h: &Hyperparameters, step: u64) -> f64 {
    let peak = h.learning_rate;
    let min = h.min_learning_rate.unwrap_or(peak * 0.1);
    if step < h.warmup_steps {
        return peak * (step + 1) as f64 / h.warmup_steps as f64;
    }
    let decay_steps = h.steps.saturating_sub(h.warmup_steps).max(1);
    let progress = ((step - h.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match h.schedule {
        super::config::Schedule::Cosine => {
            min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        super::config::Schedule::Linear => peak * (1.0 - progress),
        super::config::Schedule::Constant => peak,
    }
}

/// Global L2 norm of `grads` (summed in order) times `scale`.
pub fn global_norm(grads: &[Tensor], scale: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            // Fixed-size partial sums added in order: the same result for any thread count.
            let partials: Vec<f64> = kernels::with_slice(g, "grad-norm", |x| {
                pool::map(x.len().div_ceil(CHUNK), |i| {
                    let c = &x[i * CHUNK..x.len().min((i + 1) * CHUNK)];
                    f64::from(c.iter().map(|v| v * v).sum::<f32>())
                })
            })?;
            total += partials.iter().sum::<f64>();
            continue;
        }
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt() * scale)
}

/// Factor that brings a gradient of norm `norm` under `clip` (1 when already under, or when
/// clipping is off).
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if clip > 0.0 && norm > clip {
        clip / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place f32 update matches the composite one (run here in f64) to 1e-6.
    #[test]
    fn in_place_update_matches_composite() -> Result<()> {
        let h = Hyperparameters {
            weight_decay: 0.1,
            ..Default::default()
        };
        let dev = candle_core::Device::Cpu;
        let make = |dtype| -> Result<AdamW> {
            let w = Tensor::arange(0f32, 12.0, &dev)?
                .reshape((3, 4))?
                .to_dtype(dtype)?;
            let s = Tensor::ones(4, DType::F32, &dev)?.to_dtype(dtype)?;
            let vars = vec![
                ("w".into(), Var::from_tensor(&w)?),
                ("s".into(), Var::from_tensor(&s)?),
            ];
            AdamW::new(vars, &h)
        };
        let (mut fused, mut composite) = (make(DType::F32)?, make(DType::F64)?);
        for step in 0..3 {
            let grads = |dtype| -> Result<Vec<Tensor>> {
                fused
                    .params
                    .iter()
                    .map(|p| {
                        let n = p.var.elem_count() as f32;
                        (Tensor::arange(0f32, n, &dev)? * (0.3 - step as f64 * 0.2))?
                            .reshape(p.var.shape())?
                            .to_dtype(dtype)
                    })
                    .collect()
            };
            let (gf, gc) = (grads(DType::F32)?, grads(DType::F64)?);
            fused.step(&gf, 0.5, 0.01)?;
            composite.step(&gc, 0.5, 0.01)?;
        }
        for (a, b) in fused.params.iter().zip(&composite.params) {
            let b = b.var.as_tensor().to_dtype(DType::F32)?;
            let d = (a.var.as_tensor() - b)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "{} differs by {d}", a.name);
        }
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let h = Hyperparameters {
            steps: 100,
            warmup_steps: 10,
            learning_rate: 1.0,
            ..Default::default()
        };
        assert!((learning_rate(&h, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&h, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&h, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&h, 100) - 0.1).abs() < 1e-12);
        assert!(learning_rate(&h, 50) < 1.0 && learning_rate(&h, 50) > 0.1);
        let linear = Hyperparameters {
            schedule: super::super::config::Schedule::Linear,
            ..h.clone()
        };
        assert!((learning_rate(&linear, 55) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&linear, 100).abs() < 1e-12);
        let constant = Hyperparameters {
            schedule: super::super::config::Schedule::Constant,
            ..h.clone()
        };
        assert!((learning_rate(&constant, 99) - 1.0).abs() < 1e-12);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
    }
}
