//! x86-64 helpers shared by the SIMD encoders, which work on eight blocks at
//! a time, one block per 32-bit lane. Each mirrors a step of the portable
//! encoders exactly, so the SIMD results are bit-identical.

use super::BLOCK;
use std::arch::x86_64::*;

/// Eight consecutive blocks of `x` transposed: element `j`, lane `b` is
/// weight `j` of block `b`.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn blocks_in_lanes(x: &[f32; 8 * BLOCK]) -> [__m256; BLOCK] {
    // SAFETY (all intrinsics here): the caller's AVX contract; every load
    // reads 8 floats at `b * BLOCK + 8 * c + 0..8 < 8 * BLOCK` inside `x`.
    unsafe {
        let mut xs = [_mm256_setzero_ps(); BLOCK];
        for c in 0..BLOCK / 8 {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (b, r) in rows.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(x.as_ptr().add(b * BLOCK + 8 * c));
            }
            xs[8 * c..8 * c + 8].copy_from_slice(&transpose8(rows));
        }
        xs
    }
}

/// `clamp(round(v), lo, hi)` per lane as floats, rounding half away from
/// zero, the portable encoders' way: add the largest f32 below 1/2 with
/// `v`'s sign, clamp, truncate.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn round_clamp(v: __m256, lo: f32, hi: f32) -> __m256 {
    // SAFETY (all intrinsics here): the caller's AVX contract.
    unsafe {
        let half = _mm256_or_ps(
            _mm256_and_ps(v, _mm256_set1_ps(-0.0)),
            _mm256_set1_ps(0.499_999_97),
        );
        let t = _mm256_add_ps(v, half);
        let t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
        _mm256_cvtepi32_ps(_mm256_cvttps_epi32(t))
    }
}

/// `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))` per lane: the fixed
/// order in which the portable encoders combine their eight running sums.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn pairwise_sum8(a: [__m256; 8]) -> __m256 {
    // SAFETY (all intrinsics here): the caller's AVX contract.
    unsafe {
        _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
            _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])),
        )
    }
}

/// `|v|` per lane.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn abs(v: __m256) -> __m256 {
    // SAFETY: the caller's AVX contract.
    unsafe { _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))) }
}

/// All-ones in the lanes holding a finite value (not ±inf, not NaN).
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn finite(v: __m256) -> __m256 {
    // SAFETY: the caller's AVX contract.
    unsafe { _mm256_cmp_ps(abs(v), _mm256_set1_ps(f32::INFINITY), _CMP_LT_OQ) }
}

/// Rows become columns: output `k`, lane `b` is input `b`, lane `k`.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY (all intrinsics here): the caller's AVX contract; no memory
    // is touched.
    unsafe {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
        let u1 = _mm256_shuffle_ps(t0, t2, 0xee);
        let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
        let u3 = _mm256_shuffle_ps(t1, t3, 0xee);
        let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
        let u5 = _mm256_shuffle_ps(t4, t6, 0xee);
        let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
        let u7 = _mm256_shuffle_ps(t5, t7, 0xee);
        [
            _mm256_permute2f128_ps(u0, u4, 0x20),
            _mm256_permute2f128_ps(u1, u5, 0x20),
            _mm256_permute2f128_ps(u2, u6, 0x20),
            _mm256_permute2f128_ps(u3, u7, 0x20),
            _mm256_permute2f128_ps(u0, u4, 0x31),
            _mm256_permute2f128_ps(u1, u5, 0x31),
            _mm256_permute2f128_ps(u2, u6, 0x31),
            _mm256_permute2f128_ps(u3, u7, 0x31),
        ]
    }
}
