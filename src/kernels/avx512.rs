//! x86-64 AVX-512 VNNI kernels on 512-bit vectors, for prefill: 4-bit weights
//! with 16 rows in the lanes and `vpdpbusd` (u8 × i8, four products summed
//! into each i32 lane, no intermediate saturation), see [`q4_rows16_vnni`];
//! 8-bit weights one block per `vpdpwssd` (i16 × i16 pairs accumulated into
//! i32). Decode, activation quantization and the f16/f32 helpers use the AVX2
//! kernels: a matrix–vector product streams its weights once, and 512-bit row
//! tiles measured slower than the AVX2 ones there (see [`q8_tile`]).
//!
//! The bodies are private and only reachable through the table [`isa`] returns
//! after detecting every feature they use.

// Tile loops index several parallel register arrays by row and token; index
// loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::avx2;
use super::tile::{
    block_tile, target_instance, BlockRows, KRows, LanesKernel, Q4Lanes, MAX_TILE, MAX_TILE_T,
    Q4K_ACT_SUBS,
};
use super::{Isa, KernelSet};
use crate::quant::BLOCK;
use half::f16;
use std::arch::x86_64::*;

pub(crate) fn isa() -> Option<&'static Isa> {
    let ok = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    ok.then_some(&ISA)
}

static ISA: Isa = Isa {
    set: KernelSet::Avx512,
    tile_rows: 4,
    tile_tokens: 2,
    // the AVX2 helpers need a subset of the features detected above
    quantize_act: avx2::quantize_act,
    quantize_act16: avx2::quantize_act16,
    q4_tile: block_tile::<avx2::Q4Avx2, i8>,
    q8_tile,
    q4k_tile: super::tile::q4k_tile::<avx2::Q4kAvx2>,
    q4_lanes: Some(Q4_ROWS16),
    q4k_lanes: Some(Q4K_ROWS16),
    dot_f32: avx2::dot_f32,
    dot_f16: avx2::dot_f16,
    attend_f16: avx2::attend_f16,
    attend_f32_many: avx2::attend_f32_many,
    swiglu: avx2::swiglu,
};

target_instance!(
    Q8Avx512: BlockTile<i16> = q8_body512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// See [`QTileFn`](super::tile::QTileFn). Decode (one token) streams each weight once from
/// DRAM, where the 256-bit AVX2 loop measured faster here (SmolLM2 q8 tg at one
/// thread: 82 vs 62 t/s, 2026-12-02, AMD EPYC); prefill tiles reuse each
/// weight block for two tokens and gain 5–17% from the 512-bit loop.
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
    if nt == 1 {
        block_tile::<avx2::Q8Avx2, i16>(w, aq, ad, nb, nr, nt, out)
    } else {
        block_tile::<Q8Avx512, i16>(w, aq, ad, nb, nr, nt, out)
    }
}

/// `R` rows of 8-bit blocks × `T` 16-bit activation rows: per block and row
/// one sign-extending load to 32 i16 and one `vpdpwssd` per token (each i32
/// lane sums two products, exact), then a float convert and FMA.
///
/// Safety: the features of [`Q8Avx512`] are enabled; the caller checks
/// `w.len() >= R * nb * 32`, `wd.len() >= R * nb`, `aq.len() >= T * nb * 32`,
/// `ad.len() >= T * nb`.
#[inline(always)]
unsafe fn q8_body512<const R: usize, const T: usize>(
    w: &[u8],
    wd: &[f16],
    aq: &[i16],
    ad: &[f32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let row_bytes = nb * BLOCK;
    let (wp, ap) = (w.as_ptr(), aq.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut prod = [[[0f32; 8]; T]; R];
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        avx2::scale_products::<R, T>(wd.as_ptr(), ad.as_ptr(), nb, b, g, &mut prod);
        for j in 0..g {
            let blk = b + j;
            let mut a = [_mm512_setzero_si512(); T];
            for t in 0..T {
                a[t] = _mm512_loadu_si512(ap.add((t * nb + blk) * BLOCK) as *const __m512i);
            }
            for r in 0..R {
                let p = wp.add(r * row_bytes + blk * BLOCK);
                let q = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i));
                for t in 0..T {
                    let s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q, a[t]);
                    let scale = _mm512_set1_ps(prod[r][t][j]);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r][t]);
                }
            }
        }
        b += g;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// Tokens per call of [`q4_rows16`]: the transposes of a block are shared by
/// this many tokens.
const ROWS16_TOKENS: usize = 8;

const Q4_ROWS16: Q4Lanes = Q4Lanes {
    rows: 16,
    tokens: ROWS16_TOKENS,
    kernel: LanesKernel::Q4(q4_rows16),
};

const Q4K_ROWS16: Q4Lanes = Q4Lanes {
    rows: 16,
    tokens: ROWS16_TOKENS,
    kernel: LanesKernel::Q4K(q4k_rows16),
};

/// See [`Q4LanesFn`](super::tile::Q4LanesFn): 16 rows, one per i32 lane of a
/// 512-bit vector.
#[allow(clippy::too_many_arguments)]
fn q4_rows16(
    w: BlockRows,
    row_bytes: usize,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let (w, wd) = (w.qs, w.d);
    assert!(
        (1..=ROWS16_TOKENS).contains(&nt)
            && row_bytes >= nb * 16
            && w.len() >= 15 * row_bytes + nb * 16
            && wd.len() >= 16 * nb
            && aq.len() >= nt * nb * BLOCK
            && ad.len() >= nt * nb
            && asum.len() >= nt * nb,
        "q4_rows16: slices shorter than the tile"
    );
    // SAFETY: only reachable through `ISA`, handed out after every feature
    // the body enables was detected; the slice lengths were checked above.
    unsafe {
        match nt {
            1 => q4_rows16_vnni::<1>(w, row_bytes, wd, nb, aq, ad, asum, out),
            2 => q4_rows16_vnni::<2>(w, row_bytes, wd, nb, aq, ad, asum, out),
            3 => q4_rows16_vnni::<3>(w, row_bytes, wd, nb, aq, ad, asum, out),
            4 => q4_rows16_vnni::<4>(w, row_bytes, wd, nb, aq, ad, asum, out),
            5 => q4_rows16_vnni::<5>(w, row_bytes, wd, nb, aq, ad, asum, out),
            6 => q4_rows16_vnni::<6>(w, row_bytes, wd, nb, aq, ad, asum, out),
            7 => q4_rows16_vnni::<7>(w, row_bytes, wd, nb, aq, ad, asum, out),
            _ => q4_rows16_vnni::<8>(w, row_bytes, wd, nb, aq, ad, asum, out),
        }
    }
}

/// 16 rows × `T` tokens, rows in lanes. Per block: the 16 rows' nibbles,
/// four rows per register (row `4l + i` in 128-bit lane `l` of register `i`),
/// are transposed as 4-byte groups within each lane so that register `k`
/// holds weights `4k..4k+4` of all 16 rows in row order; then per token one
/// `vpdpbusd` per group against the matching 4 activation bytes broadcast,
/// started from `-8 * sum a` (exact in i32; `asum` holds `sum a`).
///
/// Safety: the caller checks the lengths asserted in [`q4_rows16`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_rows16_vnni<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    wd: &[f16],
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    out: &mut [f32; MAX_TILE],
) {
    let (wp, ap) = (w.as_ptr(), aq.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        let dw = scales_16x8(wd.as_ptr(), nb, b, g);
        for (j, dwj) in dw.iter().enumerate().take(g) {
            let blk = b + j;
            let c = nibbles_16_rows(wp.add(blk * 16), row_bytes);
            for t in 0..T {
                let a = ap.add((t * nb + blk) * BLOCK) as *const i32;
                let mut s = _mm512_set1_epi32(-8 * asum[t * nb + blk]);
                for (k, ck) in c.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, *ck, _mm512_set1_epi32(a.add(k).read_unaligned()));
                }
                let scale = _mm512_mul_ps(*dwj, _mm512_set1_ps(ad[t * nb + blk]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);
            }
        }
        b += g;
    }
    for t in 0..T {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]);
        for (r, &x) in lanes.iter().enumerate() {
            out[r * MAX_TILE_T + t] = x;
        }
    }
}

/// The 32 nibbles of one block of 16 rows (`p`: row 0's 16 bytes, rows
/// `row_bytes` apart) with the rows in lanes: four rows per register (row
/// `4l + i` in 128-bit lane `l` of register `i`) transposed as 4-byte groups
/// within each lane, so that `out[k]` holds weights `4k..4k+4` of all 16 rows
/// in row order (low nibbles: weights 0..16, high: 16..32), as unsigned bytes.
///
/// Safety: the 16 rows' 16 bytes are readable.
#[inline(always)]
unsafe fn nibbles_16_rows(p: *const u8, row_bytes: usize) -> [__m512i; 8] {
    let mask = _mm512_set1_epi8(0x0f);
    let row = |r: usize| _mm_loadu_si128(p.add(r * row_bytes) as *const __m128i);
    let mut lo = [_mm512_setzero_si512(); 4];
    let mut hi = [_mm512_setzero_si512(); 4];
    for i in 0..4 {
        let v = _mm512_castsi128_si512(row(i));
        let v = _mm512_inserti32x4::<1>(v, row(4 + i));
        let v = _mm512_inserti32x4::<2>(v, row(8 + i));
        let v = _mm512_inserti32x4::<3>(v, row(12 + i));
        lo[i] = _mm512_and_si512(v, mask);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
    }
    let (c0, c1) = (transpose4x4_epi32(&lo), transpose4x4_epi32(&hi));
    [c0[0], c0[1], c0[2], c0[3], c1[0], c1[1], c1[2], c1[3]]
}

/// See [`Q4kLanesFn`](super::tile::Q4kLanesFn): 16 rows, one per i32 lane of a 512-bit vector.
#[allow(clippy::too_many_arguments)]
fn q4k_rows16(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    w.check(nb, 16);
    assert!(
        (1..=ROWS16_TOKENS).contains(&nt)
            && aq.len() >= nt * nb * BLOCK
            && ad.len() >= nt * nb.div_ceil(Q4K_ACT_SUBS)
            && asum.len() >= nt * nb,
        "q4k_rows16: activations shorter than the tile"
    );
    // SAFETY: only reachable through `ISA`, handed out after every feature
    // the body enables was detected; the slice lengths were checked above.
    unsafe {
        match nt {
            1 => q4k_rows16_vnni::<1>(w, nb, aq, ad, asum, out),
            2 => q4k_rows16_vnni::<2>(w, nb, aq, ad, asum, out),
            3 => q4k_rows16_vnni::<3>(w, nb, aq, ad, asum, out),
            4 => q4k_rows16_vnni::<4>(w, nb, aq, ad, asum, out),
            5 => q4k_rows16_vnni::<5>(w, nb, aq, ad, asum, out),
            6 => q4k_rows16_vnni::<6>(w, nb, aq, ad, asum, out),
            7 => q4k_rows16_vnni::<7>(w, nb, aq, ad, asum, out),
            _ => q4k_rows16_vnni::<8>(w, nb, aq, ad, asum, out),
        }
    }
}

/// 16 q4k rows × `T` tokens, rows in lanes: per sub-block the nibbles as in
/// [`q4_rows16_vnni`] (`vpdpbusd` of the unsigned levels from zero, exact),
/// scaled by the rows' `d * sc` times the token's scale of the half group; per sub-block and
/// token the rows' `dmin * m` times `d_a * Σ a` subtracted. The rows' scales
/// are unpacked once per group with the AVX2 helper and transposed.
///
/// Safety: the caller checks `w` with [`KRows::check`] for 16 rows and the
/// activations for `T` tokens.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_rows16_vnni<const T: usize>(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    out: &mut [f32; MAX_TILE],
) {
    let ng = nb.div_ceil(8);
    let row_bytes = nb * 16;
    let (wp, ap) = (w.qs.as_ptr(), aq.as_ptr());
    let (dp, sp) = (w.dm.as_ptr() as *const i32, w.sc.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    for g in 0..ng {
        let nk = (nb - 8 * g).min(8);
        // rows r and r + 8 share register r: (d * sc, dmin * m) per sub-block
        let mut dsc = [_mm512_setzero_ps(); 8];
        let mut dmn = [_mm512_setzero_ps(); 8];
        for r in 0..8 {
            let half = |r: usize| {
                let gi = r * ng + g;
                // (d, dmin) in alternate lanes
                let dd = _mm256_cvtph_ps(_mm_set1_epi32(dp.add(gi).read_unaligned()));
                let (sc, m) = avx2::unpack_q4k_scales(sp.add(gi * 12));
                (
                    _mm256_mul_ps(_mm256_permute_ps(dd, 0b00_00_00_00), _mm256_cvtepi32_ps(sc)),
                    _mm256_mul_ps(_mm256_permute_ps(dd, 0b01_01_01_01), _mm256_cvtepi32_ps(m)),
                )
            };
            let ((s0, m0), (s1, m1)) = (half(r), half(r + 8));
            dsc[r] = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(s0), s1);
            dmn[r] = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(m0), m1);
        }
        let (dsc, dmn) = (transpose_16x8(dsc), transpose_16x8(dmn));
        for k in 0..nk {
            let blk = 8 * g + k;
            let c = nibbles_16_rows(wp.add(blk * 16), row_bytes);
            for t in 0..T {
                let a = ap.add((t * nb + blk) * BLOCK) as *const i32;
                let mut s = _mm512_setzero_si512();
                for (j, cj) in c.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, *cj, _mm512_set1_epi32(a.add(j).read_unaligned()));
                }
                let at = ad[t * nb.div_ceil(Q4K_ACT_SUBS) + blk / Q4K_ACT_SUBS];
                let scale = _mm512_mul_ps(dsc[k], _mm512_set1_ps(at));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);
                let amin = _mm512_set1_ps(at * asum[t * nb + blk] as f32);
                acc[t] = _mm512_fnmadd_ps(dmn[k], amin, acc[t]);
            }
        }
    }
    for t in 0..T {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]);
        for (r, &x) in lanes.iter().enumerate() {
            out[r * MAX_TILE_T + t] = x;
        }
    }
}

/// Within each 128-bit lane, `out[k]` = 32-bit element `k` of every input,
/// input `i` in element `i`.
#[inline(always)]
unsafe fn transpose4x4_epi32(v: &[__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm512_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm512_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm512_unpackhi_epi32(v[2], v[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// The scales of blocks `b..b + g` (`g <= 8`) of 16 rows `nb` apart, as
/// f32: `out[j]` lane `r` = row `r`'s scale of block `b + j` (lanes of
/// `j >= g` are zero). An 8×8 transpose in each 256-bit half, rows `r` and
/// `r + 8` sharing a register.
#[inline(always)]
unsafe fn scales_16x8(dp: *const f16, nb: usize, b: usize, g: usize) -> [__m512; 8] {
    let k: __mmask8 = (0xffu32 >> (8 - g)) as u8;
    let load = |r: usize| _mm_maskz_loadu_epi16(k, dp.add(r * nb + b) as *const i16);
    transpose_16x8(std::array::from_fn(|r| {
        _mm512_cvtph_ps(_mm256_set_m128i(load(r + 8), load(r)))
    }))
}

/// A 16×8 transpose of f32 values: `v[r]` holds row `r`'s 8 values in its
/// low 256 bits and row `r + 8`'s in its high 256 bits; `out[j]` lane `r`
/// is row `r`'s value `j`. An 8×8 transpose in each 256-bit half.
#[inline(always)]
unsafe fn transpose_16x8(v: [__m512; 8]) -> [__m512; 8] {
    let t: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // within each 128-bit lane: u[4h + m] element e = v[4h + e][lane position m]
    let u: [__m512; 8] = std::array::from_fn(|i| {
        let h = i / 4 * 4;
        match i % 4 {
            0 => _mm512_shuffle_ps::<0x44>(t[h], t[h + 2]),
            1 => _mm512_shuffle_ps::<0xee>(t[h], t[h + 2]),
            2 => _mm512_shuffle_ps::<0x44>(t[h + 1], t[h + 3]),
            _ => _mm512_shuffle_ps::<0xee>(t[h + 1], t[h + 3]),
        }
    });
    // join the 128-bit lanes of rows 0..4 and 4..8 in each 256-bit half
    let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    let second = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    std::array::from_fn(|j| {
        let (x, y) = (u[j % 4], u[4 + j % 4]);
        if j < 4 {
            _mm512_permutex2var_ps(x, first, y)
        } else {
            _mm512_permutex2var_ps(x, second, y)
        }
    })
}
