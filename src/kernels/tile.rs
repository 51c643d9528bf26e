//! The tile ABI: the kernels the matmul driver ([`super::matmul`]) calls, as
//! plain function-pointer types stored in each set's [`Isa`](super::Isa) table, the
//! views of weight rows they read ([`BlockRows`], [`KRows`]), and the one
//! macro, [`target_instance!`], that makes a set's `#[target_feature]`
//! instance of a generic kernel body.
//!
//! A SIMD set writes each kernel once as an `#[inline(always)]` body generic
//! over the tile shape (and over how it forms its integer dot products);
//! [`target_instance!`] stamps a type whose trait method is that body
//! compiled with the set's features, and the safe wrappers here
//! ([`block_tile`], [`q4k_tile`], [`q4_lanes`], [`q4k_lanes`]) check the
//! slices and pick the shape. A wrapper instance is a plain `fn`, stored in
//! the set's table as is: no extra indirection in the driver's loops.

use crate::quant::{BLOCK, Q4K_SCALE_BYTES, Q4K_SUBS};
use half::f16;

/// Largest register tile a kernel set may use: `out[r * MAX_TILE_T + t]`.
pub(crate) const MAX_TILE_R: usize = 16;
pub(crate) const MAX_TILE_T: usize = 8;
pub(crate) const MAX_TILE: usize = MAX_TILE_R * MAX_TILE_T;

/// Sub-blocks (32-blocks) per activation scale of a q4k matmul: half a q4k
/// group (see [`scalar::quantize_act_grouped`](super::scalar::quantize_act_grouped)).
pub const Q4K_ACT_SUBS: usize = Q4K_SUBS / 2;

/// Consecutive rows of a q4 or q8 matrix: their quant bytes (16 per block
/// for 4-bit weights, 32 for 8-bit) and f16 block scales (one per block).
#[derive(Clone, Copy)]
pub(crate) struct BlockRows<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f16],
}

impl BlockRows<'_> {
    /// Checks that the planes hold `nr` rows of `nb` blocks of `A`'s weights.
    #[inline]
    pub fn check<A: BlockAct>(&self, nb: usize, nr: usize) {
        assert!(
            self.qs.len() >= nr * nb * A::WEIGHT_BLOCK_BYTES && self.d.len() >= nr * nb,
            "tile: slices shorter than the tile"
        );
    }
}

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

/// An activation element of a block tile, and the weights it meets.
pub(crate) trait BlockAct: Copy {
    /// Quant bytes per weight block: i8 activations meet 4-bit weights, i16
    /// activations 8-bit ones.
    const WEIGHT_BLOCK_BYTES: usize;
}

impl BlockAct for i8 {
    const WEIGHT_BLOCK_BYTES: usize = BLOCK / 2;
}

impl BlockAct for i16 {
    const WEIGHT_BLOCK_BYTES: usize = BLOCK;
}

/// A register-tiled quantized block kernel: computes the dot products of
/// `nr` consecutive weight rows (`w`, `nb` blocks per row) with `nt`
/// consecutive quantized activation rows (`aq`, `ad`; `A` is i8 for 4-bit
/// weights, i16 for 8-bit), writing row `r`, token `t` to
/// `out[r * MAX_TILE_T + t]`.
/// `nr <= tile_rows`, `nt <= tile_tokens` of the owning [`Isa`](super::Isa).
pub(crate) type QTileFn<A = i8> = fn(
    w: BlockRows,
    aq: &[A],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
);

/// A register-tiled kernel for q4k weights: like [`QTileFn`] with the three
/// planes of `nr` consecutive rows in `w`, activations with one scale per
/// [`Q4K_ACT_SUBS`] blocks (`ad[t * nh + h]`, `nh = nb.div_ceil(Q4K_ACT_SUBS)`)
/// and, besides them,
/// `asum[t * nb + b]`, the sum of token `t`'s quants in block `b` (from
/// [`act_block_sums`](super::act_block_sums)), for the `dmin * m` term. A
/// row's last group is shorter when `nb` is not a multiple of [`Q4K_SUBS`].
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

/// Prefill kernel for 4-bit weights with the rows in the vector lanes:
/// exactly [`Q4Lanes::rows`] consecutive weight rows (`w`: quant bytes,
/// `row_bytes` apart, and their scales, `nb` apart) against
/// `nt <= Q4Lanes::tokens` quantized activation rows, writing row `r`, token
/// `t` to `out[r * MAX_TILE_T + t]`. `asum[t * nb + b]` is the sum of token
/// `t`'s quants in block `b` (from [`act_block_sums`](super::act_block_sums)),
/// with which the kernel applies the Q4 offset `-8` once per block instead of
/// once per weight.
///
/// The planar layout stores each row's blocks contiguously; the kernel
/// transposes the rows' unpacked blocks in registers once and reuses them for
/// every token, so one vector instruction serves 8 or 16 rows where the row
/// tiles need one per row.
pub(crate) type Q4LanesFn = fn(
    w: BlockRows,
    row_bytes: usize,
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

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Q4Lanes {
    /// The 4-bit kernel [`q4_lanes::<K>`](q4_lanes) and its shape.
    pub const fn q4<K: Q4LanesBody>() -> Q4Lanes {
        Q4Lanes {
            rows: K::ROWS,
            tokens: LANES_TOKENS,
            kernel: LanesKernel::Q4(q4_lanes::<K>),
        }
    }

    /// The q4k kernel [`q4k_lanes::<K>`](q4k_lanes) and its shape.
    pub const fn q4k<K: Q4kLanesBody>() -> Q4Lanes {
        Q4Lanes {
            rows: K::ROWS,
            tokens: LANES_TOKENS,
            kernel: LanesKernel::Q4K(q4k_lanes::<K>),
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel bodies compiled for a set's features, and the safe wrappers the
// tables hold.
//
// Each trait below is implemented by the types [`target_instance!`] stamps,
// whose method is a `#[target_feature]` function. The traits are `unsafe`:
// an implementor promises that its type is only named in wrappers stored in
// an `Isa` table that is handed out after every feature its method enables
// was detected. That is what makes the wrappers' calls sound.

/// A register tile of block weights (see [`QTileFn`]) for tiles up to
/// 4 rows × 2 tokens.
///
/// # Safety
/// See above: the implementor's type is only reachable through a table
/// handed out after detecting the features its `tile` enables.
pub(crate) unsafe trait BlockTile<A> {
    /// `R` rows of `w` × `T` tokens of `aq`, `ad` (`nb` blocks each).
    ///
    /// # Safety
    /// The CPU has the implementor's features; `w` holds `R` rows of `nb`
    /// blocks ([`BlockRows::check`]), `aq` and `ad` `T` rows.
    unsafe fn tile<const R: usize, const T: usize>(
        w: BlockRows,
        aq: &[A],
        ad: &[f32],
        nb: usize,
        out: &mut [f32; MAX_TILE],
    );
}

/// A register tile of q4k weights (see [`Q4kTileFn`]) for tiles up to
/// 4 rows × 2 tokens.
///
/// # Safety
/// As [`BlockTile`].
pub(crate) unsafe trait Q4kTile {
    /// # Safety
    /// The CPU has the implementor's features; `w` passes [`KRows::check`]
    /// for `R` rows, `aq`, `ad` and `asum` hold `T` tokens.
    unsafe fn tile<const R: usize, const T: usize>(
        w: KRows,
        aq: &[i8],
        ad: &[f32],
        asum: &[i32],
        nb: usize,
        out: &mut [f32; MAX_TILE],
    );
}

/// A rows-in-lanes kernel of 4-bit weights (see [`Q4LanesFn`]).
///
/// # Safety
/// As [`BlockTile`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) unsafe trait Q4LanesBody {
    /// Weight rows per call.
    const ROWS: usize;

    /// # Safety
    /// The CPU has the implementor's features; the slices passed the
    /// wrapper's checks for [`Self::ROWS`] rows and `T` tokens.
    unsafe fn lanes<const T: usize>(
        w: BlockRows,
        row_bytes: usize,
        nb: usize,
        aq: &[i8],
        ad: &[f32],
        asum: &[i32],
        out: &mut [f32; MAX_TILE],
    );
}

/// A rows-in-lanes kernel of q4k weights (see [`Q4kLanesFn`]).
///
/// # Safety
/// As [`BlockTile`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) unsafe trait Q4kLanesBody {
    /// Weight rows per call.
    const ROWS: usize;

    /// # Safety
    /// The CPU has the implementor's features; `w` passes [`KRows::check`]
    /// for [`Self::ROWS`] rows, the activations hold `T` tokens.
    unsafe fn lanes<const T: usize>(
        w: KRows,
        nb: usize,
        aq: &[i8],
        ad: &[f32],
        asum: &[i32],
        out: &mut [f32; MAX_TILE],
    );
}

/// Stamps `$name`, a unit type whose trait method is the kernel body
/// `$body::<$dot, ..shape>` (an `#[inline(always)]` function generic over the
/// tile shape and, optionally, over a set's dot-product form) compiled with
/// `#[target_feature(enable = $features)]`:
///
/// ```ignore
/// target_instance!(pub(super) Q4Avx2: BlockTile<i8> = q4_body::<Maddubs>, "avx2,fma,f16c");
/// ```
///
/// The trait (one of [`BlockTile`], [`Q4kTile`], [`Q4LanesBody`] (with
/// `rows = N`), [`Q4kLanesBody`] (likewise)) fixes the signature; its safe
/// wrapper ([`block_tile`], [`q4k_tile`], [`q4_lanes`], [`q4k_lanes`]) is
/// what goes into the set's table. Only for types named in a table whose
/// lookup detects `$features` first (the traits' contract).
macro_rules! target_instance {
    ($vis:vis $name:ident: BlockTile<$act:ty> = $body:ident $(::<$dot:ty>)?, $features:literal) => {
        $vis struct $name;
        // SAFETY: the caller of the macro names `$name` only in a table
        // handed out after detecting `$features`.
        unsafe impl $crate::kernels::tile::BlockTile<$act> for $name {
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize, const T: usize>(
                w: $crate::kernels::tile::BlockRows,
                aq: &[$act],
                ad: &[f32],
                nb: usize,
                out: &mut [f32; $crate::kernels::tile::MAX_TILE],
            ) {
                // SAFETY: `$features` are enabled here and the caller checked
                // the slices for an R×T tile (the trait method's contract).
                unsafe { $body::<$($dot,)? R, T>(w.qs, w.d, aq, ad, nb, out) }
            }
        }
    };
    ($vis:vis $name:ident: Q4kTile = $body:ident $(::<$dot:ty>)?, $features:literal) => {
        $vis struct $name;
        // SAFETY: as for `BlockTile` above.
        unsafe impl $crate::kernels::tile::Q4kTile for $name {
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize, const T: usize>(
                w: $crate::kernels::tile::KRows,
                aq: &[i8],
                ad: &[f32],
                asum: &[i32],
                nb: usize,
                out: &mut [f32; $crate::kernels::tile::MAX_TILE],
            ) {
                // SAFETY: `$features` are enabled here and the caller checked
                // the slices for an R×T tile.
                unsafe { $body::<$($dot,)? R, T>(w, aq, ad, asum, nb, out) }
            }
        }
    };
    ($vis:vis $name:ident: Q4LanesBody(rows = $rows:expr) = $body:ident $(::<$dot:ty>)?, $features:literal) => {
        $vis struct $name;
        // SAFETY: as for `BlockTile` above.
        unsafe impl $crate::kernels::tile::Q4LanesBody for $name {
            const ROWS: usize = $rows;

            #[target_feature(enable = $features)]
            unsafe fn lanes<const T: usize>(
                w: $crate::kernels::tile::BlockRows,
                row_bytes: usize,
                nb: usize,
                aq: &[i8],
                ad: &[f32],
                asum: &[i32],
                out: &mut [f32; $crate::kernels::tile::MAX_TILE],
            ) {
                // SAFETY: `$features` are enabled here and the caller checked
                // the slices for `ROWS` rows and `T` tokens.
                unsafe { $body::<$($dot,)? T>(w.qs, row_bytes, w.d, nb, aq, ad, asum, out) }
            }
        }
    };
    ($vis:vis $name:ident: Q4kLanesBody(rows = $rows:expr) = $body:ident $(::<$dot:ty>)?, $features:literal) => {
        $vis struct $name;
        // SAFETY: as for `BlockTile` above.
        unsafe impl $crate::kernels::tile::Q4kLanesBody for $name {
            const ROWS: usize = $rows;

            #[target_feature(enable = $features)]
            unsafe fn lanes<const T: usize>(
                w: $crate::kernels::tile::KRows,
                nb: usize,
                aq: &[i8],
                ad: &[f32],
                asum: &[i32],
                out: &mut [f32; $crate::kernels::tile::MAX_TILE],
            ) {
                // SAFETY: `$features` are enabled here and the caller checked
                // the slices for `ROWS` rows and `T` tokens.
                unsafe { $body::<$($dot,)? T>(w, nb, aq, ad, asum, out) }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use target_instance;

/// The [`QTileFn`] of `K`: checks the slices and picks the instantiation of
/// `K::tile` for the shape `(nr, nt)` (up to 4 × 2).
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_tile<K: BlockTile<A>, A: BlockAct>(
    w: BlockRows,
    aq: &[A],
    ad: &[f32],
    nb: usize,
    nr: usize,
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    w.check::<A>(nb, nr);
    assert!(
        aq.len() >= nt * nb * BLOCK && ad.len() >= nt * nb,
        "tile: slices shorter than the tile"
    );
    // SAFETY: `K`'s features were detected before the table holding this
    // wrapper was handed out (the `BlockTile` contract); slice lengths
    // checked just above.
    unsafe {
        match (nr, nt) {
            (4, 1) => K::tile::<4, 1>(w, aq, ad, nb, out),
            (4, 2) => K::tile::<4, 2>(w, aq, ad, nb, out),
            (3, 1) => K::tile::<3, 1>(w, aq, ad, nb, out),
            (3, 2) => K::tile::<3, 2>(w, aq, ad, nb, out),
            (2, 1) => K::tile::<2, 1>(w, aq, ad, nb, out),
            (2, 2) => K::tile::<2, 2>(w, aq, ad, nb, out),
            (1, 1) => K::tile::<1, 1>(w, aq, ad, nb, out),
            (1, 2) => K::tile::<1, 2>(w, aq, ad, nb, out),
            (r, t) => panic!("tile {r}x{t} larger than 4x2"),
        }
    }
}

/// The [`Q4kTileFn`] of `K`: checks the slices and picks the instantiation
/// of `K::tile` for the shape `(nr, nt)` (up to 4 × 2).
#[allow(clippy::too_many_arguments)]
pub(crate) fn q4k_tile<K: Q4kTile>(
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
            && ad.len() >= nt * nb.div_ceil(Q4K_ACT_SUBS)
            && asum.len() >= nt * nb,
        "q4k tile: activations shorter than the tile"
    );
    // SAFETY: `K`'s features were detected before the table holding this
    // wrapper was handed out (the `Q4kTile` contract); slice lengths checked
    // just above.
    unsafe {
        match (nr, nt) {
            (4, 1) => K::tile::<4, 1>(w, aq, ad, asum, nb, out),
            (4, 2) => K::tile::<4, 2>(w, aq, ad, asum, nb, out),
            (3, 1) => K::tile::<3, 1>(w, aq, ad, asum, nb, out),
            (3, 2) => K::tile::<3, 2>(w, aq, ad, asum, nb, out),
            (2, 1) => K::tile::<2, 1>(w, aq, ad, asum, nb, out),
            (2, 2) => K::tile::<2, 2>(w, aq, ad, asum, nb, out),
            (1, 1) => K::tile::<1, 1>(w, aq, ad, asum, nb, out),
            (1, 2) => K::tile::<1, 2>(w, aq, ad, asum, nb, out),
            (r, t) => panic!("q4k tile {r}x{t} larger than 4x2"),
        }
    }
}

/// Most tokens per call of the rows-in-lanes wrappers [`q4_lanes`] and
/// [`q4k_lanes`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const LANES_TOKENS: usize = 4;

/// The [`Q4LanesFn`] of `K` for up to [`LANES_TOKENS`] tokens: checks the
/// slices for `K::ROWS` rows and calls `K::lanes::<nt>`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn q4_lanes<K: Q4LanesBody>(
    w: BlockRows,
    row_bytes: usize,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    let rows = K::ROWS;
    assert!(
        (1..=LANES_TOKENS).contains(&nt)
            && row_bytes >= nb * 16
            && w.qs.len() >= (rows - 1) * row_bytes + nb * 16
            && w.d.len() >= rows * nb
            && aq.len() >= nt * nb * BLOCK
            && ad.len() >= nt * nb
            && asum.len() >= nt * nb,
        "q4 lanes: slices shorter than the tile"
    );
    // SAFETY: `K`'s features were detected before the table holding this
    // wrapper was handed out (the `Q4LanesBody` contract); slice lengths
    // checked just above.
    unsafe {
        match nt {
            1 => K::lanes::<1>(w, row_bytes, nb, aq, ad, asum, out),
            2 => K::lanes::<2>(w, row_bytes, nb, aq, ad, asum, out),
            3 => K::lanes::<3>(w, row_bytes, nb, aq, ad, asum, out),
            _ => K::lanes::<4>(w, row_bytes, nb, aq, ad, asum, out),
        }
    }
}

/// The [`Q4kLanesFn`] of `K` for up to [`LANES_TOKENS`] tokens: checks the
/// slices for `K::ROWS` rows and calls `K::lanes::<nt>`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn q4k_lanes<K: Q4kLanesBody>(
    w: KRows,
    nb: usize,
    aq: &[i8],
    ad: &[f32],
    asum: &[i32],
    nt: usize,
    out: &mut [f32; MAX_TILE],
) {
    w.check(nb, K::ROWS);
    assert!(
        (1..=LANES_TOKENS).contains(&nt)
            && aq.len() >= nt * nb * BLOCK
            && ad.len() >= nt * nb.div_ceil(Q4K_ACT_SUBS)
            && asum.len() >= nt * nb,
        "q4k lanes: activations shorter than the tile"
    );
    // SAFETY: `K`'s features were detected before the table holding this
    // wrapper was handed out (the `Q4kLanesBody` contract); slice lengths
    // checked just above.
    unsafe {
        match nt {
            1 => K::lanes::<1>(w, nb, aq, ad, asum, out),
            2 => K::lanes::<2>(w, nb, aq, ad, asum, out),
            3 => K::lanes::<3>(w, nb, aq, ad, asum, out),
            _ => K::lanes::<4>(w, nb, aq, ad, asum, out),
        }
    }
}
