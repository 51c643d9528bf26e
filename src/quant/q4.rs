//! 4-bit linear blocks: `x = d * (q - 8)`, `q` in 0..=15.

use super::{check_finite, scale_to_f16, QuantError, BLOCK};
use half::f16;

/// Divisors `t` of the candidate scales `m / -t` tried after the max-scaling
/// one (`t = 8`). A scale a little off `m / 8` often fits the other 31 weights
/// better than the one that puts `m` exactly on the grid; each candidate is
/// also refitted by least squares. See `format-spec/SPEC.md` (section 6).
const Q4_CANDIDATE_DIVISORS: [f32; 2] = [7.5, 9.0];

/// Quantizes one row (length a multiple of [`BLOCK`]) into `qs` (half the
/// length: 16 bytes per block, weight `j` in the low nibble of byte `j`, weight
/// `j + 16` in the high nibble) and `d` (one scale per block).
///
/// Per block, with `m` the value of largest magnitude (the first one on ties):
/// the max-scaling scale `f16(m / -8)` (which puts `m` exactly on level 0) is
/// the first candidate; for each `t` of `Q4_CANDIDATE_DIVISORS` (7.5, then
/// 9), `f16(m / -t)` and its least-squares refit `f16(Σ x l / Σ l²)` (over the levels `l` that
/// scale gives) are tried in turn; the candidate with the smallest squared
/// error wins, the earlier one on ties. Levels are
/// `q = clamp(round(x / d) + 8, 0, 15)` with round-half-away-from-zero.
/// So the block's squared error is never larger than max scaling's.
pub fn quantize_q4_row(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C were just detected.
        return unsafe { avx2::quantize_q4_row(x, qs, d) };
    }
    quantize_q4_row_portable(x, qs, d)
}

/// The reference the AVX2 encoder must equal byte for byte (see its tests).
fn quantize_q4_row_portable(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    check_row(x, qs, d)?;
    encode_blocks(x, qs, d)
}

/// A row every encoder accepts: whole blocks, matching output lengths, and
/// finite values.
fn check_row(x: &[f32], qs: &[u8], d: &[f16]) -> Result<(), QuantError> {
    if !x.len().is_multiple_of(BLOCK) || qs.len() * 2 != x.len() || d.len() != x.len() / BLOCK {
        return Err(QuantError::BadLength { len: x.len() });
    }
    check_finite(x)
}

/// Per block of a checked row, the scale search ([`choose_scale`]) and the
/// packing. Error indices count from the start of `x`.
fn encode_blocks(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> Result<(), QuantError> {
    for (i, ((xb, qb), db)) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK / 2))
        .zip(d)
        .enumerate()
    {
        let xb: &[f32; BLOCK] = xb.try_into().expect("chunks_exact gives whole blocks");
        let scale = choose_scale(xb).map_err(|e| e.offset(i * BLOCK))?;
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

/// The encoder in explicit AVX2 and F16C. One block's search is a long
/// serial chain of divisions, horizontal sums and scalar f16 roundings, so
/// blocks go eight at a time, one per lane, with every step vertical. Every
/// operation is the IEEE operation of the portable code, in the same order
/// per lane, so the bytes are identical; the tests below check it.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{check_row, encode_blocks, QuantError, BLOCK, Q4_CANDIDATE_DIVISORS};
    use crate::quant::x86::{abs, blocks_in_lanes, finite, pairwise_sum8, round_clamp};
    use half::f16;
    use std::arch::x86_64::*;

    /// Blocks per lane-parallel group: one per 32-bit lane of a vector.
    const LANES: usize = 8;

    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_q4_row(
        x: &[f32],
        qs: &mut [u8],
        d: &mut [f16],
    ) -> Result<(), QuantError> {
        check_row(x, qs, d)?;
        let groups = x
            .chunks(LANES * BLOCK)
            .zip(qs.chunks_mut(LANES * BLOCK / 2))
            .zip(d.chunks_mut(LANES));
        for (g, ((xg, qg), dg)) in groups.enumerate() {
            // SAFETY: AVX2 and F16C, this function's contract.
            if !unsafe { encode_group(xg, qg, dg) } {
                // A scale overflows f16: the portable loop finds the weight
                // and reports it.
                encode_blocks(xg, qg, dg).map_err(|e| e.offset(g * LANES * BLOCK))?;
            }
        }
        Ok(())
    }

    /// [`encode_lanes`] of up to eight blocks: a short group is padded with
    /// zero blocks, which only get a zero scale in their own lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[inline(always)]
    unsafe fn encode_group(x: &[f32], qs: &mut [u8], d: &mut [f16]) -> bool {
        if d.len() == LANES {
            // SAFETY: the caller's contract.
            return unsafe {
                encode_lanes(
                    x.try_into().expect("a whole group"),
                    qs.try_into().expect("a whole group"),
                    d.try_into().expect("a whole group"),
                )
            };
        }
        let mut xp = [0f32; LANES * BLOCK];
        xp[..x.len()].copy_from_slice(x);
        let (mut qp, mut dp) = ([0u8; LANES * BLOCK / 2], [f16::ZERO; LANES]);
        // SAFETY: the caller's contract.
        let done = unsafe { encode_lanes(&xp, &mut qp, &mut dp) };
        qs.copy_from_slice(&qp[..qs.len()]);
        d.copy_from_slice(&dp[..d.len()]);
        done
    }

    /// Encodes eight blocks, block `b` in lane `b`, exactly as `choose_scale`
    /// and the packing would one by one. Returns false, leaving the output
    /// unspecified, when a block's max-scaling scale overflows f16.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[inline(always)]
    unsafe fn encode_lanes(
        x: &[f32; LANES * BLOCK],
        qs: &mut [u8; LANES * BLOCK / 2],
        d: &mut [f16; LANES],
    ) -> bool {
        // SAFETY (all intrinsics here): AVX2 and F16C are available (the
        // caller's contract); the one store writes `bits`' 16 bytes.
        unsafe {
            let zero = _mm256_setzero_ps();
            let xs = blocks_in_lanes(x);

            // `largest`: the first weight of maximal magnitude, +0 if all are 0
            let mut mag = zero;
            for &v in &xs {
                mag = _mm256_max_ps(mag, abs(v));
            }
            let mut m = zero;
            for &v in xs.iter().rev() {
                m = _mm256_blendv_ps(m, v, _mm256_cmp_ps(abs(v), mag, _CMP_EQ_OQ));
            }
            m = _mm256_blendv_ps(m, zero, _mm256_cmp_ps(mag, zero, _CMP_EQ_OQ));

            let plain_h = to_f16(_mm256_div_ps(m, _mm256_set1_ps(-8.0)));
            let plain_mag = _mm_and_si128(plain_h, _mm_set1_epi16(0x7fff));
            if _mm_movemask_epi8(_mm_cmpeq_epi16(plain_mag, _mm_set1_epi16(0x7c00))) != 0 {
                return false;
            }
            let plain = _mm256_cvtph_ps(plain_h);
            // Lanes whose block gets a scale; the others are zero blocks.
            let live = _mm256_cmp_ps(plain, zero, _CMP_NEQ_OQ);

            let mut search = LaneSearch {
                xs: &xs,
                plain,
                best_h: plain_h,
                best_e: _mm256_set1_ps(f32::INFINITY),
            };
            let (fit, ok) = search.consider(plain_h, live);
            search.consider(fit, ok);
            for t in Q4_CANDIDATE_DIVISORS {
                let cand = to_f16(_mm256_div_ps(m, _mm256_set1_ps(-t)));
                let (fit, ok) = search.consider(cand, live);
                search.consider(fit, ok);
            }

            // zero blocks store +0, whatever the sign of their plain scale
            let mut bits = [0u16; LANES];
            _mm_storeu_si128(
                bits.as_mut_ptr().cast(),
                _mm_and_si128(search.best_h, narrow_mask(live)),
            );
            for (b, (db, &h)) in d.iter_mut().zip(&bits).enumerate() {
                *db = f16::from_bits(h);
                let xb = x[b * BLOCK..][..BLOCK].try_into().expect("whole blocks");
                let qb = (&mut qs[b * BLOCK / 2..][..BLOCK / 2])
                    .try_into()
                    .expect("whole blocks");
                pack(xb, db.to_f32_const(), qb);
            }
            true
        }
    }

    /// `choose_scale`'s state, one block per lane. (Methods, not closures:
    /// closures do not inherit the enclosing function's target features and
    /// would call every intrinsic out of line.)
    struct LaneSearch<'a> {
        xs: &'a [__m256; BLOCK],
        plain: __m256,
        /// the best candidate so far, as f16 bits, and its squared error
        best_h: __m128i,
        best_e: __m256,
    }

    impl LaneSearch<'_> {
        /// `consider` in every lane where `ok` is set: keeps the candidate
        /// where it is usable and strictly better; returns its refit and the
        /// lanes where it was usable (those where the refit exists).
        ///
        /// # Safety
        /// The CPU must support AVX2 and F16C.
        #[inline(always)]
        unsafe fn consider(&mut self, cand_h: __m128i, ok: __m256) -> (__m128i, __m256) {
            // SAFETY (all intrinsics here): the caller's AVX2/F16C contract.
            unsafe {
                let zero = _mm256_setzero_ps();
                let c = _mm256_cvtph_ps(cand_h);
                let nonzero = _mm256_cmp_ps(c, zero, _CMP_NEQ_OQ);
                let same_sign = _mm256_cmp_ps(
                    _mm256_and_ps(_mm256_xor_ps(c, self.plain), _mm256_set1_ps(-0.0)),
                    zero,
                    _CMP_EQ_OQ,
                );
                let usable = _mm256_and_ps(
                    _mm256_and_ps(ok, finite(c)),
                    _mm256_and_ps(nonzero, same_sign),
                );
                let (e, xl, ll) = lane_errors(self.xs, c);
                let better = _mm256_and_ps(usable, _mm256_cmp_ps(e, self.best_e, _CMP_LT_OQ));
                self.best_e = _mm256_blendv_ps(self.best_e, e, better);
                self.best_h = _mm_blendv_epi8(self.best_h, cand_h, narrow_mask(better));
                // `refit`: Σ x l / Σ l² where Σ l² > 0, else 0
                let fit = _mm256_and_ps(_mm256_div_ps(xl, ll), _mm256_cmp_ps(ll, zero, _CMP_GT_OQ));
                (to_f16(fit), usable)
            }
        }
    }

    /// Rounds eight floats to f16 bits, to nearest even like `from_f32_const`.
    ///
    /// # Safety
    /// The CPU must support F16C.
    #[inline(always)]
    unsafe fn to_f16(v: __m256) -> __m128i {
        // SAFETY: the caller's F16C contract.
        unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) }
    }

    /// A 32-bit lane mask as a 16-bit lane mask, lanes in order.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn narrow_mask(m: __m256) -> __m128i {
        // SAFETY: the caller's AVX2 contract.
        unsafe {
            let m = _mm256_castps_si256(m);
            _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1))
        }
    }

    /// `block_error` of every lane's block under that lane's scale in `s`:
    /// per-lane sums in the portable order.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn lane_errors(xs: &[__m256; BLOCK], s: __m256) -> (__m256, __m256, __m256) {
        // SAFETY (all intrinsics here): the caller's AVX2 contract.
        unsafe {
            let zero = _mm256_setzero_ps();
            let (mut err, mut xl, mut ll) = ([zero; 8], [zero; 8], [zero; 8]);
            for c in xs.chunks_exact(8) {
                for k in 0..8 {
                    let x = c[k];
                    let l = levels(x, s);
                    let e = _mm256_sub_ps(x, _mm256_mul_ps(s, l));
                    err[k] = _mm256_add_ps(err[k], _mm256_mul_ps(e, e));
                    xl[k] = _mm256_add_ps(xl[k], _mm256_mul_ps(x, l));
                    ll[k] = _mm256_add_ps(ll[k], _mm256_mul_ps(l, l));
                }
            }
            (pairwise_sum8(err), pairwise_sum8(xl), pairwise_sum8(ll))
        }
    }

    /// Packs one block under its chosen scale `s` as the portable loop does:
    /// levels `clamp(round(x / s), -8, 7) + 8` (all 8 if `s` is 0), weight
    /// `j` in the low nibble of byte `j`, `j + 16` in the high one.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn pack(xb: &[f32; BLOCK], s: f32, qb: &mut [u8; BLOCK / 2]) {
        if s == 0.0 {
            qb.fill(0x88);
            return;
        }
        // SAFETY (all intrinsics here): the caller's AVX2 contract; the four
        // loads read `xb`'s 32 floats, the store writes `qb`'s 16 bytes.
        unsafe {
            let p = xb.as_ptr();
            let sv = _mm256_set1_ps(s);
            let eight = _mm256_set1_epi32(8);
            let mut q = [_mm256_setzero_si256(); 4];
            for (c, qc) in q.iter_mut().enumerate() {
                let l = levels(_mm256_loadu_ps(p.add(8 * c)), sv);
                *qc = _mm256_add_epi32(_mm256_cvttps_epi32(l), eight);
            }
            // bytes 0..8 and 8..16: weight j low, weight j + 16 high
            let lo = _mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4));
            let hi = _mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4));
            // packus works within 128-bit halves; the permute restores j order
            let w = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0b11_01_10_00);
            let b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
            _mm_storeu_si128(qb.as_mut_ptr().cast(), b);
        }
    }

    /// `clamp(round(x / s), -8, 7)` as floats, exactly as the portable
    /// `level`.
    ///
    /// # Safety
    /// The CPU must support AVX.
    #[inline(always)]
    unsafe fn levels(x: __m256, s: __m256) -> __m256 {
        // SAFETY: the caller's AVX contract.
        unsafe { round_clamp(_mm256_div_ps(x, s), -8.0, 7.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes `x` with the dispatching encoder (AVX2 where present) and
    /// with the portable one; both results, bytes and scales.
    type Encoder = fn(&[f32], &mut [u8], &mut [f16]) -> Result<(), QuantError>;

    type Encoded = Result<(Vec<u8>, Vec<u16>), QuantError>;

    fn both(x: &[f32]) -> [Encoded; 2] {
        let run = |f: Encoder| {
            let mut qs = vec![0u8; x.len() / 2];
            let mut d = vec![f16::ZERO; x.len() / BLOCK];
            f(x, &mut qs, &mut d)?;
            Ok((qs, d.iter().map(|h| h.to_bits()).collect()))
        };
        [run(quantize_q4_row), run(quantize_q4_row_portable)]
    }

    /// One block of mixed magnitude (down to f16-subnormal scales), with
    /// exact ties of the largest magnitude, zeros, negative zeros and
    /// constants.
    fn awkward_block() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            4 => -1.0f32..1.0,
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => Just(0.75f32),
            1 => Just(-0.75f32),
        ];
        (prop::collection::vec(value, BLOCK), -30i32..16).prop_map(|(v, e)| {
            let k = 2f32.powi(e);
            v.into_iter().map(|x| x * k).collect()
        })
    }

    /// Rows of 1 to 20 such blocks, each at its own scale, so the SIMD
    /// encoder's groups of eight and its leftover blocks are both covered.
    fn awkward_rows() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(awkward_block(), 1..=20).prop_map(|b| b.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn simd_encoder_equals_portable(x in awkward_rows()) {
            let [simd, portable] = both(&x);
            prop_assert!(simd.is_ok());
            prop_assert_eq!(simd, portable);
        }

        /// A weight whose block scale overflows f16 is reported at its place
        /// in the row by both encoders.
        #[test]
        fn simd_encoder_reports_overflow_like_portable(
            x in awkward_rows(),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut x = x;
            let i = pick.index(x.len());
            x[i] = -6e5;
            let [simd, portable] = both(&x);
            prop_assert_eq!(&simd, &Err(QuantError::TooLarge { index: i, value: -6e5 }));
            prop_assert_eq!(simd, portable);
        }
    }

    #[test]
    fn simd_encoder_equals_portable_on_edge_blocks() {
        let mut rows: Vec<Vec<f32>> = vec![
            vec![0.0; BLOCK],
            vec![-0.0; BLOCK],
            vec![3.0; BLOCK],
            vec![-3.0; BLOCK],
            (0..BLOCK)
                .map(|j| if j % 2 == 0 { 1.0 } else { -1.0 })
                .collect(),
            (0..BLOCK).map(|j| (j as f32 - 15.5) * 1e-9).collect(),
            (0..BLOCK).map(|j| (j as f32 - 15.5) * 1.5e4).collect(),
        ];
        rows.push(
            (0..BLOCK)
                .map(|j| if j == 31 { -1e-3 } else { 0.0 })
                .collect(),
        );
        for x in &rows {
            let [simd, portable] = both(x);
            assert_eq!(simd, portable, "{x:?}");
        }
        // the same blocks side by side in lane groups, twice over
        let row = [rows.concat(), rows.concat()].concat();
        let [simd, portable] = both(&row);
        assert!(simd.is_ok());
        assert_eq!(simd, portable);
    }
}
