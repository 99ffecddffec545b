//! The CPU inference path of the shared [`Transformer`]: the same weights (GGUF Q4_1/Q8_0
//! blocks as stored, in the [`crate::kernels`] layout), the same architecture (the block
//! recipe of [`crate::model::block`]), computed on plain buffers by our own kernels instead
//! of a chain of candle ops.
//!
//! One [`CpuModel::forward`] runs any mix of sequences: a prompt (prefill) is a segment of
//! many tokens, a decode step is a segment of one token per sequence, and all rows go through
//! each weight matrix together. Each sequence's keys and values live in its own preallocated
//! [`CpuKv`]. This is a layout of the model's own weights for our kernels (like a repacked
//! GEMM operand), not a second model definition: it is built from a `Transformer`, and the
//! engine uses it only when every projection is quantized and on the CPU.

use crate::kernels::attention::decode::{KEY_TILE, attend, key_index};
use crate::kernels::gemm::qmatmul::{QActs, QMatrix, matmul};
use crate::kernels::math::add_assign;
use crate::kernels::pool::{self, Pool};
use crate::kernels::rope::rope;
use crate::kernels::{norm, swiglu};
use crate::model::block::{BlockOps, NormAt, Proj, block};
use crate::model::{Linear, ModelConfig, Transformer};
use candle_core::quantized::{GgmlDType, QMatMul};
use std::cell::RefCell;

/// Keys and values of one sequence, every layer, preallocated to `capacity` positions.
/// Layout: (layer, keys|values, kv head, then for keys the transposed tiles of
/// [`crate::kernels::attention::decode::key_index`], for values (position, head_dim)).
pub struct CpuKv {
    data: Vec<f32>,
    capacity: usize,
    head_span: usize,
    kv_heads: usize,
}

impl CpuKv {
    /// A cache of `capacity` positions for `config` (zeroed lazily by the allocator).
    pub fn new(config: &ModelConfig, capacity: usize) -> Self {
        // Keys are stored in transposed tiles of KEY_TILE positions (see `key_index`).
        let head_span = capacity.next_multiple_of(KEY_TILE) * config.head_dim();
        Self {
            data: vec![0.0; config.n_layers * 2 * config.n_kv_heads * head_span],
            capacity,
            head_span,
            kv_heads: config.n_kv_heads,
        }
    }

    /// Positions it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * 4
    }

    fn offset(&self, layer: usize, value: bool, head: usize) -> usize {
        ((layer * 2 + value as usize) * self.kv_heads + head) * self.head_span
    }

    fn head(&self, layer: usize, value: bool, head: usize) -> &[f32] {
        let o = self.offset(layer, value, head);
        &self.data[o..o + self.head_span]
    }

    fn head_mut(&mut self, layer: usize, value: bool, head: usize) -> &mut [f32] {
        let o = self.offset(layer, value, head);
        &mut self.data[o..o + self.head_span]
    }
}

/// The tokens one sequence contributes to a forward pass.
pub struct Segment<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first of them.
    pub start: usize,
    /// The sequence's cache; positions before `start` are already filled.
    pub cache: &'a mut CpuKv,
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v stacked: one product per layer for the three.
    qkv: QMatrix,
    o: QMatrix,
    /// gate and up stacked.
    gate_up: QMatrix,
    down: QMatrix,
}

enum Embedding {
    /// Rows of the (tied) output matrix.
    Tied,
    /// A dense table, (vocab, hidden).
    Dense(Vec<f32>),
}

/// Reused buffers of a forward pass.
#[derive(Default)]
pub struct Scratch {
    /// Activation buffers not in use, taken and given back by the block operations.
    spare: Vec<Vec<f32>>,
    acts: QActs,
}

/// The model in the kernels' layout; see the module documentation.
pub struct CpuModel {
    config: ModelConfig,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: QMatrix,
    embedding: Embedding,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The GGUF blocks of a quantized CPU projection, with their type name.
fn blocks(linear: &Linear) -> Option<(&'static str, Vec<u8>, usize, usize)> {
    let Linear::Quantized(QMatMul::QTensor(q)) = linear else {
        return None;
    };
    if !q.device().is_cpu() {
        return None;
    }
    let ty = match q.dtype() {
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q8_0 => "q8_0",
        _ => return None,
    };
    let (n, k) = q.shape().dims2().ok()?;
    Some((ty, q.data().ok()?.into_owned(), n, k))
}

/// One matrix from projections of the same input, stacked by rows.
fn stacked(parts: &[&Linear]) -> Option<QMatrix> {
    let parts = parts
        .iter()
        .map(|l| blocks(l))
        .collect::<Option<Vec<_>>>()?;
    let (ty, k) = (parts[0].0, parts[0].3);
    if parts.iter().any(|p| p.0 != ty || p.3 != k) {
        return None;
    }
    let slices: Vec<(&[u8], usize)> = parts.iter().map(|p| (p.1.as_slice(), p.2)).collect();
    QMatrix::from_ggml(ty, &slices, k).ok()
}

fn dense(t: &candle_core::Tensor) -> Option<Vec<f32>> {
    if !t.device().is_cpu() {
        return None;
    }
    t.flatten_all().ok()?.to_vec1::<f32>().ok()
}

impl CpuModel {
    /// The CPU layout of `model`, when every projection is Q4_1 or Q8_0 on the CPU; `None`
    /// otherwise (the engine then runs the candle model).
    pub fn new(model: &Transformer) -> Option<Self> {
        let config = model.config.clone();
        let layers = model
            .blocks
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                Some(Layer {
                    attn_norm: dense(&b.attn_norm.weight)?,
                    ffn_norm: dense(&b.ffn_norm.weight)?,
                    qkv: stacked(&[&a.q, &a.k, &a.v])?,
                    o: stacked(&[&a.o])?,
                    gate_up: stacked(&[&m.gate, &m.up])?,
                    down: stacked(&[&m.down])?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let lm_head = stacked(&[&model.lm_head])?;
        let embedding = if config.tie_embeddings {
            Embedding::Tied
        } else {
            Embedding::Dense(dense(&model.embedding)?)
        };
        Some(Self {
            layers,
            norm: dense(&model.norm.weight)?,
            lm_head,
            embedding,
            cos: dense(&model.cos)?,
            sin: dense(&model.sin)?,
            config,
        })
    }

    /// Bytes of weights one forward step reads, however many sequences it advances: every
    /// matrix's codes and scales, the norms, and one embedding row per token (counted once).
    /// The KV cache read by attention comes on top and grows with the positions.
    pub fn weight_bytes_per_step(&self) -> usize {
        let hidden = self.config.hidden_size;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o, &l.gate_up, &l.down]
                    .iter()
                    .map(|m| m.size_in_bytes())
                    .sum::<usize>()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        layers + self.lm_head.size_in_bytes() + 4 * (self.norm.len() + hidden)
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether `tokens` at positions from `start` fit a cache of `capacity` positions and the
    /// vocabulary (what [`Self::forward`] refuses).
    pub fn check(&self, tokens: &[u32], start: usize, capacity: usize) -> Result<(), String> {
        let c = &self.config;
        let end = start + tokens.len();
        if tokens.is_empty() || end > capacity || end > c.max_seq_len {
            return Err(format!(
                "segment of {} tokens at {start} does not fit (capacity {capacity}, max_seq_len {})",
                tokens.len(),
                c.max_seq_len
            ));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(format!("token {t} is outside the vocabulary"));
        }
        Ok(())
    }

    /// Logits (segments, vocab) of the last token of every segment, written into `logits`;
    /// every segment's new keys and values are written into its cache.
    pub fn forward(
        &self,
        segments: &mut [Segment<'_>],
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<(), String> {
        let pool = pool::global();
        let c = &self.config;
        let h = c.hidden_size;
        // Row index -> (segment, position).
        let mut rows = Vec::new();
        for (s, seg) in segments.iter().enumerate() {
            self.check(seg.tokens, seg.start, seg.cache.capacity())?;
            let end = seg.start + seg.tokens.len();
            rows.extend((seg.start..end).map(|p| (s, p)));
        }
        let r = rows.len();
        let mut x = take(&mut scratch.spare, r * h);
        for (row, seg) in x
            .chunks_exact_mut(h)
            .zip(segments.iter().flat_map(|g| g.tokens))
        {
            match &self.embedding {
                Embedding::Tied => self.lm_head.dequantize_row(*seg as usize, row),
                Embedding::Dense(e) => {
                    row.copy_from_slice(&e[*seg as usize * h..(*seg as usize + 1) * h])
                }
            }
        }
        let mut pass = Pass {
            model: self,
            segments,
            rows: &rows,
            scratch,
            pool,
        };
        for l in 0..self.layers.len() {
            x = block(&mut pass, l, x).unwrap_or_else(|e| match e {});
        }
        let (segments, s) = (pass.segments, pass.scratch);
        // The head, on the last row of each segment only.
        let mut last = take(&mut s.spare, 0);
        let mut end = 0;
        for seg in segments.iter() {
            end += seg.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let mut normed = take(&mut s.spare, last.len());
        norm::forward(&last, &self.norm, c.rms_norm_eps as f32, &mut normed);
        s.acts.quantize(&normed, h, pool);
        logits.resize(segments.len() * self.lm_head.rows(), 0.0);
        matmul(&self.lm_head, &s.acts, logits, pool);
        s.spare.extend([x, last, normed]);
        Ok(())
    }

    /// Attention of every row (already in the caches), in parallel over (segment, KV head,
    /// block of query rows).
    fn attention(
        &self,
        layer: usize,
        segments: &[Segment<'_>],
        rows: &[(usize, usize)],
        qkv: &[f32],
        out: &mut [f32],
        pool: &Pool,
    ) {
        let c = &self.config;
        let (hd, nh, kvh) = (c.head_dim(), c.n_heads, c.n_kv_heads);
        let rep = nh / kvh;
        let qkv_w = (nh + 2 * kvh) * hd;
        const BLOCK_ROWS: usize = 16;
        // Tasks: (first row, rows, kv head); rows of a block belong to one segment.
        let mut tasks = Vec::new();
        let mut first = 0;
        for seg in segments {
            let n = seg.tokens.len();
            for b in (0..n).step_by(BLOCK_ROWS) {
                for g in 0..kvh {
                    tasks.push((first + b, BLOCK_ROWS.min(n - b), g));
                }
            }
            first += n;
        }
        struct Out(*mut f32);
        // SAFETY: tasks write disjoint (row, head group) ranges of one live buffer.
        unsafe impl Sync for Out {}
        let out_ptr = Out(out.as_mut_ptr());
        let out_len = out.len();
        thread_local! {
            static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        pool.run(tasks.len(), |t| {
            let (row0, n, g) = tasks[t];
            let out_ptr = &out_ptr;
            SCORES.with_borrow_mut(|scores| {
                for row in row0..row0 + n {
                    let (seg, pos) = rows[row];
                    let cache = &*segments[seg].cache;
                    let q = &qkv[row * qkv_w + g * rep * hd..row * qkv_w + (g + 1) * rep * hd];
                    let at = row * nh * hd + g * rep * hd;
                    assert!(at + rep * hd <= out_len);
                    // SAFETY: in bounds (checked); no other task writes this row's heads of
                    // group g.
                    let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(at), rep * hd) };
                    attend(
                        q,
                        cache.head(layer, false, g),
                        cache.head(layer, true, g),
                        pos + 1,
                        hd,
                        scores,
                        o,
                    );
                }
            });
        });
    }
}

/// A spare buffer of `len` values (contents unspecified).
fn take(spare: &mut Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut v = spare.pop().unwrap_or_default();
    v.resize(len, 0.0);
    v
}

/// One forward pass of a [`CpuModel`]: the block operations on plain buffers, one row per
/// token of every segment.
struct Pass<'p, 'a> {
    model: &'p CpuModel,
    segments: &'p mut [Segment<'a>],
    /// Row index -> (segment, position).
    rows: &'p [(usize, usize)],
    scratch: &'p mut Scratch,
    pool: &'static Pool,
}

impl Pass<'_, '_> {
    fn take(&mut self, len: usize) -> Vec<f32> {
        take(&mut self.scratch.spare, len)
    }

    fn give_back(&mut self, v: Vec<f32>) {
        self.scratch.spare.push(v);
    }
}

impl BlockOps for Pass<'_, '_> {
    type X = Vec<f32>;
    type Error = std::convert::Infallible;

    fn norm(&mut self, layer: usize, at: NormAt, x: &Vec<f32>) -> Result<Vec<f32>, Self::Error> {
        let l = &self.model.layers[layer];
        let w = match at {
            NormAt::Attention => &l.attn_norm,
            NormAt::FeedForward => &l.ffn_norm,
        };
        let mut out = self.take(x.len());
        norm::forward(x, w, self.model.config.rms_norm_eps as f32, &mut out);
        Ok(out)
    }

    fn linear(&mut self, layer: usize, proj: Proj, x: Vec<f32>) -> Result<Vec<f32>, Self::Error> {
        let l = &self.model.layers[layer];
        let m = match proj {
            Proj::Qkv => &l.qkv,
            Proj::O => &l.o,
            Proj::GateUp => &l.gate_up,
            Proj::Down => &l.down,
        };
        let r = self.rows.len();
        self.scratch.acts.quantize(&x, x.len() / r, self.pool);
        self.give_back(x);
        let mut out = self.take(r * m.rows());
        matmul(m, &self.scratch.acts, &mut out, self.pool);
        Ok(out)
    }

    fn attention(&mut self, layer: usize, mut qkv: Vec<f32>) -> Result<Vec<f32>, Self::Error> {
        let c = &self.model.config;
        let (hd, nh, kvh) = (c.head_dim(), c.n_heads, c.n_kv_heads);
        let qkv_w = (nh + 2 * kvh) * hd;
        let half = hd / 2;
        // RoPE of q and k, and the new keys and values into the caches.
        for (row, &(seg, pos)) in qkv.chunks_exact_mut(qkv_w).zip(self.rows) {
            let (cos, sin) = (
                &self.model.cos[pos * half..(pos + 1) * half],
                &self.model.sin[pos * half..(pos + 1) * half],
            );
            let (qk, v) = row.split_at_mut((nh + kvh) * hd);
            for head in qk.chunks_exact_mut(hd) {
                rope(head, cos, sin, 1.0);
            }
            let cache = &mut *self.segments[seg].cache;
            let k = &qk[nh * hd..];
            for g in 0..kvh {
                let keys = cache.head_mut(layer, false, g);
                for (d, &x) in k[g * hd..(g + 1) * hd].iter().enumerate() {
                    keys[key_index(pos, d, hd)] = x;
                }
                let at = pos * hd..(pos + 1) * hd;
                cache.head_mut(layer, true, g)[at].copy_from_slice(&v[g * hd..(g + 1) * hd]);
            }
        }
        let mut out = self.take(self.rows.len() * nh * hd);
        self.model
            .attention(layer, self.segments, self.rows, &qkv, &mut out, self.pool);
        self.give_back(qkv);
        Ok(out)
    }

    fn activation(&mut self, _layer: usize, gate_up: Vec<f32>) -> Result<Vec<f32>, Self::Error> {
        let inter = self.model.config.intermediate_size;
        let mut out = self.take(gate_up.len() / 2);
        swiglu::forward(&gate_up, inter, &mut out);
        self.give_back(gate_up);
        Ok(out)
    }

    fn residual(&mut self, mut x: Vec<f32>, y: Vec<f32>) -> Result<Vec<f32>, Self::Error> {
        add_assign(&mut x, &y);
        self.give_back(y);
        Ok(x)
    }
}
