//! 8-bit quants: `x = d * q`, `q` in -127..=127, with one scale per 32-block
//! (q8) or per row (q8r).

use super::{check_finite, scale_to_f16, QuantError, BLOCK};
use half::f16;

/// Quantizes one row (length a multiple of [`BLOCK`]) into `qs` (same length)
/// and `d` (one scale per block).
///
/// Per block: `d = f16(max|x| / 127)`, `q = clamp(round(x / d), -127, 127)`
/// with round-half-away-from-zero; an all-zero block gets `d = 0, q = 0`.
pub fn quantize_q8_row(x: &[f32], qs: &mut [i8], d: &mut [f16]) -> Result<(), QuantError> {
    if !x.len().is_multiple_of(BLOCK) || qs.len() != x.len() || d.len() != x.len() / BLOCK {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)?;
    let blocks = x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(d);
    for (i, ((xb, qb), db)) in blocks.enumerate() {
        *db = quantize_run(xb, qb).map_err(|e| e.offset(i * BLOCK))?;
    }
    Ok(())
}

/// Quantizes one row (length a multiple of [`BLOCK`]) to 8 bits with one
/// scale for the whole row, returned: q8's rule with the row as the block.
/// Half a bit per weight less than q8, for tensors whose rows have no
/// outlier blocks (the output projection).
pub fn quantize_q8r_row(x: &[f32], qs: &mut [i8]) -> Result<f16, QuantError> {
    if !x.len().is_multiple_of(BLOCK) || qs.len() != x.len() {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)?;
    quantize_run(x, qs)
}

/// The 8-bit rule over one run of finite values sharing a scale.
fn quantize_run(x: &[f32], qs: &mut [i8]) -> Result<f16, QuantError> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = scale_to_f16(amax / 127.0, x)?;
    let s = scale.to_f32();
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = if s == 0.0 {
            0
        } else {
            (v / s).round().clamp(-127.0, 127.0) as i8
        };
    }
    Ok(scale)
}

/// Decodes one row of 8-bit blocks.
pub fn dequantize_q8_row(qs: &[i8], d: &[f16], out: &mut [f32]) {
    for ((qb, &db), ob) in qs
        .chunks_exact(BLOCK)
        .zip(d)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        dequantize_q8r_row(qb, db, ob);
    }
}

/// Decodes one row of [`quantize_q8r_row`] (or one q8 block).
pub fn dequantize_q8r_row(qs: &[i8], d: f16, out: &mut [f32]) {
    let s = d.to_f32();
    for (o, &q) in out.iter_mut().zip(qs) {
        *o = s * q as f32;
    }
}
