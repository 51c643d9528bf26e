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
//! scale and minimum ([`fit_sub_block_weighted`]), then the group's 6-bit quantization
//! of those against `d = max scale / 63`, `dmin = max min / 63`, a local
//! search of each sub-block's 6-bit pair and a least-squares refit of `d`,
//! `dmin` ([`encode_group`]), and the weights re-rounded against the
//! quantized values. The plain min/max fit is run through the plain group
//! stage, and the group keeps whichever of the two has the smaller squared
//! error, so the search never loses to min/max.
//!
//! With column importances ([`quantize_q4k_row_weighted`]) every squared
//! error above, in the search, the refits and the final choice, is weighted
//! by its column's importance; importance 1 everywhere gives the unweighted
//! encoding bit for bit.

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
const Q4K_DELTAS: [f32; 4] = [0.0, -0.5, 0.5, 1.0];
/// Least-squares refits after each initial rounding.
const Q4K_REFITS: usize = 2;

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
    round_clamp_int(v, hi) as f32
}

/// [`round_clamp`] as an integer (`hi` at most `i32::MAX`).
#[inline(always)]
fn round_clamp_int(v: f32, hi: f32) -> i32 {
    let t = (v + 0.499_999_97f32.copysign(v)).clamp(0.0, hi);
    // SAFETY: `t` is within 0..=hi (clamp of a non-NaN value), so the
    // truncation cannot overflow.
    unsafe { t.to_int_unchecked::<i32>() }
}

/// Sums in 8 lanes (`j mod 8`, ascending `j`), combined pairwise: a fixed
/// order the compiler vectorizes.
#[inline(always)]
fn pairwise_sum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Levels of a sub-block under scale `s > 0` and offset `o` (`x ≈ s * l -
/// o`), with the `w`-weighted squared error and the weighted sums a
/// least-squares refit needs: `(Σ w e², Σ w l, Σ w l², Σ w l x)`. With every
/// weight 1 each product by `w` is exact, so these are the unweighted sums
/// bit for bit.
#[inline(always)]
fn sub_error(x: &[f32; BLOCK], w: &[f32; BLOCK], s: f32, o: f32) -> (f32, f32, f32, f32) {
    let (mut e2, mut sl, mut sll, mut slx) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
    for (c, cw) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for k in 0..8 {
            let l = round_clamp((c[k] + o) / s, QMAX);
            let e = c[k] - (s * l - o);
            e2[k] += cw[k] * (e * e);
            sl[k] += cw[k] * l;
            sll[k] += cw[k] * (l * l);
            slx[k] += cw[k] * (l * c[k]);
        }
    }
    (
        pairwise_sum8(e2),
        pairwise_sum8(sl),
        pairwise_sum8(sll),
        pairwise_sum8(slx),
    )
}

/// Weighted least-squares `(s, o)` for fixed levels (`n` = Σ w, the other
/// sums weighted likewise): the line `x = s * l + b` through the points, with
/// `o = -b` kept at or above 0 (a sub-block's minimum is at most 0); `None`
/// if the levels do not determine a positive scale.
#[inline(always)]
fn refit(n: f32, sl: f32, sll: f32, slx: f32, sx: f32) -> Option<(f32, f32)> {
    let det = n * sll - sl * sl;
    if det <= 0.0 {
        return None;
    }
    let s = (n * slx - sl * sx) / det;
    let b = (sll * sx - sl * slx) / det;
    let (s, o) = if b > 0.0 { (slx / sll, 0.0) } else { (s, -b) };
    (s > 0.0 && s.is_finite() && o.is_finite()).then_some((s, o))
}

/// Weight 1 for every value: plain squared error.
const UNWEIGHTED: [f32; BLOCK] = [1.0; BLOCK];

/// A sub-block's float `(scale, offset)`, `x ≈ scale * q - offset` with
/// `scale >= 0`, `offset >= 0`. With `search == false` the plain min/max fit
/// `((max - min) / 15, -min)` where `min = min(min x, 0)`; otherwise the
/// candidate of least `w`-weighted squared error among that and, for each
/// `δ` of [`Q4K_DELTAS`], [`Q4K_REFITS`] weighted least-squares refits
/// starting from the levels `round((x - min) * (15 + δ) / (max - min))` (a
/// later candidate must be strictly better). Weights are non-negative and
/// finite; all 1 ([`UNWEIGHTED`]) is the unweighted fit.
#[inline(always)]
fn fit_sub_block_weighted(x: &[f32; BLOCK], w: &[f32; BLOCK], search: bool) -> (f32, f32) {
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
    let (mut best_err, ..) = sub_error(x, w, s0, -min);
    let (mut sxl, mut swl) = ([0f32; 8], [0f32; 8]);
    for (c, cw) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for k in 0..8 {
            sxl[k] += cw[k] * c[k];
            swl[k] += cw[k];
        }
    }
    let (sx, n) = (pairwise_sum8(sxl), pairwise_sum8(swl));
    for delta in Q4K_DELTAS {
        let iscale = (QMAX + delta) / range;
        let (mut sl, mut sll, mut slx) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for (c, cw) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
            for k in 0..8 {
                let l = round_clamp((c[k] - min) * iscale, QMAX);
                sl[k] += cw[k] * l;
                sll[k] += cw[k] * (l * l);
                slx[k] += cw[k] * (l * c[k]);
            }
        }
        let (mut sl, mut sll, mut slx) =
            (pairwise_sum8(sl), pairwise_sum8(sll), pairwise_sum8(slx));
        for _ in 0..Q4K_REFITS {
            let Some((s, o)) = refit(n, sl, sll, slx, sx) else {
                break;
            };
            let (e, a, b, c) = sub_error(x, w, s, o);
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
    /// Weighted squared error of the decoded group (f32, sub-block by
    /// sub-block).
    err: f32,
}

/// Offsets `(Δsc, Δm)` tried around each sub-block's rounded 6-bit scale and
/// minimum by the careful group stage, in this order.
const NEIGHBOURS: [(f32, f32); 24] = {
    let mut out = [(0f32, 0f32); 24];
    let mut i = 0;
    let mut a = -2;
    while a <= 2 {
        let mut b = -2;
        while b <= 2 {
            if a != 0 || b != 0 {
                out[i] = (a as f32, b as f32);
                i += 1;
            }
            b += 1;
        }
        a += 1;
    }
    out
};

/// The group stage: 6-bit `sc`, `m` against `d = f16(max s / 63)`, `dmin =
/// f16(max o / 63)`, then the levels re-rounded against the stored values.
/// `x` holds `fits.len()` sub-blocks, `w` their weights (`None`: all 1).
///
/// With `careful` (the searched fits) it goes further: each sub-block also
/// tries the 24 `(sc, m)` within 2 steps of the rounded pair, and the group
/// then tries the least-squares `(d, dmin)` for the chosen `sc`, `m` and
/// levels, keeping it if the error drops. Rounding the 6-bit scales was most
/// of q4k's error on SmolLM2's on-grid weights: this took its KL from 0.0166
/// to 0.0104 there (0.157 to 0.142 off the grid, 0.062 to 0.053 with
/// importances) for 2.7 times the conversion time (`benches/RESULTS.md`).
#[inline(always)]
fn encode_group(
    x: &[f32],
    w: Option<&[f32]>,
    fits: &[(f32, f32)],
    careful: bool,
) -> Result<Group, QuantError> {
    let smax = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let omax = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let d = super::scale_to_f16(smax / SMAX, x)?;
    let dmin = super::scale_to_f16(omax / SMAX, x)?;
    let g = group_stage(x, w, fits, d, dmin, careful);
    if !careful {
        return Ok(g);
    }
    let Some((d2, dmin2)) = refit_group_scales(x, w, &g, fits.len()) else {
        return Ok(g);
    };
    if (d2.to_bits(), dmin2.to_bits()) == (d.to_bits(), dmin.to_bits()) {
        return Ok(g);
    }
    let g2 = group_stage(x, w, fits, d2, dmin2, true);
    Ok(if g2.err < g.err { g2 } else { g })
}

/// The weighted least-squares `(d, dmin)` of `x ≈ d * (sc * q) - dmin * m`
/// over the group's `n` sub-blocks with `g`'s `sc`, `m` and levels fixed
/// (sums in f64, in element order), as f16; `None` if they are not
/// determined, `d` is not positive, `dmin` is negative or either is not a
/// finite f16.
fn refit_group_scales(x: &[f32], w: Option<&[f32]>, g: &Group, n: usize) -> Option<(f16, f16)> {
    let (mut saa, mut sab, mut sbb, mut sax, mut sbx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for j in 0..n * BLOCK {
        let k = j / BLOCK;
        let a = g.sc[k] as f64 * g.q[j] as f64;
        let b = g.m[k] as f64;
        let (wj, xj) = (w.map_or(1.0, |w| w[j] as f64), x[j] as f64);
        saa += wj * a * a;
        sab += wj * a * b;
        sbb += wj * b * b;
        sax += wj * a * xj;
        sbx += wj * b * xj;
    }
    let det = saa * sbb - sab * sab;
    if det <= 0.0 || !det.is_finite() {
        return None;
    }
    let d = (sax * sbb - sab * sbx) / det;
    let dmin = (sax * sab - saa * sbx) / det;
    if !(d > 0.0 && dmin >= 0.0 && d.is_finite() && dmin.is_finite()) {
        return None;
    }
    let (d, dmin) = (f16::from_f32(d as f32), f16::from_f32(dmin as f32));
    (d.is_finite() && dmin.is_finite()).then_some((d, dmin))
}

/// Stores each fit against `d` and `dmin`: `sc`, `m` rounded (and, when
/// `careful`, the best of their [`NEIGHBOURS`] instead if better), levels
/// re-rounded.
#[inline(always)]
fn group_stage(
    x: &[f32],
    w: Option<&[f32]>,
    fits: &[(f32, f32)],
    d: f16,
    dmin: f16,
    careful: bool,
) -> Group {
    let (df, dminf) = (d.to_f32_const(), dmin.to_f32_const());
    let mut g = Group {
        d,
        dmin,
        sc: [0; Q4K_SUBS],
        m: [0; Q4K_SUBS],
        q: [0; Q4K_GROUP],
        err: 0.0,
    };
    let mut trial = [0u8; BLOCK];
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
        let xs = &x[k * BLOCK..(k + 1) * BLOCK];
        let ws = w.map_or(&UNWEIGHTED[..], |w| &w[k * BLOCK..(k + 1) * BLOCK]);
        let qs = &mut g.q[k * BLOCK..(k + 1) * BLOCK];
        let (mut best_sc, mut best_m) = (sc, m);
        let mut best_err = sub_levels(xs, ws, df * sc, dminf * m, qs);
        if careful {
            for (a, b) in NEIGHBOURS {
                let (c, o) = (sc + a, m + b);
                // a zero `d` (`dmin`) makes every `sc` (`m`) the same
                if !(0.0..=SMAX).contains(&c)
                    || !(0.0..=SMAX).contains(&o)
                    || (df == 0.0 && a != 0.0)
                    || (dminf == 0.0 && b != 0.0)
                {
                    continue;
                }
                let e = sub_levels(xs, ws, df * c, dminf * o, &mut trial);
                if e < best_err {
                    (best_sc, best_m, best_err) = (c, o, e);
                    qs.copy_from_slice(&trial);
                }
            }
        }
        g.sc[k] = best_sc as u8;
        g.m[k] = best_m as u8;
        g.err += best_err;
    }
    g
}

/// Levels of one sub-block under the stored scale `s` and offset `o` into
/// `qs`, returning its weighted squared error. Fixed-size arrays and whole
/// lanes of 8, like [`sub_error`], so the compiler keeps it in vector
/// registers: the careful group stage calls it 25 to 50 times per sub-block.
#[inline(always)]
fn sub_levels(xs: &[f32], ws: &[f32], s: f32, o: f32, qs: &mut [u8]) -> f32 {
    let xs: &[f32; BLOCK] = xs.try_into().expect("a sub-block is BLOCK values");
    let ws: &[f32; BLOCK] = ws.try_into().expect("a sub-block is BLOCK values");
    let qs: &mut [u8; BLOCK] = qs.try_into().expect("a sub-block is BLOCK levels");
    let mut e2 = [0f32; 8];
    for ((c, cw), cq) in xs
        .chunks_exact(8)
        .zip(ws.chunks_exact(8))
        .zip(qs.chunks_exact_mut(8))
    {
        for k in 0..8 {
            // an integer level stores as a plain truncation, which
            // vectorizes (`f32 as u8` saturates element by element)
            let li = if s > 0.0 {
                round_clamp_int((c[k] + o) / s, QMAX)
            } else {
                0
            };
            cq[k] = li as u8;
            let l = li as f32;
            let e = c[k] - (s * l - o);
            e2[k] += cw[k] * (e * e);
        }
    }
    pairwise_sum8(e2)
}

/// [`fit_sub_block_weighted`] of each sub-block of a group (unused entries
/// zero), under weights `w` (`None`: all 1). A function, not a closure, so
/// that it inlines into the AVX2 entry point.
#[inline(always)]
fn fit_group(x: &[f32], w: Option<&[f32]>, search: bool) -> [(f32, f32); Q4K_SUBS] {
    let mut fits = [(0f32, 0f32); Q4K_SUBS];
    for (k, (f, sub)) in fits.iter_mut().zip(x.chunks_exact(BLOCK)).enumerate() {
        let sub: &[f32; BLOCK] = sub.try_into().expect("a sub-block is BLOCK values");
        let ws = match w {
            Some(w) => w[k * BLOCK..(k + 1) * BLOCK]
                .try_into()
                .expect("a sub-block is BLOCK values"),
            None => &UNWEIGHTED,
        };
        *f = fit_sub_block_weighted(sub, ws, search);
    }
    fits
}

/// Where a group's searched sub-block fits come from: the same numbers by
/// every implementation.
trait Fitter {
    /// `fit_group(x, w, true)`.
    fn searched_fits(x: &[f32], w: Option<&[f32]>) -> [(f32, f32); Q4K_SUBS];
}

struct PortableFits;

impl Fitter for PortableFits {
    #[inline(always)]
    fn searched_fits(x: &[f32], w: Option<&[f32]>) -> [(f32, f32); Q4K_SUBS] {
        fit_group(x, w, true)
    }
}

/// Encodes one group (a whole number of sub-blocks, at most 8), choosing
/// between the min/max fit and the searched fit (`search == false`: min/max
/// only) by their `w`-weighted squared error.
#[inline(always)]
fn quantize_group<F: Fitter>(
    x: &[f32],
    w: Option<&[f32]>,
    search: bool,
) -> Result<Group, QuantError> {
    let n = x.len() / BLOCK;
    let plain = encode_group(x, w, &fit_group(x, None, false)[..n], false)?;
    if !search {
        return Ok(plain);
    }
    let searched = encode_group(x, w, &F::searched_fits(x, w)[..n], true)?;
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
    quantize_rows(x, None, qs, dm, sc, true)
}

/// [`quantize_q4k_row`] minimizing the error weighted by each column's
/// `importance` (one non-negative value per weight of the row, typically the
/// mean square of the input that column multiplies, see
/// [`crate::model::ActivationStats`]): the searched fits, the group stage
/// and the choice between the searched and the min/max fits weigh each
/// weight's squared error by its column's importance. That is the expected
/// squared error of the matrix's output when input channels are
/// uncorrelated; weighing it further by the weight's own magnitude, as
/// llama.cpp does, measured worse (KL 0.066 vs 0.062 on the perturbed
/// SmolLM2, `benches/RESULTS.md`).
pub fn quantize_q4k_row_weighted(
    x: &[f32],
    importance: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
) -> Result<(), QuantError> {
    if importance.len() != x.len() {
        return Err(QuantError::BadLength { len: x.len() });
    }
    if let Some((column, &value)) = importance
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(QuantError::BadImportance { column, value });
    }
    quantize_rows(x, Some(importance), qs, dm, sc, true)
}

/// The baseline of [`quantize_q4k_row`]: every sub-block fitted by plain
/// min/max, through the same group stage. Kept to measure the search against.
pub fn quantize_q4k_row_minmax(
    x: &[f32],
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
) -> Result<(), QuantError> {
    quantize_rows(x, None, qs, dm, sc, false)
}

fn quantize_rows(
    x: &[f32],
    importance: Option<&[f32]>,
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
    search: bool,
) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { quantize_rows_avx2(x, importance, qs, dm, sc, search) };
    }
    quantize_rows_any::<PortableFits>(x, importance, qs, dm, sc, search)
}

/// The same code compiled for AVX2, with the searched fits of a whole group
/// computed eight sub-blocks at a time, one per lane ([`avx2::LaneFits`]).
/// Bytes are identical: every operation is the portable code's IEEE
/// operation in the same order per lane, and Rust never fuses them into
/// FMAs; the tests below compare the two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_rows_avx2(
    x: &[f32],
    importance: Option<&[f32]>,
    qs: &mut [u8],
    dm: &mut [f16],
    sc: &mut [u8],
    search: bool,
) -> Result<(), QuantError> {
    quantize_rows_any::<avx2::LaneFits>(x, importance, qs, dm, sc, search)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{fit_group, Fitter, BLOCK, Q4K_DELTAS, Q4K_GROUP, Q4K_REFITS, Q4K_SUBS, QMAX};
    use crate::quant::x86::{blocks_in_lanes, finite, pairwise_sum8, round_clamp};
    use std::arch::x86_64::*;

    /// Used only inside `quantize_rows_avx2`, whose contract is that the CPU
    /// has AVX2: that makes the intrinsics below sound.
    pub(super) struct LaneFits;

    impl Fitter for LaneFits {
        #[inline(always)]
        fn searched_fits(x: &[f32], w: Option<&[f32]>) -> [(f32, f32); Q4K_SUBS] {
            match (<&[f32; Q4K_GROUP]>::try_from(x), w) {
                // SAFETY: AVX2 is available (see `LaneFits`).
                (Ok(g), None) => unsafe { fit_lanes(g) },
                // a row's short last group, or weighted values
                _ => fit_group(x, w, true),
            }
        }
    }

    /// `fit_sub_block_weighted(.., true)` of the eight sub-blocks, sub-block `b` in
    /// lane `b`: the same candidates in the same order, each lane keeping
    /// its own best and dropping out of a δ's refits where the portable
    /// loop breaks.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn fit_lanes(x: &[f32; Q4K_GROUP]) -> [(f32, f32); Q4K_SUBS] {
        // SAFETY (all intrinsics here): AVX2 is available (the caller's
        // contract); the one store writes `s` and `o`'s 8 floats each.
        unsafe {
            let zero = _mm256_setzero_ps();
            let xs = blocks_in_lanes(x);
            let (mut min, mut max) = (zero, _mm256_set1_ps(f32::NEG_INFINITY));
            for &v in &xs {
                min = _mm256_min_ps(min, v);
                max = _mm256_max_ps(max, v);
            }
            let neg_min = neg(min);
            // lanes with values above their minimum (else: offset only)
            let spread = _mm256_cmp_ps(max, min, _CMP_GT_OQ);
            let range = _mm256_sub_ps(max, min);
            let s0 = _mm256_div_ps(range, _mm256_set1_ps(QMAX));
            let searching = _mm256_and_ps(
                spread,
                _mm256_and_ps(finite(s0), _mm256_cmp_ps(s0, zero, _CMP_NEQ_OQ)),
            );
            let mut best_s = _mm256_blendv_ps(zero, s0, spread);
            let mut best_o = neg_min;
            let (mut best_err, ..) = sub_errors(&xs, s0, neg_min);
            let mut sxl = [zero; 8];
            for c in xs.chunks_exact(8) {
                for k in 0..8 {
                    sxl[k] = _mm256_add_ps(sxl[k], c[k]);
                }
            }
            let sx = pairwise_sum8(sxl);
            for delta in Q4K_DELTAS {
                let iscale = _mm256_div_ps(_mm256_set1_ps(QMAX + delta), range);
                let (mut sl, mut sll, mut slx) = ([zero; 8], [zero; 8], [zero; 8]);
                for c in xs.chunks_exact(8) {
                    for k in 0..8 {
                        let l =
                            round_clamp(_mm256_mul_ps(_mm256_sub_ps(c[k], min), iscale), 0.0, QMAX);
                        sl[k] = _mm256_add_ps(sl[k], l);
                        sll[k] = _mm256_add_ps(sll[k], _mm256_mul_ps(l, l));
                        slx[k] = _mm256_add_ps(slx[k], _mm256_mul_ps(l, c[k]));
                    }
                }
                let (mut sl, mut sll, mut slx) =
                    (pairwise_sum8(sl), pairwise_sum8(sll), pairwise_sum8(slx));
                let mut alive = searching;
                for _ in 0..Q4K_REFITS {
                    let (s, o, ok) = refit(sl, sll, slx, sx);
                    alive = _mm256_and_ps(alive, ok);
                    if _mm256_movemask_ps(alive) == 0 {
                        break;
                    }
                    let (e, a, b, c) = sub_errors(&xs, s, o);
                    let better = _mm256_and_ps(alive, _mm256_cmp_ps(e, best_err, _CMP_LT_OQ));
                    best_s = _mm256_blendv_ps(best_s, s, better);
                    best_o = _mm256_blendv_ps(best_o, o, better);
                    best_err = _mm256_blendv_ps(best_err, e, better);
                    (sl, sll, slx) = (a, b, c);
                }
            }
            let (mut s, mut o) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(s.as_mut_ptr(), best_s);
            _mm256_storeu_ps(o.as_mut_ptr(), best_o);
            std::array::from_fn(|b| (s[b], o[b]))
        }
    }

    /// `refit` per lane: `(s, o, usable)`, where `usable` is the portable
    /// `Some`.
    #[inline(always)]
    unsafe fn refit(sl: __m256, sll: __m256, slx: __m256, sx: __m256) -> (__m256, __m256, __m256) {
        // SAFETY (all intrinsics here): the caller's AVX2 contract.
        unsafe {
            let zero = _mm256_setzero_ps();
            let n = _mm256_set1_ps(BLOCK as f32);
            let det = _mm256_sub_ps(_mm256_mul_ps(n, sll), _mm256_mul_ps(sl, sl));
            let s_line = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(n, slx), _mm256_mul_ps(sl, sx)),
                det,
            );
            let b = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sll, sx), _mm256_mul_ps(sl, slx)),
                det,
            );
            let through_zero = _mm256_cmp_ps(b, zero, _CMP_GT_OQ);
            let s = _mm256_blendv_ps(s_line, _mm256_div_ps(slx, sll), through_zero);
            let o = _mm256_blendv_ps(neg(b), zero, through_zero);
            let ok = _mm256_and_ps(
                _mm256_and_ps(
                    _mm256_cmp_ps(det, zero, _CMP_GT_OQ),
                    _mm256_cmp_ps(s, zero, _CMP_GT_OQ),
                ),
                _mm256_and_ps(finite(s), finite(o)),
            );
            (s, o, ok)
        }
    }

    /// `sub_error` per lane under that lane's `s` and `o`.
    #[inline(always)]
    unsafe fn sub_errors(
        xs: &[__m256; BLOCK],
        s: __m256,
        o: __m256,
    ) -> (__m256, __m256, __m256, __m256) {
        // SAFETY (all intrinsics here): the caller's AVX2 contract.
        unsafe {
            let zero = _mm256_setzero_ps();
            let (mut e2, mut sl, mut sll, mut slx) = ([zero; 8], [zero; 8], [zero; 8], [zero; 8]);
            for c in xs.chunks_exact(8) {
                for k in 0..8 {
                    let l = round_clamp(_mm256_div_ps(_mm256_add_ps(c[k], o), s), 0.0, QMAX);
                    let e = _mm256_sub_ps(c[k], _mm256_sub_ps(_mm256_mul_ps(s, l), o));
                    e2[k] = _mm256_add_ps(e2[k], _mm256_mul_ps(e, e));
                    sl[k] = _mm256_add_ps(sl[k], l);
                    sll[k] = _mm256_add_ps(sll[k], _mm256_mul_ps(l, l));
                    slx[k] = _mm256_add_ps(slx[k], _mm256_mul_ps(l, c[k]));
                }
            }
            (
                pairwise_sum8(e2),
                pairwise_sum8(sl),
                pairwise_sum8(sll),
                pairwise_sum8(slx),
            )
        }
    }

    /// `-v` per lane (a sign flip, as Rust's negation).
    #[inline(always)]
    unsafe fn neg(v: __m256) -> __m256 {
        // SAFETY: the caller's AVX2 contract.
        unsafe { _mm256_xor_ps(v, _mm256_set1_ps(-0.0)) }
    }
}

#[inline(always)]
fn quantize_rows_any<F: Fitter>(
    x: &[f32],
    importance: Option<&[f32]>,
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
        let wg = importance.map(|imp| &imp[gi * Q4K_GROUP..gi * Q4K_GROUP + xg.len()]);
        let g = quantize_group::<F>(xg, wg, search).map_err(|e| match e {
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
    use proptest::prelude::*;

    type Encoded = Result<(Vec<u8>, Vec<u16>, Vec<u8>), QuantError>;

    /// The row through the dispatching encoder and through the portable one.
    fn both(x: &[f32]) -> [Encoded; 2] {
        let run = |simd: bool| {
            let ng = x.len().div_ceil(Q4K_GROUP);
            let (mut qs, mut dm, mut sc) = (
                vec![0u8; x.len() / 2],
                vec![f16::ZERO; 2 * ng],
                vec![0u8; Q4K_SCALE_BYTES * ng],
            );
            if simd {
                quantize_q4k_row(x, &mut qs, &mut dm, &mut sc)?;
            } else {
                quantize_rows_any::<PortableFits>(x, None, &mut qs, &mut dm, &mut sc, true)?;
            }
            Ok((qs, dm.iter().map(|h| h.to_bits()).collect(), sc))
        };
        [run(true), run(false)]
    }

    /// Sub-blocks of mixed magnitude and sign balance, with zeros, negative
    /// zeros, constants and all-positive or all-negative runs, each at its
    /// own scale.
    fn awkward_sub_block() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            4 => -1.0f32..1.0,
            1 => 0.0f32..1.0,
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => Just(-0.5f32),
        ];
        (
            prop::collection::vec(value, BLOCK),
            -30i32..12,
            any::<bool>(),
        )
            .prop_map(|(v, e, flip)| {
                let k = 2f32.powi(e) * if flip { -1.0 } else { 1.0 };
                v.into_iter().map(|x| x * k).collect()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// One to three groups' worth of sub-blocks: whole groups take the
        /// lane-parallel search, a short last group the portable one.
        #[test]
        fn simd_encoder_equals_portable(
            subs in prop::collection::vec(awkward_sub_block(), 1..=3 * Q4K_SUBS),
        ) {
            let x = subs.concat();
            let [simd, portable] = both(&x);
            prop_assert!(simd.is_ok());
            prop_assert_eq!(simd, portable);
        }
    }

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
