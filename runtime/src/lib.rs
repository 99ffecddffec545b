//! anneal's runtime: the candle-based trainer, evaluator and OpenAI-compatible server that
//! TrainingJob, EvalGate and ModelServer pods run.
//!
//! One model definition ([`model`]) serves training, evaluation and serving; the KV cache is
//! passed in from outside so that the serving engine can own and batch it.

pub mod error;

// Training and evaluation.
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod model;
pub mod rng;
pub mod tokenizer;
pub mod train;

// Serving.
pub mod embed;
pub mod gguf;
pub mod kernels;
pub mod serve;
