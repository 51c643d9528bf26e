//! 4-bit linear blocks: `x = d * (q - 8)`, `q` in 0..=15.

use super::{check_finite, scale_to_f16, QuantError, BLOCK};
use half::f16;

/// Divisors `t` of the candidate scales `m / -t` tried after the max-scaling
/// one (`t = 8`). A scale a little off `m / 8` often fits the other 31 weights
/// better than the one that puts `m` exactly on the grid; each candidate is
/// also refitted by least squares. See `format-spec/SPEC.md` (section 6).
pub const Q4_CANDIDATE_DIVISORS: [f32; 2] = [7.5, 9.0];

/// Quantizes one row (length a multiple of [`BLOCK`]) into `qs` (half the
/// length: 16 bytes per block, weight `j` in the low nibble of byte `j`, weight
/// `j + 16` in the high nibble) and `d` (one scale per block).
///
/// Per block, with `m` the value of largest magnitude (the first one on ties):
/// the max-scaling scale `f16(m / -8)` (which puts `m` exactly on level 0) is
/// the first candidate; for each `t` of [`Q4_CANDIDATE_DIVISORS`], `f16(m / -t)`
/// and its least-squares refit `f16(Σ x l / Σ l²)` (over the levels `l` that
/// scale gives) are tried in turn; the candidate with the smallest squared
/// error wins, the earlier one on ties. Levels are
/// `q = clamp(round(x / d) + 8, 0, 15)` with round-half-away-from-zero.
/// So the block's squared error is never larger than max scaling's.
pub fn quantize_q4_row(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { quantize_q4_row_avx2(x, qs, d) };
    }
    quantize_q4_row_any(x, qs, d)
}

/// The same code compiled for AVX2, where the compiler vectorizes the scale
/// search 8 lanes wide. Results are bit-identical: the search uses only IEEE
/// operations (divide, multiply, add, min/max, truncating conversion), which
/// round the same at any vector width, and Rust never fuses them into FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q4_row_avx2(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    quantize_q4_row_any(x, qs, d)
}

#[inline(always)]
fn quantize_q4_row_any(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    if !x.len().is_multiple_of(BLOCK) || qs.len() * 2 != x.len() || d.len() != x.len() / BLOCK {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)?;
    for ((xb, qb), db) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK / 2))
        .zip(d)
    {
        let xb: &[f32; BLOCK] = xb.try_into().expect("chunks_exact gives whole blocks");
        let scale = choose_scale(xb)?;
        *db = scale;
        let s = scale.to_f32_const();
        let q = |x: f32| {
            if s == 0.0 {
                8
            } else {
                (level(x, s) + 8.0) as u8
            }
        };
        for j in 0..BLOCK / 2 {
            qb[j] = q(xb[j]) | (q(xb[j + BLOCK / 2]) << 4);
        }
    }
    Ok(())
}

/// The plain max-scaling rule (the first candidate of [`quantize_q4_row`]):
/// `d = f16(m / -8)`. Kept as the baseline the search is measured against.
pub fn q4_max_scale(xb: &[f32]) -> Result<f16, QuantError> {
    scale_to_f16(largest(xb) / -8.0, xb)
}

/// The value of largest magnitude, the first one on ties (0 for no values).
fn largest(xb: &[f32]) -> f32 {
    xb.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// `clamp(round(x / s), -8, 7)` (round half away from zero) for `s != 0`.
#[inline(always)]
fn level(x: f32, s: f32) -> f32 {
    let v = x / s;
    // Adding the largest f32 below 1/2 and truncating is exactly
    // round-half-away-from-zero (the expansion LLVM uses for `f32::round`),
    // but it vectorizes; clamping before the truncation keeps it in range.
    let t = (v + 0.499_999_97f32.copysign(v)).clamp(-8.0, 7.0);
    // SAFETY: `t` is finite and within -8..=7 (`x` is finite and `s` non-zero,
    // so `v` is finite or ±inf, which the clamp maps to the ends; `clamp`
    // returns no NaN for non-NaN input), so the truncation cannot overflow.
    // The unchecked form lets the compiler use the packed conversion.
    (unsafe { t.to_int_unchecked::<i32>() }) as f32
}

/// Squared error of the block under a non-zero scale `s`, and `Σ x l`, `Σ l²`
/// for a least-squares refit. Accumulated in f32 in 8 lanes (`j mod 8`,
/// ascending `j`), combined as `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 +
/// a7))`: a fixed order, so the choice is deterministic, and one the compiler
/// vectorizes.
#[inline(always)]
fn block_error(xb: &[f32; BLOCK], s: f32) -> (f32, f32, f32) {
    let mut err = [0f32; 8];
    let mut xl = [0f32; 8];
    let mut ll = [0f32; 8];
    for c in xb.chunks_exact(8) {
        for k in 0..8 {
            let l = level(c[k], s);
            let e = c[k] - s * l;
            err[k] += e * e;
            xl[k] += c[k] * l;
            ll[k] += l * l;
        }
    }
    let sum = |a: [f32; 8]| ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    (sum(err), sum(xl), sum(ll))
}

/// The block's scale: the least-squared-error candidate (see [`quantize_q4_row`]).
#[inline(always)]
fn choose_scale(xb: &[f32; BLOCK]) -> Result<f16, QuantError> {
    let m = largest(xb);
    let plain = scale_to_f16(m / -8.0, xb)?;
    if plain == f16::ZERO {
        return Ok(plain);
    }
    let mut best = (plain, f32::INFINITY);
    let (a, b) = consider(xb, plain, plain, &mut best).expect("the plain scale is usable");
    consider(xb, refit(a, b), plain, &mut best);
    for t in Q4_CANDIDATE_DIVISORS {
        // `_const`: see `refit`
        if let Some((a, b)) = consider(xb, f16::from_f32_const(m / -t), plain, &mut best) {
            consider(xb, refit(a, b), plain, &mut best);
        }
    }
    Ok(best.0)
}

/// Evaluates candidate scale `cand` (skipped if zero, non-finite or of the
/// other sign than `plain`): keeps it in `best` (scale, squared error) if its
/// error is smaller, and returns its `Σ x l`, `Σ l²` for a refit.
#[inline(always)]
fn consider(xb: &[f32; BLOCK], cand: f16, plain: f16, best: &mut (f16, f32)) -> Option<(f32, f32)> {
    if !cand.is_finite() || cand == f16::ZERO || cand.is_sign_negative() != plain.is_sign_negative()
    {
        return None;
    }
    let (e, a, b) = block_error(xb, cand.to_f32_const());
    if e < best.1 {
        *best = (cand, e);
    }
    Some((a, b))
}

/// The least-squares scale `Σ x l / Σ l²` in f16. The `_const` conversions
/// are half's portable bit arithmetic, inlined here; the plain ones dispatch
/// to F16C through a function pointer per call, which cost more than the
/// whole error search. Both round to nearest even: the results are the same.
#[inline(always)]
fn refit(a: f32, b: f32) -> f16 {
    f16::from_f32_const(if b > 0.0 { a / b } else { 0.0 })
}

/// Decodes one row of 4-bit blocks.
pub fn dequantize_q4_row(qs: &[u8], d: &[f16], out: &mut [f32]) {
    for ((qb, db), ob) in qs
        .chunks_exact(BLOCK / 2)
        .zip(d)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let s = db.to_f32();
        for j in 0..BLOCK / 2 {
            ob[j] = s * ((qb[j] & 0x0f) as i32 - 8) as f32;
            ob[j + BLOCK / 2] = s * ((qb[j] >> 4) as i32 - 8) as f32;
        }
    }
}
