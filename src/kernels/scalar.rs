//! Reference kernels in plain Rust. They define the exact semantics (integer
//! block dot products, then one float multiply per block) that every SIMD
//! kernel must reproduce: 4-bit weights × 8-bit activations, 8-bit weights ×
//! 16-bit activations.

use super::tile::{BlockRows, KRows, MAX_TILE, MAX_TILE_T, Q4K_ACT_SUBS};
use super::{act_block_sums, Isa, KernelSet};
use crate::quant::{q4k_unpack_scales, TensorType, WeightView, BLOCK, Q4K_SCALE_BYTES, Q4K_SUBS};
use half::f16;

/// Activations quantized in blocks of [`BLOCK`]: `x ≈ d * q`, one f32 scale
/// per block.
#[derive(Clone, Debug, Default)]
pub struct QuantBlocks<Q> {
    pub qs: Vec<Q>,
    pub d: Vec<f32>,
}

/// 8-bit activation blocks (`q` in -127..=127), multiplied with 4-bit weights.
pub type QuantAct = QuantBlocks<i8>;

/// 16-bit activation blocks (`q` in -32767..=32767), multiplied with 8-bit
/// weights: 8-bit activations would add as much rounding error as the 8-bit
/// weights themselves, which dominated q8's perplexity loss.
pub type QuantAct16 = QuantBlocks<i16>;

/// Quantizes `x` (finite values, length a multiple of [`BLOCK`]) into `out`:
/// `d = max|x| / 127`, `q = round(x * (127 / max|x|))` (half away from zero).
/// The inverse is capped at `f32::MAX` so that a block of subnormals, whose
/// `127 / max|x|` overflows, quantizes to small integers instead of NaN.
pub fn quantize_act(x: &[f32], out: &mut QuantAct) {
    out.qs.resize(x.len(), 0);
    out.d.resize(x.len() / BLOCK, 0.0);
    quantize_act_into(x, &mut out.qs, &mut out.d, 1)
}

/// Quantizes rows of `cols` activations for q4k weights: like
/// [`quantize_act`], but one scale per [`Q4K_ACT_SUBS`] blocks of each row
/// (half a q4k group), the row's last run shorter when its blocks do not fill
/// one; `out.d` holds `(cols / BLOCK).div_ceil(Q4K_ACT_SUBS)` scales per row.
/// A shared scale lets the q4k kernels sum its blocks in integers and convert
/// once. llama.cpp's Q8_K shares one per 256; per 128 costs one more convert
/// per group and halves the perplexity loss that sharing adds
/// (`benches/RESULTS.md`).
pub fn quantize_act_grouped(x: &[f32], cols: usize, out: &mut QuantAct) {
    out.qs.resize(x.len(), 0);
    out.d
        .resize(x.len() / cols * (cols / BLOCK).div_ceil(Q4K_ACT_SUBS), 0.0);
    super::matmul::quantize_act_rows(
        quantize_act_into,
        x,
        cols,
        Q4K_ACT_SUBS,
        &mut out.qs,
        &mut out.d,
    )
}

/// Quantizes `x` with one scale per run of `blocks` blocks:
/// `x.len() == d.len() * blocks * BLOCK`.
fn quantize_act_into(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize) {
    let run = blocks * BLOCK;
    for ((xb, qb), d) in x
        .chunks_exact(run)
        .zip(qs.chunks_exact_mut(run))
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
    inverse_scale(127.0, amax)
}

/// Quantizes `x` (finite values, length a multiple of [`BLOCK`]) into 16-bit
/// blocks: `d = max|x| / 32767`, `q = round(x * (32767 / max|x|))` (half away
/// from zero), so `|q| <= 32767` (the product is at most `32767 * (1 + 2^-23)`).
/// The inverse is capped like [`act_inverse_scale`]'s.
pub fn quantize_act16(x: &[f32], out: &mut QuantAct16) {
    out.qs.resize(x.len(), 0);
    out.d.resize(x.len() / BLOCK, 0.0);
    quantize_act16_into(x, &mut out.qs, &mut out.d)
}

fn quantize_act16_into(x: &[f32], qs: &mut [i16], d: &mut [f32]) {
    for ((xb, qb), d) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *d = amax / 32767.0;
        let inv = act16_inverse_scale(amax);
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i16;
        }
    }
}

/// `32767 / amax`, 0 for an all-zero block, capped at `f32::MAX`; every
/// kernel set multiplies by exactly this value.
#[inline]
pub fn act16_inverse_scale(amax: f32) -> f32 {
    inverse_scale(32767.0, amax)
}

#[inline]
fn inverse_scale(qmax: f32, amax: f32) -> f32 {
    if amax == 0.0 {
        0.0
    } else {
        (qmax / amax).min(f32::MAX)
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

/// Dot product of one row of q4k weights (quants `wq`, `(d, dmin)` pairs
/// `dm`, packed scales `sc`) with 8-bit activations quantized one scale per
/// run of [`Q4K_ACT_SUBS`] blocks (`ad[h]`, see [`quantize_act_grouped`];
/// `asum[b]`: the sum of `aq` over block `b`, see [`act_block_sums`]). Per
/// run `h` (within one group, whose `(d, dmin)` it uses), with `(sc_k, m_k)`
/// the 6-bit scales of its sub-blocks `k`:
///
/// `sum += ad[h] * (d * Σ_k sc_k Σ_j q_j a_j - dmin * Σ_k m_k asum[b_k])`
///
/// in f32, runs left to right. Both run sums are exact in i32 and in f32:
/// `|Σ q a| <= 32 * 15 * 127 = 60960` per sub-block, so the first is at most
/// `4 * 63 * 60960 < 2^24`, the second `4 * 63 * 4064 < 2^20`. The SIMD sets
/// form the same integers (or per-lane parts of them) and combine them in
/// another float order.
pub fn dot_q4k_q8(wq: &[u8], dm: &[f16], sc: &[u8], aq: &[i8], ad: &[f32], asum: &[i32]) -> f32 {
    let nb = aq.len() / BLOCK;
    let mut sum = 0f32;
    // a row's last group may hold fewer than Q4K_SUBS sub-blocks
    for g in 0..nb.div_ceil(Q4K_SUBS) {
        let (d, dmin) = (dm[2 * g].to_f32(), dm[2 * g + 1].to_f32());
        let (s, m) = q4k_unpack_scales(&sc[g * Q4K_SCALE_BYTES..(g + 1) * Q4K_SCALE_BYTES]);
        let (mut qa, mut ma) = (0i32, 0i32);
        for b in g * Q4K_SUBS..nb.min((g + 1) * Q4K_SUBS) {
            let k = b - g * Q4K_SUBS;
            let w = &wq[b * 16..b * 16 + 16];
            let a = &aq[b * BLOCK..b * BLOCK + BLOCK];
            let mut isum = 0i32;
            for j in 0..16 {
                isum += (w[j] & 0x0f) as i32 * a[j] as i32;
                isum += (w[j] >> 4) as i32 * a[j + 16] as i32;
            }
            qa += s[k] as i32 * isum;
            ma += m[k] as i32 * asum[b];
            // a run ends every Q4K_ACT_SUBS blocks and at the group's end
            if (b + 1).is_multiple_of(Q4K_ACT_SUBS) || b + 1 == nb.min((g + 1) * Q4K_SUBS) {
                sum += ad[b / Q4K_ACT_SUBS] * (d * qa as f32 - dmin * ma as f32);
                (qa, ma) = (0, 0);
            }
        }
    }
    sum
}

/// Dot product of one row of 8-bit weight blocks with 16-bit activation blocks.
///
/// The block sum is exact in i32: `|w| <= 128` (a file may hold -128) and
/// `|a| <= 32767`, so `|isum| <= 32 * 128 * 32767 = 134_213_632 < 2^31`. It
/// can exceed 2^24, so its conversion to f32 may round; the SIMD sets convert
/// partial sums per lane instead and add the lanes in f32, so they agree with
/// this reference within a float tolerance, and exactly whenever each block's
/// sum of `|w * a|` is below 2^24 (every partial sum is then exact in f32).
pub fn dot_q8_q16(wq: &[i8], wd: &[f16], aq: &[i16], ad: &[f32]) -> f32 {
    dot_q8_q16_scaled(wq, aq, &ad[..wd.len()], |b| wd[b].to_f32())
}

/// [`dot_q8_q16`] for a row with one scale `d` for all its blocks (q8r):
/// the same products in the same order, so it equals `dot_q8_q16` with `d`
/// repeated per block, which is how the SIMD sets run it.
pub fn dot_q8r_q16(wq: &[i8], d: f16, aq: &[i16], ad: &[f32]) -> f32 {
    dot_q8_q16_scaled(wq, aq, ad, |_| d.to_f32())
}

/// The q8 × q16 sum over the blocks of `ad`, block `b`'s weight scale
/// given by `scale(b)`.
fn dot_q8_q16_scaled(wq: &[i8], aq: &[i16], ad: &[f32], scale: impl Fn(usize) -> f32) -> f32 {
    let mut sum = 0f32;
    for (b, &adb) in ad.iter().enumerate() {
        let w = &wq[b * BLOCK..b * BLOCK + BLOCK];
        let a = &aq[b * BLOCK..b * BLOCK + BLOCK];
        let isum: i32 = w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum();
        sum += scale(b) * adb * isum as f32;
    }
    sum
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y).sum()
}

pub fn axpy_f32(out: &mut [f32], s: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += s * x;
    }
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
    let mut act16 = QuantAct16::default();
    let mut asum = Vec::new();
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
                quantize_act16(xt, &mut act16);
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_q8_q16(
                        &qs[r * cols..(r + 1) * cols],
                        &d[r * nb..(r + 1) * nb],
                        &act16.qs,
                        &act16.d,
                    );
                }
            }
            WeightView::Q8R { qs, d, .. } => {
                quantize_act16(xt, &mut act16);
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_q8r_q16(&qs[r * cols..(r + 1) * cols], d[r], &act16.qs, &act16.d);
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
            WeightView::Q4K { qs, dm, sc, .. } => {
                quantize_act_grouped(xt, cols, &mut act);
                act_block_sums(&act.qs, &mut asum);
                let [qr, dr, sr] = TensorType::Q4K.row_planes(cols);
                for (r, o) in yt.iter_mut().enumerate() {
                    *o = dot_q4k_q8(
                        &qs[r * qr..(r + 1) * qr],
                        &dm[r * dr / 2..(r + 1) * dr / 2],
                        &sc[r * sr..(r + 1) * sr],
                        &act.qs,
                        &act.d,
                        &asum,
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
    quantize_act16: quantize_act16_into,
    q4_tile,
    q8_tile,
    q4k_tile,
    q4_lanes: None,
    q4k_lanes: None,
    dot_f32,
    dot_f16,
    attend_f16,
    attend_f32_many,
    swiglu,
};

/// Reference SwiGLU gate (see [`super::swiglu`]).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

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

/// Reference attention of one head over an f32 cache (see
/// [`super::attend_f32`]).
pub fn attend_f32(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_with(dot_f32, axpy_f32, q, keys, values, scale, scores, out)
}

/// Reference attention of several queries (see [`super::attend_f32_many`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_f32_many(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    super::attend_many_with(attend_f32, q, lens, keys, values, scale, scores, out)
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
    w: BlockRows,
    aq: &[i8],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let (w, wd) = (w.qs, w.d);
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
    w: BlockRows,
    aq: &[i16],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let rb = nb * BLOCK;
    let (w, wd): (&[i8], _) = (bytemuck::cast_slice(w.qs), w.d);
    for r in 0..nr {
        for t in 0..nt {
            out[r * MAX_TILE_T + t] = dot_q8_q16(
                &w[r * rb..(r + 1) * rb],
                &wd[r * nb..(r + 1) * nb],
                &aq[t * nb * BLOCK..(t + 1) * nb * BLOCK],
                &ad[t * nb..(t + 1) * nb],
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn q4k_tile(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    w.check(nb, nr);
    let nh = nb.div_ceil(Q4K_ACT_SUBS);
    let [qr, dr, sr] = TensorType::Q4K.row_planes(nb * BLOCK);
    for r in 0..nr {
        for t in 0..nt {
            out[r * MAX_TILE_T + t] = dot_q4k_q8(
                &w.qs[r * qr..(r + 1) * qr],
                &w.dm[r * dr / 2..(r + 1) * dr / 2],
                &w.sc[r * sr..(r + 1) * sr],
                &aq[t * nb * BLOCK..(t + 1) * nb * BLOCK],
                &ad[t * nh..(t + 1) * nh],
                &asum[t * nb..(t + 1) * nb],
            );
        }
    }
}
