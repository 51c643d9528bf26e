//! aarch64 NEON kernels, with and without the dot-product extension.
//!
//! 4-bit block dot products: 16 weights × 16 activations per instruction with
//! `sdot` (FEAT_DotProd; written as inline assembly because `vdotq_s32` is not
//! stable in Rust 1.95), otherwise `smull`/`smlal2` into i16 and a pairwise
//! widening add into i32, as llama.cpp's `ggml_vdotq_s32` fallback does.
//! 8-bit weights meet 16-bit activations, which `sdot` cannot take: both sets
//! widen the weights (`sxtl`) and multiply-accumulate i16 × i16 into i32
//! (`smull`/`smlal2`). All are exact for our ranges, so the per-block integer
//! sums equal the scalar reference's. f16 → f32 uses `fcvtl`, which every ARMv8 NEON has (the
//! `vcvt_f32_f16` intrinsic would demand the separate `fp16` feature).
//!
//! Every `#[target_feature]` function here is private; the only way in is an
//! [`Isa`] table returned by [`isa_plain`] / [`isa_dotprod`], which check the
//! CPU first.

// Tile loops index several parallel register arrays by row and token; index
// loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::tile::{
    block_tile, q4k_tile, target_instance, KRows, MAX_TILE, MAX_TILE_T, Q4K_ACT_SUBS,
};
use super::{Isa, KernelSet};
use crate::quant::{q4k_unpack_scales, BLOCK, Q4K_SCALE_BYTES};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

pub(crate) fn isa_plain() -> Option<&'static Isa> {
    std::arch::is_aarch64_feature_detected!("neon").then_some(&ISA_PLAIN)
}

pub(crate) fn isa_dotprod() -> Option<&'static Isa> {
    let ok = std::arch::is_aarch64_feature_detected!("neon")
        && std::arch::is_aarch64_feature_detected!("dotprod");
    ok.then_some(&ISA_DOT)
}

static ISA_PLAIN: Isa = Isa {
    set: KernelSet::Neon,
    tile_rows: 4,
    tile_tokens: 2,
    quantize_act,
    quantize_act16,
    q4_tile: block_tile::<Q4Plain, i8>,
    q8_tile: block_tile::<Q8Plain, i16>,
    q4k_tile: q4k_tile::<Q4kPlain>,
    q4_lanes: None,
    q4k_lanes: None,
    dot_f32,
    dot_f16,
    attend_f16,
    attend_f32_many,
    swiglu: super::scalar::swiglu,
};

static ISA_DOT: Isa = Isa {
    set: KernelSet::NeonDotprod,
    tile_rows: 4,
    tile_tokens: 2,
    quantize_act,
    quantize_act16,
    q4_tile: block_tile::<Q4Dot, i8>,
    q8_tile: block_tile::<Q8Dot, i16>,
    q4k_tile: q4k_tile::<Q4kDot>,
    q4_lanes: None,
    q4k_lanes: None,
    dot_f32,
    dot_f16,
    attend_f16,
    attend_f32_many,
    swiglu: super::scalar::swiglu,
};

// The safe wrappers below are only stored in the tables above, which are handed
// out after detecting the features their bodies use. Each checks the slice
// lengths its unsafe body relies on.

fn quantize_act(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize) {
    assert!(qs.len() == x.len() && x.len() == d.len() * blocks * BLOCK);
    // SAFETY: NEON detected; lengths checked.
    unsafe { quantize_act_neon(x, qs, d, blocks) }
}

fn quantize_act16(x: &[f32], qs: &mut [i16], d: &mut [f32]) {
    assert!(x.len().is_multiple_of(BLOCK) && qs.len() == x.len() && d.len() == x.len() / BLOCK);
    // SAFETY: NEON detected; lengths checked.
    unsafe { quantize_act16_neon(x, qs, d) }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: NEON detected; equal lengths checked.
    unsafe { dot_neon(a, b) }
}

fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: NEON detected; equal lengths checked.
    unsafe { dot_neon(a, b) }
}

fn attend_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend(q, keys, values, scale, scores, out)
}

#[allow(clippy::too_many_arguments)]
fn attend_f32_many(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    super::attend_many_with(attend::<f32>, q, lens, keys, values, scale, scores, out)
}

/// The reference attention on this set's dot and axpy; one body for f16 and
/// f32 caches, so a widened cache gives exactly the f16 cache's results.
fn attend<E: Lanes8>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dot = |k: &[E], q: &[f32]| {
        // SAFETY: NEON detected; the slices have equal lengths (hd each).
        unsafe { dot_neon(k, q) }
    };
    let axpy = |o: &mut [f32], s: f32, v: &[E]| {
        // SAFETY: NEON detected; the slices have equal lengths (hd each).
        unsafe { axpy_neon(o, s, v) }
    };
    super::scalar::attend_with(dot, axpy, q, keys, values, scale, scores, out)
}

/// How one 32-weight block's integer dot product is formed.
trait BlockDot {
    /// Four i32 lanes whose sum is `sum w0[i] * a0[i] + sum w1[i] * a1[i]`.
    unsafe fn dot2(w0: int8x16_t, a0: int8x16_t, w1: int8x16_t, a1: int8x16_t) -> int32x4_t;

    /// Four i32 lanes whose sum is `sum w[k][i] * a[k][i]`: 32 weights
    /// (sign-extended from i8) × 32 16-bit activations. The same for both
    /// sets (`sdot` has no i16 form). Each lane sums eight products, at most
    /// `8 * 128 * 32767 < 2^25`: exact in i32.
    #[inline(always)]
    unsafe fn dot16(w: &[int16x8_t; 4], a: &[int16x8_t; 4]) -> int32x4_t {
        // two independent accumulation chains
        let mut s0 = vmull_s16(vget_low_s16(w[0]), vget_low_s16(a[0]));
        let mut s1 = vmull_s16(vget_low_s16(w[1]), vget_low_s16(a[1]));
        s0 = vmlal_high_s16(s0, w[0], a[0]);
        s1 = vmlal_high_s16(s1, w[1], a[1]);
        s0 = vmlal_s16(s0, vget_low_s16(w[2]), vget_low_s16(a[2]));
        s1 = vmlal_s16(s1, vget_low_s16(w[3]), vget_low_s16(a[3]));
        s0 = vmlal_high_s16(s0, w[2], a[2]);
        s1 = vmlal_high_s16(s1, w[3], a[3]);
        vaddq_s32(s0, s1)
    }
}

struct Sdot;
impl BlockDot for Sdot {
    #[inline(always)]
    unsafe fn dot2(w0: int8x16_t, a0: int8x16_t, w1: int8x16_t, a1: int8x16_t) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: only instantiated inside `#[target_feature(enable = "dotprod")]`
        // functions reachable after detecting dotprod; register-only, no memory.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {w0:v}.16b, {a0:v}.16b",
                "sdot {acc:v}.4s, {w1:v}.16b, {a1:v}.16b",
                acc = inout(vreg) acc,
                w0 = in(vreg) w0, a0 = in(vreg) a0, w1 = in(vreg) w1, a1 = in(vreg) a1,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }
}

struct Mull;
impl BlockDot for Mull {
    /// |w| <= 128, |a| <= 127: a sum of two products is at most 32512 and
    /// fits i16; pairs are then widened to i32, so nothing saturates or wraps.
    #[inline(always)]
    unsafe fn dot2(w0: int8x16_t, a0: int8x16_t, w1: int8x16_t, a1: int8x16_t) -> int32x4_t {
        let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(a0)), w0, a0);
        let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(a1)), w1, a1);
        vpadalq_s16(vpaddlq_s16(p0), p1)
    }
}

/// Eight f16 (as bits) to two f32x4.
#[inline(always)]
unsafe fn cvt_f16x8(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: fcvtl/fcvtl2 are base ARMv8 NEON; register-only.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            // `lo` is written before `h` is last read, so it must not share
            // `h`'s register (`lateout` would allow that)
            lo = out(vreg) lo, hi = lateout(vreg) hi, h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

/// `prod[r][t][j] = wd[r][b + j] * ad[t][b + j]` for blocks `b..b + g`, g <= 8.
#[inline(always)]
unsafe fn scale_products<const R: usize, const T: usize>(
    wd: *const f16,
    ad: *const f32,
    nb: usize,
    b: usize,
    g: usize,
    prod: &mut [[[f32; 8]; T]; R],
) {
    if g == 8 {
        for r in 0..R {
            let (w0, w1) = cvt_f16x8(vld1q_u16(wd.add(r * nb + b) as *const u16));
            for t in 0..T {
                let a = ad.add(t * nb + b);
                vst1q_f32(prod[r][t].as_mut_ptr(), vmulq_f32(w0, vld1q_f32(a)));
                vst1q_f32(
                    prod[r][t].as_mut_ptr().add(4),
                    vmulq_f32(w1, vld1q_f32(a.add(4))),
                );
            }
        }
    } else {
        for r in 0..R {
            for t in 0..T {
                for j in 0..g {
                    prod[r][t][j] = (*wd.add(r * nb + b + j)).to_f32() * *ad.add(t * nb + b + j);
                }
            }
        }
    }
}

/// `R` rows of 4-bit blocks × `T` activation rows; nibbles are made signed
/// (q - 8, in -8..=7) before the dot product.
#[inline(always)]
unsafe fn q4_body<D: BlockDot, const R: usize, const T: usize>(
    w: &[u8],
    wd: &[f16],
    aq: &[i8],
    ad: &[f32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let row_bytes = nb * 16;
    let mask = vdupq_n_u8(0x0f);
    let eight = vdupq_n_s8(8);
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    let mut prod = [[[0f32; 8]; T]; R];
    let (wp, ap) = (w.as_ptr(), aq.as_ptr());
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        scale_products::<R, T>(wd.as_ptr(), ad.as_ptr(), nb, b, g, &mut prod);
        for j in 0..g {
            let blk = b + j;
            let mut a = [(vdupq_n_s8(0), vdupq_n_s8(0)); T];
            for t in 0..T {
                let p = ap.add((t * nb + blk) * BLOCK);
                a[t] = (vld1q_s8(p), vld1q_s8(p.add(16)));
            }
            for r in 0..R {
                let raw = vld1q_u8(wp.add(r * row_bytes + blk * 16));
                let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, mask)), eight);
                let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
                for t in 0..T {
                    let s = D::dot2(lo, a[t].0, hi, a[t].1);
                    acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(s), prod[r][t][j]);
                }
            }
        }
        b += g;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = vaddvq_f32(acc[r][t]);
        }
    }
}

/// `R` rows of 8-bit blocks × `T` 16-bit activation rows; each weight block
/// is widened to i16 once per row and used for every token.
#[inline(always)]
unsafe fn q8_body<D: BlockDot, const R: usize, const T: usize>(
    w: &[u8],
    wd: &[f16],
    aq: &[i16],
    ad: &[f32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let row_bytes = nb * BLOCK;
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    let mut prod = [[[0f32; 8]; T]; R];
    let (wp, ap) = (w.as_ptr() as *const i8, aq.as_ptr());
    let mut b = 0;
    while b < nb {
        let g = (nb - b).min(8);
        scale_products::<R, T>(wd.as_ptr(), ad.as_ptr(), nb, b, g, &mut prod);
        for j in 0..g {
            let blk = b + j;
            let mut a = [[vdupq_n_s16(0); 4]; T];
            for t in 0..T {
                let p = ap.add((t * nb + blk) * BLOCK);
                a[t] = [
                    vld1q_s16(p),
                    vld1q_s16(p.add(8)),
                    vld1q_s16(p.add(16)),
                    vld1q_s16(p.add(24)),
                ];
            }
            for r in 0..R {
                let p = wp.add(r * row_bytes + blk * BLOCK);
                let (w0, w1) = (vld1q_s8(p), vld1q_s8(p.add(16)));
                let w16 = [
                    vmovl_s8(vget_low_s8(w0)),
                    vmovl_high_s8(w0),
                    vmovl_s8(vget_low_s8(w1)),
                    vmovl_high_s8(w1),
                ];
                for t in 0..T {
                    let s = D::dot16(&w16, &a[t]);
                    acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(s), prod[r][t][j]);
                }
            }
        }
        b += g;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = vaddvq_f32(acc[r][t]);
        }
    }
}

// The q4k tile's per-group vectors of block sums (one 4-lane vector or
// 128-bit lane per activation scale) assume half groups of 4 sub-blocks.
const _: () = assert!(Q4K_ACT_SUBS == 4);

/// `R` rows of q4k weights × `T` 8-bit activation rows with one scale per
/// half group ([`Q4K_ACT_SUBS`] sub-blocks): per sub-block the unsigned
/// nibbles (0..=15, valid as i8) dotted with the activations by `D::dot2` and
/// multiplied by the 6-bit `sc` in integers (each lane gathers at most
/// `4 * 63 * 8 * 15 * 127 < 2^22` per half, so its conversion is exact); per
/// half `d * d_a` times that; per group `dmin * m * d_a * Σ a` of the 8
/// sub-blocks in two vectors (one per half) subtracted.
#[inline(always)]
unsafe fn q4k_body<D: BlockDot, const R: usize, const T: usize>(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    out: &mut [f32; MAX_TILE],
) {
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    for g in 0..nb / 8 {
        q4k_group::<D, R, T>(w, aq, ad, asum, nb, g, 8, &mut acc);
    }
    if !nb.is_multiple_of(8) {
        q4k_group::<D, R, T>(w, aq, ad, asum, nb, nb / 8, nb % 8, &mut acc);
    }
    for r in 0..R {
        for t in 0..T {
            out[r * MAX_TILE_T + t] = vaddvq_f32(acc[r][t]);
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
unsafe fn q4k_group<D: BlockDot, const R: usize, const T: usize>(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    g: usize,
    nk: usize,
    acc: &mut [[float32x4_t; T]; R],
) {
    let ng = nb.div_ceil(8);
    let row_bytes = nb * 16;
    let mask = vdupq_n_u8(0x0f);
    let mut scs = [[0i32; 8]; R];
    let mut d_row = [0f32; R];
    let (wp, ap) = (w.qs.as_ptr(), aq.as_ptr());
    let nh = nb.div_ceil(Q4K_ACT_SUBS);
    let mut adv = [[0f32; 2]; T];
    let mut amin = [[vdupq_n_f32(0.0); 2]; T];
    for t in 0..T {
        let i = t * nb + 8 * g;
        let mut spad = [0i32; 8];
        let sptr = if nk == 8 {
            asum.as_ptr().add(i)
        } else {
            spad[..nk].copy_from_slice(&asum[i..i + nk]);
            spad.as_ptr()
        };
        for h in 0..2 {
            // a short group may have no second half
            if Q4K_ACT_SUBS * h < nk {
                adv[t][h] = ad[t * nh + 2 * g + h];
            }
            let s = vcvtq_f32_s32(vld1q_s32(sptr.add(4 * h)));
            amin[t][h] = vmulq_n_f32(s, adv[t][h]);
        }
    }
    for r in 0..R {
        let gi = r * ng + g;
        let (d, dmin) = (w.dm[2 * gi].to_f32(), w.dm[2 * gi + 1].to_f32());
        let (sc, m) = q4k_unpack_scales(&w.sc[gi * Q4K_SCALE_BYTES..]);
        let to_f32 = |v: &[u8; 8], h: usize| {
            let lanes = [
                v[4 * h] as f32,
                v[4 * h + 1] as f32,
                v[4 * h + 2] as f32,
                v[4 * h + 3] as f32,
            ];
            vld1q_f32(lanes.as_ptr())
        };
        for h in 0..2 {
            let dm = vmulq_n_f32(to_f32(&m, h), dmin);
            for t in 0..T {
                acc[r][t] = vfmsq_f32(acc[r][t], dm, amin[t][h]);
            }
        }
        scs[r] = sc.map(i32::from);
        d_row[r] = d;
    }
    let mut isum = [[vdupq_n_s32(0); T]; R];
    for k in 0..nk {
        let blk = 8 * g + k;
        let mut a = [(vdupq_n_s8(0), vdupq_n_s8(0)); T];
        for t in 0..T {
            let p = ap.add((t * nb + blk) * BLOCK);
            a[t] = (vld1q_s8(p), vld1q_s8(p.add(16)));
        }
        for r in 0..R {
            let raw = vld1q_u8(wp.add(r * row_bytes + blk * 16));
            let lo = vreinterpretq_s8_u8(vandq_u8(raw, mask));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
            for t in 0..T {
                let s = D::dot2(lo, a[t].0, hi, a[t].1);
                isum[r][t] = vmlaq_n_s32(isum[r][t], s, scs[r][k]);
            }
        }
        // the end of a half: its integer sums times `d` and its activation scale
        if (k + 1).is_multiple_of(Q4K_ACT_SUBS) || k + 1 == nk {
            let h = k / Q4K_ACT_SUBS;
            for r in 0..R {
                for t in 0..T {
                    let f = vcvtq_f32_s32(isum[r][t]);
                    acc[r][t] = vfmaq_n_f32(acc[r][t], f, d_row[r] * adv[t][h]);
                    isum[r][t] = vdupq_n_s32(0);
                }
            }
        }
    }
}

target_instance!(Q4Dot: BlockTile<i8> = q4_body::<Sdot>, "neon,dotprod");
target_instance!(Q8Dot: BlockTile<i16> = q8_body::<Sdot>, "neon,dotprod");
target_instance!(Q4kDot: Q4kTile = q4k_body::<Sdot>, "neon,dotprod");
target_instance!(Q4Plain: BlockTile<i8> = q4_body::<Mull>, "neon");
target_instance!(Q8Plain: BlockTile<i16> = q8_body::<Mull>, "neon");
target_instance!(Q4kPlain: Q4kTile = q4k_body::<Mull>, "neon");

/// The 32 values of the block at `xp` and their largest magnitude (exact:
/// max does not round), shared by the 8- and 16-bit activation quantizers.
#[inline(always)]
unsafe fn load_block_absmax(xp: *const f32) -> ([float32x4_t; 8], f32) {
    let mut v = [vdupq_n_f32(0.0); 8];
    let mut m = vdupq_n_f32(0.0);
    for k in 0..8 {
        v[k] = vld1q_f32(xp.add(4 * k));
        m = vmaxq_f32(m, vabsq_f32(v[k]));
    }
    (v, vmaxvq_f32(m))
}

/// Bit-identical to `scalar::quantize_act`: max is exact in any order, the
/// scale and its inverse are the same scalar divisions, `v * inv` is one IEEE
/// multiply, and `fcvtas` rounds to nearest with ties away from zero, exactly
/// like `f32::round`. One scale per run of `blocks` blocks.
#[target_feature(enable = "neon")]
unsafe fn quantize_act_neon(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize) {
    let xp = x.as_ptr();
    for (run, db) in d.iter_mut().enumerate() {
        let first = run * blocks;
        let mut amax = 0f32;
        for blk in first..first + blocks {
            amax = amax.max(load_block_absmax(xp.add(blk * BLOCK)).1);
        }
        *db = amax / 127.0;
        let inv = super::scalar::act_inverse_scale(amax);
        for blk in first..first + blocks {
            let v = load_block_absmax(xp.add(blk * BLOCK)).0;
            let mut q = [vdupq_n_s32(0); 8];
            for k in 0..8 {
                q[k] = vcvtaq_s32_f32(vmulq_n_f32(v[k], inv));
            }
            let h = |i: usize| vcombine_s16(vqmovn_s32(q[i]), vqmovn_s32(q[i + 1]));
            let lo = vcombine_s8(vqmovn_s16(h(0)), vqmovn_s16(h(2)));
            let hi = vcombine_s8(vqmovn_s16(h(4)), vqmovn_s16(h(6)));
            let qp = qs.as_mut_ptr().add(blk * BLOCK);
            vst1q_s8(qp, lo);
            vst1q_s8(qp.add(16), hi);
        }
    }
}

/// 16-bit blocks; bit-identical to `scalar::quantize_act16` for the reasons
/// given at [`quantize_act_neon`] (`|q| <= 32767`, so the narrowing never
/// saturates).
#[target_feature(enable = "neon")]
unsafe fn quantize_act16_neon(x: &[f32], qs: &mut [i16], d: &mut [f32]) {
    for (blk, db) in d.iter_mut().enumerate() {
        let (v, amax) = load_block_absmax(x.as_ptr().add(blk * BLOCK));
        *db = amax / 32767.0;
        let inv = super::scalar::act16_inverse_scale(amax);
        let qp = qs.as_mut_ptr().add(blk * BLOCK);
        for k in 0..4 {
            let lo = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k], inv));
            let hi = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k + 1], inv));
            vst1q_s16(qp.add(8 * k), vcombine_s16(vqmovn_s32(lo), vqmovn_s32(hi)));
        }
    }
}

/// A cached key/value element type: eight of them as two f32x4.
trait Lanes8: Copy {
    /// Safety: NEON present; eight elements readable at `p`.
    unsafe fn load8(p: *const Self) -> (float32x4_t, float32x4_t);
    fn widen(self) -> f32;
}

impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> (float32x4_t, float32x4_t) {
        (vld1q_f32(p), vld1q_f32(p.add(4)))
    }
    fn widen(self) -> f32 {
        self
    }
}

impl Lanes8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> (float32x4_t, float32x4_t) {
        cvt_f16x8(vld1q_u16(p as *const u16))
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Safety: NEON present; `a.len() == b.len()`.
#[target_feature(enable = "neon")]
unsafe fn dot_neon<E: Lanes8>(a: &[E], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        let (x0, x1) = E::load8(pa.add(i));
        let (x2, x3) = E::load8(pa.add(i + 8));
        acc[0] = vfmaq_f32(acc[0], x0, vld1q_f32(pb.add(i)));
        acc[1] = vfmaq_f32(acc[1], x1, vld1q_f32(pb.add(i + 4)));
        acc[2] = vfmaq_f32(acc[2], x2, vld1q_f32(pb.add(i + 8)));
        acc[3] = vfmaq_f32(acc[3], x3, vld1q_f32(pb.add(i + 12)));
        i += 16;
    }
    while i + 8 <= n {
        let (x0, x1) = E::load8(pa.add(i));
        acc[0] = vfmaq_f32(acc[0], x0, vld1q_f32(pb.add(i)));
        acc[1] = vfmaq_f32(acc[1], x1, vld1q_f32(pb.add(i + 4)));
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        sum += a[i].widen() * b[i];
        i += 1;
    }
    sum
}

/// `out += s * v`. Safety: NEON present; `out.len() == v.len()`.
#[target_feature(enable = "neon")]
unsafe fn axpy_neon<E: Lanes8>(out: &mut [f32], s: f32, v: &[E]) {
    let n = out.len();
    let (po, pv) = (out.as_mut_ptr(), v.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let (x0, x1) = E::load8(pv.add(i));
        vst1q_f32(po.add(i), vfmaq_n_f32(vld1q_f32(po.add(i)), x0, s));
        vst1q_f32(po.add(i + 4), vfmaq_n_f32(vld1q_f32(po.add(i + 4)), x1, s));
        i += 8;
    }
    while i < n {
        out[i] += s * v[i].widen();
        i += 1;
    }
}
