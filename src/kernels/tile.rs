//! The tile ABI: what the matmul driver ([`super::matmul`]) hands a kernel
//! set's register-tile and rows-in-lanes kernels, as plain function-pointer
//! types stored in each set's [`Isa`](super::Isa) table, and the views of
//! weight rows they read.

use crate::quant::{Q4K_SCALE_BYTES, Q4K_SUBS};
use half::f16;

/// Largest register tile a kernel set may use: `out[r * MAX_TILE_T + t]`.
pub(crate) const MAX_TILE_R: usize = 16;
pub(crate) const MAX_TILE_T: usize = 8;
pub(crate) const MAX_TILE: usize = MAX_TILE_R * MAX_TILE_T;

/// A register-tiled quantized block kernel: computes the dot products of
/// `nr` consecutive weight rows (`w`: their quant bytes, `wd`: their scales,
/// `nb` blocks per row) with `nt` consecutive quantized activation rows (`aq`,
/// `ad`; `A` is i8 for 4-bit weights, i16 for 8-bit), writing row `r`, token
/// `t` to `out[r * MAX_TILE_T + t]`.
/// `nr <= tile_rows`, `nt <= tile_tokens` of the owning [`Isa`].
pub(crate) type QTileFn<A = i8> = fn(
    w: &[u8],
    wd: &[f16],
    aq: &[A],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
);

/// Sub-blocks (32-blocks) per activation scale of a q4k matmul: half a q4k
/// group (see [`scalar::quantize_act_grouped`]).
pub const Q4K_ACT_SUBS: usize = Q4K_SUBS / 2;

/// A register-tiled kernel for q4k weights: like [`QTileFn`] with the three
/// planes of `nr` consecutive rows in `w`, activations with one scale per
/// [`Q4K_ACT_SUBS`] blocks (`ad[t * nh + h]`, `nh = nb.div_ceil(Q4K_ACT_SUBS)`)
/// and, besides them,
/// `asum[t * nb + b]`, the sum of token `t`'s quants in block `b` (from
/// [`act_block_sums`]), for the `dmin * m` term. A row's last group is
/// shorter when `nb` is not a multiple of [`Q4K_SUBS`].
pub(crate) type Q4kTileFn = fn(
    w: KRows,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
);

/// Consecutive rows of a q4k matrix: their quant bytes (16 per sub-block),
/// `(d, dmin)` pairs (one per group) and packed scales (12 bytes per group).
#[derive(Clone, Copy)]
pub(crate) struct KRows<'a> {
    pub qs: &'a [u8],
    pub dm: &'a [f16],
    pub sc: &'a [u8],
}

impl KRows<'_> {
    /// Checks that the planes hold `nr` rows of `nb` sub-blocks.
    pub fn check(&self, nb: usize, nr: usize) {
        let ng = nb.div_ceil(Q4K_SUBS);
        assert!(
            self.qs.len() >= nr * nb * 16
                && self.dm.len() >= nr * ng * 2
                && self.sc.len() >= nr * ng * Q4K_SCALE_BYTES,
            "q4k tile: slices shorter than the tile"
        );
    }
}

/// Calls `$f::<R, T>(args)` for the register tile `(nr, nt)` (R <= 4,
/// T <= 2): the one list of tile shapes the SIMD sets instantiate.
macro_rules! dispatch_tile {
    ($nr:expr, $nt:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match ($nr, $nt) {
            (4, 1) => $f::<4, 1>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (1, 1) => $f::<1, 1>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            (r, t) => panic!("tile {r}x{t} larger than 4x2"),
        }
    };
}
#[allow(unused_imports)]
pub(crate) use dispatch_tile;

/// Makes a [`QTileFn`] for tiles up to 4 rows × 2 tokens: a safe wrapper
/// that checks the slices and picks the instantiation of `$body`, an unsafe
/// `#[target_feature]` function generic over the tile shape whose only
/// precondition is those slice lengths. Only for bodies whose features the
/// owning [`Isa`] table checks before it is handed out.
///
/// The longer form first makes that body, `$inner`: a `#[target_feature]`
/// instance of the `#[inline(always)]` body `$body::<$dot, R, T>`, generic
/// over how a set forms its integer dot products.
#[allow(unused_macros)]
macro_rules! tile_fn {
    ($vis:vis $name:ident, $inner:ident, $body:ident, $dot:ty, $features:literal, $row_bytes:expr, $act:ty) => {
        #[target_feature(enable = $features)]
        unsafe fn $inner<const R: usize, const T: usize>(
            w: &[u8],
            wd: &[f16],
            aq: &[$act],
            ad: &[f32],
            nb: usize,
            out: &mut [f32; MAX_TILE],
        ) {
            // SAFETY: the caller checked the slice lengths for an R×T tile.
            unsafe { $body::<$dot, R, T>(w, wd, aq, ad, nb, out) }
        }

        $crate::kernels::tile::tile_fn!($vis $name, $inner, $row_bytes, $act);
    };
    ($vis:vis $name:ident, $body:ident, $row_bytes:expr, $act:ty) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(
            w: &[u8],
            wd: &[f16],
            aq: &[$act],
            ad: &[f32],
            nb: usize,
            nr: usize,
            nt: usize,
            out: &mut [f32; MAX_TILE],
        ) {
            assert!(
                w.len() >= nr * nb * $row_bytes
                    && wd.len() >= nr * nb
                    && aq.len() >= nt * nb * BLOCK
                    && ad.len() >= nt * nb,
                "tile: slices shorter than the tile"
            );
            // SAFETY: only reachable through an `Isa` table handed out after
            // every feature the body enables was detected; slice lengths
            // checked just above.
            unsafe { $crate::kernels::tile::dispatch_tile!(nr, nt, $body(w, wd, aq, ad, nb, out)) }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use tile_fn;

/// Makes a q4k tile function for a SIMD set's [`Q4kTileFn`] slot: a
/// `#[target_feature]` instance of the set's body `$body::<$dot, R, T>` per
/// tile shape, and a safe wrapper that checks the slices and picks the shape.
#[allow(unused_macros)]
macro_rules! q4k_tile_fn {
    ($vis:vis $name:ident, $inner:ident, $body:ident, $dot:ty, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $inner<const R: usize, const T: usize>(
            w: KRows,
            aq: &[i8],
            ad: &[f32],
            asum: &[i32],
            nb: usize,
            out: &mut [f32; MAX_TILE],
        ) {
            // SAFETY: the caller checked the slice lengths for an R×T tile.
            unsafe { $body::<$dot, R, T>(w, aq, ad, asum, nb, out) }
        }

        #[allow(clippy::too_many_arguments)]
        $vis fn $name(
            w: KRows,
            aq: &[i8],
            ad: &[f32],
            asum: &[i32],
            nb: usize,
            nr: usize,
            nt: usize,
            out: &mut [f32; MAX_TILE],
        ) {
            w.check(nb, nr);
            assert!(
                aq.len() >= nt * nb * BLOCK
                    && ad.len() >= nt * nb.div_ceil($crate::kernels::tile::Q4K_ACT_SUBS)
                    && asum.len() >= nt * nb,
                "q4k tile: activations shorter than the tile"
            );
            // SAFETY: only reachable through a table handed out after the
            // features were detected; slice lengths checked just above.
            unsafe { $crate::kernels::tile::dispatch_tile!(nr, nt, $inner(w, aq, ad, asum, nb, out)) }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use q4k_tile_fn;

/// Prefill kernel for 4-bit weights with the rows in the vector lanes:
/// exactly [`Q4Lanes::rows`] consecutive weight rows (`w`: quant bytes,
/// `row_bytes` apart; `wd`: their scales, `nb` apart) against
/// `nt <= Q4Lanes::tokens` quantized activation rows, writing row `r`, token
/// `t` to `out[r * MAX_TILE_T + t]`. `asum[t * nb + b]` is the sum of token
/// `t`'s quants in block `b` (from [`act_block_sums`]), with which the kernel
/// applies the Q4 offset `-8` once per block instead of once per weight.
///
/// The planar layout stores each row's blocks contiguously; the kernel
/// transposes the rows' unpacked blocks in registers once and reuses them for
/// every token, so one vector instruction serves 8 or 16 rows where the row
/// tiles need one per row.
pub(crate) type Q4LanesFn = fn(
    w: &[u8],
    row_bytes: usize,
    wd: &[f16],
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
);

/// Prefill kernel for q4k weights with the rows in the vector lanes: like
/// [`Q4LanesFn`], with the three planes of exactly [`Q4Lanes::rows`]
/// consecutive rows in `w` (see [`KRows`]), one activation scale per
/// [`Q4K_ACT_SUBS`] blocks (as [`Q4kTileFn`]) and the `dmin * m` term taken from `asum`.
pub(crate) type Q4kLanesFn = fn(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
);

/// The rows-in-lanes kernel of a 4-bit type (only the x86 sets have them).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum LanesKernel {
    Q4(Q4LanesFn),
    Q4K(Q4kLanesFn),
}

/// A rows-in-lanes kernel and its shape.
#[derive(Clone, Copy)]
pub(crate) struct Q4Lanes {
    /// Weight rows per call (the vector's i32 lanes).
    pub rows: usize,
    /// Most tokens per call.
    pub tokens: usize,
    pub kernel: LanesKernel,
}
