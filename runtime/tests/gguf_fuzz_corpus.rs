//! Replays the fuzz target's corpus (`runtime/fuzz/corpus/gguf`: the known crashers of GGUF
//! loaders and a valid file) through the same body the fuzzer runs, so every CI run checks
//! them without nightly or libFuzzer.

#[test]
fn corpus_never_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        anneal_runtime::gguf::exercise(&bytes);
        // Every prefix too: truncation at each field boundary.
        for len in (0..bytes.len()).step_by(7) {
            anneal_runtime::gguf::exercise(&bytes[..len]);
        }
        n += 1;
    }
    assert!(n >= 10, "corpus has only {n} files");
}
