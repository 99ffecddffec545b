//! The byte-level tokenizer: ids 0..=255 are bytes, then BOS and EOS.

use super::{Tokenizer, TokenizerError};

/// One token per byte; needs no file and never fails to encode.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Beginning of sequence.
    pub const BOS: u32 = 256;
    /// End of sequence.
    pub const EOS: u32 = 257;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    /// Every byte is its own token: no text can spell BOS or EOS.
    fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(text)
    }

    fn control_tokens(&self) -> &[(String, u32)] {
        &[]
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        258
    }

    fn bos_id(&self) -> Option<u32> {
        Some(Self::BOS)
    }

    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }

    fn token_to_piece(&self, id: u32) -> Option<Vec<u8>> {
        match u8::try_from(id) {
            Ok(b) => Some(vec![b]),
            Err(_) if id < 258 => Some(Vec::new()),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = ByteTokenizer;
        let ids = t.encode("12+7=19 é").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "12+7=19 é");
        assert_eq!(
            t.decode(&[ByteTokenizer::BOS, 65, ByteTokenizer::EOS])
                .unwrap(),
            "A"
        );
    }
}
