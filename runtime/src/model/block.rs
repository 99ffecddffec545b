//! The decoder block as one recipe that every forward pass of the architecture runs: pre-norm
//! attention and feed-forward with residuals,
//!
//! ```text
//! x += o(attention(qkv(norm_attn(x))))
//! x += down(activation(gate_up(norm_ffn(x))))
//! ```
//!
//! written once in [`block`] over the operations of [`BlockOps`], which each pass implements
//! on its own representation with the shared [`crate::kernels`]:
//!
//! - the candle layers ([`super::CandleOps`]: training's graph path, evaluation, the candle
//!   inference path and the batched decode on candle, which plug in their attention and
//!   projections);
//! - the serving engine's quantized CPU pass (`serve::cpu_model`, plain buffers).
//!
//! The fused training step (`train::fused`) keeps its own hand-scheduled forward and backward
//! passes over the same kernels; its tests check it against the candle layers' gradients.
//!
//! Where an architecture change goes: the order of operations (say, a post-norm block or
//! parallel attention and feed-forward) here; a new weight (a bias) in the loading
//! ([`super::Block::new`]) and in the two implementations of [`BlockOps::linear`]; a
//! different activation in [`BlockOps::activation`], on a kernel of [`crate::kernels`].

/// Which of a block's norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormAt {
    /// Before attention.
    Attention,
    /// Before the feed-forward.
    FeedForward,
}

/// Which of a block's projections (stacked where one input feeds several).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    /// Queries, keys and values, one row of `[q | k | v]` per token.
    Qkv,
    /// The attention output.
    O,
    /// The feed-forward's gate and up projections, `[gate | up]`.
    GateUp,
    /// The feed-forward's down projection.
    Down,
}

/// The operations of a decoder block on one forward pass's representation of the activations
/// of all its rows (`X`).
pub trait BlockOps {
    /// Activations.
    type X;
    /// What the operations fail with.
    type Error;

    /// RMSNorm of `x` with the scale of layer `layer`'s norm `at`.
    fn norm(&mut self, layer: usize, at: NormAt, x: &Self::X) -> Result<Self::X, Self::Error>;

    /// Projection `proj` of layer `layer` applied to `x` (consumed, so buffers can be reused).
    fn linear(&mut self, layer: usize, proj: Proj, x: Self::X) -> Result<Self::X, Self::Error>;

    /// Self-attention of layer `layer` from the projected `[q | k | v]`: RoPE, the KV cache
    /// when there is one, and the heads' outputs side by side.
    fn attention(&mut self, layer: usize, qkv: Self::X) -> Result<Self::X, Self::Error>;

    /// The feed-forward activation of `[gate | up]`: SwiGLU, `silu(gate) * up`.
    fn activation(&mut self, layer: usize, gate_up: Self::X) -> Result<Self::X, Self::Error>;

    /// The residual connection `x + y`.
    fn residual(&mut self, x: Self::X, y: Self::X) -> Result<Self::X, Self::Error>;
}

/// Block `layer` applied to `x`; see the module documentation.
pub fn block<B: BlockOps>(ops: &mut B, layer: usize, x: B::X) -> Result<B::X, B::Error> {
    let h = ops.norm(layer, NormAt::Attention, &x)?;
    let qkv = ops.linear(layer, Proj::Qkv, h)?;
    let a = ops.attention(layer, qkv)?;
    let y = ops.linear(layer, Proj::O, a)?;
    let x = ops.residual(x, y)?;
    let h = ops.norm(layer, NormAt::FeedForward, &x)?;
    let gate_up = ops.linear(layer, Proj::GateUp, h)?;
    let m = ops.activation(layer, gate_up)?;
    let y = ops.linear(layer, Proj::Down, m)?;
    ops.residual(x, y)
}
