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

use super::avx2::{self, q4_body, q4_rows8_body, q4k_body, q4k_rows8_body, ByteDot};
use super::tile::{block_tile, q4k_tile, target_instance, Q4Lanes};
use super::{Isa, KernelSet};
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
    q4_tile: block_tile::<Q4Vnni, i8>,
    q8_tile: block_tile::<avx2::Q8Avx2, i16>,
    q4k_tile: q4k_tile::<Q4kVnni>,
    q4_lanes: Some(Q4_ROWS8),
    q4k_lanes: Some(Q4K_ROWS8),
    dot_f32: avx2::dot_f32,
    dot_f16: avx2::dot_f16,
    attend_f16: avx2::attend_f16,
    attend_f32_many: avx2::attend_f32_many,
    swiglu: avx2::swiglu,
};

target_instance!(Q4Vnni: BlockTile<i8> = q4_body::<Vnni>, "avx2,fma,f16c,avxvnni");
target_instance!(Q4kVnni: Q4kTile = q4k_body::<Vnni>, "avx2,fma,f16c,avxvnni");
target_instance!(
    Q4Rows8Vnni: Q4LanesBody(rows = 8) = q4_rows8_body::<Vnni>,
    "avx2,fma,f16c,avxvnni"
);
target_instance!(
    Q4kRows8Vnni: Q4kLanesBody(rows = 8) = q4k_rows8_body::<Vnni>,
    "avx2,fma,f16c,avxvnni"
);

const Q4_ROWS8: Q4Lanes = Q4Lanes::q4::<Q4Rows8Vnni>();
const Q4K_ROWS8: Q4Lanes = Q4Lanes::q4k::<Q4kRows8Vnni>();

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
