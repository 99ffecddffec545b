//! The accuracy cost of serving SmolLM2's Q4_1 weights re-quantized to Q8_0 (the fast path):
//! weight error relative to the Q4_1 values, and logits of a real prompt against the exact
//! Q4_1 model. Prints the figures BENCHMARKS.md quotes.

mod serve_support;

use anneal_runtime::gguf::{GgufFile, GgufTokenizer, GgufWeights, Q41Policy, model_config};
use anneal_runtime::model::Transformer;
use anneal_runtime::tokenizer::Tokenizer;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

#[test]
fn q8_0_requantization_keeps_logits_close() {
    let file = GgufFile::open(&serve_support::smollm2()).unwrap();
    let dev = Device::Cpu;
    // Weight error of one projection.
    let w = GgufWeights::new(&file, &dev, Q41Policy::Keep)
        .qtensor("blk.0.ffn_up.weight")
        .unwrap();
    assert_eq!(w.dtype(), GgmlDType::Q4_1);
    let exact = w.dequantize(&dev).unwrap();
    let requant = QTensor::quantize(&exact, GgmlDType::Q8_0)
        .unwrap()
        .dequantize(&dev)
        .unwrap();
    let rel = |a: &Tensor, b: &Tensor| -> f32 {
        let d = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let n = a
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (d / n).sqrt()
    };
    let w_err = rel(&exact, &requant);

    let mut config = model_config(&file.header).unwrap();
    config.max_seq_len = 256;
    let load = |p| Transformer::new(&config, &GgufWeights::new(&file, &dev, p), &dev).unwrap();
    let (q41, q80) = (load(Q41Policy::Keep), load(Q41Policy::Q8_0));
    let tok = GgufTokenizer::from_header(&file.header).unwrap();
    let text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes.";
    let prompt = tok.encode(text).unwrap();
    let tokens = Tensor::new(prompt.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = q41.forward(&tokens, 0, None).unwrap().squeeze(0).unwrap();
    let b = q80.forward(&tokens, 0, None).unwrap().squeeze(0).unwrap();
    let logit_err = rel(&a, &b);
    let top_a = a.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let top_b = b.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let agree =
        top_a.iter().zip(&top_b).filter(|(x, y)| x == y).count() as f32 / top_a.len() as f32;
    println!(
        "Q4_1 -> Q8_0: weight rel. RMS error {w_err:.4}, logits rel. RMS error {logit_err:.4}, top-1 agreement {:.1}%",
        agree * 100.0
    );
    assert!(w_err < 0.02, "{w_err}");
    assert!(logit_err < 0.1, "{logit_err}");
    assert!(agree >= 0.95, "{agree}");
}
