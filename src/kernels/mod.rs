//! Compute kernels and their single dispatch point.
//!
//! Everything the forward pass computes on weights goes through [`matmul`];
//! attention over the f16 KV cache goes through [`dot_f16`] and [`axpy_f16`].
//! `scalar` is the reference implementation every SIMD kernel is tested
//! against.

pub mod scalar;

use crate::quant::WeightView;
use half::f16;

/// `y[t * rows + r] = sum_c W[r, c] * x[t * cols + c]` for each of `n_tokens`
/// activation rows. For quantized weights the activations are first quantized
/// to 8-bit blocks (see [`scalar::quantize_act`]); for f32/f16 weights the
/// product is computed in f32.
pub fn matmul(w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tokens * w.cols(), "matmul: activation shape");
    assert_eq!(y.len(), n_tokens * w.rows(), "matmul: output shape");
    scalar::matmul(w, x, n_tokens, y)
}

/// `sum_i a[i] * b[i]` with `a` in f16 (a cached key).
pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    scalar::dot_f16(a, b)
}

/// `out[i] += s * v[i]` with `v` in f16 (a cached value).
pub fn axpy_f16(out: &mut [f32], s: f32, v: &[f16]) {
    scalar::axpy_f16(out, s, v)
}
