//! A reader over the file's bytes that never reads, or lets a caller allocate, past the end.

use super::error::{GgufError, Result};

/// Little-endian reads from a byte slice; every read is checked against the bytes left.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Fails unless `count` items of at least `min_size` bytes each can still follow: the check
    /// that makes a count read from the file safe to allocate for.
    pub(crate) fn ensure_room(&self, count: u64, min_size: u64, what: &'static str) -> Result<()> {
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(what, needed));
        }
        Ok(())
    }

    pub(crate) fn take(&mut self, len: u64, what: &'static str) -> Result<&'a [u8]> {
        self.ensure_room(len, 1, what)?;
        // ensure_room bounded len by remaining(), a usize.
        let len = len as usize;
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 length, then that many UTF-8 bytes.
    pub(crate) fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.u64(what)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Invalid {
            offset: at,
            what,
            detail: format!("not UTF-8: {e}"),
        })
    }

    pub(crate) fn truncated(&self, what: &'static str, needed: u64) -> GgufError {
        GgufError::Truncated {
            offset: self.pos,
            what,
            needed,
            available: self.remaining(),
        }
    }

    pub(crate) fn invalid(&self, what: &'static str, detail: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            offset: self.pos,
            what,
            detail: detail.into(),
        }
    }
}
