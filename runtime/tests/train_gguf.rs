//! GGUF export of a trained model directory: a tiny model trained by the binary is exported to
//! Q8_0 and Q4_0 and loaded the way `serve` loads models; the tokenizer round-trips like the
//! directory's, the Q8_0 file completes prompts as the directory does, and a truncated file is
//! refused. A Hugging Face tokenizer is carried into the GGUF metadata too.

mod serve_support;
mod train_support;

use anneal_runtime::checkpoint::{atomic, gguf_export, model_dir};
use anneal_runtime::eval::greedy;
use anneal_runtime::gguf::Q41Policy;
use anneal_runtime::model::{ModelConfig, init_params};
use anneal_runtime::serve::loaded_model::{self, LoadError, LoadedModel};
use anneal_runtime::tokenizer::{HfTokenizer, Tokenizer};
use anneal_runtime::train::config::GgufQuantization;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use train_support::{Scratch, assert_ok, run};

/// 1-digit sums (100 examples) learn in a few hundred steps of a 30k-parameter model: enough
/// for confident greedy answers, in a few seconds of training.
const CONFIG: &str = r#"model:
  architecture:
    hiddenSize: 32
    nLayers: 2
    nHeads: 4
    nKvHeads: 2
    intermediateSize: 64
    maxSeqLen: 16
dataset:
  uri: builtin:arith?digits=1
stage: sft
hyperparameters:
  steps: 300
  batchSize: 32
  learningRate: 0.01
  warmupSteps: 20
  weightDecay: 0.0
  threads: 2
  logEvery: 100
output:
  path: OUTPUT
  gguf: Q8_0
"#;

const PROMPTS: [&str; 6] = ["1+2=", "3+4=", "9+9=", "0+7=", "5+8=", "6+0="];

/// Texts for the tokenizer round trip: ASCII, control bytes, multi-byte UTF-8.
const TEXTS: [&str; 5] = [
    "12+7=19",
    "Hello, world!\n\tsecond line  ",
    "\u{0}\u{1}\u{7f} <s></s>",
    "héllo wörld, naïve café",
    "日本語 ✓ 🦀 ∑x²",
];

fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    loaded_model::load(path, Q41Policy::Keep, None, &Device::Cpu)
}

/// BOS then the prompt's tokens, as `serve` starts a completion.
fn prompt_ids(m: &LoadedModel, prompt: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = m.tokenizer.bos_id().into_iter().collect();
    ids.extend(m.tokenizer.encode(prompt).unwrap());
    ids
}

fn complete(m: &LoadedModel, prompt: &str) -> String {
    let ids = prompt_ids(m, prompt);
    let out = greedy(&m.transformer, &ids, 4, &m.stop_ids, &Device::Cpu).unwrap();
    m.tokenizer.decode(&out).unwrap()
}

/// Next-token logits after `prompt`, without a cache.
fn logits(m: &LoadedModel, prompt: &str) -> Vec<f32> {
    let ids = prompt_ids(m, prompt);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = m.transformer.forward_last(&input, 0, None).unwrap();
    l.squeeze(0).unwrap().to_vec1().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Largest |a - b| over the prompts' logits, and how many prompts agree on the top token.
fn compare_logits(a: &LoadedModel, b: &LoadedModel) -> (f32, usize) {
    let mut max_diff = 0f32;
    let mut agree = 0;
    for p in PROMPTS {
        let (la, lb) = (logits(a, p), logits(b, p));
        assert_eq!(la.len(), lb.len());
        for (x, y) in la.iter().zip(&lb) {
            max_diff = max_diff.max((x - y).abs());
        }
        agree += usize::from(argmax(&la) == argmax(&lb));
    }
    (max_diff, agree)
}

/// Greedy `/v1/completions` of [`PROMPTS`] from a server started on `model`.
fn serve_completions(model: &Path) -> Vec<String> {
    let mut args = serve_support::args(model.to_path_buf());
    args.max_seq_len = 16;
    args.threads = Some(2);
    let addr = serve_support::start(args, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    PROMPTS
        .iter()
        .map(|p| {
            let body = serde_json::json!({"prompt": p, "temperature": 0, "max_tokens": 4});
            let body = body.to_string().into_bytes();
            let r = rt
                .block_on(serve_support::request(
                    addr,
                    "POST",
                    "/v1/completions",
                    Some(&body),
                    &[],
                ))
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `b` encodes and decodes `texts` as `a` does, with the same BOS and EOS.
fn assert_same_tokenizer(a: &dyn Tokenizer, b: &dyn Tokenizer, texts: &[&str]) {
    assert_eq!(a.bos_id(), b.bos_id());
    assert_eq!(a.eos_id(), b.eos_id());
    for text in texts {
        let ids = a.encode(text).unwrap();
        assert_eq!(b.encode(text).unwrap(), ids, "encoding {text:?}");
        assert_eq!(b.decode(&ids).unwrap(), a.decode(&ids).unwrap(), "{text:?}");
        let mut with_specials = a.bos_id().into_iter().collect::<Vec<_>>();
        with_specials.extend(&ids);
        with_specials.extend(a.eos_id());
        assert_eq!(
            a.decode(&with_specials).unwrap(),
            b.decode(&with_specials).unwrap()
        );
    }
}

#[test]
fn trained_model_exports_to_gguf_that_serve_loads() {
    let s = Scratch::new("gguf");
    let dir = s.path("model");
    let cfg = s.write(
        "train.yaml",
        &CONFIG.replace("OUTPUT", dir.to_str().unwrap()),
    );
    assert_ok(&run(&["train", "--config", cfg.to_str().unwrap()], &[]));
    let reference = load(&dir).unwrap();
    // `output.gguf: Q8_0`: train exported it already, into the manifest.
    let exported_by_train = atomic::verify_dir(&dir).unwrap().files["model-q8_0.gguf"].clone();

    let q8 = gguf_export::export(&dir, GgufQuantization::Q8_0).unwrap();
    assert_eq!(q8.sha256, exported_by_train, "the export is deterministic");
    let q4 = gguf_export::export(&dir, GgufQuantization::Q4_0).unwrap();
    assert_eq!(q8.path, dir.join("model-q8_0.gguf"));
    assert_eq!(q4.path, dir.join("model-q4_0.gguf"));
    // Both files are in the directory's manifest, and the directory still loads.
    let manifest = atomic::verify_dir(&dir).unwrap();
    assert_eq!(manifest.files["model-q8_0.gguf"], q8.sha256);
    assert_eq!(manifest.files["model-q4_0.gguf"], q4.sha256);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    eprintln!(
        "sizes: safetensors {} B, q8_0 {} B, q4_0 {} B",
        size(&dir.join(model_dir::WEIGHTS)),
        size(&q8.path),
        size(&q4.path)
    );

    let gguf8 = load(&q8.path).unwrap();
    // GGUF stores the RMSNorm epsilon as f32 (llama.cpp reads it so).
    let want_config = ModelConfig {
        rms_norm_eps: f64::from(reference.transformer.config.rms_norm_eps as f32),
        ..reference.transformer.config.clone()
    };
    assert_eq!(gguf8.transformer.config, want_config);
    assert_same_tokenizer(&*reference.tokenizer, &*gguf8.tokenizer, &TEXTS);
    // One token per byte, id = byte value: 256 bytes, BOS and EOS.
    assert_eq!(gguf8.tokenizer.vocab_size(), 258);
    for text in TEXTS {
        let ids = gguf8.tokenizer.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(gguf8.tokenizer.decode(&ids).unwrap(), text);
    }
    assert_eq!(gguf8.stop_ids, reference.stop_ids);
    // llama.cpp requires the merges as an array of strings, even when there are none.
    for path in [&q8.path, &q4.path] {
        let file = anneal_runtime::gguf::GgufFile::open(path).unwrap();
        let merges = file.header.get("tokenizer.ggml.merges").unwrap();
        assert!(
            matches!(merges.as_array(), Some(anneal_runtime::gguf::value::Array::String(m)) if m.is_empty()),
            "{merges:?}"
        );
    }

    let (diff8, agree8) = compare_logits(&reference, &gguf8);
    eprintln!(
        "q8_0: logits max |diff| {diff8:.4}, top-1 agreement {agree8}/{}",
        PROMPTS.len()
    );
    let want: Vec<String> = PROMPTS.iter().map(|p| complete(&reference, p)).collect();
    let got: Vec<String> = PROMPTS.iter().map(|p| complete(&gguf8, p)).collect();
    eprintln!("completions: directory {want:?}, q8_0 {got:?}");
    assert_eq!(got, want);

    let gguf4 = load(&q4.path).unwrap();
    assert_same_tokenizer(&*reference.tokenizer, &*gguf4.tokenizer, &TEXTS);
    let (diff4, agree4) = compare_logits(&reference, &gguf4);
    eprintln!(
        "q4_0: logits max |diff| {diff4:.4}, top-1 agreement {agree4}/{}",
        PROMPTS.len()
    );
    let ids = prompt_ids(&gguf4, PROMPTS[0]);
    let out = greedy(&gguf4.transformer, &ids, 4, &[], &Device::Cpu).unwrap();
    assert_eq!(out.len(), 4);
    eprintln!(
        "q4_0 completion of {:?}: {:?}",
        PROMPTS[0],
        complete(&gguf4, PROMPTS[0])
    );

    // The server itself (its engine and kernels, not only its loader) answers alike.
    let served: Vec<Vec<String>> = [&dir, &q8.path, &q4.path]
        .iter()
        .map(|m| serve_completions(m))
        .collect();
    eprintln!(
        "served: directory {:?}, q8_0 {:?}, q4_0 {:?}",
        served[0], served[1], served[2]
    );
    assert_eq!(served[0], want);
    assert_eq!(served[1], want);
    assert!(served[2].iter().all(|t| !t.is_empty()));

    // A truncated file is refused with an error naming the problem.
    let bytes = std::fs::read(&q8.path).unwrap();
    // (Cutting only the zero padding after the last tensor leaves a valid file.)
    for keep in [bytes.len() - 64, bytes.len() / 2, 100, 3] {
        let cut = s.path("cut.gguf");
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = load(&cut).err().expect("a truncated GGUF must not load");
        let msg = err.to_string();
        eprintln!("truncated to {keep} bytes: {msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "{msg}"
        );
    }
}

/// A byte-level BPE `tokenizer.json` in SmolLM's style (single digits, then byte-level), with a
/// few merges and ChatML special tokens.
fn write_hf_tokenizer(path: &Path) -> usize {
    use anneal_runtime::gguf::tokenizer::byte_level_char;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};

    let mut vocab: Vocab = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), u32::from(b)))
        .collect();
    let pairs = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("Ġ", "c")];
    let merges: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for (a, b) in &merges {
        let n = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), n);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre: PreTokenizerWrapper = Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])
    .into();
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tok.add_special_tokens(
        specials
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    tok.save(path, false).unwrap();
    tok.get_vocab_size(true)
}

#[test]
fn huggingface_tokenizer_is_carried_into_gguf() {
    let s = Scratch::new("gguf-hf");
    let n_tokens = write_hf_tokenizer(&s.path("tokenizer.json"));
    let config = ModelConfig {
        // Padded past the tokenizer: the export fills the rest with unused tokens.
        vocab_size: n_tokens + 4,
        // 48 is not a multiple of the block size: those matrices stay F32 beside Q8_0 ones.
        hidden_size: 48,
        n_layers: 1,
        n_heads: 4,
        n_kv_heads: 2,
        intermediate_size: 96,
        max_seq_len: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_embeddings: true,
    };
    let vars = init_params(&config, 3, &Device::Cpu).unwrap();
    let tensors: HashMap<_, _> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let text =
        model_dir::TextFiles::huggingface(&s.0.join("tokenizer.json"), None, None, None).unwrap();
    let dir = s.path("model");
    model_dir::save(&dir, &config, &tensors, &text).unwrap();
    let q8 = gguf_export::export(&dir, GgufQuantization::Q8_0).unwrap();

    let file = anneal_runtime::gguf::GgufFile::open(&q8.path).unwrap();
    let dtype = |name: &str| file.header.tensor(name).map(|t| t.dtype);
    assert_eq!(dtype("blk.0.attn_q.weight"), Some(GgmlDType::F32));
    assert_eq!(dtype("blk.0.ffn_down.weight"), Some(GgmlDType::Q8_0));
    assert_eq!(dtype("blk.0.attn_norm.weight"), Some(GgmlDType::F32));
    assert_eq!(dtype("output.weight"), None);

    let reference = load(&dir).unwrap();
    let gguf = load(&q8.path).unwrap();
    // Tied: no output.weight in the file, and the loader takes the embedding as the head.
    assert!(gguf.transformer.config.tie_embeddings);
    assert_eq!(gguf.tokenizer.vocab_size(), config.vocab_size);
    let hf = HfTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(hf.vocab_size(), n_tokens);
    let texts = [
        "the cat, the hell",
        "12345 + 678 = 7023",
        "<|im_start|>user\nhi there<|im_end|>\n",
        "naïve ✓ 日本",
    ];
    assert_same_tokenizer(&hf, &*gguf.tokenizer, &texts);
    // The merges are used: " the" is one token.
    assert_eq!(gguf.tokenizer.encode(" the").unwrap().len(), 1);
    assert!(gguf.stop_ids.contains(&hf.eos_id().unwrap()));
    let (diff, _) = compare_logits(&reference, &gguf);
    eprintln!("hf q8_0: logits max |diff| {diff:.5}");
    assert!(diff < 0.05, "{diff}");
}
