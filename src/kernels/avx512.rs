//! x86-64 AVX-512 VNNI kernels: the AVX2 tile loops with each block's integer
//! dot product done by `vpdpbusd` (4-bit weights: u8 × i8, four products
//! summed into each i32 lane, no intermediate saturation) or two `vpdpwssd`
//! (8-bit weights: i16 × i16 pairs accumulated into i32) on 256-bit vectors
//! (AVX512-VL), which keeps the clock up on CPUs that slow down for 512-bit
//! work. Activation quantization and the f16/f32 helpers are the AVX2 ones.
//!
//! The bodies are private and only reachable through the table [`isa`] returns
//! after detecting every feature they use.

use super::avx2::{self, q4_body, q4k_body, q8_body, tile_fn, BlockDot};
use super::{dispatch_tile, q4k_tile_fn, Isa, KRows, KernelSet, MAX_TILE};
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
    q4_tile,
    q8_tile,
    q4k_tile,
    q4_rows8: Some(avx2::q4_rows8),
    dot_f32: avx2::dot_f32,
    dot_f16: avx2::dot_f16,
    axpy_f16: avx2::axpy_f16,
    attend_f16: avx2::attend_f16,
};

struct Vnni;

impl BlockDot for Vnni {
    /// `-8 * sum a` spread over the lanes, the start value of the q4 dot.
    #[inline(always)]
    unsafe fn q4_prep(a: __m256i) -> __m256i {
        let eights = _mm256_set1_epi8(8);
        _mm256_sub_epi32(
            _mm256_setzero_si256(),
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), eights, a),
        )
    }

    /// `sum q * a - 8 * sum a = sum (q - 8) * a`, exact in i32 (`sum q * a`
    /// for a zero `prep`: q4k).
    #[inline(always)]
    unsafe fn q4(q: __m256i, a: __m256i, prep: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(prep, q, a)
    }

    /// The AVX2 `vpmaddwd` + add, fused: each `vpdpwssd` adds two i16
    /// products per lane without saturating, four products per lane in all.
    #[inline(always)]
    unsafe fn q8(w: [__m256i; 2], a: [__m256i; 2]) -> __m256i {
        let s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), w[0], a[0]);
        _mm256_dpwssd_epi32(s, w[1], a[1])
    }
}

tile_fn!(
    q4_tile,
    q4_tile_vnni,
    q4_body,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    16,
    i8
);
tile_fn!(
    q8_tile,
    q8_tile_vnni,
    q8_body,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    32,
    i16
);
q4k_tile_fn!(
    q4k_tile,
    q4k_tile_vnni,
    q4k_body,
    Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);
