//! x86-64 AVX-VNNI kernels: the AVX2 set with the 4-bit dot products formed
//! by the VEX-encoded 256-bit `vpdpbusd` (u8 × i8, four products summed into
//! each i32 lane and accumulated, no i16 intermediate) and `vpdpwssd`, for
//! CPUs that have AVX-VNNI but no AVX-512 (Alder Lake and later). The 4-bit
//! bodies are the AVX2 ones, instantiated with [`Vnni`] in place of
//! `vpmaddubsw` + `vpmaddwd`; everything VNNI does not shorten (activation
//! quantization, q8's i16 products, f16/f32 dots, attention) is the AVX2
//! entry.
//!
//! The bodies are private and only reachable through the table [`isa`]
//! returns after detecting every feature they use.

use super::avx2::{self, q4_body, q4k_body, rows8_fn, ByteDot, ROWS8_TOKENS};
use super::{Isa, KRows, KernelSet, LanesKernel, Q4Lanes, MAX_TILE, MAX_TILE_T, Q4K_ACT_SUBS};
use crate::quant::BLOCK;
use half::f16;
use std::arch::x86_64::*;

pub(crate) fn isa() -> Option<&'static Isa> {
    let ok = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("avxvnni");
    ok.then_some(&ISA)
}

static ISA: Isa = Isa {
    set: KernelSet::AvxVnni,
    tile_rows: 4,
    tile_tokens: 2,
    // the AVX2 entries need a subset of the features detected above
    quantize_act: avx2::quantize_act,
    quantize_act16: avx2::quantize_act16,
    q4_tile,
    q8_tile: avx2::q8_tile,
    q4k_tile,
    q4_lanes: Some(Q4_ROWS8),
    q4k_lanes: Some(Q4K_ROWS8),
    dot_f32: avx2::dot_f32,
    dot_f16: avx2::dot_f16,
    axpy_f16: avx2::axpy_f16,
    attend_f16: avx2::attend_f16,
    attend_f32_many: avx2::attend_f32_many,
    swiglu: avx2::swiglu,
};

super::tile_fn!(
    q4_tile,
    q4_body_vnni,
    q4_body,
    Vnni,
    "avx2,fma,f16c,avxvnni",
    16,
    i8
);
super::q4k_tile_fn!(
    q4k_tile,
    q4k_tile_vnni,
    q4k_body,
    Vnni,
    "avx2,fma,f16c,avxvnni"
);
rows8_fn!(q4_rows8, q4_rows8_vnni, Vnni, "avx2,fma,f16c,avxvnni");

const Q4_ROWS8: Q4Lanes = Q4Lanes {
    rows: 8,
    tokens: ROWS8_TOKENS,
    kernel: LanesKernel::Q4(q4_rows8),
};

/// `vpdpbusd` (`_mm256_dpbusd_avx_epi32`): `acc + Σ u8 × i8` over each i32
/// lane's four byte pairs, the products and their sum formed exactly in
/// 32 bits; `vpdpwssd` likewise for i16 pairs. Our sums stay far below 2^31
/// (the bounds at each step), so every lane holds the exact integer the AVX2
/// form leaves in it, and the float steps after it are the same.
struct Vnni;

impl ByteDot for Vnni {
    /// `-8 × Σ a` over each lane's four activations: the start of every
    /// row's [`Vnni::q4_dot`], so the offset costs nothing per row.
    #[inline(always)]
    unsafe fn q4_prep(a: __m256i) -> __m256i {
        let zero = _mm256_setzero_si256();
        _mm256_sub_epi32(zero, _mm256_dpbusd_avx_epi32(zero, _mm256_set1_epi8(8), a))
    }

    /// One `vpdpbusd` from `-8 Σ a`: `Σ q a - 8 Σ a = Σ (q - 8) a`, at most
    /// `4 * 15 * 127 + 8 * 4 * 128` in magnitude per lane.
    #[inline(always)]
    unsafe fn q4_dot(q: __m256i, a: __m256i, prep: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(prep, q, a)
    }

    /// The scales as they are: 0..=63 in the low i16 of each lane, zero in
    /// the high one.
    #[inline(always)]
    unsafe fn q4k_scales(sc: __m256i) -> __m256i {
        sc
    }

    /// Two `vpdpbusd` give each lane's `Σ q0 a0 + Σ q1 a1` in i32, at most
    /// `8 * 15 * 127 = 15240` in magnitude, so its low i16 is that value
    /// (sign included) and its high i16 is the sign extension; `vpdpwssd`
    /// multiplies the low i16 by the scale and the high one by zero, and adds
    /// into `isum`.
    #[inline(always)]
    unsafe fn q4k_step(
        isum: __m256i,
        q0: __m256i,
        a0: __m256i,
        q1: __m256i,
        a1: __m256i,
        s: __m256i,
    ) -> __m256i {
        let p = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q0, a0);
        let p = _mm256_dpbusd_avx_epi32(p, q1, a1);
        _mm256_dpwssd_avx_epi32(isum, p, s)
    }

    /// Two chains of four `vpdpbusd` (half the latency of one), the first
    /// started from `-8 Σ a`; each lane at most `32 * 15 * 127 + 8 * 32 * 128`.
    #[inline(always)]
    unsafe fn rows8_dot(c: &[__m256i; 8], a: *const i32, asum: i32) -> __m256i {
        let ak = |k: usize| _mm256_set1_epi32(a.add(k).read_unaligned());
        let mut s0 = _mm256_set1_epi32(-8 * asum);
        let mut s1 = _mm256_setzero_si256();
        for k in (0..8).step_by(2) {
            s0 = _mm256_dpbusd_avx_epi32(s0, c[k], ak(k));
            s1 = _mm256_dpbusd_avx_epi32(s1, c[k + 1], ak(k + 1));
        }
        _mm256_add_epi32(s0, s1)
    }
}

const Q4K_ROWS8: Q4Lanes = Q4Lanes {
    rows: 8,
    tokens: ROWS8_TOKENS,
    kernel: LanesKernel::Q4K(q4k_rows8),
};

/// See [`super::Q4kLanesFn`]: 8 rows, one per i32 lane.
#[allow(clippy::too_many_arguments)]
fn q4k_rows8(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    w.check(nb, 8);
    assert!(
        (1..=ROWS8_TOKENS).contains(&nt)
            && aq.len() >= nt * nb * BLOCK
            && ad.len() >= nt * nb.div_ceil(Q4K_ACT_SUBS)
            && asum.len() >= nt * nb,
        "q4k_rows8: activations shorter than the tile"
    );
    // SAFETY: only reachable through `ISA`, handed out after every feature
    // the body enables was detected; the slice lengths were checked above.
    unsafe {
        match nt {
            1 => q4k_rows8_vnni::<1>(w, nb, aq, ad, asum, out),
            2 => q4k_rows8_vnni::<2>(w, nb, aq, ad, asum, out),
            3 => q4k_rows8_vnni::<3>(w, nb, aq, ad, asum, out),
            _ => q4k_rows8_vnni::<4>(w, nb, aq, ad, asum, out),
        }
    }
}

/// 8 q4k rows × `T` tokens, rows in lanes (the 256-bit form of the AVX-512
/// set's `q4k_rows16_vnni`): per sub-block the rows' nibbles
/// ([`avx2::nibbles_8_rows`]) meet the activations in `vpdpbusd` from zero
/// (the unsigned levels; exact, as [`Vnni::rows8_dot`]), the sum is scaled by
/// the rows' `d * sc` times the token's scale of the half group, and the rows'
/// `dmin * m` times `d_a * Σ a` is subtracted. The rows' scales are unpacked
/// once per group and transposed.
///
/// Safety: the caller checks `w` with [`KRows::check`] for 8 rows and the
/// activations for `T` tokens.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q4k_rows8_vnni<const T: usize>(
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
            let (sc, m) = avx2::unpack_q4k_scales(sp.add(gi * 12));
            dsc[r] = _mm256_mul_ps(_mm256_permute_ps(dd, 0b00_00_00_00), _mm256_cvtepi32_ps(sc));
            dmn[r] = _mm256_mul_ps(_mm256_permute_ps(dd, 0b01_01_01_01), _mm256_cvtepi32_ps(m));
        }
        let (dsc, dmn) = (transpose_8x8(dsc), transpose_8x8(dmn));
        for k in 0..nk {
            let blk = 8 * g + k;
            let c = avx2::nibbles_8_rows(wp.add(blk * 16), row_bytes);
            for t in 0..T {
                let a = ap.add((t * nb + blk) * BLOCK) as *const i32;
                // no offset: q4k's levels are unsigned
                let s = Vnni::rows8_dot(&c, a, 0);
                let at = ad[t * nh + blk / Q4K_ACT_SUBS];
                let scale = _mm256_mul_ps(dsc[k], _mm256_set1_ps(at));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                let amin = _mm256_set1_ps(at * asum[t * nb + blk] as f32);
                acc[t] = _mm256_fnmadd_ps(dmn[k], amin, acc[t]);
            }
        }
    }
    for t in 0..T {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
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
