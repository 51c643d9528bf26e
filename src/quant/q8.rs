//! 8-bit blocks: `x = d * q`, `q` in -127..=127.

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
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = scale_to_f16(amax / 127.0, xb).map_err(|e| e.offset(i * BLOCK))?;
        *db = scale;
        let s = scale.to_f32();
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = if s == 0.0 {
                0
            } else {
                (v / s).round().clamp(-127.0, 127.0) as i8
            };
        }
    }
    Ok(())
}

/// Decodes one row of 8-bit blocks.
pub fn dequantize_q8_row(qs: &[i8], d: &[f16], out: &mut [f32]) {
    for ((qb, db), ob) in qs
        .chunks_exact(BLOCK)
        .zip(d)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let s = db.to_f32();
        for (o, &q) in ob.iter_mut().zip(qb) {
            *o = s * q as f32;
        }
    }
}
