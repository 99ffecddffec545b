//! Tensor descriptors of a GGUF file and the checks that make their data ranges safe to read.

use super::error::{GgufError, Result};
use candle_core::quantized::GgmlDType;

/// ggml allows at most four dimensions.
pub const MAX_DIMS: u32 = 4;

/// Where one tensor lies in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in candle's (row-major, outermost first) order: the reverse of ggml's `ne`.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: GgmlDType,
    /// Byte offset of the data from the start of the file (already bounds-checked).
    pub start: usize,
    /// Length of the data in bytes (already bounds-checked).
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ggml type with this tag, when candle can hold it.
pub fn dtype_of_tag(tag: u32) -> Option<GgmlDType> {
    Some(match tag {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A tensor descriptor as read, before its data range is resolved.
pub(crate) struct RawTensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the innermost (contiguous) dimension.
    pub ne: Vec<u64>,
    pub tag: u32,
    pub offset: u64,
}

impl RawTensorInfo {
    /// Checks shape, type and range against the data section `[data_start, file_len)` and
    /// the alignment, returning the resolved descriptor.
    pub(crate) fn resolve(
        self,
        data_start: usize,
        file_len: usize,
        alignment: u64,
    ) -> Result<TensorInfo> {
        let bad = |detail: String| GgufError::BadTensor {
            name: self.name.clone(),
            detail,
        };
        let dtype = dtype_of_tag(self.tag)
            .ok_or_else(|| bad(format!("unsupported ggml type {}", self.tag)))?;
        let block = dtype.block_size() as u64;
        let inner = *self.ne.first().ok_or_else(|| bad("no dimensions".into()))?;
        if self.ne.contains(&0) {
            return Err(bad(format!("zero-sized dimension in {:?}", self.ne)));
        }
        if !inner.is_multiple_of(block) {
            return Err(bad(format!(
                "innermost dimension {inner} is not a multiple of the {dtype:?} block ({block})"
            )));
        }
        let elems = self
            .ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {:?} overflows", self.ne)))?;
        let len = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| bad(format!("shape {:?} overflows", self.ne)))?;
        if !self.offset.is_multiple_of(alignment) {
            return Err(bad(format!(
                "offset {} is not a multiple of the alignment {alignment}",
                self.offset
            )));
        }
        let data_len = (file_len - data_start) as u64;
        let end = self
            .offset
            .checked_add(len)
            .filter(|&end| end <= data_len)
            .ok_or_else(|| {
                bad(format!(
                    "data [{}, +{len}) runs past the end of the data section ({data_len} bytes)",
                    self.offset
                ))
            })?;
        let _ = end;
        // All three fit in usize: bounded by file_len above.
        let shape = self.ne.iter().rev().map(|&d| d as usize).collect();
        Ok(TensorInfo {
            name: self.name,
            shape,
            dtype,
            start: data_start + self.offset as usize,
            len: len as usize,
        })
    }
}
