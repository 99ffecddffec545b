//! Attention kernels on one softmax ([`super::math::softmax`]) and one RoPE ([`super::rope`]):
//!
//! - [`train`]: causal self-attention over whole sequences from the fused q/k/v projection,
//!   with its backward pass (a candle custom op, or called by the fused training step);
//! - [`decode`]: single-query attention over a serving KV cache whose keys are stored in
//!   transposed tiles, for prefill and decode.
//!
//! The two share the per-row softmax and the rotation; their score and weighted-sum loops
//! differ because their layouts do: training computes a (t x t) block of scores with the f32
//! matrix product over keys it has just rotated, decode streams one query row over a cache
//! laid out for it.

pub mod decode;
pub(crate) mod train;

pub use train::causal_self_attention;
pub(crate) use train::{Geometry, Saved, backward, forward};
