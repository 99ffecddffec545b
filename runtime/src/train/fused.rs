//! The whole training step of the transformer on the CPU in f32, forward and backward written
//! out over flat buffers that live from one step to the next.
//!
//! candle's autograd, even over the fused kernels, allocates and zeroes a buffer per graph
//! node and adds each gradient into a fresh zeroed copy (`zeros_like` then `add`), stacks the
//! q/k/v and gate/up weights with a copy (and un-stacks their gradients with another) every
//! step, and keeps every activation in a new allocation. On a small model those passes over
//! memory cost as much as the matrix products. Here the activations and gradients are
//! written once into buffers reused across steps, residual additions and gradient
//! accumulation happen inside the matrix products (the FMA chain starts from the value
//! already there), and weight gradients go straight into the buffers the optimizer reads.
//!
//! The same kernels as the graph path compute each piece (`crate::kernels`), so the numbers
//! agree with candle's autograd to float rounding (a test checks every gradient); the order of
//! every sum is fixed, so a run stays bitwise reproducible for any thread count. Other
//! devices, bf16 and quantized weights keep candle's autograd (`ANNEAL_FUSED_STEP=0` forces
//! it on the CPU too, for comparisons).

use super::dpo;
use super::loss::{Objective, Outcome, nll_sum_and_grad};
use crate::data::Batch;
use crate::kernels::{Mat, attention, matmul_par, norm, swiglu, with_slice};
use crate::model::{Linear, Transformer};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;

fn internal(e: candle_core::Error) -> crate::dist::DistError {
    crate::dist::DistError::Protocol(format!("fused step: {e}"))
}

/// Whether the fused step can train `model`: dense f32 weights on the CPU, and not turned off
/// with `ANNEAL_FUSED_STEP=0`.
pub fn applies(model: &Transformer) -> bool {
    if std::env::var("ANNEAL_FUSED_STEP").is_ok_and(|v| v == "0") {
        return false;
    }
    let dense = |l: &Linear| matches!(l, Linear::Dense(w) if w.dtype() == DType::F32);
    model.embedding.device().is_cpu()
        && model.embedding.dtype() == DType::F32
        && dense(&model.lm_head)
        && model.blocks.iter().all(|b| {
            [&b.attn.q, &b.attn.k, &b.attn.v, &b.attn.o]
                .into_iter()
                .chain([&b.mlp.gate, &b.mlp.up, &b.mlp.down])
                .all(dense)
        })
}

/// One block's weights (stacked as the kernels want them), or their gradients.
#[derive(Default)]
struct BlockBufs {
    attn_norm: Vec<f32>,
    /// q, k and v weights stacked by rows: ((heads + 2 kv_heads) * head_dim, hidden).
    qkv: Vec<f32>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// gate and up weights stacked by rows: (2 intermediate, hidden).
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

/// All weights, or all gradients.
#[derive(Default)]
struct ModelBufs {
    embedding: Vec<f32>,
    blocks: Vec<BlockBufs>,
    norm: Vec<f32>,
    /// The head; unused when the head is the embedding (tied).
    head: Vec<f32>,
}

/// What the backward pass of one block needs from its forward pass.
#[derive(Default)]
struct BlockActs {
    /// The block's input (residual stream).
    x: Vec<f32>,
    n1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    attn: attention::Saved,
    /// The residual stream after attention.
    mid: Vec<f32>,
    n2: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// Sizes of the model.
#[derive(Clone, Copy)]
struct Dims {
    vocab: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    eps: f32,
    tied: bool,
}

impl Dims {
    fn qkv(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    fn att(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// The fused training step's buffers. Build it once per trainer; [`FusedStep::accumulate`]
/// runs a micro-batch, [`FusedStep::take_grads`] hands the summed gradients to the optimizer.
pub struct FusedStep {
    dims: Dims,
    weights: ModelBufs,
    grads: ModelBufs,
    acts: Vec<BlockActs>,
    /// The last block's output, the final norm's output and the logits (then their gradient).
    top: (Vec<f32>, Vec<f32>, Vec<f32>),
    /// Backward scratch: the residual stream's gradient, a hidden-wide one, and two wider ones.
    scratch: (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Which gradients to compute.
    trains: Trains,
    /// Micro-batches summed into `grads` since the last `take_grads`.
    micro: usize,
}

/// Rows `from..from + rows` of a row-major buffer of rows `width` wide (empty when it is
/// shorter).
fn split_rows(buf: &[f32], from: usize, rows: usize, width: usize) -> &[f32] {
    buf.get(from * width..(from + rows) * width).unwrap_or(&[])
}

/// A tensor's values.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    with_slice(t, "anneal-fused-step", <[f32]>::to_vec)
}

/// Sets `dst` to the values of `tensors` one after the other, reusing its allocation.
fn copy_into(dst: &mut Vec<f32>, tensors: &[&Tensor]) -> Result<()> {
    dst.clear();
    for t in tensors {
        with_slice(t, "anneal-fused-step", |v| dst.extend_from_slice(v))?;
    }
    Ok(())
}

/// Which gradients the step computes, decided once from the names the optimizer trains.
struct Trains {
    embedding: bool,
    /// The head (the embedding itself when tied).
    head: bool,
    norm: bool,
    /// Per block: attn_norm, q/k/v, attn_output, ffn_norm, gate/up, down.
    blocks: Vec<[bool; 6]>,
    /// The lowest block the backward pass reaches: blocks below the lowest trained one need
    /// no gradient, unless the embedding trains.
    stop: usize,
}

impl Trains {
    fn new(names: &[String], n_layers: usize, tied: bool) -> Self {
        let has = |name: &str| names.iter().any(|n| n == name);
        let embd = "token_embd.weight";
        let embedding = has(embd);
        let blocks: Vec<[bool; 6]> = (0..n_layers)
            .map(|l| {
                let t = |p: &str| has(&format!("blk.{l}.{p}.weight"));
                [
                    t("attn_norm"),
                    t("attn_q") || t("attn_k") || t("attn_v"),
                    t("attn_output"),
                    t("ffn_norm"),
                    t("ffn_gate") || t("ffn_up"),
                    t("ffn_down"),
                ]
            })
            .collect();
        let stop = if embedding {
            0
        } else {
            blocks
                .iter()
                .position(|b| b.contains(&true))
                .unwrap_or(n_layers)
        };
        Self {
            embedding,
            head: has(if tied { embd } else { "output.weight" }),
            norm: has("output_norm.weight"),
            blocks,
            stop,
        }
    }
}

/// A bucket of gradients on its way to the gang's sum: where they belong, and the buffers (in a
/// fixed order) of the weights that train. Every rank sends the same buckets in the same order,
/// so the ring's calls match.
struct Bucket {
    /// `Some(l)`: block `l`; `None`: the embedding, the final norm and the head.
    block: Option<usize>,
    bufs: Vec<Vec<f32>>,
}

/// Where the backward pass sends each bucket as soon as it is final.
type Sink = std::sync::mpsc::Sender<Bucket>;

/// `v` taken out of its place, `len` long: zeros when nothing was computed into it yet (a
/// rank whose micro-batches all had no loss token still adds its part, zero, to the sum).
fn taken(v: &mut Vec<f32>, len: usize, computed: bool) -> Vec<f32> {
    let mut out = std::mem::take(v);
    if !computed || out.len() != len {
        out.clear();
        out.resize(len, 0.0);
    }
    out
}

impl Trains {
    /// The gradients of block `l` that train, taken out of `gb` (see [`FusedStep::put_back`]);
    /// zeros of the right length when nothing was `computed` into them.
    fn take_block(&self, d: Dims, l: usize, gb: &mut BlockBufs, computed: bool) -> Bucket {
        let h = d.hidden;
        let [t_an, t_qkv, t_o, t_fn, t_gu, t_down] = self.blocks[l];
        let mut bufs = Vec::new();
        for (trains, buf, len) in [
            (t_an, &mut gb.attn_norm, h),
            (t_qkv, &mut gb.qkv, d.qkv() * h),
            (t_o, &mut gb.o, h * d.att()),
            (t_fn, &mut gb.ffn_norm, h),
            (t_gu, &mut gb.gate_up, 2 * d.inter * h),
            (t_down, &mut gb.down, h * d.inter),
        ] {
            if trains {
                bufs.push(taken(buf, len, computed));
            }
        }
        Bucket {
            block: Some(l),
            bufs,
        }
    }

    /// The embedding's, final norm's and head's gradients that train, taken out of `gr`.
    fn take_top(&self, d: Dims, gr: &mut ModelBufs, computed: bool) -> Bucket {
        let (v, h) = (d.vocab, d.hidden);
        let mut bufs = Vec::new();
        if self.embedding || (d.tied && self.head) {
            bufs.push(taken(&mut gr.embedding, v * h, computed));
        }
        if self.norm {
            bufs.push(taken(&mut gr.norm, h, computed));
        }
        if !d.tied && self.head {
            bufs.push(taken(&mut gr.head, v * h, computed));
        }
        Bucket { block: None, bufs }
    }
}

fn dense(l: &Linear) -> Result<&Tensor> {
    match l {
        Linear::Dense(w) => Ok(w),
        Linear::Quantized(_) => candle_core::bail!("fused step: quantized weight"),
    }
}

/// A micro-batch as the passes read it: token ids, targets, the loss mask, and the shapes.
type Prepared = (Vec<u32>, Vec<u32>, Vec<f32>, attention::Geometry);

/// Sets `v` to `len` values without touching the ones it keeps (they are overwritten).
fn size(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

impl FusedStep {
    /// Buffers for `model`, training the weights named in `trainable`.
    pub fn new(model: &Transformer, trainable: Vec<String>) -> Result<Self> {
        let c = &model.config;
        let dims = Dims {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim(),
            inter: c.intermediate_size,
            eps: c.rms_norm_eps as f32,
            tied: c.tie_embeddings,
        };
        Ok(Self {
            dims,
            weights: ModelBufs::default(),
            grads: ModelBufs::default(),
            acts: (0..c.n_layers).map(|_| BlockActs::default()).collect(),
            top: Default::default(),
            scratch: Default::default(),
            cos: values(&model.cos)?,
            sin: values(&model.sin)?,
            trains: Trains::new(&trainable, c.n_layers, c.tie_embeddings),
            micro: 0,
        })
    }

    /// Copies the current weights of `model` into the stacked layout.
    fn load_weights(&mut self, model: &Transformer) -> Result<()> {
        let w = &mut self.weights;
        copy_into(&mut w.embedding, &[&model.embedding])?;
        copy_into(&mut w.norm, &[&model.norm.weight])?;
        if !self.dims.tied {
            copy_into(&mut w.head, &[dense(&model.lm_head)?])?;
        }
        w.blocks.resize_with(model.blocks.len(), BlockBufs::default);
        for (b, dst) in model.blocks.iter().zip(&mut w.blocks) {
            let (a, m) = (&b.attn, &b.mlp);
            copy_into(&mut dst.attn_norm, &[&b.attn_norm.weight])?;
            copy_into(&mut dst.qkv, &[dense(&a.q)?, dense(&a.k)?, dense(&a.v)?])?;
            copy_into(&mut dst.o, &[dense(&a.o)?])?;
            copy_into(&mut dst.ffn_norm, &[&b.ffn_norm.weight])?;
            copy_into(&mut dst.gate_up, &[dense(&m.gate)?, dense(&m.up)?])?;
            copy_into(&mut dst.down, &[dense(&m.down)?])?;
        }
        Ok(())
    }

    /// Runs forward and backward over `batch`, adds the gradients of `objective` to the ones
    /// summed so far, and returns its summed loss.
    pub fn accumulate(
        &mut self,
        model: &Transformer,
        batch: &Batch,
        objective: &Objective,
    ) -> Result<Outcome> {
        let (tokens, targets, mask, geometry) = self.prepare(model, batch)?;
        let outcome = self.forward(&tokens, &targets, &mask, geometry, Some(objective));
        self.backward(&tokens, geometry, None);
        self.micro += 1;
        Ok(outcome.unwrap_or(Outcome {
            loss_sum: 0.0,
            dpo: None,
        }))
    }

    /// The last micro-batch of a step for a rank of `gang` (or `None` when this rank has no
    /// last micro-batch with a loss token): runs it as [`Self::accumulate`] does while a
    /// second thread sums each block's gradients over the gang as soon as the backward pass has
    /// finished them (buckets, as PyTorch's DDP does), so the ring's traffic overlaps the
    /// backward pass of the blocks below. Afterwards [`Self::take_grads`] hands out the gang's
    /// sums. Every rank sends the same buckets in the same order (blocks from the top, then the
    /// embedding, norm and head), whether it overlaps them or not, so the ring's calls match.
    pub fn accumulate_summed(
        &mut self,
        model: &Transformer,
        last: Option<(&Batch, &Objective)>,
        gang: &mut crate::dist::Ring,
    ) -> std::result::Result<Option<Outcome>, crate::dist::DistError> {
        let prepared = match last {
            Some((batch, _)) => Some(self.prepare(model, batch).map_err(internal)?),
            None => None,
        };
        let (tx, rx) = std::sync::mpsc::channel::<Bucket>();
        let (summed, outcome) = std::thread::scope(|scope| {
            let comm = scope.spawn(move || {
                let mut summed = Vec::new();
                for mut bucket in rx {
                    for buf in &mut bucket.bufs {
                        gang.all_reduce_sum(buf)?;
                    }
                    summed.push(bucket);
                }
                Ok::<_, crate::dist::DistError>(summed)
            });
            let outcome = match (&prepared, last) {
                (Some((tokens, targets, mask, geometry)), Some((_, objective))) => {
                    let outcome = self.forward(tokens, targets, mask, *geometry, Some(objective));
                    self.backward(tokens, *geometry, Some(&tx));
                    self.micro += 1;
                    Some(outcome.unwrap_or(Outcome {
                        loss_sum: 0.0,
                        dpo: None,
                    }))
                }
                _ => {
                    // Nothing to overlap: the same buckets, sent now.
                    let (d, computed) = (self.dims, self.micro > 0);
                    let gr = &mut self.grads;
                    gr.blocks.resize_with(self.acts.len(), BlockBufs::default);
                    for l in (self.trains.stop..self.acts.len()).rev() {
                        let bucket = self.trains.take_block(d, l, &mut gr.blocks[l], computed);
                        let _ = tx.send(bucket);
                    }
                    let _ = tx.send(self.trains.take_top(d, gr, computed));
                    self.micro = self.micro.max(1);
                    None
                }
            };
            drop(tx);
            let summed = comm
                .join()
                .map_err(|_| crate::dist::DistError::Protocol("the sum thread panicked".into()));
            (summed, outcome)
        });
        for bucket in summed?? {
            self.put_back(bucket);
        }
        Ok(outcome)
    }

    /// Puts a bucket's buffers back where [`Trains::take_block`] or [`Trains::take_top`] took
    /// them from.
    fn put_back(&mut self, bucket: Bucket) {
        let d = self.dims;
        let mut bufs = bucket.bufs.into_iter();
        match bucket.block {
            Some(l) => {
                let [t_an, t_qkv, t_o, t_fn, t_gu, t_down] = self.trains.blocks[l];
                let gb = &mut self.grads.blocks[l];
                for (trains, slot) in [
                    (t_an, &mut gb.attn_norm),
                    (t_qkv, &mut gb.qkv),
                    (t_o, &mut gb.o),
                    (t_fn, &mut gb.ffn_norm),
                    (t_gu, &mut gb.gate_up),
                    (t_down, &mut gb.down),
                ] {
                    if trains {
                        *slot = bufs.next().unwrap_or_default();
                    }
                }
            }
            None => {
                let t = &self.trains;
                let gr = &mut self.grads;
                if t.embedding || (d.tied && t.head) {
                    gr.embedding = bufs.next().unwrap_or_default();
                }
                if t.norm {
                    gr.norm = bufs.next().unwrap_or_default();
                }
                if !d.tied && t.head {
                    gr.head = bufs.next().unwrap_or_default();
                }
            }
        }
    }

    /// The logits of `batch` (one row of `vocab` per position) from the very forward pass the
    /// step runs, gradients untouched: DPO's reference log-probabilities are computed with it,
    /// so that at the first step the policy equals its reference bit for bit.
    pub fn logits(&mut self, model: &Transformer, batch: &Batch) -> Result<&[f32]> {
        let (tokens, targets, mask, geometry) = self.prepare(model, batch)?;
        self.forward(&tokens, &targets, &mask, geometry, None);
        Ok(&self.top.2)
    }

    /// The batch as flat vectors, checked, with the model's weights loaded at the first
    /// micro-batch of a step.
    fn prepare(&mut self, model: &Transformer, batch: &Batch) -> Result<Prepared> {
        if self.micro == 0 {
            self.load_weights(model)?;
        }
        let (b, t) = batch.inputs.dims2()?;
        let tokens = batch.inputs.flatten_all()?.to_vec1::<u32>()?;
        let targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
        let mask = batch.mask.flatten_all()?.to_vec1::<f32>()?;
        let d = self.dims;
        if let Some(&bad) = tokens
            .iter()
            .chain(&targets)
            .find(|&&i| i as usize >= d.vocab)
        {
            candle_core::bail!("token {bad} outside the vocabulary of {}", d.vocab);
        }
        if t > self.cos.len() / (d.head_dim / 2) {
            candle_core::bail!("sequence of {t} tokens exceeds the RoPE tables");
        }
        let geometry = attention::Geometry::new(b, t, d.heads, d.kv_heads, d.head_dim)?;
        Ok((tokens, targets, mask, geometry))
    }

    /// The forward pass; with an objective, leaves the logits' gradient in `top.2` and returns
    /// the loss sum, without one leaves the logits there.
    fn forward(
        &mut self,
        tokens: &[u32],
        targets: &[u32],
        mask: &[f32],
        g: attention::Geometry,
        objective: Option<&Objective>,
    ) -> Option<Outcome> {
        let d = self.dims;
        let (n, h) = (tokens.len(), d.hidden);
        let w = &self.weights;
        // Every block reads its input from its own buffer, the next block's input is written
        // by the previous block; the first is the embedding.
        let first = match self.acts.first_mut() {
            Some(a) => &mut a.x,
            None => &mut self.top.0,
        };
        size(first, n * h);
        for (row, &tok) in first.chunks_exact_mut(h).zip(tokens) {
            let tok = tok as usize;
            row.copy_from_slice(&w.embedding[tok * h..(tok + 1) * h]);
        }
        let n_layers = self.acts.len();
        for l in 0..n_layers {
            let (done, rest) = self.acts.split_at_mut(l + 1);
            let a = &mut done[l];
            let next = match rest.first_mut() {
                Some(a) => &mut a.x,
                None => &mut self.top.0,
            };
            let wb = &w.blocks[l];
            size(&mut a.n1, n * h);
            norm::forward(&a.x, &wb.attn_norm, d.eps, &mut a.n1);
            size(&mut a.qkv, n * d.qkv());
            let n1 = Mat::rows(&a.n1, n, h, h);
            matmul_par(
                &mut a.qkv,
                d.qkv(),
                false,
                n1,
                Mat::rows(&wb.qkv, d.qkv(), h, h).t(),
                1.0,
            );
            size(&mut a.att, n * d.att());
            attention::forward(&a.qkv, g, &self.cos, &self.sin, &mut a.att, &mut a.attn);
            // mid = x + att @ o^T, the product's sums starting from x.
            a.mid.clone_from(&a.x);
            let att = Mat::rows(&a.att, n, d.att(), d.att());
            matmul_par(
                &mut a.mid,
                h,
                true,
                att,
                Mat::rows(&wb.o, h, d.att(), d.att()).t(),
                1.0,
            );
            size(&mut a.n2, n * h);
            norm::forward(&a.mid, &wb.ffn_norm, d.eps, &mut a.n2);
            size(&mut a.gate_up, n * 2 * d.inter);
            let n2 = Mat::rows(&a.n2, n, h, h);
            let gu = Mat::rows(&wb.gate_up, 2 * d.inter, h, h).t();
            matmul_par(&mut a.gate_up, 2 * d.inter, false, n2, gu, 1.0);
            size(&mut a.act, n * d.inter);
            swiglu::forward(&a.gate_up, d.inter, &mut a.act);
            next.clone_from(&a.mid);
            let act = Mat::rows(&a.act, n, d.inter, d.inter);
            matmul_par(
                next,
                h,
                true,
                act,
                Mat::rows(&wb.down, h, d.inter, d.inter).t(),
                1.0,
            );
        }
        let (x, normed, logits) = &mut self.top;
        size(normed, n * h);
        norm::forward(x, &w.norm, d.eps, normed);
        size(logits, n * d.vocab);
        let head = if d.tied { &w.embedding } else { &w.head };
        let nm = Mat::rows(normed, n, h, h);
        matmul_par(
            logits,
            d.vocab,
            false,
            nm,
            Mat::rows(head, d.vocab, h, h).t(),
            1.0,
        );
        Some(match objective? {
            Objective::Nll => Outcome {
                loss_sum: nll_sum_and_grad(logits, targets, mask, d.vocab),
                dpo: None,
            },
            Objective::Dpo { pairs, beta } => {
                let sums = dpo::loss_and_grad(logits, targets, mask, d.vocab, pairs, *beta);
                Outcome {
                    loss_sum: sums.loss,
                    dpo: Some(sums),
                }
            }
        })
    }

    /// The backward pass from the logits' gradient in `top.2`, adding into `grads`.
    fn backward(&mut self, tokens: &[u32], g: attention::Geometry, sink: Option<&Sink>) {
        let d = self.dims;
        let (n, h, v) = (tokens.len(), d.hidden, d.vocab);
        let acc = self.micro > 0;
        let n_layers = self.acts.len();
        let t = &self.trains;
        let (train_embd, train_head, train_norm, stop) = (t.embedding, t.head, t.norm, t.stop);

        let w = &self.weights;
        let gr = &mut self.grads;
        gr.blocks.resize_with(n_layers, BlockBufs::default);
        let (x_top, normed, dlogits) = &self.top;
        let (dx, dn, wide, narrow) = &mut self.scratch;
        size(dx, n * h);
        size(dn, n * h);
        let head = if d.tied { &w.embedding } else { &w.head };
        let dl = Mat::rows(dlogits, n, v, v);
        if train_head {
            let dst = if d.tied {
                &mut gr.embedding
            } else {
                &mut gr.head
            };
            size(dst, v * h);
            matmul_par(dst, h, acc, dl.t(), Mat::rows(normed, n, h, h), 1.0);
        }
        matmul_par(dn, h, false, dl, Mat::rows(head, v, h, h), 1.0);
        size(&mut gr.norm, h);
        norm::backward(
            x_top,
            &w.norm,
            d.eps,
            dn,
            dx,
            false,
            &mut gr.norm,
            acc && train_norm,
        );

        for l in (stop..n_layers).rev() {
            let (a, wb, gb) = (&self.acts[l], &w.blocks[l], &mut gr.blocks[l]);
            let [t_an, t_qkv, t_o, t_fn, t_gu, t_down] = self.trains.blocks[l];
            let dxm = Mat::rows(dx, n, h, h);
            // out = mid + act @ down^T
            if t_down {
                size(&mut gb.down, h * d.inter);
                let act = Mat::rows(&a.act, n, d.inter, d.inter);
                matmul_par(&mut gb.down, d.inter, acc, dxm.t(), act, 1.0);
            }
            size(narrow, n * d.inter.max(d.att()));
            let dact = &mut narrow[..n * d.inter];
            matmul_par(
                dact,
                d.inter,
                false,
                dxm,
                Mat::rows(&wb.down, h, d.inter, d.inter),
                1.0,
            );
            size(wide, n * (2 * d.inter).max(d.qkv()));
            let dgu = &mut wide[..n * 2 * d.inter];
            swiglu::backward(&a.gate_up, dact, d.inter, dgu);
            let dgum = Mat::rows(dgu, n, 2 * d.inter, 2 * d.inter);
            if t_gu {
                size(&mut gb.gate_up, 2 * d.inter * h);
                matmul_par(
                    &mut gb.gate_up,
                    h,
                    acc,
                    dgum.t(),
                    Mat::rows(&a.n2, n, h, h),
                    1.0,
                );
            }
            matmul_par(
                dn,
                h,
                false,
                dgum,
                Mat::rows(&wb.gate_up, 2 * d.inter, h, h),
                1.0,
            );
            size(&mut gb.ffn_norm, h);
            norm::backward(
                &a.mid,
                &wb.ffn_norm,
                d.eps,
                dn,
                dx,
                true,
                &mut gb.ffn_norm,
                acc && t_fn,
            );
            // mid = x + att @ o^T
            let dxm = Mat::rows(dx, n, h, h);
            if t_o {
                size(&mut gb.o, h * d.att());
                let att = Mat::rows(&a.att, n, d.att(), d.att());
                matmul_par(&mut gb.o, d.att(), acc, dxm.t(), att, 1.0);
            }
            let datt = &mut narrow[..n * d.att()];
            matmul_par(
                datt,
                d.att(),
                false,
                dxm,
                Mat::rows(&wb.o, h, d.att(), d.att()),
                1.0,
            );
            let dqkv = &mut wide[..n * d.qkv()];
            attention::backward(&a.qkv, datt, g, &self.cos, &self.sin, dqkv, &a.attn);
            let dqkvm = Mat::rows(dqkv, n, d.qkv(), d.qkv());
            if t_qkv {
                size(&mut gb.qkv, d.qkv() * h);
                matmul_par(
                    &mut gb.qkv,
                    h,
                    acc,
                    dqkvm.t(),
                    Mat::rows(&a.n1, n, h, h),
                    1.0,
                );
            }
            if l > stop || train_embd || t_an {
                matmul_par(dn, h, false, dqkvm, Mat::rows(&wb.qkv, d.qkv(), h, h), 1.0);
                size(&mut gb.attn_norm, h);
                norm::backward(
                    &a.x,
                    &wb.attn_norm,
                    d.eps,
                    dn,
                    dx,
                    true,
                    &mut gb.attn_norm,
                    acc && t_an,
                );
            }
            // This block's gradients are final: summed over the gang while the blocks below
            // run their backward pass.
            if let Some(sink) = sink {
                let _ = sink.send(self.trains.take_block(d, l, gb, true));
            }
        }
        if train_embd {
            // The lookup's gradient: each position's row added to its token's row, in order.
            size(&mut gr.embedding, v * h);
            let head_wrote = d.tied && train_head;
            if !acc && !head_wrote {
                gr.embedding.fill(0.0);
            }
            for (row, &tok) in dx.chunks_exact(h).zip(tokens) {
                let tok = tok as usize;
                for (e, g) in gr.embedding[tok * h..(tok + 1) * h].iter_mut().zip(row) {
                    *e += g;
                }
            }
        }
        if let Some(sink) = sink {
            let _ = sink.send(self.trains.take_top(d, gr, true));
        }
    }

    /// The gradients summed since the last call, one per name in `names` (in that order; zeros
    /// when no micro-batch counted), and starts a new sum.
    pub fn take_grads<'a>(&'a mut self, names: &[(String, Vec<usize>)]) -> Result<Vec<Tensor>> {
        let d = self.dims;
        let h = d.hidden;
        let micro = std::mem::take(&mut self.micro);
        let mut by_name: HashMap<String, &[f32]> = HashMap::new();
        if micro > 0 {
            let gr = &self.grads;
            let q = d.heads * d.head_dim;
            let kv = d.kv_heads * d.head_dim;
            by_name.insert("token_embd.weight".into(), &gr.embedding);
            by_name.insert("output.weight".into(), &gr.head);
            by_name.insert("output_norm.weight".into(), &gr.norm);
            for (l, b) in gr.blocks.iter().enumerate() {
                let p = |s: &str| format!("blk.{l}.{s}.weight");
                let split =
                    |buf: &'a [f32], from: usize, rows: usize| split_rows(buf, from, rows, h);
                by_name.insert(p("attn_norm"), &b.attn_norm);
                by_name.insert(p("attn_q"), split(&b.qkv, 0, q));
                by_name.insert(p("attn_k"), split(&b.qkv, q, kv));
                by_name.insert(p("attn_v"), split(&b.qkv, q + kv, kv));
                by_name.insert(p("attn_output"), &b.o);
                by_name.insert(p("ffn_norm"), &b.ffn_norm);
                by_name.insert(p("ffn_gate"), split(&b.gate_up, 0, d.inter));
                by_name.insert(p("ffn_up"), split(&b.gate_up, d.inter, d.inter));
                by_name.insert(p("ffn_down"), &b.down);
            }
        }
        names
            .iter()
            .map(|(name, shape)| {
                let len: usize = shape.iter().product();
                match by_name.get(name) {
                    Some(g) if g.len() == len => {
                        Tensor::from_slice(g, shape.as_slice(), &Device::Cpu)
                    }
                    Some(g) if micro > 0 => candle_core::bail!(
                        "fused step: no gradient for {name} ({} values, {len} expected)",
                        g.len()
                    ),
                    _ => Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;
    use crate::model::{ModelConfig, init_params};
    use crate::train::loss::masked_nll_sum;
    use candle_nn::VarBuilder;

    fn config(tied: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 37,
            hidden_size: 32,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: 2,
            intermediate_size: 40,
            max_seq_len: 80,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: tied,
        }
    }

    /// Two sequences of 71 and 50 inputs (the second padded), the first with its first 20
    /// predictions masked out as an sft prompt would be.
    fn batch(seed: u64, vocab: u32) -> Batch {
        let mut rng = crate::rng::Rng::new(seed, 3);
        let mut tokens = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (rng.normal().abs() * 9.0) as u32 % vocab)
                .collect()
        };
        let samples = [Sample::new(tokens(72), 20), Sample::new(tokens(51), 1)];
        let refs: Vec<&Sample> = samples.iter().collect();
        Batch::new(&refs, 0, &Device::Cpu).unwrap()
    }

    /// The loss and the gradient of every name in `names`, summed over `batches`, by candle's
    /// autograd over the same model.
    fn reference(
        model: &Transformer,
        vars: &candle_nn::VarMap,
        names: &[(String, Vec<usize>)],
        batches: &[Batch],
    ) -> Result<(f64, Vec<Tensor>)> {
        let data = vars.data().lock().unwrap();
        let mut loss_sum = 0f64;
        let mut sums: Vec<Option<Tensor>> = vec![None; names.len()];
        for batch in batches {
            let logits = model.forward(&batch.inputs, 0, None)?;
            let loss = masked_nll_sum(&logits, &batch.targets, &batch.mask)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            let store = loss.backward()?;
            for ((name, _), sum) in names.iter().zip(&mut sums) {
                let g = store.get(data[name].as_tensor()).expect("gradient").clone();
                *sum = Some(match sum.take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        Ok((loss_sum, sums.into_iter().map(Option::unwrap).collect()))
    }

    /// Fused loss and gradients against candle's autograd, for the weights `trains` selects.
    fn check(tied: bool, trains: impl Fn(&str) -> bool, micro: usize) -> Result<()> {
        let cfg = config(tied);
        let vars = init_params(&cfg, 11, &Device::Cpu)?;
        let model = Transformer::new(
            &cfg,
            &VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
            &Device::Cpu,
        )?;
        let mut names: Vec<(String, Vec<usize>)> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| trains(n))
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        names.sort();
        let batches: Vec<Batch> = (0..micro).map(|i| batch(i as u64, 37)).collect();
        let (want_loss, want) = reference(&model, &vars, &names, &batches)?;
        let mut step = FusedStep::new(&model, names.iter().map(|n| n.0.clone()).collect())?;
        let mut loss = 0f64;
        for b in &batches {
            loss += step.accumulate(&model, b, &Objective::Nll)?.loss_sum;
        }
        let got = step.take_grads(&names)?;
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "{loss} vs {want_loss}"
        );
        for ((name, _), (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            let d = crate::kernels::test_util::rel_diff(g, w)?;
            assert!(d < 1e-4, "{name}: gradient differs by {d}");
        }
        Ok(())
    }

    /// Every gradient of an untied model with grouped KV heads, padding and masked positions.
    #[test]
    fn matches_autograd_untied() -> Result<()> {
        check(false, |_| true, 1)
    }

    /// Tied embeddings: the head's and the lookup's gradients both land on the embedding.
    #[test]
    fn matches_autograd_tied() -> Result<()> {
        check(true, |_| true, 1)
    }

    /// Lower blocks and the embedding frozen (sft): only the rest gets gradients.
    #[test]
    fn matches_autograd_frozen_lower_blocks() -> Result<()> {
        check(
            false,
            |n| !n.starts_with("blk.0.") && n != "token_embd.weight",
            1,
        )
    }

    /// Gradient accumulation over three micro-batches sums them.
    #[test]
    fn matches_autograd_accumulated() -> Result<()> {
        check(false, |_| true, 3)
    }

    /// The same step twice from the same weights gives the same bits.
    #[test]
    fn deterministic() -> Result<()> {
        let cfg = config(false);
        let vars = init_params(&cfg, 3, &Device::Cpu)?;
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let model = Transformer::new(&cfg, &vb, &Device::Cpu)?;
        let names = vec![("blk.1.attn_q.weight".to_string(), vec![32, 32])];
        let mut step = FusedStep::new(&model, vec![names[0].0.clone()])?;
        let b = batch(9, 37);
        let mut runs = Vec::new();
        for _ in 0..2 {
            let loss = step.accumulate(&model, &b, &Objective::Nll)?.loss_sum;
            let g = step.take_grads(&names)?[0]
                .flatten_all()?
                .to_vec1::<f32>()?;
            runs.push((
                loss.to_bits(),
                g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ));
        }
        assert_eq!(runs[0], runs[1]);
        Ok(())
    }
}
