//! Fuzzes the GGUF loader: header, metadata, tensor descriptors, tensor data into candle,
//! model configuration and tokenizer. Any panic is a finding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    anneal_runtime::gguf::exercise(data);
});
