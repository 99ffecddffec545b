//! Turning generated tokens into streamed text: text is released only once it is complete
//! UTF-8 and cannot be the beginning of a stop sequence; a stop sequence ends the stream and
//! is not part of it.
//!
//! Each token is decoded with a small window of the tokens before it, not with the whole
//! generation (which made a long answer quadratic): the window's earlier tokens give the
//! decoder its context (a character split over tokens, a decoder that treats a leading space
//! specially), and the new text is what decoding the window adds to decoding its context. This
//! is how text-generation-inference and candle-examples' `TokenOutputStream` stream.

use crate::tokenizer::Tokenizer;
use std::sync::Arc;

/// The text state of one generation.
pub struct TextStream {
    tokenizer: Arc<dyn Tokenizer>,
    stop: Vec<String>,
    /// Bytes of the longest stop sequence.
    longest_stop: usize,
    /// The window: `window[..read]` was decoded already (the context), `window[read..]` not yet.
    window: Vec<u32>,
    read: usize,
    /// The text decoded so far.
    text: String,
    /// Bytes of `text` already released.
    emitted: usize,
}

impl TextStream {
    /// A stream ending at any of `stop` (empty strings are ignored).
    pub fn new(tokenizer: Arc<dyn Tokenizer>, stop: Vec<String>) -> Self {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            tokenizer,
            longest_stop: stop.iter().map(String::len).max().unwrap_or(0),
            stop,
            window: Vec::new(),
            read: 0,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Takes the next generated token; returns the text that can be released and whether a
    /// stop sequence was reached.
    pub fn push(&mut self, token: u32) -> (String, bool) {
        self.window.push(token);
        let before = self.text.len();
        if !self.decode_window(false) {
            return (String::new(), false);
        }
        self.release(before, false)
    }

    /// The held-back text, when the generation ends without a stop sequence.
    pub fn flush(&mut self) -> Option<String> {
        let before = self.text.len();
        self.decode_window(true);
        Some(self.release(before, true).0).filter(|t| !t.is_empty())
    }

    /// Appends the window's new text to `text`; false while it ends in an incomplete
    /// character (which decodes to U+FFFD) and `last` is not set.
    fn decode_window(&mut self, last: bool) -> bool {
        if self.read == self.window.len() {
            return true;
        }
        let decode = |ids: &[u32]| self.tokenizer.decode(ids).unwrap_or_default();
        let context = decode(&self.window[..self.read]);
        let all = decode(&self.window);
        if !last && all.ends_with('\u{FFFD}') {
            return false;
        }
        match all.strip_prefix(context.as_str()) {
            Some(new) => self.text.push_str(new),
            // A decoder that rewrote its context: wait for more tokens, or at the end take
            // the new tokens alone.
            None if !last => return false,
            None => self.text.push_str(&decode(&self.window[self.read..])),
        }
        // What was just decoded is the next token's context.
        self.window.drain(..self.read);
        self.read = self.window.len();
        true
    }

    /// Releases text up to a stop sequence (looked for from a little before `new_from`, where
    /// the newly decoded text starts), or else all but a tail that a stop sequence may still
    /// complete (nothing held back when `last`).
    fn release(&mut self, new_from: usize, last: bool) -> (String, bool) {
        // A stop sequence not found before ends at or after `new_from`.
        let from = floor_char_boundary(
            &self.text,
            new_from
                .saturating_sub(self.longest_stop.saturating_sub(1))
                .max(self.emitted),
        );
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(at) = found.map(|at| from + at) {
            let out = self.text[self.emitted..at].to_string();
            self.emitted = self.text.len();
            return (out, true);
        }
        let mut end = self.text.len();
        if !last {
            // Hold back a tail that a stop sequence may still complete.
            end -= self
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|&n| s.is_char_boundary(n))
                        .map(move |n| &s[..n])
                })
                .filter(|prefix| self.text.ends_with(prefix))
                .map(str::len)
                .max()
                .unwrap_or(0);
        }
        if end <= self.emitted {
            return (String::new(), false);
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }
}

/// The largest character boundary of `s` at or before `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{ByteTokenizer, TokenizerError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Pushes the bytes of `s` one token at a time; the text released and whether it stopped.
    fn feed(t: &mut TextStream, s: &str) -> (String, bool) {
        let mut out = String::new();
        for id in ByteTokenizer.encode(s).unwrap() {
            let (delta, stopped) = t.push(id);
            out.push_str(&delta);
            if stopped {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn stop_sequence_is_cut_and_held_back() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["END".into()]);
        assert_eq!(feed(&mut t, "hello E"), ("hello ".into(), false));
        assert_eq!(feed(&mut t, "N"), (String::new(), false));
        assert_eq!(feed(&mut t, "D more"), (String::new(), true));
    }

    #[test]
    fn a_held_back_prefix_that_is_not_a_stop_is_released() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["END".into()]);
        assert_eq!(feed(&mut t, "hello EN"), ("hello ".into(), false));
        assert_eq!(feed(&mut t, "X"), ("ENX".into(), false));
    }

    #[test]
    fn flush_releases_the_tail() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["xyz".into()]);
        assert_eq!(feed(&mut t, "abx"), ("ab".into(), false));
        assert_eq!(t.flush().as_deref(), Some("x"));
    }

    #[test]
    fn characters_split_over_tokens_are_released_whole() {
        // One token per byte: every character here but the ASCII ones spans several tokens.
        let text = "é 世界 🐉 naïve";
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec![]);
        let mut deltas = Vec::new();
        for id in ByteTokenizer.encode(text).unwrap() {
            deltas.push(t.push(id).0);
        }
        deltas.extend(t.flush());
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn a_stop_sequence_split_over_characters_is_found() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["界 🐉".into()]);
        assert_eq!(feed(&mut t, "世界 🐉 more"), ("世".into(), true));
    }

    /// Counts the token ids it is asked to decode.
    struct Counting(AtomicUsize);

    impl Tokenizer for Counting {
        fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
            ByteTokenizer.encode(text)
        }
        fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
            ByteTokenizer.encode_literal(text)
        }
        fn control_tokens(&self) -> &[(String, u32)] {
            &[]
        }
        fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
            self.0.fetch_add(ids.len(), Ordering::Relaxed);
            ByteTokenizer.decode(ids)
        }
        fn vocab_size(&self) -> usize {
            ByteTokenizer.vocab_size()
        }
        fn bos_id(&self) -> Option<u32> {
            None
        }
        fn eos_id(&self) -> Option<u32> {
            None
        }
        fn token_to_piece(&self, id: u32) -> Option<Vec<u8>> {
            ByteTokenizer.token_to_piece(id)
        }
    }

    #[test]
    fn decoding_work_grows_linearly_with_the_generation() {
        let tokenizer = Arc::new(Counting(AtomicUsize::new(0)));
        let mut t = TextStream::new(tokenizer.clone(), vec!["never".into()]);
        let text = "ab é 🐉 ".repeat(500);
        let mut out = String::new();
        let ids = ByteTokenizer.encode(&text).unwrap();
        for &id in &ids {
            out.push_str(&t.push(id).0);
        }
        out.extend(t.flush());
        assert_eq!(out, text);
        // Re-decoding the whole generation per token would decode n(n+1)/2 ids.
        let decoded = tokenizer.0.load(Ordering::Relaxed);
        assert!(
            decoded <= 8 * ids.len(),
            "{decoded} ids decoded for {} tokens",
            ids.len()
        );
    }
}
