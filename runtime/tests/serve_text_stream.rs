//! Streamed text with SmolLM2's tokenizer: fed one token at a time, the stream releases exactly
//! the text that decoding the whole generation gives, characters split over tokens included,
//! and never half a character.

mod serve_support;

use anneal_runtime::gguf::{GgufFile, GgufTokenizer};
use anneal_runtime::serve::text_stream::TextStream;
use anneal_runtime::tokenizer::Tokenizer;
use serve_support::smollm2;
use std::sync::Arc;

const TEXTS: [&str; 3] = [
    "Plain ASCII, with digits 2024 and punctuation!",
    "Émigrés à Zürich: naïve café, 東京と世界, Ελληνικά, русский.",
    "Emoji: 🐉🔥 👩‍👩‍👧 🇫🇷 and math ∑∫√ ≠ ≤.",
];

fn tokenizer() -> Arc<dyn Tokenizer> {
    let file = GgufFile::open(&smollm2()).unwrap();
    Arc::new(GgufTokenizer::from_header(&file.header).unwrap())
}

#[test]
fn streamed_text_is_the_whole_decode() {
    let tok = tokenizer();
    let mut split_characters = 0;
    for text in TEXTS {
        let ids = tok.encode(text).unwrap();
        split_characters += ids
            .iter()
            .filter(|&&id| std::str::from_utf8(&tok.token_to_piece(id).unwrap()).is_err())
            .count();
        let mut stream = TextStream::new(tok.clone(), vec![]);
        let mut deltas: Vec<String> = ids.iter().map(|&id| stream.push(id).0).collect();
        deltas.extend(stream.flush());
        assert!(
            deltas.iter().all(|d| !d.contains('\u{FFFD}')),
            "half a character released: {deltas:?}"
        );
        assert_eq!(deltas.concat(), tok.decode(&ids).unwrap());
        assert_eq!(deltas.concat(), text);
    }
    // Otherwise this would not test characters that span tokens.
    assert!(split_characters > 0);
}

#[test]
fn a_stop_sequence_ends_the_stream_before_it() {
    let tok = tokenizer();
    let text = "東京と世界 then STOP here";
    let ids = tok.encode(text).unwrap();
    let mut stream = TextStream::new(tok.clone(), vec!["STOP".into()]);
    let mut out = String::new();
    let mut stopped = false;
    for &id in &ids {
        let (delta, stop) = stream.push(id);
        out.push_str(&delta);
        if stop {
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert_eq!(out, "東京と世界 then ");
}
