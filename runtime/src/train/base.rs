//! The model a fine-tuning run starts from (`spec.model.baseModel`): a model directory written
//! by `anneal-runtime train`, a llama-family GGUF file (its weights dequantized to f32: a Q4_1
//! file's values are the starting point, said as such in the run's events), or a Hugging Face
//! directory (`config.json`, `model.safetensors`, `tokenizer.json`, and the chat template from
//! `tokenizer_config.json` or `chat_template.jinja`). The tokenizer and chat template come
//! from the base model and go into the output unchanged, so the fine-tuned model reads and
//! writes text exactly as the base did.

use crate::checkpoint::model_dir::{self, TextFiles};
use crate::checkpoint::{CheckpointError, atomic};
use crate::gguf::{GgufFile, GgufTokenizer, GgufWeights, Q41Policy, model_config};
use crate::model::{ModelConfig, Weights, param_names};
use crate::tokenizer::{HfTokenizer, TOKENIZER_CONFIG, Tokenizer, TokenizerSpec};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// A loaded base model.
pub struct BaseModel {
    /// Its architecture.
    pub config: ModelConfig,
    /// Every weight by the runtime's (GGUF llama) name, f32.
    pub tensors: HashMap<String, Tensor>,
    /// Its tokenizer, as the output will record it.
    pub text: TextFiles,
    /// What kind of file it was, for the run's events.
    pub kind: &'static str,
}

impl BaseModel {
    /// The tokenizer of the base model, read from what the output records.
    pub fn tokenizer(&self) -> Result<Box<dyn Tokenizer>, CheckpointError> {
        text_tokenizer(&self.text)
    }
}

/// The tokenizer `text` records (the byte tokenizer, or its `tokenizer.json`).
pub fn text_tokenizer(text: &TextFiles) -> Result<Box<dyn Tokenizer>, CheckpointError> {
    match (&text.spec, &text.tokenizer_json) {
        (TokenizerSpec::Huggingface { bos, eos, .. }, Some(json)) => Ok(Box::new(
            HfTokenizer::from_bytes(json, "tokenizer.json", bos.as_deref(), eos.as_deref())
                .map_err(|e| CheckpointError::Format(e.to_string()))?,
        )),
        (spec, _) => spec
            .load(Path::new("."))
            .map_err(|e| CheckpointError::Format(e.to_string())),
    }
}

fn missing(path: &Path, what: &str) -> CheckpointError {
    CheckpointError::Format(format!("{}: {what}", path.display()))
}

/// Loads the base model at `path` onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<BaseModel, CheckpointError> {
    if path.is_dir() {
        if path.join(atomic::MANIFEST).exists() {
            return anneal_dir(path, device);
        }
        return huggingface_dir(path, device);
    }
    if !path.exists() {
        return Err(missing(path, "does not exist"));
    }
    let mut magic = [0u8; 4];
    let head =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    if head.is_err() || &magic != b"GGUF" {
        return Err(missing(
            path,
            "is neither a GGUF file nor a model directory (an anneal model directory with \
             MANIFEST.json, or a Hugging Face one with config.json, model.safetensors and tokenizer.json)",
        ));
    }
    gguf(path, device)
}

fn anneal_dir(dir: &Path, device: &Device) -> Result<BaseModel, CheckpointError> {
    let loaded = model_dir::load(dir, device)?;
    let spec: TokenizerSpec = serde_json::from_value(read_json(&dir.join(TOKENIZER_CONFIG))?)
        .map_err(|e| {
            CheckpointError::Corrupt(format!("{}: {e}", dir.join(TOKENIZER_CONFIG).display()))
        })?;
    let text = match &spec {
        TokenizerSpec::Byte => TextFiles {
            chat_template: loaded.chat_template.clone(),
            ..TextFiles::byte()
        },
        TokenizerSpec::Huggingface { path, bos, eos } => TextFiles::huggingface(
            &dir.join(path),
            bos.clone(),
            eos.clone(),
            loaded.chat_template.clone(),
        )?,
    };
    let weights = dir.join(model_dir::WEIGHTS);
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", weights.display())))?;
    Ok(BaseModel {
        config: loaded.config,
        tensors,
        text,
        kind: "model directory",
    })
}

fn gguf(path: &Path, device: &Device) -> Result<BaseModel, CheckpointError> {
    let bad =
        |e: &dyn std::fmt::Display| CheckpointError::Format(format!("{}: {e}", path.display()));
    let file = GgufFile::open(path).map_err(|e| bad(&e))?;
    let config = model_config(&file.header).map_err(|e| bad(&e))?;
    let weights = GgufWeights::new(&file, device, Q41Policy::F32);
    let mut tensors = HashMap::new();
    for (name, shape) in param_names(&config) {
        let t = weights.tensor(&name, &shape).map_err(|e| bad(&e))?;
        tensors.insert(name, t);
    }
    let tokenizer = GgufTokenizer::from_header(&file.header).map_err(|e| bad(&e))?;
    let (json, bos, eos) = tokenizer.to_json().map_err(|e| bad(&e))?;
    let chat_template = file
        .header
        .get_str("tokenizer.chat_template")
        .ok()
        .map(str::to_string);
    Ok(BaseModel {
        config,
        tensors,
        text: TextFiles {
            spec: TokenizerSpec::Huggingface {
                path: model_dir::TOKENIZER_JSON.into(),
                bos,
                eos,
            },
            tokenizer_json: Some(json.into_bytes()),
            chat_template,
        },
        kind: "GGUF (dequantized to f32)",
    })
}

fn read_json(path: &Path) -> Result<Json, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", path.display())))
}

/// A Hugging Face `LlamaForCausalLM` (or Mistral) directory.
fn huggingface_dir(dir: &Path, device: &Device) -> Result<BaseModel, CheckpointError> {
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(name).exists() {
            return Err(missing(
                dir,
                &format!(
                    "has no {name} (a base model directory is an anneal model directory with \
                     MANIFEST.json, or a Hugging Face one with config.json, model.safetensors \
                     and tokenizer.json)"
                ),
            ));
        }
    }
    let config = hf_config(&dir.join("config.json"))?;
    let weights = dir.join("model.safetensors");
    let raw = candle_core::safetensors::load(&weights, device)
        .map_err(|e| CheckpointError::Corrupt(format!("{}: {e}", weights.display())))?;
    let tensors = from_hf_names(&config, raw)
        .map_err(|e| CheckpointError::Format(format!("{}: {e}", weights.display())))?;
    // tokenizer_config.json: the chat template and the names of BOS and EOS.
    let tc = match dir.join("tokenizer_config.json") {
        p if p.exists() => read_json(&p)?,
        _ => Json::Null,
    };
    let token = |key: &str| match &tc[key] {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    };
    let chat_template = match dir.join(model_dir::CHAT_TEMPLATE) {
        p if p.exists() => Some(
            std::fs::read_to_string(&p).map_err(|e| CheckpointError::Io {
                path: p.display().to_string(),
                source: e,
            })?,
        ),
        _ => tc["chat_template"].as_str().map(str::to_string),
    };
    let text = TextFiles::huggingface(
        &dir.join("tokenizer.json"),
        token("bos_token"),
        token("eos_token"),
        chat_template,
    )?;
    Ok(BaseModel {
        config,
        tensors,
        text,
        kind: "Hugging Face directory",
    })
}

/// A Hugging Face llama `config.json` as the runtime's architecture.
fn hf_config(path: &Path) -> Result<ModelConfig, CheckpointError> {
    let c = read_json(path)?;
    let bad = |m: String| CheckpointError::Format(format!("{}: {m}", path.display()));
    let arch = c["architectures"][0].as_str().unwrap_or("");
    if !matches!(arch, "LlamaForCausalLM" | "MistralForCausalLM") {
        return Err(bad(format!(
            "architectures[0] is {arch:?}; only LlamaForCausalLM and MistralForCausalLM are supported"
        )));
    }
    let int = |key: &str| -> Result<usize, CheckpointError> {
        c[key]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(format!("{key} is missing or not a positive integer")))
    };
    if let Some(scaling) = c.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(bad(format!("rope_scaling {scaling} is not supported")));
    }
    let n_heads = int("num_attention_heads")?;
    let hidden = int("hidden_size")?;
    if c.get("head_dim")
        .is_some_and(|h| h.as_u64() != Some((hidden / n_heads.max(1)) as u64))
    {
        return Err(bad(
            "head_dim other than hidden_size / num_attention_heads is not supported".into(),
        ));
    }
    let config = ModelConfig {
        vocab_size: int("vocab_size")?,
        hidden_size: hidden,
        n_layers: int("num_hidden_layers")?,
        n_heads,
        n_kv_heads: c["num_key_value_heads"]
            .as_u64()
            .map_or(n_heads, |v| v as usize),
        intermediate_size: int("intermediate_size")?,
        max_seq_len: int("max_position_embeddings")?,
        rope_theta: c["rope_theta"].as_f64().unwrap_or(10_000.0),
        rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5),
        tie_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
    }
    .normalized();
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// The Hugging Face name of each runtime weight.
pub fn hf_name(name: &str) -> String {
    let layer = |rest: &str| -> Option<(String, &'static str)> {
        let (i, w) = rest.split_once('.')?;
        let hf = match w {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return None,
        };
        Some((i.to_string(), hf))
    };
    match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        other => match other.strip_prefix("blk.").and_then(layer) {
            Some((i, hf)) => format!("model.layers.{i}.{hf}"),
            None => other.into(),
        },
    }
}

/// Hugging Face weights under the runtime's names, f32; the query and key projections
/// permuted from the half-split rotary layout to the interleaved one (llama.cpp's conversion).
pub fn from_hf_names(
    config: &ModelConfig,
    mut raw: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let hd = config.head_dim();
    let mut out = HashMap::new();
    for (name, shape) in param_names(config) {
        let hf = hf_name(&name);
        let t = raw
            .remove(&hf)
            .ok_or_else(|| candle_core::Error::msg(format!("missing tensor `{hf}`")))?
            .to_dtype(DType::F32)?;
        if t.dims() != shape.as_slice() {
            candle_core::bail!(
                "`{hf}` has shape {:?}, config.json needs {shape:?}",
                t.dims()
            );
        }
        let heads = if name.ends_with("attn_q.weight") {
            Some(config.n_heads)
        } else if name.ends_with("attn_k.weight") {
            Some(config.n_kv_heads)
        } else {
            None
        };
        let t = match heads {
            Some(n) => rotary_interleaved(&t, n, hd)?,
            None => t,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Rows of each head reordered from (first halves, second halves) to interleaved pairs.
fn rotary_interleaved(w: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let cols = w.dim(1)?;
    w.reshape((heads, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((heads * head_dim, cols))
}

/// The inverse of [`rotary_interleaved`]: what a Hugging Face checkpoint stores.
pub fn rotary_half_split(w: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let cols = w.dim(1)?;
    w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((heads * head_dim, cols))
}

/// Runtime weights under Hugging Face names, q and k in the half-split layout: what
/// `transformers`' `LlamaForCausalLM` loads (the PyTorch references use it).
pub fn to_hf_names(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let hd = config.head_dim();
    let mut out = HashMap::new();
    for (name, _) in param_names(config) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| candle_core::Error::msg(format!("missing tensor `{name}`")))?;
        let t = if name.ends_with("attn_q.weight") {
            rotary_half_split(t, config.n_heads, hd)?
        } else if name.ends_with("attn_k.weight") {
            rotary_half_split(t, config.n_kv_heads, hd)?
        } else {
            t.clone()
        };
        out.insert(hf_name(&name), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotary_permutation_round_trips() -> candle_core::Result<()> {
        // Four heads of eight rows, three columns: row r holds 3r, 3r + 1, 3r + 2.
        let w = Tensor::arange(0f32, 4.0 * 8.0 * 3.0, &Device::Cpu)?.reshape((32, 3))?;
        let inter = rotary_interleaved(&w, 4, 8)?;
        // Head 0, interleaved: rows 0, 4, 1, 5, ... of the half-split layout.
        let first: Vec<f32> = inter
            .narrow(0, 0, 4)?
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(first, vec![0.0, 12.0, 3.0, 15.0]);
        let back = rotary_half_split(&inter, 4, 8)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    /// Runtime weights written in Hugging Face layout (what the PyTorch references load, and
    /// transformers agrees with the runtime's loss on them: BENCHMARKS.md) read back equal, and
    /// a Hugging Face `config.json` gives the architecture.
    #[test]
    fn hugging_face_layout_round_trips() -> Result<(), CheckpointError> {
        let config = ModelConfig {
            vocab_size: 40,
            hidden_size: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            intermediate_size: 24,
            max_seq_len: 32,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
        };
        let vars = crate::model::init_params(&config, 5, &Device::Cpu)?;
        let ours: HashMap<String, Tensor> = vars
            .data()
            .lock()
            .map_err(|_| CheckpointError::Format("lock".into()))?
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let hf = to_hf_names(&config, &ours)?;
        assert!(hf.contains_key("model.layers.1.self_attn.k_proj.weight"));
        let back = from_hf_names(&config, hf)?;
        for (name, t) in &ours {
            let (a, b) = (
                t.flatten_all()?.to_vec1::<f32>()?,
                back[name].flatten_all()?.to_vec1::<f32>()?,
            );
            assert_eq!(a, b, "{name}");
        }
        let dir = std::env::temp_dir().join(format!(
            "anneal-hf-{}",
            crate::checkpoint::atomic::writer_tag()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| CheckpointError::Format(e.to_string()))?;
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 24, "max_position_embeddings": 32, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        });
        std::fs::write(dir.join("config.json"), json.to_string())
            .map_err(|e| CheckpointError::Format(e.to_string()))?;
        let parsed = hf_config(&dir.join("config.json"));
        let missing = huggingface_dir(&dir, &Device::Cpu)
            .err()
            .map(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(parsed?, config);
        assert!(
            missing
                .as_deref()
                .is_some_and(|m| m.contains("has no model.safetensors")),
            "{missing:?}"
        );
        Ok(())
    }

    #[test]
    fn hugging_face_names() {
        assert_eq!(
            hf_name("blk.3.attn_output.weight"),
            "model.layers.3.self_attn.o_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
