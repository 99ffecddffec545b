//! The BERT encoder on the CPU over packed sequences: the inputs of a batch are laid end to end
//! (no padding), so the dense layers multiply exactly the tokens there are, and attention runs
//! per sequence and head over that sequence's own rows (what text-embeddings-inference does on a
//! GPU with variable-length attention). The products are anneal's own ([`crate::kernels`],
//! AVX-512 or AVX2), element-wise work uses its vectorised `exp`/`erf`.
//!
//! Padded batches, as PyTorch and candle-transformers run them, spend most of their work on pad
//! tokens when lengths differ; here a batch costs what its tokens cost.

use crate::kernels::math::{self, gelu_erf};
use crate::kernels::pool;
use crate::kernels::{Mat, SharedOut, matmul, matmul_par};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

/// `y = x @ w^T + b` with `w` (out, inp) row-major.
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Dense {
    fn load(vb: &VarBuilder, out: usize, inp: usize) -> candle_core::Result<Self> {
        Ok(Self {
            w: vec_of(vb.get((out, inp), "weight")?)?,
            b: vec_of(vb.get(out, "bias")?)?,
            out,
            inp,
        })
    }

    /// Several maps of the same input as one (query, key and value).
    fn stack(parts: Vec<Dense>) -> Self {
        let inp = parts[0].inp;
        Self {
            out: parts.iter().map(|p| p.out).sum(),
            w: parts.iter().flat_map(|p| p.w.iter().copied()).collect(),
            b: parts.iter().flat_map(|p| p.b.iter().copied()).collect(),
            inp,
        }
    }

    /// `x` holds `rows` rows of `inp`.
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y: Vec<f32> = Vec::with_capacity(rows * self.out);
        for _ in 0..rows {
            y.extend_from_slice(&self.b);
        }
        let lhs = Mat::rows(x, rows, self.inp, self.inp);
        let rhs = Mat::rows(&self.w, self.out, self.inp, self.inp).t();
        matmul_par(&mut y, self.out, true, lhs, rhs, 1.0);
        y
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, d: usize, eps: f64) -> candle_core::Result<Self> {
        // Old BERT checkpoints name them gamma and beta.
        let get = |a: &str, b: &str| vb.get(d, a).or_else(|_| vb.get(d, b)).and_then(vec_of);
        Ok(Self {
            w: get("weight", "gamma")?,
            b: get("bias", "beta")?,
            eps: eps as f32,
        })
    }

    /// Normalises each row of `x` (width = its length) in place.
    fn apply(&self, x: &mut [f32]) {
        let d = self.w.len();
        pool::chunks_mut(x, d, |_, row| {
            let mean = math::sum(row) / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = (*v - mean) * inv * w + b;
            }
        });
    }
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    ln1: LayerNorm,
    up: Dense,
    down: Dense,
    ln2: LayerNorm,
}

/// A BERT encoder's weights, as f32 arrays.
pub struct CpuBert {
    word: Vec<f32>,
    position: Vec<f32>,
    /// Row 0 of the token-type table: every input is one segment.
    token_type: Vec<f32>,
    ln: LayerNorm,
    layers: Vec<Layer>,
    d: usize,
    heads: usize,
    act: HiddenAct,
    max_positions: usize,
}

fn vec_of(t: candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl CpuBert {
    /// Reads the weights of `vb` (a BERT checkpoint, with or without a `bert.` prefix).
    pub fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let d = c.hidden_size;
        let e = vb.pp("embeddings");
        let token_types = vec_of(e.get((c.type_vocab_size, d), "token_type_embeddings.weight")?)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                qkv: Dense::stack(vec![
                    Dense::load(&a.pp("self.query"), d, d)?,
                    Dense::load(&a.pp("self.key"), d, d)?,
                    Dense::load(&a.pp("self.value"), d, d)?,
                ]),
                attn_out: Dense::load(&a.pp("output.dense"), d, d)?,
                ln1: LayerNorm::load(&a.pp("output.LayerNorm"), d, c.layer_norm_eps)?,
                up: Dense::load(&l.pp("intermediate.dense"), c.intermediate_size, d)?,
                down: Dense::load(&l.pp("output.dense"), d, c.intermediate_size)?,
                ln2: LayerNorm::load(&l.pp("output.LayerNorm"), d, c.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word: vec_of(e.get((c.vocab_size, d), "word_embeddings.weight")?)?,
            position: vec_of(e.get((c.max_position_embeddings, d), "position_embeddings.weight")?)?,
            token_type: token_types[..d].to_vec(),
            ln: LayerNorm::load(&e.pp("LayerNorm"), d, c.layer_norm_eps)?,
            layers,
            d,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            max_positions: c.max_position_embeddings,
        })
    }

    /// The last hidden states of `inputs` (token ids, each at most the model's positions long),
    /// packed: the rows of input `i` follow those of input `i - 1`.
    pub fn forward(&self, inputs: &[&[u32]]) -> candle_core::Result<Vec<f32>> {
        let d = self.d;
        let vocab = self.word.len() / d;
        let rows: usize = inputs.iter().map(|i| i.len()).sum();
        let mut x = vec![0f32; rows * d];
        let mut r = 0;
        for input in inputs {
            if input.len() > self.max_positions {
                candle_core::bail!(
                    "an input of {} tokens is longer than the model's {} positions",
                    input.len(),
                    self.max_positions
                );
            }
            for (pos, &id) in input.iter().enumerate() {
                let id = id as usize;
                if id >= vocab {
                    candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                }
                let row = &mut x[r * d..(r + 1) * d];
                let word = &self.word[id * d..(id + 1) * d];
                let position = &self.position[pos * d..(pos + 1) * d];
                for (((v, w), p), t) in row.iter_mut().zip(word).zip(position).zip(&self.token_type)
                {
                    *v = w + p + t;
                }
                r += 1;
            }
        }
        self.ln.apply(&mut x);
        let spans: Vec<(usize, usize)> = inputs
            .iter()
            .scan(0, |start, i| {
                let span = (*start, i.len());
                *start += i.len();
                Some(span)
            })
            .collect();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x, rows);
            let ctx = self.attention(&qkv, rows, &spans);
            let mut h = layer.attn_out.forward(&ctx, rows);
            add(&mut h, &x);
            layer.ln1.apply(&mut h);
            let mut up = layer.up.forward(&h, rows);
            self.activate(&mut up);
            let mut out = layer.down.forward(&up, rows);
            add(&mut out, &h);
            layer.ln2.apply(&mut out);
            x = out;
        }
        Ok(x)
    }

    /// Scaled dot-product attention of each sequence with itself, per head; `qkv` rows hold
    /// query, key and value side by side. Tasks are (sequence, head) pairs, each writing its
    /// head's columns of its sequence's rows.
    fn attention(&self, qkv: &[f32], rows: usize, spans: &[(usize, usize)]) -> Vec<f32> {
        let (d, heads) = (self.d, self.heads);
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut ctx = vec![0f32; rows * d];
        let out = SharedOut::new(&mut ctx);
        let tasks: Vec<(usize, usize, usize)> = spans
            .iter()
            .flat_map(|&(start, len)| (0..heads).map(move |h| (start, len, h)))
            .collect();
        pool::run(tasks.len(), |t| {
            let (start, len, h) = tasks[t];
            let q = Mat::rows(&qkv[start * 3 * d + h * dh..], len, dh, 3 * d);
            let k = Mat::rows(&qkv[start * 3 * d + d + h * dh..], len, dh, 3 * d);
            let v = Mat::rows(&qkv[start * 3 * d + 2 * d + h * dh..], len, dh, 3 * d);
            let mut scores = vec![0f32; len * len];
            matmul(&mut scores, len, false, q, k.t(), scale);
            scores.chunks_mut(len).for_each(math::softmax);
            let mut head = vec![0f32; len * dh];
            matmul(
                &mut head,
                dh,
                false,
                Mat::rows(&scores, len, len, len),
                v,
                1.0,
            );
            // SAFETY: task (start, h) alone writes columns h*dh.. of rows start..start+len.
            unsafe { out.write_rows(start * d + h * dh, d, &head, dh) };
        });
        ctx
    }

    fn activate(&self, x: &mut [f32]) {
        let act = self.act;
        pool::chunks_mut(x, 4096, |_, chunk| match act {
            HiddenAct::Gelu => chunk.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            HiddenAct::GeluApproximate => chunk.iter_mut().for_each(|v| {
                let u = 0.797_884_6 * (*v + 0.044_715 * *v * *v * *v);
                // tanh(u) = 2 sigmoid(2u) - 1
                *v = 0.5 * *v * (2.0 * math::sigmoid(2.0 * u));
            }),
            HiddenAct::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
        });
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
