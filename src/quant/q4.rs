//! 4-bit linear blocks: `x = d * (q - 8)`, `q` in 0..=15.

use super::{check_finite, scale_to_f16, QuantError, BLOCK};
use half::f16;

/// Quantizes one row (length a multiple of [`BLOCK`]) into `qs` (half the
/// length: 16 bytes per block, weight `j` in the low nibble of byte `j`, weight
/// `j + 16` in the high nibble) and `d` (one scale per block).
///
/// Per block: `m` is the value of largest magnitude (the first one on ties),
/// `d = f16(m / -8)`, so `m` maps exactly to level 0 and the grid spends its
/// extra negative level on the larger side; `q = clamp(round(x / d) + 8, 0, 15)`
/// with round-half-away-from-zero.
pub fn quantize_q4_row(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    if !x.len().is_multiple_of(BLOCK) || qs.len() * 2 != x.len() || d.len() != x.len() / BLOCK {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)?;
    for ((xb, qb), db) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK / 2))
        .zip(d)
    {
        let m = xb
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let scale = scale_to_f16(m / -8.0, xb)?;
        *db = scale;
        let s = scale.to_f32();
        let level = |v: f32| -> u8 {
            if s == 0.0 {
                8
            } else {
                ((v / s).round() + 8.0).clamp(0.0, 15.0) as u8
            }
        };
        for j in 0..BLOCK / 2 {
            qb[j] = level(xb[j]) | (level(xb[j + BLOCK / 2]) << 4);
        }
    }
    Ok(())
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
