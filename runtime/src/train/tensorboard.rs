//! A TensorBoard event file (`events.out.tfevents.<secs>.<host>`): scalar summaries of loss,
//! learning rate, gradient norm and tokens/s per logged step, readable by `tensorboard --logdir`.
//!
//! The format is TFRecord framing around `tensorflow.Event` protocol buffers: each record is
//! `u64 length, u32 masked-crc32c(length), data, u32 masked-crc32c(data)`, little-endian. The few
//! protobuf fields needed are encoded here by hand (no protobuf dependency for four fields).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Appends scalar events to one file; flushed after every step's record.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = wall_time();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "anneal".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let mut writer = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        writer.out.flush()?;
        Ok(writer)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event with `scalars` (tag, value) at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_float(&mut v, 2, *value as f32);
            put_bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u64, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise: records are small and written once per logged step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(data: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = data[*at];
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// (field, wire type, payload) of a protobuf message, in order.
    fn fields(data: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < data.len() {
            let key = varint(data, &mut at);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                0 => varint(data, &mut at).to_le_bytes().to_vec(),
                1 => {
                    at += 8;
                    data[at - 8..at].to_vec()
                }
                2 => {
                    let n = varint(data, &mut at) as usize;
                    at += n;
                    data[at - n..at].to_vec()
                }
                5 => {
                    at += 4;
                    data[at - 4..at].to_vec()
                }
                other => panic!("wire type {other}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn records_frame_and_checksum_scalar_events() {
        let dir = std::env::temp_dir().join(format!(
            "anneal-tb-{}",
            crate::checkpoint::atomic::writer_tag()
        ));
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(7, &[("train/loss", 2.5), ("train/lr", 0.001)])
            .unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 2);
        let version = fields(&records[0]);
        assert_eq!(version[1], (3, 2, b"brain.Event:2".to_vec()));
        let event = fields(&records[1]);
        assert_eq!(event[1].0, 2);
        assert_eq!(u64::from_le_bytes(event[1].2[..8].try_into().unwrap()), 7);
        let summary = fields(&event[2].2);
        let first = fields(&summary[0].2);
        assert_eq!(first[0].2, b"train/loss");
        assert_eq!(f32::from_le_bytes(first[1].2[..4].try_into().unwrap()), 2.5);
        assert_eq!(summary.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
