//! Reference kernels in plain Rust. They define the exact semantics (integer
//! block dot products, then one float multiply per block) that every SIMD
//! kernel must reproduce.

use super::{Isa, KernelSet, MAX_TILE, MAX_TILE_T};
use crate::quant::{WeightView, BLOCK};
use half::f16;

/// Activations quantized to 8-bit blocks: `x ≈ d * q`, `q` in -127..=127,
/// one f32 scale per 32 values.
#[derive(Clone, Debug, Default)]
pub struct QuantAct {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
}

/// Quantizes `x` (finite values, length a multiple of [`BLOCK`]) into `out`:
/// `d = max|x| / 127`, `q = round(x * (127 / max|x|))` (half away from zero).
/// The inverse is capped at `f32::MAX` so that a block of subnormals, whose
/// `127 / max|x|` overflows, quantizes to small integers instead of NaN.
pub fn quantize_act(x: &[f32], out: &mut QuantAct) {
    out.qs.resize(x.len(), 0);
    out.d.resize(x.len() / BLOCK, 0.0);
    quantize_act_into(x, &mut out.qs, &mut out.d)
}

fn quantize_act_into(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), d) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = act_inverse_scale(amax);
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
    }
}

/// `127 / amax`, 0 for an all-zero block, capped at `f32::MAX`; every kernel
/// set multiplies by exactly this value.
#[inline]
pub fn act_inverse_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        0.0
    } else {
        (127.0 / amax).min(f32::MAX)
    }
}

/// Dot product of one row of 4-bit weight blocks with 8-bit activation blocks.
pub fn dot_q4_q8(wq: &[u8], wd: &[f16], aq: &[i8], ad: &[f32]) -> f32 {
    let mut sum = 0f32;
    for b in 0..wd.len() {
        let w = &wq[b * 16..b * 16 + 16];
        let a = &aq[b * BLOCK..b * BLOCK + BLOCK];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += ((w[j] & 0x0f) as i32 - 8) * a[j] as i32;
            isum += ((w[j] >> 4) as i32 - 8) * a[j + 16] as i32;
        }
        sum += wd[b].to_f32() * ad[b] * isum as f32;
    }
    sum
}

/// Dot product of one row of 8-bit weight blocks with 8-bit activation blocks.
pub fn dot_q8_q8(wq: &[i8], wd: &[f16], aq: &[i8], ad: &[f32]) -> f32 {
    let mut sum = 0f32;
    for b in 0..wd.len() {
        let w = &wq[b * BLOCK..b * BLOCK + BLOCK];
        let a = &aq[b * BLOCK..b * BLOCK + BLOCK];
        let isum: i32 = w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum();
        sum += wd[b].to_f32() * ad[b] * isum as f32;
    }
    sum
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y).sum()
}

pub fn axpy_f16(out: &mut [f32], s: f32, v: &[f16]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += s * x.to_f32();
    }
}

pub fn matmul(w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let nb = cols / BLOCK;
    let mut act = QuantAct::default();
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        let yt = &mut y[t * rows..(t + 1) * rows];
        match *w {
            WeightView::F32 { data, .. } => {
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_f32(&data[r * cols..(r + 1) * cols], xt);
                }
            }
            WeightView::F16 { data, .. } => {
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_f16(&data[r * cols..(r + 1) * cols], xt);
                }
            }
            WeightView::Q8 { qs, d, .. } => {
                quantize_act(xt, &mut act);
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_q8_q8(
                        &qs[r * cols..(r + 1) * cols],
                        &d[r * nb..(r + 1) * nb],
                        &act.qs,
                        &act.d,
                    );
                }
            }
            WeightView::Q4 { qs, d, .. } => {
                quantize_act(xt, &mut act);
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_q4_q8(
                        &qs[r * cols / 2..(r + 1) * cols / 2],
                        &d[r * nb..(r + 1) * nb],
                        &act.qs,
                        &act.d,
                    );
                }
            }
        }
    }
}

/// The scalar kernel set: the reference functions above, driven by the same
/// tiled, threaded matmul driver as the SIMD sets. Its accumulation order is
/// the reference's, so its matmul equals [`matmul`] bit for bit.
pub(crate) static ISA: Isa = Isa {
    set: KernelSet::Scalar,
    tile_rows: 4,
    tile_tokens: 1,
    quantize_act: quantize_act_into,
    q4_tile,
    q8_tile,
    q4_rows8: None,
    dot_f32,
    dot_f16,
    axpy_f16,
    attend_f16,
};

/// Reference attention of one head (see [`super::attend_f16`]).
pub fn attend_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_with(dot_f16, axpy_f16, q, keys, values, scale, scores, out)
}

/// Attention from a dot product and an axpy over cached elements of type `E`:
/// `out = softmax(q·K * scale) · V`, softmax in f32. The NEON set uses it with
/// its own f16 helpers, the runtime's f32 KV cache with f32 ones.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn attend_with<E>(
    dot: impl Fn(&[E], &[f32]) -> f32,
    axpy: impl Fn(&mut [f32], f32, &[E]),
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc = dot(&keys[j * hd..(j + 1) * hd], q) * scale;
        max = max.max(*sc);
    }
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc *= inv;
        axpy(out, *sc, &values[j * hd..(j + 1) * hd]);
    }
}

#[allow(clippy::too_many_arguments)]
fn q4_tile(
    w: &[u8],
    wd: &[f16],
    aq: &[i8],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let rb = nb * BLOCK / 2;
    for r in 0..nr {
        for t in 0..nt {
            out[r * MAX_TILE_T + t] = dot_q4_q8(
                &w[r * rb..(r + 1) * rb],
                &wd[r * nb..(r + 1) * nb],
                &aq[t * nb * BLOCK..(t + 1) * nb * BLOCK],
                &ad[t * nb..(t + 1) * nb],
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn q8_tile(
    w: &[u8],
    wd: &[f16],
    aq: &[i8],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let rb = nb * BLOCK;
    let w: &[i8] = bytemuck::cast_slice(w);
    for r in 0..nr {
        for t in 0..nt {
            out[r * MAX_TILE_T + t] = dot_q8_q8(
                &w[r * rb..(r + 1) * rb],
                &wd[r * nb..(r + 1) * nb],
                &aq[t * nb * BLOCK..(t + 1) * nb * BLOCK],
                &ad[t * nb..(t + 1) * nb],
            );
        }
    }
}
