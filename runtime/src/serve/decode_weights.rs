//! A kernel-friendly layout of the same weights for the batched decode step.
//!
//! candle's AVX-512 VNNI tiled Q8_0 kernel, which reuses each weight tile across all rows of
//! the batch, only takes matrices whose input width is a multiple of 256; SmolLM2's is 576, so
//! most of its matrices fall back to one AVX2 dot product per (row, column) (72 % of a
//! 16-sequence step in a profile). Zero-padding the input dimension to the next multiple of 256
//! (and the activations likewise) gives the same products through the tiled kernel. This is a
//! layout cache of the model's own weights, not a second model definition.

use crate::model::{Linear, Transformer};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, Device, Module, Result, Tensor};

/// One linear map with its input dimension padded to a multiple of 256.
pub struct PaddedLinear {
    weight: QMatMul,
    pad: usize,
}

impl PaddedLinear {
    /// The padded form of `linear`, when it is quantized and padding makes it tile-eligible.
    pub fn new(linear: &Linear) -> Result<Option<Self>> {
        let Linear::Quantized(QMatMul::QTensor(q)) = linear else {
            return Ok(None);
        };
        let (n, k) = q.shape().dims2()?;
        if k.is_multiple_of(256) || !n.is_multiple_of(16) {
            return Ok(None);
        }
        let pad = k.next_multiple_of(256) - k;
        let w = q.dequantize(&Device::Cpu)?.pad_with_zeros(1, 0, pad)?;
        let weight = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        Ok(Some(Self { weight, pad }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight
            .forward(&x.pad_with_zeros(D::Minus1, 0, self.pad)?)
    }
}

/// Applies `linear` through its padded form when there is one.
pub fn apply(linear: &Linear, padded: &Option<PaddedLinear>, x: &Tensor) -> Result<Tensor> {
    match padded {
        Some(p) => p.forward(x),
        None => linear.forward(x),
    }
}

/// Padded forms of one block's projections: q, k, v, o, gate, up, down.
pub type BlockPadded = [Option<PaddedLinear>; 7];

/// Padded forms of every projection of a model.
pub struct DecodeWeights {
    /// Per block.
    pub blocks: Vec<BlockPadded>,
    /// The output head.
    pub lm_head: Option<PaddedLinear>,
}

impl DecodeWeights {
    /// Builds the padded forms (none when padding cannot help, e.g. dense weights, or on a GPU,
    /// whose quantized kernels have no such constraint).
    pub fn new(model: &Transformer) -> Result<Self> {
        if !model.embedding.device().is_cpu() {
            return Ok(Self::none());
        }
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                Ok([
                    PaddedLinear::new(&a.q)?,
                    PaddedLinear::new(&a.k)?,
                    PaddedLinear::new(&a.v)?,
                    PaddedLinear::new(&a.o)?,
                    PaddedLinear::new(&m.gate)?,
                    PaddedLinear::new(&m.up)?,
                    PaddedLinear::new(&m.down)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            lm_head: PaddedLinear::new(&model.lm_head)?,
        })
    }

    /// No padded forms: every projection runs as loaded.
    pub fn none() -> Self {
        Self {
            blocks: Vec::new(),
            lm_head: None,
        }
    }
}
