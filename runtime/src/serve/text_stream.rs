//! Turning generated tokens into streamed text: text is released only once it is complete
//! UTF-8 and cannot be the beginning of a stop sequence; a stop sequence ends the stream and
//! is not part of it.

use crate::tokenizer::Tokenizer;
use std::sync::Arc;

/// The text state of one generation.
pub struct TextStream {
    tokenizer: Arc<dyn Tokenizer>,
    stop: Vec<String>,
    text: String,
    emitted: usize,
}

impl TextStream {
    /// A stream ending at any of `stop` (empty strings are ignored).
    pub fn new(tokenizer: Arc<dyn Tokenizer>, stop: Vec<String>) -> Self {
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            tokenizer,
            stop,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Takes the whole generation so far; returns the text that can be released and whether a
    /// stop sequence was reached.
    pub fn push(&mut self, generated: &[u32]) -> (String, bool) {
        // Decoding everything each time keeps multi-token characters right; generations are
        // short enough that this costs little next to a forward pass.
        self.text = self.tokenizer.decode(generated).unwrap_or_default();
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            let out = self
                .text
                .get(self.emitted..at)
                .unwrap_or_default()
                .to_string();
            self.emitted = at.max(self.emitted);
            return (out, true);
        }
        // An incomplete character decodes to U+FFFD: wait for its remaining bytes.
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        // Hold back a tail that a stop sequence may still complete.
        let held = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.text[..end].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        end -= held;
        if end <= self.emitted || !self.text.is_char_boundary(end) {
            return (String::new(), false);
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }

    /// The held-back text, when the generation ends without a stop sequence.
    pub fn flush(&mut self) -> Option<String> {
        let rest = self
            .text
            .get(self.emitted..)
            .filter(|r| !r.is_empty())?
            .to_string();
        self.emitted = self.text.len();
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    fn ids(s: &str) -> Vec<u32> {
        ByteTokenizer.encode(s).unwrap()
    }

    #[test]
    fn stop_sequence_is_cut_and_held_back() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["END".into()]);
        let (a, stop) = t.push(&ids("hello E"));
        assert_eq!((a.as_str(), stop), ("hello ", false));
        let (b, stop) = t.push(&ids("hello EN"));
        assert_eq!((b.as_str(), stop), ("", false));
        let (c, stop) = t.push(&ids("hello END more"));
        assert_eq!((c.as_str(), stop), ("", true));
    }

    #[test]
    fn flush_releases_the_tail() {
        let mut t = TextStream::new(Arc::new(ByteTokenizer), vec!["xyz".into()]);
        let (a, _) = t.push(&ids("abx"));
        assert_eq!(a, "ab");
        assert_eq!(t.flush().as_deref(), Some("x"));
    }
}
