//! GGUF tensors as the shared [`Transformer`](crate::model::Transformer)'s weight source, and
//! the model configuration read from GGUF llama metadata.

use super::{GgufError, GgufFile, Header, Result, TensorInfo};
use crate::model::{Linear, ModelConfig, Weights};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;

/// What to do with Q4_1 weights at load time.
///
/// candle has no SIMD kernel for Q4_1 (its dot product is scalar), while Q8_0 has AVX2 and
/// AVX-512 VNNI kernels. The serving engine's own CPU kernels ([`crate::kernels`]) take Q4_1
/// as stored, so `Keep` is exact and fast there. Q4_1 values are `d * q + m` with 4-bit `q`;
/// re-quantizing them to Q8_0 (per 32 values, `amax / 127` steps) adds at most half a Q8_0
/// step of error, about 1/17 of the original Q4_1 step, for twice the weight memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Q41Policy {
    /// Keep Q4_1 as stored (exact; anneal's SIMD kernels on the CPU, candle's elsewhere;
    /// the default).
    #[default]
    Keep,
    /// Re-quantize Q4_1 to Q8_0 (candle's SIMD kernels).
    Q8_0,
    /// Dequantize Q4_1 to dense f32 (exact; 4.5x the memory; dense GEMM kernels).
    F32,
}

/// A GGUF file viewed as model weights.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    device: Device,
    policy: Q41Policy,
}

impl<'a> GgufWeights<'a> {
    /// Weights from `file`, placed on `device`.
    pub fn new(file: &'a GgufFile, device: &Device, policy: Q41Policy) -> Self {
        Self {
            file,
            device: device.clone(),
            policy,
        }
    }

    fn info(&self, name: &str) -> Result<&'a TensorInfo> {
        self.file
            .header
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))
    }

    fn check_shape(info: &TensorInfo, shape: &[usize]) -> Result<()> {
        if info.shape != shape {
            return Err(GgufError::BadTensor {
                name: info.name.clone(),
                detail: format!("shape {:?}, the model needs {shape:?}", info.shape),
            });
        }
        Ok(())
    }

    /// The tensor `name` as candle's quantized tensor, with its stored type.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let info = self.info(name)?;
        qtensor(self.file.data(info), info, &self.device)
    }
}

/// Builds a [`QTensor`] from a tensor's bytes; `bytes.len()` must be `info.len`, which
/// [`super::Header::parse`] derived from the shape and type.
pub fn qtensor(bytes: &[u8], info: &TensorInfo, device: &Device) -> Result<QTensor> {
    if bytes.len() != info.len {
        return Err(GgufError::BadTensor {
            name: info.name.clone(),
            detail: format!("{} data bytes, expected {}", bytes.len(), info.len),
        });
    }
    // candle reinterprets the bytes as blocks in place and asserts their alignment; a file with
    // a small general.alignment can place a tensor anywhere, so such data is copied first.
    let storage = if (bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
        QStorage::from_data(Cow::Borrowed(bytes), device, info.dtype)?
    } else {
        let mut words = vec![0u128; bytes.len().div_ceil(ALIGN)];
        // SAFETY: the u128 buffer is initialised and at least bytes.len() bytes long; viewing
        // it as bytes has no alignment or validity requirement.
        let buf: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        buf.copy_from_slice(bytes);
        QStorage::from_data(Cow::Borrowed(&*buf), device, info.dtype)?
    };
    Ok(QTensor::new(storage, info.shape.as_slice())?)
}

/// The largest alignment any ggml block type needs (f32, and f16 inside blocks, need less).
const ALIGN: usize = std::mem::align_of::<u128>();

impl Weights for GgufWeights<'_> {
    fn linear(&self, name: &str, in_dim: usize, out_dim: usize) -> candle_core::Result<Linear> {
        let full = format!("{name}.weight");
        let info = self.info(&full).map_err(candle_core::Error::wrap)?;
        Self::check_shape(info, &[out_dim, in_dim]).map_err(candle_core::Error::wrap)?;
        let mut q = self.qtensor(&full).map_err(candle_core::Error::wrap)?;
        if q.dtype() == GgmlDType::Q4_1 {
            match self.policy {
                Q41Policy::Keep => {}
                Q41Policy::Q8_0 => {
                    q = QTensor::quantize(&q.dequantize(&self.device)?, GgmlDType::Q8_0)?
                }
                Q41Policy::F32 => return Ok(Linear::Dense(q.dequantize(&self.device)?)),
            }
        }
        Ok(Linear::Quantized(QMatMul::from_qtensor(q)?))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let info = self.info(name).map_err(candle_core::Error::wrap)?;
        Self::check_shape(info, shape).map_err(candle_core::Error::wrap)?;
        self.qtensor(name)
            .map_err(candle_core::Error::wrap)?
            .dequantize(&self.device)?
            .to_dtype(DType::F32)
    }
}

/// The architecture of a llama-family GGUF file, from its metadata.
pub fn model_config(h: &Header) -> Result<ModelConfig> {
    let arch = h.get_str("general.architecture")?;
    if !matches!(arch, "llama" | "mistral") {
        return Err(GgufError::Metadata {
            key: "general.architecture".into(),
            detail: format!("`{arch}` is not a llama-family architecture"),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let usize_of = |k: &str| -> Result<usize> {
        let v = h.get_u64(&key(k))?;
        usize::try_from(v).map_err(|_| GgufError::Metadata {
            key: key(k),
            detail: format!("{v} is too large"),
        })
    };
    let n_heads = usize_of("attention.head_count")?;
    let vocab_size = match h
        .get("tokenizer.ggml.tokens")
        .ok()
        .and_then(|v| v.as_array())
    {
        Some(tokens) => tokens.len(),
        None => usize_of("vocab_size")?,
    };
    let config = ModelConfig {
        vocab_size,
        hidden_size: usize_of("embedding_length")?,
        n_layers: usize_of("block_count")?,
        n_heads,
        n_kv_heads: usize_of("attention.head_count_kv").unwrap_or(n_heads),
        intermediate_size: usize_of("feed_forward_length")?,
        max_seq_len: usize_of("context_length")?,
        rope_theta: h.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rms_norm_eps: h
            .get_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        tie_embeddings: h.tensor("output.weight").is_none(),
    }
    .normalized();
    config.validate().map_err(|e| GgufError::Metadata {
        key: format!("{arch}.*"),
        detail: e.to_string(),
    })?;
    Ok(config)
}
