//! GGUF model files: a parser that distrusts its input, and the bridge into candle's quantized
//! tensors.
//!
//! Every count, length, shape and offset read from the file is checked against the bytes that
//! are left before anything is allocated for it; a malformed file is a [`GgufError`], never a
//! panic (style.md #13). The parser works on a byte slice so that the fuzz target
//! (`runtime/fuzz`) drives exactly the code that loads real files.

mod cursor;
pub mod error;
pub mod tensor_info;
pub mod tokenizer;
pub mod value;
pub mod weights;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cursor::Cursor;
pub use error::{GgufError, Result};
pub use tensor_info::TensorInfo;
use tensor_info::{MAX_DIMS, RawTensorInfo};
pub use tokenizer::GgufTokenizer;
pub use value::{Array, Value};
pub use weights::{GgufWeights, Q41Policy, model_config};

const MAGIC: u32 = u32::from_le_bytes(*b"GGUF");
const DEFAULT_ALIGNMENT: u64 = 32;
/// Larger alignments are surely corrupt and would make padding arithmetic wasteful.
const MAX_ALIGNMENT: u64 = 1 << 16;
/// A tensor descriptor takes at least: name length (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO: u64 = 24;
/// A key/value pair takes at least: key length (8), type (4), a one-byte value.
const MIN_KV: u64 = 13;

/// The parsed header of a GGUF file: metadata and tensor descriptors.
#[derive(Debug, Clone)]
pub struct Header {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor descriptors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Index of each tensor in `tensors`, by name.
    by_name: HashMap<String, usize>,
}

impl Header {
    /// Parses and checks the header of the GGUF file `bytes`; the tensor data ranges it
    /// returns all lie inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(bytes);
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        c.ensure_room(n_kv, MIN_KV, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let tag = c.u32("metadata value type")?;
            let value = value::read_value(&mut c, tag)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::Duplicate {
                    kind: "metadata key",
                    name: key,
                });
            }
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= MAX_ALIGNMENT)
                .ok_or_else(|| GgufError::Metadata {
                    key: "general.alignment".into(),
                    detail: format!("{v:?} is not a power of two up to {MAX_ALIGNMENT}"),
                })?,
        };
        c.ensure_room(n_tensors, MIN_TENSOR_INFO, "tensor descriptors")?;
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            raw.push(read_tensor_info(&mut c)?);
        }
        // Bounded by the file length (a usize) and MAX_ALIGNMENT: no overflow.
        let data_start = (c.pos() as u64).next_multiple_of(alignment);
        if data_start > bytes.len() as u64 && !raw.is_empty() {
            return Err(c.truncated("tensor data", data_start - c.pos() as u64));
        }
        let data_start = (data_start as usize).min(bytes.len());
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for r in raw {
            let info = r.resolve(data_start, bytes.len(), alignment)?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate {
                    kind: "tensor",
                    name: info.name,
                });
            }
            tensors.push(info);
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The descriptor of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The metadata value `key`.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            detail: "missing".into(),
        })
    }

    /// The metadata value `key` as an unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64().ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            detail: format!("{v:?} is not an unsigned integer"),
        })
    }

    /// The metadata value `key` as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            detail: format!("{v:?} is not a number"),
        })
    }

    /// The metadata value `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| GgufError::Metadata {
            key: key.into(),
            detail: "is not a string".into(),
        })
    }
}

fn read_tensor_info(c: &mut Cursor<'_>) -> Result<RawTensorInfo> {
    let name = c.string("tensor name")?;
    let n_dims = c.u32("tensor dimension count")?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(c.invalid(
            "tensor dimension count",
            format!("`{name}` has {n_dims} dimensions (1..={MAX_DIMS})"),
        ));
    }
    let ne = (0..n_dims)
        .map(|_| c.u64("tensor dimension"))
        .collect::<Result<Vec<_>>>()?;
    let tag = c.u32("tensor type")?;
    let offset = c.u64("tensor offset")?;
    Ok(RawTensorInfo {
        name,
        ne,
        tag,
        offset,
    })
}

/// A GGUF file mapped into memory with its checked header.
pub struct GgufFile {
    /// The parsed header.
    pub header: Header,
    bytes: memmap2::Mmap,
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a model file rewritten under a running server is outside
        // what the runtime defends against (the operator mounts models read-only).
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = Header::parse(&bytes)?;
        Ok(Self { header, bytes })
    }

    /// The raw bytes of a tensor's data (bounds were checked by [`Header::parse`]).
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.start..info.start + info.len]
    }
}

/// Runs every loader step over `bytes`, ignoring errors: the body of the fuzz target and of
/// the test that replays its corpus. Only a panic (a bug) escapes.
pub fn exercise(bytes: &[u8]) {
    let Ok(header) = Header::parse(bytes) else {
        return;
    };
    for info in &header.tensors {
        // Dequantizing costs memory proportional to the element count; the file bounds it.
        if let Ok(t) = weights::qtensor(
            &bytes[info.start..info.start + info.len],
            info,
            &candle_core::Device::Cpu,
        ) {
            let _ = t.dequantize(&candle_core::Device::Cpu);
        }
    }
    let _ = GgufTokenizer::from_header(&header);
    let _ = model_config(&header);
}
