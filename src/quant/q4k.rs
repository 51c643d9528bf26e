//! Affine 4-bit blocks with 6-bit sub-block scales ("q4k"):
//! `x = d * sc * q - dmin * m`, `q` in 0..=15.
//!
//! A row is cut into groups of [`Q4K_GROUP`] = 256 weights (the last group of
//! a row whose length is not a multiple of 256 is shorter: the remaining
//! whole sub-blocks), each group into at most [`Q4K_SUBS`] = 8 sub-blocks of
//! [`BLOCK`] = 32. Every sub-block has its own
//! scale `sc` and minimum `m` (6-bit unsigned, 0..=63), every group an f16
//! scale `d` for the `sc` and an f16 `dmin` for the `m`. The tensor is stored
//! in three planes (see `format-spec/SPEC.md`, section 6):
//!
//! 1. quants: 16 bytes per sub-block, row-major, packed like q4 (byte `j`
//!    holds weight `j` in its low nibble and weight `j + 16` in its high one);
//! 2. `(d, dmin)` f16 pairs, one per group, row-major;
//! 3. scales: 12 bytes per group; sub-block `k` has the 12-bit field
//!    `sc | m << 6`, and fields `2p`, `2p + 1` fill bytes `3p..3p + 3` as the
//!    little-endian 24-bit value `f[2p] | f[2p + 1] << 12`.
//!
//! Encoding (deterministic): per sub-block a least-squares search for a float
//! scale and minimum ([`fit_sub_block`]), then the group's 6-bit quantization
//! of those against `d = max scale / 63`, `dmin = max min / 63`, and the
//! weights re-rounded against the quantized values. The plain min/max fit is
//! run through the same group stage, and the group keeps whichever of the two
//! has the smaller squared error, so the search never loses to min/max.

use super::{check_finite, QuantError, BLOCK};
use half::f16;

/// Weights per group (one `d`, `dmin` pair and 12 scale bytes).
pub const Q4K_GROUP: usize = 256;
/// Sub-blocks (of [`BLOCK`] weights) per group.
pub const Q4K_SUBS: usize = Q4K_GROUP / BLOCK;
/// Packed scale bytes per group: 8 fields of 12 bits.
pub const Q4K_SCALE_BYTES: usize = 12;
/// Offsets `δ` of the initial level spacing tried by the sub-block search:
/// the first levels are `round((x - min) * (15 + δ) / (max - min))`.
pub const Q4K_DELTAS: [f32; 4] = [0.0, -0.5, 0.5, 1.0];
/// Least-squares refits after each initial rounding.
pub const Q4K_REFITS: usize = 2;

/// Largest level of a nibble.
const QMAX: f32 = 15.0;
/// Largest 6-bit sub-block scale or minimum.
const SMAX: f32 = 63.0;

/// The 8 sub-blocks' `(sc, m)` of one group from its 12 packed bytes.
#[inline(always)]
pub fn q4k_unpack_scales(b: &[u8]) -> ([u8; Q4K_SUBS], [u8; Q4K_SUBS]) {
    let mut sc = [0u8; Q4K_SUBS];
    let mut m = [0u8; Q4K_SUBS];
    for p in 0..Q4K_SUBS / 2 {
        let v = b[3 * p] as u32 | (b[3 * p + 1] as u32) << 8 | (b[3 * p + 2] as u32) << 16;
        for (h, f) in [v & 0xfff, v >> 12].into_iter().enumerate() {
            sc[2 * p + h] = (f & 63) as u8;
            m[2 * p + h] = (f >> 6) as u8;
        }
    }
    (sc, m)
}

/// Packs 8 `(sc, m)` pairs (each below 64) into 12 bytes.
pub fn q4k_pack_scales(sc: &[u8; Q4K_SUBS], m: &[u8; Q4K_SUBS], out: &mut [u8]) {
    for p in 0..Q4K_SUBS / 2 {
        let f = |k: usize| (sc[k] as u32 & 63) | (m[k] as u32 & 63) << 6;
        let v = f(2 * p) | f(2 * p + 1) << 12;
        out[3 * p..3 * p + 3].copy_from_slice(&v.to_le_bytes()[..3]);
    }
}

/// `clamp(round(v), 0, hi)` with round-half-away-from-zero, for finite or
/// infinite `v` (not NaN). Adding the largest f32 below 1/2 and truncating is
/// exactly `f32::round`; clamping first keeps it in range and vectorizable.
#[inline(always)]
fn round_clamp(v: f32, hi: f32) -> f32 {
    let t = (v + 0.499_999_97f32.copysign(v)).clamp(0.0, hi);
    // SAFETY: `t` is within 0..=hi (clamp of a non-NaN value), so the
    // truncation cannot overflow.
    (unsafe { t.to_int_unchecked::<i32>() }) as f32
}

/// Sums in 8 lanes (`j mod 8`, ascending `j`), combined pairwise: a fixed
/// order the compiler vectorizes.
#[inline(always)]
fn lanes_sum(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Levels of a sub-block under scale `s > 0` and offset `o` (`x ≈ s * l -
/// o`), with the squared error and the sums a least-squares refit needs:
/// `(Σ e², Σ l, Σ l², Σ l x)`.
#[inline(always)]
fn sub_error(x: &[f32; BLOCK], s: f32, o: f32) -> (f32, f32, f32, f32) {
    let (mut e2, mut sl, mut sll, mut slx) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            let l = round_clamp((c[k] + o) / s, QMAX);
            let e = c[k] - (s * l - o);
            e2[k] += e * e;
            sl[k] += l;
            sll[k] += l * l;
            slx[k] += l * c[k];
        }
    }
    (lanes_sum(e2), lanes_sum(sl), lanes_sum(sll), lanes_sum(slx))
}

/// Least-squares `(s, o)` for fixed levels: the line `x = s * l + b` through
/// the points, with `o = -b` kept at or above 0 (a sub-block's minimum is at
/// most 0); `None` if the levels do not determine a positive scale.
#[inline(always)]
fn refit(sl: f32, sll: f32, slx: f32, sx: f32) -> Option<(f32, f32)> {
    let n = BLOCK as f32;
    let det = n * sll - sl * sl;
    if det <= 0.0 {
        return None;
    }
    let s = (n * slx - sl * sx) / det;
    let b = (sll * sx - sl * slx) / det;
    let (s, o) = if b > 0.0 { (slx / sll, 0.0) } else { (s, -b) };
    (s > 0.0 && s.is_finite() && o.is_finite()).then_some((s, o))
}

/// A sub-block's float `(scale, offset)`, `x ≈ scale * q - offset` with
/// `scale >= 0`, `offset >= 0`. With `search == false` the plain min/max fit
/// `((max - min) / 15, -min)` where `min = min(min x, 0)`; otherwise the
/// least-squared-error candidate among that and, for each `δ` of
/// [`Q4K_DELTAS`], [`Q4K_REFITS`] least-squares refits starting from the
/// levels `round((x - min) * (15 + δ) / (max - min))` (a later candidate must
/// be strictly better).
#[inline(always)]
pub fn fit_sub_block(x: &[f32; BLOCK], search: bool) -> (f32, f32) {
    let min = x.iter().fold(0f32, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if max <= min {
        // every value equals min (<= 0): offset only
        return (0.0, -min);
    }
    let range = max - min;
    let s0 = range / QMAX;
    let mut best = (s0, -min);
    if !search || s0 == 0.0 || !s0.is_finite() {
        return best;
    }
    let (mut best_err, ..) = sub_error(x, s0, -min);
    let mut sxl = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            sxl[k] += c[k];
        }
    }
    let sx = lanes_sum(sxl);
    for delta in Q4K_DELTAS {
        let iscale = (QMAX + delta) / range;
        let (mut sl, mut sll, mut slx) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for c in x.chunks_exact(8) {
            for k in 0..8 {
                let l = round_clamp((c[k] - min) * iscale, QMAX);
                sl[k] += l;
                sll[k] += l * l;
                slx[k] += l * c[k];
            }
        }
        let (mut sl, mut sll, mut slx) = (lanes_sum(sl), lanes_sum(sll), lanes_sum(slx));
        for _ in 0..Q4K_REFITS {
            let Some((s, o)) = refit(sl, sll, slx, sx) else {
                break;
            };
            let (e, a, b, c) = sub_error(x, s, o);
            if e < best_err {
                best = (s, o);
                best_err = e;
            }
            (sl, sll, slx) = (a, b, c);
        }
    }
    best
}

/// One encoded group of `n` sub-blocks (8, or fewer for a row's last group);
/// entries past `n` stay zero.
struct Group {
    d: f16,
    dmin: f16,
    sc: [u8; Q4K_SUBS],
    m: [u8; Q4K_SUBS],
    /// Levels 0..=15, one per weight.
    q: [u8; Q4K_GROUP],
    /// Squared error of the decoded group (f32, sub-block by sub-block).
    err: f32,
}

/// The group stage: 6-bit `sc`, `m` against `d = f16(max s / 63)`, `dmin =
/// f16(max o / 63)`, then the levels re-rounded against the stored values.
/// `x` holds `fits.len()` sub-blocks.
#[inline(always)]
fn encode_group(x: &[f32], fits: &[(f32, f32)]) -> Result<Group, QuantError> {
    let smax = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let omax = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let d = super::scale_to_f16(smax / SMAX, x)?;
    let dmin = super::scale_to_f16(omax / SMAX, x)?;
    let (df, dminf) = (d.to_f32_const(), dmin.to_f32_const());
    let mut g = Group {
        d,
        dmin,
        sc: [0; Q4K_SUBS],
        m: [0; Q4K_SUBS],
        q: [0; Q4K_GROUP],
        err: 0.0,
    };
    for (k, fit) in fits.iter().enumerate() {
        let sc = if df > 0.0 {
            round_clamp(fit.0 / df, SMAX)
        } else {
            0.0
        };
        let m = if dminf > 0.0 {
            round_clamp(fit.1 / dminf, SMAX)
        } else {
            0.0
        };
        g.sc[k] = sc as u8;
        g.m[k] = m as u8;
        let (s, o) = (df * sc, dminf * m);
        let xs = &x[k * BLOCK..(k + 1) * BLOCK];
        let qs = &mut g.q[k * BLOCK..(k + 1) * BLOCK];
        let mut e2 = [0f32; 8];
        for (j, (&v, q)) in xs.iter().zip(qs.iter_mut()).enumerate() {
            let l = if s > 0.0 {
                round_clamp((v + o) / s, QMAX)
            } else {
                0.0
            };
            *q = l as u8;
            let e = v - (s * l - o);
            e2[j % 8] += e * e;
        }
        g.err += lanes_sum(e2);
    }
    Ok(g)
}

/// [`fit_sub_block`] of each sub-block of a group (unused entries zero). A
/// function, not a closure, so that it inlines into the AVX2 entry point.
#[inline(always)]
fn fit_group(x: &[f32], search: bool) -> [(f32, f32); Q4K_SUBS] {
    let mut fits = [(0f32, 0f32); Q4K_SUBS];
    for (f, sub) in fits.iter_mut().zip(x.chunks_exact(BLOCK)) {
        let sub: &[f32; BLOCK] = sub.try_into().expect("a sub-block is BLOCK values");
        *f = fit_sub_block(sub, search);
    }
    fits
}

/// Encodes one group (a whole number of sub-blocks, at most 8), choosing
/// between the min/max fit and the searched fit (`search == false`: min/max
/// only).
#[inline(always)]
fn quantize_group(x: &[f32], search: bool) -> Result<Group, QuantError> {
    let n = x.len() / BLOCK;
    let plain = encode_group(x, &fit_group(x, false)[..n])?;
    if !search {
        return Ok(plain);
    }
    let searched = encode_group(x, &fit_group(x, true)[..n])?;
    Ok(if searched.err < plain.err {
        searched
    } else {
        plain
    })
}

/// Quantizes one row (length a multiple of [`BLOCK`]) into its three planes:
/// `qs` (`len / 2` bytes), `dm` (`(d, dmin)` per group) and `sc` (12 bytes per
/// group), where the row is cut into groups of [`Q4K_GROUP`] weights and a
/// last, shorter group if the length is not a multiple of it. See the module
/// documentation for the algorithm.
pub fn quantize_q4k_row(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
) -> Result<(), QuantError> {
    quantize_rows(x, qs, dm, sc, true)
}

/// The baseline of [`quantize_q4k_row`]: every sub-block fitted by plain
/// min/max, through the same group stage. Kept to measure the search against.
pub fn quantize_q4k_row_minmax(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
) -> Result<(), QuantError> {
    quantize_rows(x, qs, dm, sc, false)
}

fn quantize_rows(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
    search: bool,
) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { quantize_rows_avx2(x, qs, dm, sc, search) };
    }
    quantize_rows_any(x, qs, dm, sc, search)
}

/// The same code compiled for AVX2, where the compiler vectorizes the
/// sub-block fits 8 lanes wide. Bytes are identical: the encoder uses only
/// IEEE operations that round the same at any vector width, and Rust never
/// fuses them into FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_rows_avx2(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
    search: bool,
) -> Result<(), QuantError> {
    quantize_rows_any(x, qs, dm, sc, search)
}

#[inline(always)]
fn quantize_rows_any(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
    search: bool,
) -> Result<(), QuantError> {
    let ng = x.len().div_ceil(Q4K_GROUP);
    if !x.len().is_multiple_of(BLOCK)
        || qs.len() * 2 != x.len()
        || dm.len() != 2 * ng
        || sc.len() != Q4K_SCALE_BYTES * ng
    {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)?;
    let groups = x.chunks(Q4K_GROUP).zip(qs.chunks_mut(Q4K_GROUP / 2));
    for (gi, (xg, qg)) in groups.enumerate() {
        let g = quantize_group(xg, search).map_err(|e| match e {
            QuantError::TooLarge { index, value } => QuantError::TooLarge {
                index: index + gi * Q4K_GROUP,
                value,
            },
            other => other,
        })?;
        dm[2 * gi] = g.d;
        dm[2 * gi + 1] = g.dmin;
        q4k_pack_scales(
            &g.sc,
            &g.m,
            &mut sc[gi * Q4K_SCALE_BYTES..(gi + 1) * Q4K_SCALE_BYTES],
        );
        for (qb, lb) in qg.chunks_exact_mut(BLOCK / 2).zip(g.q.chunks_exact(BLOCK)) {
            for j in 0..BLOCK / 2 {
                qb[j] = lb[j] | lb[j + BLOCK / 2] << 4;
            }
        }
    }
    Ok(())
}

/// Decodes one row: `x = (d * sc) * q - dmin * m` in f32. Both products are
/// exact (at most 11 + 6 + 4 significant bits), so the only rounding is the
/// subtraction's and every conforming decoder gives the same bits.
pub fn dequantize_q4k_row(qs: &[u8], dm: &[f16], sc: &[u8], out: &mut [f32]) {
    let groups = out.chunks_mut(Q4K_GROUP).zip(qs.chunks(Q4K_GROUP / 2));
    for (gi, (og, qg)) in groups.enumerate() {
        let (d, dmin) = (dm[2 * gi].to_f32(), dm[2 * gi + 1].to_f32());
        let (s, m) = q4k_unpack_scales(&sc[gi * Q4K_SCALE_BYTES..(gi + 1) * Q4K_SCALE_BYTES]);
        for (k, (ob, qb)) in og
            .chunks_exact_mut(BLOCK)
            .zip(qg.chunks_exact(BLOCK / 2))
            .enumerate()
        {
            let (ds, o) = (d * s[k] as f32, dmin * m[k] as f32);
            for j in 0..BLOCK / 2 {
                ob[j] = ds * (qb[j] & 0x0f) as f32 - o;
                ob[j + BLOCK / 2] = ds * (qb[j] >> 4) as f32 - o;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_pack_round_trip() {
        let sc = [0, 1, 63, 17, 32, 5, 62, 9];
        let m = [63, 0, 1, 44, 31, 6, 0, 63];
        let mut b = [0u8; 12];
        q4k_pack_scales(&sc, &m, &mut b);
        assert_eq!(q4k_unpack_scales(&b), (sc, m));
        // field 0 = 0 | 63 << 6 = 0xfc0, field 1 = 1: bytes c0 1f 00
        assert_eq!(&b[..3], &[0xc0, 0x1f, 0x00]);
    }

    #[test]
    fn round_clamp_is_round_half_away() {
        for v in [
            -1.5f32, -0.5, -0.49, 0.0, 0.49, 0.5, 1.5, 2.5, 14.5, 15.4, 99.0,
        ] {
            assert_eq!(round_clamp(v, 15.0), v.round().clamp(0.0, 15.0), "{v}");
        }
        assert_eq!(round_clamp(f32::INFINITY, 15.0), 15.0);
        assert_eq!(round_clamp(f32::NEG_INFINITY, 15.0), 0.0);
    }
}
