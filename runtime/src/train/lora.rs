//! LoRA (low-rank adaptation, Hu et al. 2021, as PEFT does it): each target weight `W0`
//! (out x in) stays frozen and learns a low-rank change, `W = W0 + (alpha / rank) B A` with `A`
//! (rank x in) drawn like PEFT's default (Kaiming-uniform, bound `1/sqrt(in)`) and `B` (out x
//! rank) zero, so training starts from the base model exactly.
//!
//! The step runs on the merged weight: before each step `W` is set to `W0 + s B A`, the
//! training step (the fused CPU one, or candle's autograd) computes the gradient `G` of the
//! loss with respect to `W`, and the chain rule gives the adapters' gradients
//! `dB = s G Aᵀ` and `dA = s Bᵀ G` exactly. Only `A` and `B` have optimizer moments and are
//! summed over a gang; the output is the merged model (what `serve` and llama.cpp load) and the
//! adapters beside it (`adapter.safetensors`, `adapter.json`).

use super::TrainError;
use crate::model::ModelConfig;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Which weights of every block get an adapter: `q`, `k`, `v`, `o` (attention), `gate`, `up`,
/// `down` (feed-forward).
pub const TARGETS: [(&str, &str); 7] = [
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
];

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoraSettings {
    /// Rank of each adapter.
    pub rank: usize,
    /// Scale numerator: the change is `alpha / rank` times `B A`.
    pub alpha: f64,
    /// Weights adapted in every block (PEFT's default for llama: `q` and `v`).
    pub targets: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: vec!["q".into(), "v".into()],
        }
    }
}

impl LoraSettings {
    /// Checks rank, alpha and targets.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 || self.rank > 4096 {
            return Err("lora.rank must be in 1..=4096".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err("lora.alpha must be positive".into());
        }
        if self.targets.is_empty() {
            return Err("lora.targets must name at least one weight".into());
        }
        if let Some(t) = self.targets.iter().find(|t| suffix(t).is_none()) {
            return Err(format!(
                "lora.targets: unknown weight {t:?} (use q, k, v, o, gate, up, down)"
            ));
        }
        Ok(())
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

fn suffix(target: &str) -> Option<&'static str> {
    TARGETS.iter().find(|(t, _)| *t == target).map(|(_, s)| *s)
}

/// One adapted weight.
struct Adapter {
    /// The weight's name (`blk.3.attn_q.weight`).
    name: String,
    /// The base weight `W0`.
    base: Tensor,
    /// The weight the model computes with (`W0 + s B A`), a variable of the model's map.
    merged: Var,
    a: Var,
    b: Var,
}

/// The adapters of a run.
pub struct Lora {
    /// The settings.
    pub settings: LoraSettings,
    adapters: Vec<Adapter>,
}

/// Name of an adapter matrix: `{weight}.lora_a` or `{weight}.lora_b`.
fn adapter_name(weight: &str, which: &str) -> String {
    format!("{weight}.lora_{which}")
}

impl Lora {
    /// Adapters for the target weights of `config`'s blocks in `varmap`, initialised from
    /// `seed`.
    pub fn new(
        settings: LoraSettings,
        config: &ModelConfig,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        settings.validate().map_err(TrainError::Config)?;
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Internal("weights lock poisoned".into()))?;
        let mut rng = Rng::new(seed, 0x10A4);
        let mut adapters = Vec::new();
        for l in 0..config.n_layers {
            for (_, suffix) in TARGETS
                .iter()
                .filter(|(t, _)| settings.targets.iter().any(|s| s == t))
            {
                let name = format!("blk.{l}.{suffix}.weight");
                let merged = vars
                    .get(&name)
                    .ok_or_else(|| TrainError::Internal(format!("no weight {name}")))?
                    .clone();
                let (out, inp) = merged.as_tensor().dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..settings.rank * inp)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (settings.rank, inp), device)?)?;
                let b =
                    Var::from_tensor(&Tensor::zeros((out, settings.rank), DType::F32, device)?)?;
                adapters.push(Adapter {
                    base: merged.as_tensor().copy()?,
                    name,
                    merged,
                    a,
                    b,
                });
            }
        }
        Ok(Self { settings, adapters })
    }

    /// The adapters' variables by name (what the optimizer updates).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|ad| {
                [
                    (adapter_name(&ad.name, "a"), ad.a.clone()),
                    (adapter_name(&ad.name, "b"), ad.b.clone()),
                ]
            })
            .collect()
    }

    /// The adapted weights' names and shapes (the gradients the step computes).
    pub fn weights(&self) -> Vec<(String, Vec<usize>)> {
        self.adapters
            .iter()
            .map(|ad| (ad.name.clone(), ad.base.dims().to_vec()))
            .collect()
    }

    /// The adapted weights' variables, in [`Lora::weights`] order.
    pub fn weight_vars(&self) -> Vec<Var> {
        self.adapters.iter().map(|ad| ad.merged.clone()).collect()
    }

    /// Sets every adapted weight to `W0 + s B A`.
    pub fn merge(&self) -> Result<(), TrainError> {
        let s = self.settings.scale();
        for ad in &self.adapters {
            let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * s)?;
            ad.merged.set(&(&ad.base + delta)?)?;
        }
        Ok(())
    }

    /// The adapters' gradients by name from the adapted weights' (in [`Lora::weights`]
    /// order): `dA = s Bᵀ G`, `dB = s G Aᵀ`.
    pub fn adapter_grads(&self, grads: &[Tensor]) -> Result<HashMap<String, Tensor>, TrainError> {
        let s = self.settings.scale();
        let mut out = HashMap::new();
        for (ad, g) in self.adapters.iter().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let da = (ad.b.as_tensor().t()?.matmul(&g)? * s)?;
            let db = (g.matmul(&ad.a.as_tensor().t()?)? * s)?;
            out.insert(adapter_name(&ad.name, "a"), da);
            out.insert(adapter_name(&ad.name, "b"), db);
        }
        Ok(out)
    }

    /// The adapters as tensors by name (checkpoints, and the adapter file of the output).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Restores the adapters from `tensors` (a checkpoint's).
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        for (name, var) in self.vars() {
            let t = tensors.get(&name).ok_or_else(|| {
                TrainError::Checkpoint(crate::checkpoint::CheckpointError::Corrupt(format!(
                    "no LoRA adapter `{name}`"
                )))
            })?;
            var.set(t)?;
        }
        self.merge()
    }
}

impl Lora {
    /// Writes the adapters in PEFT's format into `dir`: `adapter_model.safetensors` (Hugging
    /// Face names; the query and key adapters' `B` rows in Hugging Face's rotary layout, as
    /// their weights are) and `adapter_config.json`, for `base` (the base model's URI).
    pub fn write_peft(
        &self,
        dir: &std::path::Path,
        config: &ModelConfig,
        base: &str,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        use crate::checkpoint::CheckpointError;
        let hd = config.head_dim();
        let mut tensors = HashMap::new();
        let mut modules = std::collections::BTreeSet::new();
        for ad in &self.adapters {
            let hf = super::base::hf_name(&ad.name);
            let module = hf.trim_end_matches(".weight");
            modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
            let b = ad.b.as_tensor();
            let b = if ad.name.ends_with("attn_q.weight") {
                super::base::rotary_half_split(b, config.n_heads, hd)?
            } else if ad.name.ends_with("attn_k.weight") {
                super::base::rotary_half_split(b, config.n_kv_heads, hd)?
            } else {
                b.clone()
            };
            tensors.insert(
                format!("base_model.model.{module}.lora_A.weight"),
                ad.a.as_tensor().clone(),
            );
            tensors.insert(format!("base_model.model.{module}.lora_B.weight"), b);
        }
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        let json = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.settings.rank,
            "lora_alpha": self.settings.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "target_modules": modules.into_iter().collect::<Vec<_>>(),
        });
        let bytes =
            serde_json::to_vec_pretty(&json).map_err(|e| CheckpointError::Format(e.to_string()))?;
        crate::checkpoint::atomic::write_synced(&dir.join("adapter_config.json"), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapters' gradients from the adapted weight's equal autograd's through `W0 + s B A`.
    #[test]
    fn the_chain_rule_gives_autograds_adapter_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (out, inp, rank, s) = (6usize, 5usize, 3usize, 2.5f64);
        let mut rng = Rng::new(1, 2);
        let mut rand = |r: usize, c: usize| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
            Tensor::from_vec(v, (r, c), &dev)
        };
        let (w0, x, y) = (rand(out, inp)?, rand(4, inp)?, rand(4, out)?);
        let a = Var::from_tensor(&rand(rank, inp)?)?;
        let b = Var::from_tensor(&rand(out, rank)?)?;
        let loss = |w: &Tensor| -> candle_core::Result<Tensor> {
            (x.matmul(&w.t()?)?.tanh()? * &y)?.sum_all()
        };
        // Autograd through the adapters.
        let w = (&w0 + (b.as_tensor().matmul(a.as_tensor())? * s)?)?;
        let grads = loss(&w)?.backward()?;
        // The chain rule from the merged weight's gradient.
        let merged = Var::from_tensor(&w)?;
        let g = loss(merged.as_tensor())?.backward()?;
        let g = g.get(merged.as_tensor()).expect("merged gradient").clone();
        let lora = Lora {
            settings: LoraSettings {
                rank,
                alpha: s * rank as f64,
                targets: vec!["q".into()],
            },
            adapters: vec![Adapter {
                name: "blk.0.attn_q.weight".into(),
                base: w0.clone(),
                merged,
                a: a.clone(),
                b: b.clone(),
            }],
        };
        let ours = lora.adapter_grads(&[g]).map_err(candle_core::Error::wrap)?;
        for (name, var) in [("a", &a), ("b", &b)] {
            let want = grads
                .get(var.as_tensor())
                .expect("autograd")
                .flatten_all()?;
            let got = ours[&adapter_name("blk.0.attn_q.weight", name)].flatten_all()?;
            let diff = (want - got)?.abs()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "d{name}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn settings_are_checked() {
        assert!(LoraSettings::default().validate().is_ok());
        let bad = |f: fn(&mut LoraSettings)| {
            let mut s = LoraSettings::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(|s| s.rank = 0).contains("rank"));
        assert!(bad(|s| s.targets = vec!["w".into()]).contains("\"w\""));
        assert!(bad(|s| s.alpha = f64::NAN).contains("alpha"));
    }
}
