//! CPU inference kernels of the serving path: quantized matrix products on the GGUF weights as
//! stored, fused attention over the preallocated KV cache, and the small fork-join pool that
//! runs them. Inference only (no gradients); the serving engine uses them on the CPU and falls
//! back to the candle model otherwise.

pub mod attention;
pub mod ops;
pub mod pool;
pub mod qmatmul;
