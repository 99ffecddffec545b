//! Where a [`Transformer`](super::Transformer)'s weights come from, and the deterministic
//! initialisation of a model trained from scratch.

use super::{Linear, ModelConfig};
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// A source of named weights. Names follow GGUF's llama convention; `linear` takes the name
/// without the `.weight` suffix, `tensor` the full name.
pub trait Weights {
    /// The (out_dim, in_dim) weight `{name}.weight` as a linear map.
    fn linear(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<Linear>;
    /// A dense f32 tensor of the given shape.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

/// Dense weights: from a [`VarMap`] (trainable variables) or a safetensors file.
impl Weights for VarBuilder<'_> {
    fn linear(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
        Ok(Linear::Dense(
            self.get((out_dim, in_dim), &format!("{name}.weight"))?,
        ))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(Shape::from_dims(shape), name)
    }
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Ones,
    Normal(f64),
}

/// Every parameter of `config` with its shape, in a fixed order (the order of initialisation).
pub fn param_names(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    param_specs(config)
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect()
}

fn param_specs(config: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, i, v, hd) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.head_dim(),
    );
    let std = 0.02;
    // Residual projections start smaller so the residual stream's variance does not grow with depth.
    let std_out = std / (2.0 * config.n_layers as f64).sqrt();
    let mut specs = vec![(
        "token_embd.weight".to_string(),
        vec![v, h],
        Init::Normal(std),
    )];
    for l in 0..config.n_layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        specs.extend([
            (p("attn_norm.weight"), vec![h], Init::Ones),
            (
                p("attn_q.weight"),
                vec![config.n_heads * hd, h],
                Init::Normal(std),
            ),
            (
                p("attn_k.weight"),
                vec![config.n_kv_heads * hd, h],
                Init::Normal(std),
            ),
            (
                p("attn_v.weight"),
                vec![config.n_kv_heads * hd, h],
                Init::Normal(std),
            ),
            (
                p("attn_output.weight"),
                vec![h, config.n_heads * hd],
                Init::Normal(std_out),
            ),
            (p("ffn_norm.weight"), vec![h], Init::Ones),
            (p("ffn_gate.weight"), vec![i, h], Init::Normal(std)),
            (p("ffn_up.weight"), vec![i, h], Init::Normal(std)),
            (p("ffn_down.weight"), vec![h, i], Init::Normal(std_out)),
        ]);
    }
    specs.push(("output_norm.weight".to_string(), vec![h], Init::Ones));
    if !config.tie_embeddings {
        specs.push(("output.weight".to_string(), vec![v, h], Init::Normal(std)));
    }
    specs
}

/// A [`VarMap`] holding every parameter of `config`, initialised from `seed` alone (candle's
/// own initialisers draw from an unseeded generator, which would break reproducibility).
pub fn init_params(config: &ModelConfig, seed: u64, device: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    let mut rng = Rng::new(seed, 0x1417);
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned"))?;
        for (name, shape, init) in param_specs(config) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = match init {
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            };
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(DType::F32)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}
