//! GGUF metadata values. Arrays are stored typed (a `Vec<u32>`, not a `Vec<Value>`), so that a
//! hostile count cannot make the loader hold many times the file's size in memory.

use super::cursor::Cursor;
use super::error::{GgufError, Result};

/// Nesting deeper than this is refused; real files nest arrays one level at most.
pub const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array`.
    Array(Array),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

/// A typed metadata array.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// Integers of any width, widened (tokenizer types, merges ranks...).
    Int(Vec<i64>),
    /// Unsigned 64-bit integers (which do not fit `i64`).
    U64(Vec<u64>),
    /// Floats (token scores).
    Float(Vec<f64>),
    /// Booleans.
    Bool(Vec<bool>),
    /// Strings (tokens, merges).
    String(Vec<String>),
    /// Arrays of arrays.
    Array(Vec<Array>),
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::Int(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::Float(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

// Type tags of the GGUF spec.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// The fewest bytes one element of a type can occupy in the file.
fn min_size(tag: u32) -> u64 {
    match tag {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        // element type + count
        T_ARRAY => 12,
        _ => 1,
    }
}

fn bool_of(c: &mut Cursor<'_>) -> Result<bool> {
    match c.u8("bool")? {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(c.invalid("bool", format!("byte {b} is neither 0 nor 1"))),
    }
}

/// Reads one value of type `tag`.
pub(crate) fn read_value(c: &mut Cursor<'_>, tag: u32) -> Result<Value> {
    Ok(match tag {
        T_U8 => Value::U8(c.u8("u8")?),
        T_I8 => Value::I8(c.u8("i8")? as i8),
        T_U16 => Value::U16(c.u16("u16")?),
        T_I16 => Value::I16(c.u16("i16")? as i16),
        T_U32 => Value::U32(c.u32("u32")?),
        T_I32 => Value::I32(c.u32("i32")? as i32),
        T_F32 => Value::F32(f32::from_bits(c.u32("f32")?)),
        T_BOOL => Value::Bool(bool_of(c)?),
        T_STRING => Value::String(c.string("string value")?),
        T_ARRAY => Value::Array(read_array(c, 1)?),
        T_U64 => Value::U64(c.u64("u64")?),
        T_I64 => Value::I64(c.u64("i64")? as i64),
        T_F64 => Value::F64(f64::from_bits(c.u64("f64")?)),
        other => return Err(c.invalid("value type", format!("unknown type tag {other}"))),
    })
}

fn read_array(c: &mut Cursor<'_>, depth: usize) -> Result<Array> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::TooDeep(MAX_ARRAY_DEPTH));
    }
    let tag = c.u32("array element type")?;
    let count = c.u64("array length")?;
    c.ensure_room(count, min_size(tag), "array elements")?;
    // ensure_room bounded count by the bytes left, so it fits a usize and the allocation
    // is at most a small multiple of the file's size.
    let n = count as usize;
    fn ints(
        c: &mut Cursor<'_>,
        n: usize,
        f: impl Fn(&mut Cursor<'_>) -> Result<i64>,
    ) -> Result<Array> {
        (0..n).map(|_| f(c)).collect::<Result<_>>().map(Array::Int)
    }
    Ok(match tag {
        T_U8 => ints(c, n, |c| Ok(c.u8("u8")?.into()))?,
        T_I8 => ints(c, n, |c| Ok((c.u8("i8")? as i8).into()))?,
        T_U16 => ints(c, n, |c| Ok(c.u16("u16")?.into()))?,
        T_I16 => ints(c, n, |c| Ok((c.u16("i16")? as i16).into()))?,
        T_U32 => ints(c, n, |c| Ok(c.u32("u32")?.into()))?,
        T_I32 => ints(c, n, |c| Ok((c.u32("i32")? as i32).into()))?,
        T_I64 => ints(c, n, |c| Ok(c.u64("i64")? as i64))?,
        T_U64 => Array::U64((0..n).map(|_| c.u64("u64")).collect::<Result<_>>()?),
        T_F32 => Array::Float(
            (0..n)
                .map(|_| Ok(f32::from_bits(c.u32("f32")?).into()))
                .collect::<Result<_>>()?,
        ),
        T_F64 => Array::Float(
            (0..n)
                .map(|_| Ok(f64::from_bits(c.u64("f64")?)))
                .collect::<Result<_>>()?,
        ),
        T_BOOL => Array::Bool((0..n).map(|_| bool_of(c)).collect::<Result<_>>()?),
        T_STRING => Array::String(
            (0..n)
                .map(|_| c.string("string element"))
                .collect::<Result<_>>()?,
        ),
        T_ARRAY => Array::Array(
            (0..n)
                .map(|_| read_array(c, depth + 1))
                .collect::<Result<_>>()?,
        ),
        other => return Err(c.invalid("array element type", format!("unknown type tag {other}"))),
    })
}
