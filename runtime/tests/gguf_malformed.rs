//! The GGUF parser against crafted files: every malformed one is a clear error, never a panic.

use anneal_runtime::gguf::{GgufError, Header, TensorInfo, Value, weights::qtensor};
use candle_core::Device;

/// Builds GGUF bytes field by field.
#[derive(Default)]
struct Gguf {
    bytes: Vec<u8>,
}

impl Gguf {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut g = Self::default();
        g.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        g
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        while !self.bytes.len().is_multiple_of(align) {
            self.bytes.push(0);
        }
        self
    }
}

/// A well-formed file: one metadata string, an f32 (2, 3) tensor and a q8_0 (1, 32) tensor.
fn valid() -> Vec<u8> {
    let mut g = Gguf::header(3, 2, 1);
    g.str("general.name").u32(8).str("tiny");
    g.tensor("a", &[3, 2], 0, 0).tensor("b", &[32, 1], 8, 32);
    g.pad_to(32);
    for i in 0..6 {
        g.raw(&(i as f32).to_le_bytes());
    }
    g.pad_to(32);
    // q8_0 block: f16 scale 1.0 then 32 int8 values.
    g.raw(&[0x00, 0x3c]);
    for i in 0..32u8 {
        g.raw(&[i]);
    }
    g.bytes
}

fn parse_err(bytes: &[u8]) -> GgufError {
    match Header::parse(bytes) {
        Ok(h) => panic!("parsed a malformed file: {h:?}"),
        Err(e) => e,
    }
}

#[test]
fn valid_file_parses_and_loads() {
    let bytes = valid();
    let h = Header::parse(&bytes).expect("valid file");
    assert_eq!(h.version, 3);
    assert_eq!(h.get_str("general.name").unwrap(), "tiny");
    let a: &TensorInfo = h.tensor("a").unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    let t = qtensor(&bytes[a.start..a.start + a.len], a, &Device::Cpu).unwrap();
    let v = t
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(v, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
    let b = h.tensor("b").unwrap();
    let t = qtensor(&bytes[b.start..b.start + b.len], b, &Device::Cpu).unwrap();
    let v = t
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(v[31], 31.0);
}

#[test]
fn misaligned_tensor_data_is_copied_not_rejected() {
    let bytes = valid();
    let h = Header::parse(&bytes).unwrap();
    let b = h.tensor("b").unwrap();
    // The same bytes one byte off any alignment.
    let mut shifted = vec![0u8; b.len + 1];
    shifted[1..].copy_from_slice(&bytes[b.start..b.start + b.len]);
    let t = qtensor(&shifted[1..], b, &Device::Cpu).unwrap();
    assert_eq!(t.shape().dims(), &[1, 32]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid();
    let h = Header::parse(&bytes).unwrap();
    let data_end = h.tensors.iter().map(|t| t.start + t.len).max().unwrap();
    for len in 0..data_end {
        assert!(
            Header::parse(&bytes[..len]).is_err(),
            "prefix of {len} bytes parsed"
        );
    }
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = valid();
    bytes[0] = b'X';
    assert!(matches!(parse_err(&bytes), GgufError::BadMagic(_)));
    let g = Gguf::header(1, 0, 0);
    assert!(matches!(
        parse_err(&g.bytes),
        GgufError::UnsupportedVersion(1)
    ));
}

#[test]
fn alignment_zero_and_non_power_of_two() {
    for align in [0, 3, 1 << 30] {
        let mut g = Gguf::header(3, 0, 1);
        g.kv_u32("general.alignment", align);
        let err = parse_err(&g.bytes);
        assert!(
            err.to_string().contains("general.alignment"),
            "{align}: {err}"
        );
    }
}

#[test]
fn huge_lengths_and_counts() {
    // A key length of u64::MAX.
    let mut g = Gguf::header(3, 0, 1);
    g.u64(u64::MAX);
    assert!(matches!(parse_err(&g.bytes), GgufError::Truncated { .. }));
    // u64::MAX metadata entries and tensors.
    assert!(matches!(
        parse_err(&Gguf::header(3, 0, u64::MAX).bytes),
        GgufError::Truncated { .. }
    ));
    assert!(matches!(
        parse_err(&Gguf::header(3, u64::MAX, 0).bytes),
        GgufError::Truncated { .. }
    ));
    // An array of u64::MAX strings.
    let mut g = Gguf::header(3, 0, 1);
    g.str("tokens").u32(9).u32(8).u64(u64::MAX);
    assert!(matches!(parse_err(&g.bytes), GgufError::Truncated { .. }));
    // A string value of u64::MAX - 3 bytes (would overflow a naive pos + len).
    let mut g = Gguf::header(3, 0, 1);
    g.str("k").u32(8).u64(u64::MAX - 3);
    assert!(matches!(parse_err(&g.bytes), GgufError::Truncated { .. }));
}

#[test]
fn deep_nesting_is_refused() {
    let mut g = Gguf::header(3, 0, 1);
    g.str("deep").u32(9);
    for _ in 0..10_000 {
        g.u32(9).u64(1);
    }
    g.u32(0).u64(0);
    assert!(matches!(parse_err(&g.bytes), GgufError::TooDeep(_)));
}

#[test]
fn overflowing_and_bad_shapes() {
    let cases: &[(&[u64], u32, u64, &str)] = &[
        (&[1 << 32, 1 << 32, 1 << 32], 0, 0, "overflows"),
        (&[u64::MAX, 2], 0, 0, "overflows"),
        (&[0, 4], 0, 0, "zero-sized"),
        (&[33, 1], 3, 0, "not a multiple"),
        (&[4], 99, 0, "unsupported ggml type"),
        (&[4], 0, 64, "past the end"),
        (&[4], 0, 3, "alignment"),
        (&[4], 0, u64::MAX - 31, "past the end"),
    ];
    for &(ne, ty, offset, expect) in cases {
        let mut g = Gguf::header(3, 1, 0);
        g.tensor("t", ne, ty, offset).pad_to(32).raw(&[0u8; 16]);
        let err = parse_err(&g.bytes).to_string();
        assert!(
            err.contains(expect),
            "{ne:?} type {ty} offset {offset}: {err}"
        );
    }
    let mut g = Gguf::header(3, 1, 0);
    g.str("t").u32(5).raw(&[0u8; 64]);
    assert!(parse_err(&g.bytes).to_string().contains("dimensions"));
}

#[test]
fn duplicates_and_bad_tags() {
    let mut g = Gguf::header(3, 0, 2);
    g.kv_u32("k", 1).kv_u32("k", 2);
    assert!(matches!(parse_err(&g.bytes), GgufError::Duplicate { .. }));
    let mut g = Gguf::header(3, 2, 0);
    g.tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 0)
        .pad_to(32)
        .raw(&[0u8; 16]);
    assert!(matches!(parse_err(&g.bytes), GgufError::Duplicate { .. }));
    let mut g = Gguf::header(3, 0, 1);
    g.str("k").u32(13).u32(0);
    assert!(
        parse_err(&g.bytes)
            .to_string()
            .contains("unknown type tag 13")
    );
    let mut g = Gguf::header(3, 0, 1);
    g.str("k").u32(7).raw(&[2]);
    assert!(parse_err(&g.bytes).to_string().contains("bool"));
    let mut g = Gguf::header(3, 0, 1);
    g.u64(2).raw(&[0xff, 0xfe]).u32(0).raw(&[0]);
    assert!(parse_err(&g.bytes).to_string().contains("UTF-8"));
}

#[test]
fn typed_arrays_read_back() {
    let mut g = Gguf::header(3, 0, 1);
    g.str("scores")
        .u32(9)
        .u32(6)
        .u64(2)
        .raw(&1.5f32.to_le_bytes())
        .raw(&(-2f32).to_le_bytes());
    let h = Header::parse(&g.bytes).unwrap();
    let Some(Value::Array(a)) = h.metadata.get("scores") else {
        panic!("no array")
    };
    assert_eq!(a.len(), 2);
}
