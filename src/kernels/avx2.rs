//! x86-64 AVX2 + FMA + F16C kernels.
//!
//! 4-bit block dot products follow llama.cpp's AVX2 Q4_0 path: 32 weights in
//! one 256-bit register, `vpmaddubsw` (u8 × i8 → pairs of i16) then `vpmaddwd`
//! with ones (→ eight i32 lanes), then one float convert + FMA per block.
//! 8-bit weights meet 16-bit activations: the weights are sign-extended to i16
//! (`vpmovsxbw`) and `vpmaddwd` forms the i32 pair sums directly. All the
//! integer steps are exact for our ranges (see the comments at each), so the
//! per-block integer sums equal the scalar reference's.
//!
//! Every `#[target_feature]` function here is private; the only way in is the
//! [`Isa`] table returned by [`isa`], which checks the CPU first.

// Tile loops index several parallel register arrays by row and token; index
// loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::tile::{
    block_tile, q4k_tile, target_instance, KRows, Q4Lanes, MAX_TILE, MAX_TILE_T, Q4K_ACT_SUBS,
};
use super::{Isa, KernelSet};
use crate::quant::BLOCK;
use half::f16;
use std::arch::x86_64::*;

pub(crate) fn isa() -> Option<&'static Isa> {
    let ok = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    ok.then_some(&ISA)
}

static ISA: Isa = Isa {
    set: KernelSet::Avx2,
    tile_rows: 4,
    tile_tokens: 2,
    quantize_act,
    quantize_act16,
    q4_tile: block_tile::<Q4Avx2, i8>,
    q8_tile: block_tile::<Q8Avx2, i16>,
    q4k_tile: q4k_tile::<Q4kAvx2>,
    q4_lanes: Some(Q4_ROWS8),
    q4k_lanes: Some(Q4K_ROWS8),
    dot_f32,
    dot_f16,
    attend_f16,
    attend_f32_many,
    swiglu,
};

// The safe wrappers below, and the kernel types `target_instance!` stamps, are
// only stored in `ISA`, which `isa()` hands out after detecting AVX2, FMA and
// F16C, and in `avx512::ISA` and `avxvnni::ISA`, which check the same
// features besides their own. Each wrapper checks the slice lengths the
// unsafe body relies on.

pub(super) fn quantize_act(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize) {
    assert!(qs.len() == x.len() && x.len() == d.len() * blocks * BLOCK);
    // SAFETY: features detected (see above); lengths checked.
    unsafe { quantize_act_avx2(x, qs, d, blocks) }
}

pub(super) fn quantize_act16(x: &[f32], qs: &mut [i16], d: &mut [f32]) {
    assert!(x.len().is_multiple_of(BLOCK) && qs.len() == x.len() && d.len() == x.len() / BLOCK);
    // SAFETY: features detected (see above); lengths checked.
    unsafe { quantize_act16_avx2(x, qs, d) }
}

pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: features detected; equal lengths checked.
    unsafe { dot_avx2(a, b) }
}

pub(super) fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: features detected; equal lengths checked.
    unsafe { dot_avx2(a, b) }
}

pub(super) fn attend_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, len) = (q.len(), scores.len());
    assert!(out.len() == hd && keys.len() >= len * hd && values.len() >= len * hd);
    // SAFETY: features detected; shapes checked.
    unsafe { attend_avx2(q, keys, values, scale, scores, out) }
}

pub(super) fn attend_f32_many(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    super::check_attend_many(q, lens, keys, values, scores, out);
    // SAFETY: features detected; shapes checked.
    unsafe { attend_many_avx2(q, lens, keys, values, scale, scores, out) }
}

pub(super) fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    // SAFETY: features detected; equal lengths checked.
    unsafe { swiglu_avx2(gate, up) }
}

/// How a set forms the integer dot products of unsigned 4-bit weights
/// (0..=15) with signed 8-bit activations, in eight i32 lanes. The 4-bit
/// bodies below ([`q4_body`], [`q4k_body`], [`q4_rows8_body`]) are generic
/// over it and `#[inline(always)]`: each set instantiates them in its own
/// `#[target_feature]` functions. Every form sums the same products into
/// each i32 lane, exactly, so the lanes hold the same integers in every set.
///
/// Safety (every method): only called from functions that enable AVX2 and
/// the implementor's instructions (`#[inline(always)]`, so they compile there).
pub(super) trait ByteDot {
    /// Per-token precomputation for [`ByteDot::q4_dot`] from the activations.
    unsafe fn q4_prep(a: __m256i) -> __m256i;
    /// `sum (q - 8) * a` for the nibbles `q` of one block.
    unsafe fn q4_dot(q: __m256i, a: __m256i, prep: __m256i) -> __m256i;
    /// The multipliers of [`ByteDot::q4k_step`] from q4k's 6-bit scales, one
    /// per i32 lane.
    unsafe fn q4k_scales(sc: __m256i) -> __m256i;
    /// `isum + s * (sum q0 * a0 + sum q1 * a1)` per lane, with `s` lanes from
    /// [`ByteDot::q4k_scales`] (`q1`, `a1` zero for an odd sub-block).
    unsafe fn q4k_step(
        isum: __m256i,
        q0: __m256i,
        a0: __m256i,
        q1: __m256i,
        a1: __m256i,
        s: __m256i,
    ) -> __m256i;
    /// `sum_k c[k] * a[k] - 8 * asum` per lane, `a[k]` the four activation
    /// bytes at `a.add(k)` broadcast (see [`q4_rows8_body`]).
    unsafe fn rows8_dot(c: &[__m256i; 8], a: *const i32, asum: i32) -> __m256i;
}

/// AVX2: `vpmaddubsw` (u8 × i8 → pairs of i16) then `vpmaddwd`.
pub(super) struct Maddubs;

impl ByteDot for Maddubs {
    /// 8 × the pair sums of the activations: computed once per activation
    /// block and reused for every row.
    #[inline(always)]
    unsafe fn q4_prep(a: __m256i) -> __m256i {
        _mm256_maddubs_epi16(_mm256_set1_epi8(8), a)
    }

    /// The nibbles are used unsigned in `vpmaddubsw`, then 8 × the pair sums
    /// of `a` (`prep`) are subtracted at 16 bits: per pair
    /// `q0*a0 + q1*a1 - 8*(a0 + a1)`, each part below 2^15 in magnitude, so
    /// nothing saturates.
    #[inline(always)]
    unsafe fn q4_dot(q: __m256i, a: __m256i, prep: __m256i) -> __m256i {
        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, a), prep);
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// Each scale in both i16 halves of its lane, for `vpmaddwd`.
    #[inline(always)]
    unsafe fn q4k_scales(sc: __m256i) -> __m256i {
        _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16))
    }

    /// The two `vpmaddubsw` products (at most `2 * 15 * 127` per i16) add in
    /// i16 (at most 7620), and `vpmaddwd` multiplies the pairs by the scale.
    #[inline(always)]
    unsafe fn q4k_step(
        isum: __m256i,
        q0: __m256i,
        a0: __m256i,
        q1: __m256i,
        a1: __m256i,
        s: __m256i,
    ) -> __m256i {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(q0, a0), _mm256_maddubs_epi16(q1, a1));
        _mm256_add_epi32(isum, _mm256_madd_epi16(p, s))
    }

    /// `vpmaddubsw` per group: the eight i16 partial sums of a lane add up
    /// exactly, each at most 2·15·127 = 3810 in magnitude, eight of them
    /// 30480 < 2^15; then `vpmaddwd` with ones widens them.
    #[inline(always)]
    unsafe fn rows8_dot(c: &[__m256i; 8], a: *const i32, asum: i32) -> __m256i {
        let mut s16 = _mm256_maddubs_epi16(c[0], _mm256_set1_epi32(a.read_unaligned()));
        for (k, ck) in c.iter().enumerate().skip(1) {
            let ak = _mm256_set1_epi32(a.add(k).read_unaligned());
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*ck, ak));
        }
        _mm256_sub_epi32(
            _mm256_madd_epi16(s16, _mm256_set1_epi16(1)),
            _mm256_set1_epi32(8 * asum),
        )
    }
}

/// `sum w * a` for 8-bit weights sign-extended to i16 (`w[0]`: elements
/// 0..16, `w[1]`: 16..32) and 16-bit activations, in eight i32 lanes. Each
/// lane sums four products, at most `4 * 128 * 32767 < 2^24` in magnitude, so
/// it is exact in i32 and its conversion to f32 is exact too. (`vpmaddwd`
/// could only wrap for (-32768)² + (-32768)², and activations never hold
/// -32768.)
#[inline(always)]
unsafe fn q8_dot(w: [__m256i; 2], a: [__m256i; 2]) -> __m256i {
    _mm256_add_epi32(_mm256_madd_epi16(w[0], a[0]), _mm256_madd_epi16(w[1], a[1]))
}

/// Prefetches the cache line at `offset` of row `r + R`: the same place in
/// the next tile's rows. The hardware prefetchers lose each row's stream when
/// a tile ends (the next rows start a whole tile further on, and a 4096-wide
/// q4 row is only 32 cache lines), so without this every tile began with a
/// cache miss per row (7B q4k decode: 5.7 t/s with it, 4.5 without;
/// `benches/RESULTS.md`). Past the matrix's last row the address may name
/// memory that does not exist, which a prefetch allows (it never faults).
#[inline(always)]
unsafe fn prefetch_next_tile<const R: usize>(
    w: *const u8,
    r: usize,
    row_bytes: usize,
    offset: usize,
) {
    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((r + R) * row_bytes + offset) as *const i8);
}

/// `R` rows of 4-bit blocks × `T` quantized activation rows.
///
/// Safety: AVX2, FMA, F16C and what `D` uses are enabled; the caller checks
/// `w.len() >= R * nb * 16`, `wd.len() >= R * nb`, `aq.len() >= T * nb * 32`,
/// `ad.len() >= T * nb`.
#[inline(always)]
pub(super) unsafe fn q4_body<D: ByteDot, const R: usize, const T: usize>(
    w: &[u8],
    wd: &[f16],
    aq: &[i8],
    ad: &[f32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let row_bytes = nb * 16;
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut prod = [[[0f32; 8]; T]; R];
    let (wp, ap) = (w.as_ptr(), aq.as_ptr());
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        scale_products::<R, T>(wd.as_ptr(), ad.as_ptr(), nb, b, g, &mut prod);
        for j in 0..g {
            let blk = b + j;
            let mut a = [_mm256_setzero_si256(); T];
            let mut c = [_mm256_setzero_si256(); T];
            for t in 0..T {
                a[t] = _mm256_loadu_si256(ap.add((t * nb + blk) * BLOCK) as *const __m256i);
                c[t] = D::q4_prep(a[t]);
            }
            for r in 0..R {
                let raw = _mm_loadu_si128(wp.add(r * row_bytes + blk * 16) as *const __m128i);
                if blk.is_multiple_of(4) {
                    prefetch_next_tile::<R>(wp, r, row_bytes, blk * 16);
                }
                let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
                for t in 0..T {
                    let s = D::q4_dot(q, a[t], c[t]);
                    let scale = _mm256_set1_ps(prod[r][t][j]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][t]);
                }
            }
        }
        b += g;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = hsum(acc[r][t]);
        }
    }
}

/// `R` rows of 8-bit blocks × `T` 16-bit activation rows. Per block and row:
/// two sign-extending loads; per token: two `vpmaddwd` and an add (the 8-bit
/// activation path needed a sign, a `vpmaddubsw` and a `vpmaddwd`).
///
/// Safety: AVX2, FMA and F16C are enabled; the caller checks
/// `w.len() >= R * nb * 32`, `wd.len() >= R * nb`, `aq.len() >= T * nb * 32`,
/// `ad.len() >= T * nb`.
#[inline(always)]
unsafe fn q8_body<const R: usize, const T: usize>(
    w: &[u8],
    wd: &[f16],
    aq: &[i16],
    ad: &[f32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let row_bytes = nb * BLOCK;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut prod = [[[0f32; 8]; T]; R];
    let (wp, ap) = (w.as_ptr(), aq.as_ptr());
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        scale_products::<R, T>(wd.as_ptr(), ad.as_ptr(), nb, b, g, &mut prod);
        for j in 0..g {
            let blk = b + j;
            let mut a = [[_mm256_setzero_si256(); 2]; T];
            for t in 0..T {
                let p = ap.add((t * nb + blk) * BLOCK);
                a[t] = [
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(16) as *const __m256i),
                ];
            }
            for r in 0..R {
                let p = wp.add(r * row_bytes + blk * BLOCK);
                if blk.is_multiple_of(2) {
                    prefetch_next_tile::<R>(wp, r, row_bytes, blk * BLOCK);
                }
                let q = [
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i)),
                ];
                for t in 0..T {
                    let s = q8_dot(q, a[t]);
                    let scale = _mm256_set1_ps(prod[r][t][j]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][t]);
                }
            }
        }
        b += g;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = hsum(acc[r][t]);
        }
    }
}

target_instance!(pub(super) Q4Avx2: BlockTile<i8> = q4_body::<Maddubs>, "avx2,fma,f16c");
target_instance!(pub(super) Q8Avx2: BlockTile<i16> = q8_body, "avx2,fma,f16c");

/// The 8 sub-blocks' `(sc, m)` of the group whose 12 packed scale bytes are
/// at `p`, as i32 lanes (sub-block `k` in lane `k`). Reads exactly 12 bytes.
#[inline(always)]
pub(super) unsafe fn unpack_q4k_scales(p: *const u8) -> (__m256i, __m256i) {
    let lo = _mm_loadl_epi64(p as *const __m128i);
    let v = _mm_insert_epi32(lo, (p.add(8) as *const i32).read_unaligned(), 2);
    let v = _mm256_broadcastsi128_si256(v);
    // lane k gets the 24 bits of pair k / 2 (bytes 3p..3p + 3)
    let pick = _mm256_setr_epi8(
        0, 1, 2, -1, 0, 1, 2, -1, 3, 4, 5, -1, 3, 4, 5, -1, //
        6, 7, 8, -1, 6, 7, 8, -1, 9, 10, 11, -1, 9, 10, 11, -1,
    );
    let pairs = _mm256_shuffle_epi8(v, pick);
    let f = _mm256_and_si256(
        _mm256_srlv_epi32(pairs, _mm256_setr_epi32(0, 12, 0, 12, 0, 12, 0, 12)),
        _mm256_set1_epi32(0xfff),
    );
    (
        _mm256_and_si256(f, _mm256_set1_epi32(63)),
        _mm256_srli_epi32(f, 6),
    )
}

// The q4k tile's per-group vectors of block sums (one 4-lane vector or
// 128-bit lane per activation scale) assume half groups of 4 sub-blocks.
const _: () = assert!(Q4K_ACT_SUBS == 4);

/// `R` rows of q4k weights × `T` 8-bit activation rows with one scale per
/// half group ([`Q4K_ACT_SUBS`] sub-blocks). A half's `Σ_k sc_k Σ q a` is
/// summed in integers and converted once: per pair of sub-blocks and row, one
/// 32-byte load holds both sub-blocks' nibbles, the low nibbles meet each
/// sub-block's first 16 activations and the high nibbles its last 16, and
/// [`ByteDot::q4k_step`] multiplies both products' lane sums by the
/// sub-blocks' 6-bit scales (`sc_k` in the low 128-bit lane, `sc_{k+1}` in
/// the high one). Each i32 lane gathers at most `2 * 2 * 7620 * 63 < 2^21`
/// per half, so its conversion is exact. Per
/// half and row: `d` times that, times the token's scale of the half; per group
/// and row `dmin * m_k * Σ a` of the 8 sub-blocks in one vector, each lane
/// times its half's scale, subtracted. With two tokens, `vphaddd` first puts
/// both tokens' sums of a row in one register (lanes 0, 1, 4, 5 and 2, 3, 6,
/// 7): half the conversions and float accumulators, so the 4 × 2 tile spills
/// less.
///
/// Safety: AVX2, FMA, F16C and what `D` uses are enabled; the caller checks
/// the slices with [`KRows::check`] for `R` rows and `aq`, `ad`, `asum` for
/// `T` tokens.
#[inline(always)]
pub(super) unsafe fn q4k_body<D: ByteDot, const R: usize, const T: usize>(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for g in 0..nb / 8 {
        q4k_group::<D, R, T>(w, aq, ad, asum, nb, g, 8, &mut acc);
    }
    if !nb.is_multiple_of(8) {
        q4k_group::<D, R, T>(w, aq, ad, asum, nb, nb / 8, nb % 8, &mut acc);
    }
    if T == 2 {
        for r in 0..R {
            let [t0, t1] = hsum_pair(acc[r][0]);
            out[r * MAX_TILE_T] = t0;
            out[r * MAX_TILE_T + 1] = t1;
        }
        return;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = hsum(acc[r][t]);
        }
    }
}

/// Group `g` (of `nk` sub-blocks: 8, or fewer for a row's last group) of
/// [`q4k_body`]. A short group reads its activation block sums through a
/// zero-padded copy, so the lanes of missing sub-blocks add nothing.
///
/// Safety: as [`q4k_body`], with `8 * g + nk <= nb`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn q4k_group<D: ByteDot, const R: usize, const T: usize>(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    g: usize,
    nk: usize,
    acc: &mut [[__m256; T]; R],
) {
    const HALF: usize = Q4K_ACT_SUBS;
    let ng = nb.div_ceil(8);
    let nh = nb.div_ceil(HALF);
    let row_bytes = nb * 16;
    let (wp, dp, sp, ap) = (
        w.qs.as_ptr(),
        w.dm.as_ptr() as *const i32,
        w.sc.as_ptr(),
        aq.as_ptr(),
    );
    // each row's 6-bit scales as `D::q4k_step` multiplies them (after a
    // `vpermd`); its `d` broadcast
    let mut sc2 = [_mm256_setzero_si256(); R];
    let mut dv = [_mm256_setzero_ps(); R];
    for r in 0..R {
        let gi = r * ng + g;
        let (sc, _) = unpack_q4k_scales(sp.add(gi * 12));
        sc2[r] = D::q4k_scales(sc);
        let dd = _mm256_cvtph_ps(_mm_set1_epi32(dp.add(gi).read_unaligned()));
        dv[r] = _mm256_permute_ps(dd, 0b00_00_00_00);
    }
    // the activation scales of the group's halves (zero for a missing one)
    let mut ah = [[0f32; 2]; T];
    for t in 0..T {
        for h in 0..2 {
            if HALF * h < nk {
                ah[t][h] = *ad.get_unchecked(t * nh + 2 * g + h);
            }
        }
    }
    let span = Q4kSpan {
        wp,
        ap,
        row_bytes,
        nb,
        first: 8 * g,
    };
    let half = |h: usize, k0: usize, k1: usize, acc: &mut [[__m256; T]; R]| {
        q4k_half::<D, R, T>(span, k0, k1, &sc2, &dv, &ah, h, acc)
    };
    if nk == 8 {
        // a whole group: constant bounds, so both halves unroll
        half(0, 0, HALF, acc);
        half(1, HALF, 2 * HALF, acc);
    } else {
        for h in 0..2 {
            let (k0, k1) = (HALF * h, nk.min(HALF * (h + 1)));
            if k0 >= k1 {
                break;
            }
            half(h, k0, k1, acc);
        }
    }
    let mut amin = [_mm256_setzero_ps(); T];
    for t in 0..T {
        let i = t * nb + 8 * g;
        let s = if nk == 8 {
            _mm256_loadu_si256(asum.as_ptr().add(i) as *const __m256i)
        } else {
            let mut spad = [0i32; 8];
            spad[..nk].copy_from_slice(&asum[i..i + nk]);
            _mm256_loadu_si256(spad.as_ptr() as *const __m256i)
        };
        // lane k: Σ a of sub-block k times its half's activation scale
        let a = _mm256_set_m128(_mm_set1_ps(ah[t][1]), _mm_set1_ps(ah[t][0]));
        amin[t] = _mm256_mul_ps(_mm256_cvtepi32_ps(s), a);
    }
    // `dmin` and the minima are read again rather than kept from the first
    // loop: R more live vectors across the halves would spill in the 4 × 2 tile.
    for r in 0..R {
        let gi = r * ng + g;
        let dd = _mm256_cvtph_ps(_mm_set1_epi32(dp.add(gi).read_unaligned()));
        let (_, m) = unpack_q4k_scales(sp.add(gi * 12));
        let dm = _mm256_mul_ps(_mm256_permute_ps(dd, 0b01_01_01_01), _mm256_cvtepi32_ps(m));
        if T == 2 {
            let both = _mm256_hadd_ps(_mm256_mul_ps(dm, amin[0]), _mm256_mul_ps(dm, amin[T - 1]));
            acc[r][0] = _mm256_sub_ps(acc[r][0], both);
            continue;
        }
        for t in 0..T {
            acc[r][t] = _mm256_fnmadd_ps(dm, amin[t], acc[r][t]);
        }
    }
}

/// Where a q4k tile reads one group: its weight rows (`row_bytes` apart), its
/// activation rows (`nb` blocks each) and the group's first block.
#[derive(Clone, Copy)]
struct Q4kSpan {
    wp: *const u8,
    ap: *const i8,
    row_bytes: usize,
    nb: usize,
    first: usize,
}

/// Sub-blocks `k0..k1` (half `h`) of the group starting at block `span.first`:
/// their integer sums per row and token, times the row's `d` and the token's
/// scale of the half, added to `acc`.
///
/// Safety: as [`q4k_body`], with `span.first + k1 <= span.nb`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn q4k_half<D: ByteDot, const R: usize, const T: usize>(
    span: Q4kSpan,
    k0: usize,
    k1: usize,
    sc2: &[__m256i; R],
    dv: &[__m256; R],
    ah: &[[f32; 2]; T],
    h: usize,
    acc: &mut [[__m256; T]; R],
) {
    let isum = q4k_half_isum::<D, R, T>(span, k0, k1, sc2);
    if T == 2 {
        // both tokens' sums in one register (see `q4k_body`); `T - 1` is
        // token 1, spelled so that the T = 1 instantiation still compiles
        let (a0, a1) = (ah[0][h], ah[T - 1][h]);
        let a = _mm256_setr_ps(a0, a0, a1, a1, a0, a0, a1, a1);
        for r in 0..R {
            let both = _mm256_hadd_epi32(isum[r][0], isum[r][T - 1]);
            let f = _mm256_mul_ps(dv[r], a);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), f, acc[r][0]);
        }
        return;
    }
    for t in 0..T {
        let a = _mm256_set1_ps(ah[t][h]);
        for r in 0..R {
            let f = _mm256_mul_ps(dv[r], _mm256_cvtepi32_ps(isum[r][t]));
            acc[r][t] = _mm256_fmadd_ps(f, a, acc[r][t]);
        }
    }
}

/// `Σ_k sc_k Σ q a` over sub-blocks `k0..k1` of the group starting at block
/// `span.first`, per row and token, in i32 lanes (see [`q4k_body`]).
///
/// Safety: as [`q4k_body`], with `span.first + k1 <= span.nb`.
#[inline(always)]
unsafe fn q4k_half_isum<D: ByteDot, const R: usize, const T: usize>(
    span: Q4kSpan,
    k0: usize,
    k1: usize,
    sc2: &[__m256i; R],
) -> [[__m256i; T]; R] {
    let Q4kSpan {
        wp,
        ap,
        row_bytes,
        nb,
        first,
    } = span;
    let mask = _mm256_set1_epi8(0x0f);
    let mut isum = [[_mm256_setzero_si256(); T]; R];
    let mut k = k0;
    while k + 2 <= k1 {
        let blk = first + k;
        let mut alo = [_mm256_setzero_si256(); T];
        let mut ahi = [_mm256_setzero_si256(); T];
        for t in 0..T {
            let p = ap.add((t * nb + blk) * BLOCK);
            let a0 = _mm256_loadu_si256(p as *const __m256i);
            let a1 = _mm256_loadu_si256(p.add(BLOCK) as *const __m256i);
            alo[t] = _mm256_permute2x128_si256(a0, a1, 0x20);
            ahi[t] = _mm256_permute2x128_si256(a0, a1, 0x31);
        }
        let (s0, s1) = (k as i32, k as i32 + 1);
        let pick = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
        for r in 0..R {
            let v = _mm256_loadu_si256(wp.add(r * row_bytes + blk * 16) as *const __m256i);
            if k.is_multiple_of(4) {
                prefetch_next_tile::<R>(wp, r, row_bytes, blk * 16);
            }
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            let s = _mm256_permutevar8x32_epi32(sc2[r], pick);
            for t in 0..T {
                isum[r][t] = D::q4k_step(isum[r][t], lo, alo[t], hi, ahi[t], s);
            }
        }
        k += 2;
    }
    if k < k1 {
        // an odd last sub-block: its 32 weights in one register
        let blk = first + k;
        let mut a = [_mm256_setzero_si256(); T];
        for t in 0..T {
            a[t] = _mm256_loadu_si256(ap.add((t * nb + blk) * BLOCK) as *const __m256i);
        }
        let pick = _mm256_set1_epi32(k as i32);
        for r in 0..R {
            let raw = _mm_loadu_si128(wp.add(r * row_bytes + blk * 16) as *const __m128i);
            let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
            let s = _mm256_permutevar8x32_epi32(sc2[r], pick);
            let zero = _mm256_setzero_si256();
            for t in 0..T {
                isum[r][t] = D::q4k_step(isum[r][t], q, a[t], zero, zero, s);
            }
        }
    }
    isum
}

target_instance!(pub(super) Q4kAvx2: Q4kTile = q4k_body::<Maddubs>, "avx2,fma,f16c");

target_instance!(
    Q4Rows8Avx2: Q4LanesBody(rows = 8) = q4_rows8_body::<Maddubs>,
    "avx2,fma,f16c"
);
target_instance!(
    Q4kRows8Avx2: Q4kLanesBody(rows = 8) = q4k_rows8_body::<Maddubs>,
    "avx2,fma,f16c"
);

const Q4_ROWS8: Q4Lanes = Q4Lanes::q4::<Q4Rows8Avx2>();
const Q4K_ROWS8: Q4Lanes = Q4Lanes::q4k::<Q4kRows8Avx2>();

/// 8 q4k rows × `T` tokens, rows in lanes (the 256-bit form of the AVX-512
/// set's `q4k_rows16_vnni`): per sub-block the rows' nibbles
/// ([`nibbles_8_rows`]) meet the activations in [`ByteDot::rows8_dot`] with
/// no offset (q4k's levels are unsigned; exact in either form), the sum is
/// scaled by the rows' `d * sc` times the token's scale of the half group,
/// and the rows' `dmin * m` times `d_a * Σ a` is subtracted. The rows'
/// scales are unpacked once per group and transposed.
///
/// Safety: AVX2, FMA, F16C and what `D` uses are enabled; the slices passed
/// [`q4k_lanes`](super::tile::q4k_lanes)' checks for 8 rows and `T` tokens.
#[inline(always)]
pub(super) unsafe fn q4k_rows8_body<D: ByteDot, const T: usize>(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    out: &mut [f32; MAX_TILE],
) {
    let (ng, nh) = (nb.div_ceil(8), nb.div_ceil(Q4K_ACT_SUBS));
    let row_bytes = nb * 16;
    let (wp, ap) = (w.qs.as_ptr(), aq.as_ptr());
    let (dp, sp) = (w.dm.as_ptr() as *const i32, w.sc.as_ptr());
    let mut acc = [_mm256_setzero_ps(); T];
    for g in 0..ng {
        let nk = (nb - 8 * g).min(8);
        // per row: (d * sc, dmin * m) of the group's sub-blocks
        let mut dsc = [_mm256_setzero_ps(); 8];
        let mut dmn = [_mm256_setzero_ps(); 8];
        for r in 0..8 {
            let gi = r * ng + g;
            // (d, dmin) in alternate lanes
            let dd = _mm256_cvtph_ps(_mm_set1_epi32(dp.add(gi).read_unaligned()));
            let (sc, m) = unpack_q4k_scales(sp.add(gi * 12));
            dsc[r] = _mm256_mul_ps(_mm256_permute_ps(dd, 0b00_00_00_00), _mm256_cvtepi32_ps(sc));
            dmn[r] = _mm256_mul_ps(_mm256_permute_ps(dd, 0b01_01_01_01), _mm256_cvtepi32_ps(m));
        }
        let (dsc, dmn) = (transpose_8x8(dsc), transpose_8x8(dmn));
        for k in 0..nk {
            let blk = 8 * g + k;
            let c = nibbles_8_rows(wp.add(blk * 16), row_bytes);
            for t in 0..T {
                let a = ap.add((t * nb + blk) * BLOCK) as *const i32;
                // no offset: q4k's levels are unsigned
                let s = D::rows8_dot(&c, a, 0);
                let at = ad[t * nh + blk / Q4K_ACT_SUBS];
                let scale = _mm256_mul_ps(dsc[k], _mm256_set1_ps(at));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                let amin = _mm256_set1_ps(at * asum[t * nb + blk] as f32);
                acc[t] = _mm256_fnmadd_ps(dmn[k], amin, acc[t]);
            }
        }
    }
    store_rows_in_lanes(&acc, out);
}

/// Writes a rows-in-lanes kernel's sums: lane `r` of `acc[t]` is row `r`,
/// token `t`.
#[inline(always)]
unsafe fn store_rows_in_lanes<const T: usize>(acc: &[__m256; T], out: &mut [f32; MAX_TILE]) {
    for (t, v) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
        for (r, &x) in lanes.iter().enumerate() {
            out[r * MAX_TILE_T + t] = x;
        }
    }
}

/// An 8×8 transpose of f32 values: `out[j]` lane `r` = `v[r]` lane `j`.
#[inline(always)]
unsafe fn transpose_8x8(v: [__m256; 8]) -> [__m256; 8] {
    // t[2i], t[2i + 1]: rows 2i, 2i + 1 interleaved (low / high pairs)
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    // u[4h + m]: rows 4h..4h + 4 of columns m (low lane) and m + 4 (high)
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let h = i / 4 * 4;
        match i % 4 {
            0 => _mm256_shuffle_ps::<0x44>(t[h], t[h + 2]),
            1 => _mm256_shuffle_ps::<0xee>(t[h], t[h + 2]),
            2 => _mm256_shuffle_ps::<0x44>(t[h + 1], t[h + 3]),
            _ => _mm256_shuffle_ps::<0xee>(t[h + 1], t[h + 3]),
        }
    });
    std::array::from_fn(|j| {
        if j < 4 {
            _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[j - 4], u[j])
        }
    })
}

/// 8 rows × `T` tokens, rows in lanes. Per block: the 8 rows' nibbles with
/// register `k` holding weights `4k..4k+4` of all 8 rows ([`nibbles_8_rows`]),
/// then per token [`ByteDot::rows8_dot`] against the matching 4 activation
/// bytes broadcast.
///
/// Safety: AVX2, FMA, F16C and what `D` uses are enabled; the slices passed
/// [`q4_lanes`](super::tile::q4_lanes)' checks for 8 rows and `T` tokens.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn q4_rows8_body<D: ByteDot, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    wd: &[f16],
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    out: &mut [f32; MAX_TILE],
) {
    let (wp, dp, ap) = (w.as_ptr(), wd.as_ptr() as *const u16, aq.as_ptr());
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let c = nibbles_8_rows(wp.add(b * 16), row_bytes);
        let dw = _mm256_cvtph_ps(_mm_set_epi16(
            *dp.add(7 * nb + b) as i16,
            *dp.add(6 * nb + b) as i16,
            *dp.add(5 * nb + b) as i16,
            *dp.add(4 * nb + b) as i16,
            *dp.add(3 * nb + b) as i16,
            *dp.add(2 * nb + b) as i16,
            *dp.add(nb + b) as i16,
            *dp.add(b) as i16,
        ));
        for t in 0..T {
            let a = ap.add((t * nb + b) * BLOCK) as *const i32;
            let s32 = D::rows8_dot(&c, a, asum[t * nb + b]);
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(ad[t * nb + b]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[t]);
        }
    }
    store_rows_in_lanes(&acc, out);
}

/// The 32 nibbles of one block of 8 rows (`p`: row 0's 16 bytes, rows
/// `row_bytes` apart) with the rows in lanes, as unsigned bytes: `out[k]`
/// holds weights `4k..4k + 4` of all 8 rows in row order (low nibbles:
/// weights 0..16, high: 16..32). Rows `r` and `r + 4` share a register (one
/// per 128-bit lane) before a transpose of 4-byte groups within each lane.
///
/// Safety: AVX2 enabled; the 8 rows' 16 bytes are readable.
#[inline(always)]
pub(super) unsafe fn nibbles_8_rows(p: *const u8, row_bytes: usize) -> [__m256i; 8] {
    let mask = _mm256_set1_epi8(0x0f);
    let mut lo = [_mm256_setzero_si256(); 4];
    let mut hi = [_mm256_setzero_si256(); 4];
    for r in 0..4 {
        let pair = _mm256_loadu2_m128i(
            p.add((r + 4) * row_bytes) as *const __m128i,
            p.add(r * row_bytes) as *const __m128i,
        );
        lo[r] = _mm256_and_si256(pair, mask);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(pair, 4), mask);
    }
    let (c0, c1) = (transpose4x4_epi32(&lo), transpose4x4_epi32(&hi));
    [c0[0], c0[1], c0[2], c0[3], c1[0], c1[1], c1[2], c1[3]]
}

/// Within each 128-bit lane, `out[k]` = 32-bit element `k` of every
/// input, input `r` in element `r`.
#[inline(always)]
unsafe fn transpose4x4_epi32(v: &[__m256i; 4]) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// The two token sums of a register laid out as `hadd` leaves them: lanes
/// 0, 1, 4, 5 the first token's, 2, 3, 6, 7 the second's.
#[inline(always)]
unsafe fn hsum_pair(v: __m256) -> [f32; 2] {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let mut l = [0f32; 4];
    _mm_storeu_ps(l.as_mut_ptr(), s);
    [l[0] + l[1], l[2] + l[3]]
}

/// `out[c0..c0 + 8K] += Σ_{j ∈ range} p[j] · V[j][c0..c0 + 8K]` over cached
/// values (rows of `out.len()`), in `K` accumulators.
///
/// Safety: AVX2/FMA/F16C present; `c0 + 8K <= out.len()`, `p` and `values`
/// cover `range`.
#[inline(always)]
unsafe fn weighted_value_sum<const K: usize, E: Lanes8>(
    p: &[f32],
    values: &[E],
    range: std::ops::Range<usize>,
    c0: usize,
    out: &mut [f32],
) {
    let (vp, op, hd) = (values.as_ptr(), out.as_mut_ptr(), out.len());
    let mut acc: [__m256; K] = std::array::from_fn(|k| _mm256_loadu_ps(op.add(c0 + 8 * k)));
    for j in range {
        let pv = _mm256_set1_ps(p[j]);
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pv, E::load8(vp.add(j * hd + c0 + 8 * k)), *a);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(op.add(c0 + 8 * k), *a);
    }
}

/// The eight horizontal sums of `v[0..8]`, as lanes 0..8 of one vector.
#[inline(always)]
unsafe fn hsum_x8(v: [__m256; 8]) -> __m256 {
    // per 128-bit half: pair sums, then quad sums of four vectors
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let q0 = _mm256_hadd_ps(h01, h23);
    let q1 = _mm256_hadd_ps(h45, h67);
    // q0 = [v0..v3 low halves | v0..v3 high halves], q1 likewise for v4..v7
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(q0, q1),
        _mm256_permute2f128_ps::<0x31>(q0, q1),
    )
}

// Inlined into the `#[target_feature]` instances of `target_instance!`.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Converts the scales of blocks `b..b + g` (g <= 8) of `R` rows and multiplies
/// them with those of `T` tokens: `prod[r][t][j] = wd[r][b + j] * ad[t][b + j]`.
// Inlined into the `#[target_feature]` instances of `target_instance!`.
#[inline(always)]
pub(super) unsafe fn scale_products<const R: usize, const T: usize>(
    wd: *const f16,
    ad: *const f32,
    nb: usize,
    b: usize,
    g: usize,
    prod: &mut [[[f32; 8]; T]; R],
) {
    if g == 8 {
        for (r, pr) in prod.iter_mut().enumerate() {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(r * nb + b) as *const __m128i));
            for (t, pt) in pr.iter_mut().enumerate() {
                let a = _mm256_loadu_ps(ad.add(t * nb + b));
                _mm256_storeu_ps(pt.as_mut_ptr(), _mm256_mul_ps(w, a));
            }
        }
    } else {
        for (r, pr) in prod.iter_mut().enumerate() {
            for (t, pt) in pr.iter_mut().enumerate() {
                for (j, p) in pt.iter_mut().enumerate().take(g) {
                    *p = (*wd.add(r * nb + b + j)).to_f32() * *ad.add(t * nb + b + j);
                }
            }
        }
    }
}

/// Rounds half away from zero exactly like `f32::round`: the fractional part
/// `v - trunc(v)` is exact in floating point, so comparing it with 0.5 decides
/// the tie the same way.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round_away(v: __m256) -> __m256 {
    let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let frac = _mm256_sub_ps(v, t);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let big = _mm256_cmp_ps(
        _mm256_and_ps(frac, abs_mask),
        _mm256_set1_ps(0.5),
        _CMP_GE_OQ,
    );
    let one_signed = _mm256_or_ps(_mm256_andnot_ps(abs_mask, v), _mm256_set1_ps(1.0));
    _mm256_add_ps(t, _mm256_and_ps(big, one_signed))
}

/// The 32 values of the block at `xp` and the lane-wise maximum of their
/// magnitudes.
#[inline(always)]
unsafe fn load_block_abs(xp: *const f32) -> ([__m256; 4], __m256) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let v = [
        _mm256_loadu_ps(xp),
        _mm256_loadu_ps(xp.add(8)),
        _mm256_loadu_ps(xp.add(16)),
        _mm256_loadu_ps(xp.add(24)),
    ];
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
        _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
    );
    (v, m)
}

/// The largest of the eight lanes.
#[inline(always)]
unsafe fn hmax(m: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// The 32 values of the block at `xp` and their largest magnitude (exact:
/// max does not round).
#[inline(always)]
unsafe fn load_block_absmax(xp: *const f32) -> ([__m256; 4], f32) {
    let (v, m) = load_block_abs(xp);
    (v, hmax(m))
}

/// Quantizes whole blocks, one scale per run of `blocks` blocks;
/// bit-identical to `scalar::quantize_act` (max is exact in any order, the
/// scale and inverse are the same scalar divisions, `v * inv` is one IEEE
/// multiply, and [`round_away`] is exact).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize) {
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let xp = x.as_ptr();
    for (run, db) in d.iter_mut().enumerate() {
        let first = run * blocks;
        let mut m = _mm256_setzero_ps();
        for blk in first..first + blocks {
            m = _mm256_max_ps(m, load_block_abs(xp.add(blk * BLOCK)).1);
        }
        let amax = hmax(m);
        *db = amax / 127.0;
        let inv = _mm256_set1_ps(super::scalar::act_inverse_scale(amax));
        for blk in first..first + blocks {
            // reloaded: eight blocks' values do not fit in the registers
            let v = load_block_abs(xp.add(blk * BLOCK)).0;
            let i = [
                _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[0], inv))),
                _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[1], inv))),
                _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[2], inv))),
                _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[3], inv))),
            ];
            // the packs work per 128-bit lane; the permute restores element order
            let p = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let p = _mm256_permutevar8x32_epi32(p, perm);
            _mm256_storeu_si256(qs.as_mut_ptr().add(blk * BLOCK) as *mut __m256i, p);
        }
    }
}

/// Quantizes whole blocks to 16 bits; bit-identical to
/// `scalar::quantize_act16` for the reasons given at [`quantize_act_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act16_avx2(x: &[f32], qs: &mut [i16], d: &mut [f32]) {
    for (blk, db) in d.iter_mut().enumerate() {
        let (v, amax) = load_block_absmax(x.as_ptr().add(blk * BLOCK));
        *db = amax / 32767.0;
        let inv = _mm256_set1_ps(super::scalar::act16_inverse_scale(amax));
        let i: [__m256i; 4] =
            std::array::from_fn(|k| _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[k], inv))));
        // the pack works per 128-bit lane (a0-3 b0-3 a4-7 b4-7); the 64-bit
        // permute restores element order. No value saturates (|q| <= 32767).
        let qp = qs.as_mut_ptr().add(blk * BLOCK);
        for h in 0..2 {
            let p = _mm256_packs_epi32(i[2 * h], i[2 * h + 1]);
            let p = _mm256_permute4x64_epi64(p, 0b11_01_10_00);
            _mm256_storeu_si256(qp.add(16 * h) as *mut __m256i, p);
        }
    }
}

/// A cached key/value element type: eight of them as f32 lanes.
trait Lanes8: Copy {
    /// Safety: AVX2/F16C present; eight elements readable at `p`.
    unsafe fn load8(p: *const Self) -> __m256;
    fn widen(self) -> f32;
}

impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        ld_f16(p)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Safety: AVX2/FMA/F16C present; `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<E: Lanes8>(a: &[E], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, s) in acc.iter_mut().enumerate() {
            *s = _mm256_fmadd_ps(
                E::load8(pa.add(i + 8 * k)),
                _mm256_loadu_ps(pb.add(i + 8 * k)),
                *s,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(E::load8(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        sum += a[i].widen() * b[i];
        i += 1;
    }
    sum
}

/// Eight f16 at `p` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn ld_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// `exp(x)` for eight lanes, Cephes' `expf` scheme (range reduction by ln 2 in
/// two parts, degree-6 polynomial, exponent by integer add); relative error
/// about 2e-7. Inputs are clamped to [-87.3, 88.3], so results stay normal.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let fx = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(x, x),
        _mm256_add_ps(x, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// Safety: `gate.len() == up.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let (gp, up_) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let g = _mm256_loadu_ps(gp.add(i));
        let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(up_.add(i))));
        i += 8;
    }
    super::scalar::swiglu(&mut gate[i..], &up[i..]);
}

/// One query's attention over its `scores.len()` cached positions: scores
/// with the inlined dot (keys in f16 or f32), a vector softmax, then `out`
/// accumulated in registers 64 lanes at a time over all positions.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: Lanes8>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let len = scores.len();
    let max = scores_range(q, keys, scale, 0..len, scores);
    softmax_in_place(scores, max);
    out.fill(0.0);
    accumulate_values(scores, values, 0..len, out);
}

/// Keys per block of the many-query attention: a block's keys (and then its
/// values) stay in L1 while every query of the batch uses them.
const KEY_BLOCK_BYTES: usize = 16 << 10;

/// Attention of `lens.len()` queries (rows of `q`) over one KV head, query
/// `i` seeing the first `lens[i]` positions; `scores` rows of
/// `scores.len() / lens.len()`, `out` rows of `hd`. Keys and values are
/// walked in L1-sized blocks, each used by every query before the next is
/// read (one query at a time re-read them all from L2 per query). Every
/// query's result equals [`attend_avx2`]'s bit for bit: scores are computed
/// in the same groups of eight, and the `p·V` sums continue across blocks in
/// the same order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_many_avx2<E: Lanes8>(
    q: &[f32],
    lens: &[usize],
    keys: &[E],
    values: &[E],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let nq = lens.len();
    let (hd, stride) = (q.len() / nq, scores.len() / nq);
    let block = (KEY_BLOCK_BYTES / (hd * std::mem::size_of::<E>()) / 8 * 8).max(8);
    let longest = lens.iter().copied().max().unwrap_or(0);
    let mut maxes = [f32::NEG_INFINITY; super::MAX_ATTEND_QUERIES];
    for b0 in (0..longest).step_by(block) {
        for (i, &len) in lens.iter().enumerate() {
            let end = len.min(b0 + block);
            if end > b0 {
                let qi = &q[i * hd..(i + 1) * hd];
                let m = scores_range(qi, keys, scale, b0..end, &mut scores[i * stride..]);
                maxes[i] = maxes[i].max(m);
            }
        }
    }
    for (i, &len) in lens.iter().enumerate() {
        softmax_in_place(&mut scores[i * stride..i * stride + len], maxes[i]);
    }
    out.fill(0.0);
    for b0 in (0..longest).step_by(block) {
        for (i, &len) in lens.iter().enumerate() {
            let end = len.min(b0 + block);
            if end > b0 {
                let (p, o) = (&scores[i * stride..], &mut out[i * hd..(i + 1) * hd]);
                accumulate_values(p, values, b0..end, o);
            }
        }
    }
}

/// `scores[j] = scale · q·K[j]` for `j` in `range` (`range.start` a multiple
/// of 8, keys rows of `q.len()`); returns the largest.
///
/// Safety: AVX2/FMA/F16C present; `keys` and `scores` cover `range`.
#[inline(always)]
unsafe fn scores_range<E: Lanes8>(
    q: &[f32],
    keys: &[E],
    scale: f32,
    range: std::ops::Range<usize>,
    scores: &mut [f32],
) -> f32 {
    let hd = q.len();
    let sp = scores.as_mut_ptr();
    // Eight keys at a time: the query's chunk is loaded once for all eight,
    // and their eight sums are reduced together (one `hsum_x8` instead of a
    // horizontal sum per key, which cost as much as the products at
    // SmolLM2's head size of 64).
    let mut j = range.start;
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    if hd.is_multiple_of(8) {
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        let scale_v = _mm256_set1_ps(scale);
        while j + 8 <= range.end {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < hd {
                let qv = _mm256_loadu_ps(qp.add(i));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(E::load8(kp.add((j + k) * hd + i)), qv, *a);
                }
                i += 8;
            }
            let sc = _mm256_mul_ps(hsum_x8(acc), scale_v);
            _mm256_storeu_ps(sp.add(j), sc);
            maxv = _mm256_max_ps(maxv, sc);
            j += 8;
        }
    }
    let mut max = hmax(maxv);
    for j in j..range.end {
        let sc = dot_avx2(&keys[j * hd..(j + 1) * hd], q) * scale;
        scores[j] = sc;
        max = max.max(sc);
    }
    max
}

/// Softmax of `scores` in place, given their maximum.
///
/// Safety: AVX2/FMA present.
#[inline(always)]
unsafe fn softmax_in_place(scores: &mut [f32], max: f32) {
    let (sp, len) = (scores.as_mut_ptr(), scores.len());
    let mv = _mm256_set1_ps(max);
    let mut sumv = _mm256_setzero_ps();
    let mut j = 0;
    while j + 8 <= len {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp.add(j)), mv));
        _mm256_storeu_ps(sp.add(j), e);
        sumv = _mm256_add_ps(sumv, e);
        j += 8;
    }
    let mut sum = hsum(sumv);
    while j < len {
        scores[j] = (scores[j] - max).exp();
        sum += scores[j];
        j += 1;
    }
    let inv = 1.0 / sum;
    for sc in scores.iter_mut() {
        *sc *= inv;
    }
}

/// `out[c] += Σ_{j ∈ range} p[j] · V[j][c]`, values rows of `out.len()`.
///
/// Safety: AVX2/FMA/F16C present; `p` and `values` cover `range`.
#[inline(always)]
unsafe fn accumulate_values<E: Lanes8>(
    p: &[f32],
    values: &[E],
    range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let hd = out.len();
    // 64 columns per pass where the head allows (a whole SmolLM2 head: one
    // broadcast of each score serves eight vectors), then 32, then 8
    let mut c0 = 0;
    while c0 + 64 <= hd {
        weighted_value_sum::<8, E>(p, values, range.clone(), c0, out);
        c0 += 64;
    }
    while c0 + 32 <= hd {
        weighted_value_sum::<4, E>(p, values, range.clone(), c0, out);
        c0 += 32;
    }
    while c0 + 8 <= hd {
        weighted_value_sum::<1, E>(p, values, range.clone(), c0, out);
        c0 += 8;
    }
    for (c, o) in out.iter_mut().enumerate().skip(c0) {
        for j in range.clone() {
            *o += p[j] * values[j * hd + c].widen();
        }
    }
}
