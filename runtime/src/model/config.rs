//! The architecture of a model, as the TrainingJob's `spec.model.architecture` states it and
//! as `config.json` in a model directory stores it.

use serde::{Deserialize, Serialize};

/// A configuration that cannot describe a working transformer.
#[derive(Debug, thiserror::Error)]
#[error("invalid model architecture: {0}")]
pub struct ConfigError(pub String);

/// Architecture of a decoder-only transformer. Field names are camelCase like the TrainingJob
/// spec; snake_case aliases are accepted for hand-written files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens in the vocabulary; 0 means "take it from the tokenizer".
    #[serde(default, alias = "vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(alias = "hidden_size")]
    pub hidden_size: usize,
    /// Number of decoder blocks.
    #[serde(alias = "n_layers")]
    pub n_layers: usize,
    /// Query heads per block.
    #[serde(alias = "n_heads")]
    pub n_heads: usize,
    /// Key/value heads per block (grouped-query attention); defaults to `n_heads`.
    #[serde(default, alias = "n_kv_heads")]
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU feed-forward.
    #[serde(alias = "intermediate_size")]
    pub intermediate_size: usize,
    /// Longest sequence (prompt plus generation) the model accepts.
    #[serde(alias = "max_seq_len")]
    pub max_seq_len: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta", alias = "rope_theta")]
    pub rope_theta: f64,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_rms_norm_eps", alias = "rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Whether the output head reuses the token embedding.
    #[serde(default, alias = "tie_embeddings")]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_heads.max(1)
    }

    /// Fills defaults that depend on other fields (`n_kv_heads`).
    pub fn normalized(mut self) -> Self {
        if self.n_kv_heads == 0 {
            self.n_kv_heads = self.n_heads;
        }
        self
    }

    /// Checks that the shapes fit together, so that building the model cannot fail on them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let positive = [
            ("vocabSize", self.vocab_size),
            ("hiddenSize", self.hidden_size),
            ("nLayers", self.n_layers),
            ("nHeads", self.n_heads),
            ("nKvHeads", self.n_kv_heads),
            ("intermediateSize", self.intermediate_size),
            ("maxSeqLen", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
            // Keeps every product of dimensions far from overflow and allocations sane.
            if v > 1 << 20 {
                return err(format!("{name} = {v} is too large"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.n_heads) {
            return err(format!(
                "hiddenSize {} is not a multiple of nHeads {}",
                self.hidden_size, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return err(format!(
                "nHeads {} is not a multiple of nKvHeads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return err("ropeTheta must be a positive number".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return err("rmsNormEps must be a positive number".into());
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.n_kv_heads * self.head_dim();
        let block = 2 * h + h * h * 2 + 2 * h * kv + 3 * h * i;
        let head = if self.tie_embeddings { 0 } else { h * v };
        v * h + self.n_layers * block + h + head
    }
}
