//! nibble: run LLaMA-2-family language models on ordinary CPUs from a single
//! memory-mapped `.nbl` file.
//!
//! - [`format`]: the `.nbl` container (reader, writer)
//! - [`quant`]: tensor types and scalar block quantization
//! - [`kernels`]: dequant-matmul and friends, scalar and SIMD, one dispatch point
//! - [`model`]: the LLaMA forward pass and KV cache

pub mod format;
pub mod kernels;
pub mod model;
pub mod quant;
