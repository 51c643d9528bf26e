//! Compute kernels and their single dispatch point.
//!
//! Everything the forward pass computes on weights goes through [`matmul`]
//! and [`matmul_many`]; attention over the KV cache through [`attend_f16`]
//! and [`attend_f32_many`], and the feed-forward gate through [`swiglu`].
//! `scalar` is the reference implementation every SIMD kernel is tested
//! against.
//!
//! One kernel set ([`KernelSet`]) is chosen once per process, by CPU feature
//! detection or by the `NIBBLE_KERNELS` environment variable. Each set is a
//! table of plain functions (`Isa`); the instruction-set specific ones are
//! only reachable through a table handed out after the features were
//! detected, which is what makes calling them sound.
//!
//! Quantized matmul semantics (identical in every set): each activation row is
//! quantized in blocks of 32, to 8 bits for 4-bit weights
//! ([`scalar::quantize_act`]) and to 16 bits for 8-bit weights
//! ([`scalar::quantize_act16`]: 8-bit activations would double q8's rounding
//! error), bit-identical in every set; each weight block is multiplied with its
//! activation block in exact integer arithmetic, and the integer block sum is
//! scaled by `d_weight * d_act` and accumulated in f32. Only the order of that
//! f32 accumulation differs between sets. q4k weights meet 8-bit activations
//! with one scale per half group of 128 ([`scalar::quantize_act_grouped`]),
//! so each half's sum splits in two exact integer parts,
//! `Σ x a = d_a * (d * Σ_k sc_k Σ q a - dmin * Σ_k m_k Σ a)`, with the
//! activation block sums `Σ a` computed once per matmul ([`act_block_sums`]);
//! see [`scalar::dot_q4k_q8`].

pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::quant::{WeightView, BLOCK, Q4K_SCALE_BYTES, Q4K_SUBS};
use half::f16;
use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;
use std::thread::LocalKey;

pub use scalar::{QuantAct, QuantAct16, QuantBlocks};

/// Environment variable that overrides kernel detection.
pub const KERNELS_ENV: &str = "NIBBLE_KERNELS";

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

        $crate::kernels::tile_fn!($vis $name, $inner, $row_bytes, $act);
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
            unsafe { $crate::kernels::dispatch_tile!(nr, nt, $body(w, wd, aq, ad, nb, out)) }
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
                    && ad.len() >= nt * nb.div_ceil($crate::kernels::Q4K_ACT_SUBS)
                    && asum.len() >= nt * nb,
                "q4k tile: activations shorter than the tile"
            );
            // SAFETY: only reachable through a table handed out after the
            // features were detected; slice lengths checked just above.
            unsafe { $crate::kernels::dispatch_tile!(nr, nt, $inner(w, aq, ad, asum, nb, out)) }
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

/// The sum of each 32-value activation block, computed once per matmul for
/// the kernels that fold a weight offset into the activations (q4k's
/// `dmin * m`, q4's `-8` in the rows-in-lanes prefill kernels).
pub fn act_block_sums(aq: &[i8], out: &mut Vec<i32>) {
    out.clear();
    out.extend(
        aq.chunks_exact(BLOCK)
            .map(|b| b.iter().map(|&v| v as i32).sum::<i32>()),
    );
}

/// See [`Isa::quantize_act`].
pub(crate) type QuantizeActFn = fn(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize);

/// Quantizes rows of `cols` activations with `quantize` (an
/// [`Isa::quantize_act`]), one scale per `group` blocks of each row and one
/// for the row's shorter remainder: `d` holds `nb.div_ceil(group)` scales per
/// row of `nb` blocks.
pub(crate) fn quantize_act_rows(
    quantize: QuantizeActFn,
    x: &[f32],
    cols: usize,
    group: usize,
    qs: &mut [i8],
    d: &mut [f32],
) {
    let nb = cols / BLOCK;
    let per_row = nb.div_ceil(group);
    assert!(
        cols.is_multiple_of(BLOCK)
            && x.len().is_multiple_of(cols)
            && qs.len() == x.len()
            && d.len() == x.len() / cols * per_row,
        "quantize_act_rows: shapes"
    );
    if nb.is_multiple_of(group) {
        return quantize(x, qs, d, group);
    }
    let whole = nb / group * group * BLOCK;
    for ((xr, qr), dr) in x
        .chunks_exact(cols)
        .zip(qs.chunks_exact_mut(cols))
        .zip(d.chunks_exact_mut(per_row))
    {
        let (dw, dt) = dr.split_at_mut(per_row - 1);
        quantize(&xr[..whole], &mut qr[..whole], dw, group);
        quantize(&xr[whole..], &mut qr[whole..], dt, nb % group);
    }
}

/// The function table of one kernel set.
pub(crate) struct Isa {
    pub set: KernelSet,
    /// Weight rows per register tile (prefill and decode).
    pub tile_rows: usize,
    /// Activation rows (tokens) per register tile in prefill.
    pub tile_tokens: usize,
    /// Quantizes whole blocks with one scale per run of `blocks` blocks:
    /// `qs.len() == x.len() == d.len() * blocks * BLOCK`.
    pub quantize_act: QuantizeActFn,
    /// The same in 16-bit blocks (for 8-bit weights).
    pub quantize_act16: fn(x: &[f32], qs: &mut [i16], d: &mut [f32]),
    pub q4_tile: QTileFn,
    pub q8_tile: QTileFn<i16>,
    pub q4k_tile: Q4kTileFn,
    /// Optional prefill kernel for 4-bit weights, see [`Q4LanesFn`].
    pub q4_lanes: Option<Q4Lanes>,
    /// The same for q4k, where a set has one.
    pub q4k_lanes: Option<Q4Lanes>,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[f16], &[f32]) -> f32,
    /// See [`attend_f16`]; lengths checked by the caller.
    pub attend_f16: AttendFn,
    /// See [`attend_f32_many`]; shapes checked by the caller.
    pub attend_f32_many: AttendManyFn,
    /// See [`swiglu`]; equal lengths checked by the caller.
    pub swiglu: fn(gate: &mut [f32], up: &[f32]),
}

pub(crate) type AttendFn<E = f16> =
    fn(q: &[f32], keys: &[E], values: &[E], scale: f32, scores: &mut [f32], out: &mut [f32]);

pub(crate) type AttendManyFn = fn(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
);

/// Most queries one [`attend_f32_many`] call takes.
pub const MAX_ATTEND_QUERIES: usize = 64;

/// The shapes [`attend_f32_many`] requires (one to [`MAX_ATTEND_QUERIES`]
/// queries of equal, non-zero width; every length non-zero and covered by
/// `keys`, `values` and a row of `scores`); panics otherwise.
pub(crate) fn check_attend_many(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scores: &[f32],
    out: &[f32],
) {
    let nq = lens.len();
    assert!(
        (1..=MAX_ATTEND_QUERIES).contains(&nq) && q.len().is_multiple_of(nq),
        "attend_f32_many: query count"
    );
    let (hd, longest) = (q.len() / nq, lens.iter().copied().max().unwrap_or(0));
    assert!(
        hd > 0
            && lens.iter().all(|&l| l > 0)
            && out.len() == q.len()
            && scores.len() / nq >= longest
            && keys.len() >= longest * hd
            && values.len() >= longest * hd,
        "attend_f32_many: shapes"
    );
}

/// [`attend_f32_many`] as one single-query `attend` per query: the
/// reference semantics, and the sets without a blocked kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_many_with(
    attend: AttendFn<f32>,
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let nq = lens.len();
    let (hd, stride) = (q.len() / nq, scores.len() / nq);
    for (i, &len) in lens.iter().enumerate() {
        attend(
            &q[i * hd..(i + 1) * hd],
            keys,
            values,
            scale,
            &mut scores[i * stride..i * stride + len],
            &mut out[i * hd..(i + 1) * hd],
        );
    }
}

/// A family of kernels for one instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSet {
    /// Plain Rust, any CPU; the reference semantics.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX2 + FMA + F16C with AVX-VNNI (256-bit `vpdpbusd`, VEX).
    AvxVnni,
    /// x86-64 AVX-512 F/BW/VL + VNNI (`vpdpbusd`) on 256-bit vectors, plus F16C/FMA.
    Avx512,
    /// aarch64 NEON without the dot-product extension.
    Neon,
    /// aarch64 NEON with `sdot` (`vdotq_s32`).
    NeonDotprod,
}

impl KernelSet {
    pub const ALL: [KernelSet; 6] = [
        Self::Scalar,
        Self::Avx2,
        Self::AvxVnni,
        Self::Avx512,
        Self::Neon,
        Self::NeonDotprod,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::AvxVnni => "avxvnni",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
            Self::NeonDotprod => "neon-dotprod",
        }
    }

    /// Parses a `NIBBLE_KERNELS` value. `neon` means the best NEON path this
    /// CPU has (with `dotprod` if present); `neon-nodot` forces plain NEON.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Self::Scalar,
            "avx2" => Self::Avx2,
            "avxvnni" => Self::AvxVnni,
            "avx512" => Self::Avx512,
            "neon" => {
                if Self::NeonDotprod.is_supported() {
                    Self::NeonDotprod
                } else {
                    Self::Neon
                }
            }
            "neon-nodot" | "neon-plain" => Self::Neon,
            "neon-dotprod" => Self::NeonDotprod,
            _ => return None,
        })
    }

    /// Whether this CPU can run the set.
    pub fn is_supported(self) -> bool {
        self.isa().is_some()
    }

    /// Every set this CPU can run, slowest first.
    pub fn available() -> Vec<KernelSet> {
        Self::ALL.into_iter().filter(|s| s.is_supported()).collect()
    }

    /// The fastest set this CPU can run.
    pub fn detect() -> KernelSet {
        *Self::available().last().unwrap_or(&Self::Scalar)
    }

    fn isa(self) -> Option<&'static Isa> {
        match self {
            Self::Scalar => Some(&scalar::ISA),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::isa(),
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni => avxvnni::isa(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => avx512::isa(),
            #[cfg(target_arch = "aarch64")]
            Self::Neon => neon::isa_plain(),
            #[cfg(target_arch = "aarch64")]
            Self::NeonDotprod => neon::isa_dotprod(),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kernel set could not be selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    UnknownName(String),
    Unsupported(KernelSet),
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownName(s) => write!(
                f,
                "{KERNELS_ENV}={s:?} is not a kernel set (use scalar, avx2, avxvnni, avx512, neon or neon-nodot)"
            ),
            Self::Unsupported(k) => {
                let have: Vec<_> = KernelSet::available().iter().map(|k| k.name()).collect();
                write!(
                    f,
                    "{KERNELS_ENV}={k}: this CPU lacks the instructions for it (available: {})",
                    have.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// A handle on a kernel set this CPU supports. Every kernel is reachable
/// through it, so tests and benchmarks can compare sets side by side.
#[derive(Clone, Copy)]
pub struct Kernels {
    isa: &'static Isa,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kernels({})", self.isa.set)
    }
}

static ACTIVE: OnceLock<Result<Kernels, KernelError>> = OnceLock::new();

/// Chooses the process-wide kernel set (from `NIBBLE_KERNELS` if set, else by
/// detection). Idempotent. Call it at start-up to turn a bad override into a
/// clean error; otherwise the first kernel call does it and exits with the
/// message.
pub fn init() -> Result<Kernels, KernelError> {
    ACTIVE
        .get_or_init(|| match std::env::var(KERNELS_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let set = KernelSet::parse(&v).ok_or(KernelError::UnknownName(v))?;
                Kernels::new(set)
            }
            _ => Kernels::new(KernelSet::detect()),
        })
        .clone()
}

impl Kernels {
    pub fn new(set: KernelSet) -> Result<Kernels, KernelError> {
        set.isa()
            .map(|isa| Kernels { isa })
            .ok_or(KernelError::Unsupported(set))
    }

    /// The process-wide set. A bad `NIBBLE_KERNELS` ends the process with a
    /// one-line message (callers that want to handle it call [`init`] first).
    pub fn active() -> Kernels {
        match init() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }

    pub fn set(&self) -> KernelSet {
        self.isa.set
    }

    /// See [`matmul`].
    pub fn matmul(&self, w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n_tokens * w.cols(), "matmul: activation shape");
        assert_eq!(y.len(), n_tokens * w.rows(), "matmul: output shape");
        matmul_impl(self.isa, w, x, n_tokens, y)
    }

    /// See [`matmul_many`].
    pub fn matmul_many(&self, x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
        for (w, y) in outs.iter() {
            assert_eq!(x.len(), n_tokens * w.cols(), "matmul: activation shape");
            assert_eq!(y.len(), n_tokens * w.rows(), "matmul: output shape");
        }
        matmul_many_impl(self.isa, x, n_tokens, outs)
    }

    /// Quantizes `x` (a whole number of blocks) like [`scalar::quantize_act`].
    pub fn quantize_act(&self, x: &[f32], out: &mut QuantAct) {
        assert!(x.len().is_multiple_of(BLOCK), "quantize_act: partial block");
        out.qs.resize(x.len(), 0);
        out.d.resize(x.len() / BLOCK, 0.0);
        (self.isa.quantize_act)(x, &mut out.qs, &mut out.d, 1)
    }

    /// Quantizes rows of `cols` activations like
    /// [`scalar::quantize_act_grouped`] (for q4k weights).
    pub fn quantize_act_grouped(&self, x: &[f32], cols: usize, out: &mut QuantAct) {
        out.qs.resize(x.len(), 0);
        out.d
            .resize(x.len() / cols * (cols / BLOCK).div_ceil(Q4K_ACT_SUBS), 0.0);
        quantize_act_rows(
            self.isa.quantize_act,
            x,
            cols,
            Q4K_ACT_SUBS,
            &mut out.qs,
            &mut out.d,
        )
    }

    /// Quantizes `x` (a whole number of blocks) like [`scalar::quantize_act16`].
    pub fn quantize_act16(&self, x: &[f32], out: &mut QuantAct16) {
        assert!(
            x.len().is_multiple_of(BLOCK),
            "quantize_act16: partial block"
        );
        out.qs.resize(x.len(), 0);
        out.d.resize(x.len() / BLOCK, 0.0);
        (self.isa.quantize_act16)(x, &mut out.qs, &mut out.d)
    }

    /// One row of 4-bit weight blocks against one quantized activation row.
    pub fn dot_q4_q8(&self, wq: &[u8], wd: &[f16], aq: &[i8], ad: &[f32]) -> f32 {
        let nb = wd.len();
        assert!(wq.len() == nb * BLOCK / 2 && aq.len() == nb * BLOCK && ad.len() == nb);
        let mut out = [0f32; MAX_TILE];
        (self.isa.q4_tile)(wq, wd, aq, ad, nb, 1, 1, &mut out);
        out[0]
    }

    /// One row of q4k weights (`nb` sub-blocks in groups of up to 8: quants,
    /// `(d, dmin)` pairs, packed scales) against one activation row quantized
    /// with one scale per [`Q4K_ACT_SUBS`] blocks (see
    /// [`Kernels::quantize_act_grouped`]).
    pub fn dot_q4k_q8(&self, wq: &[u8], dm: &[f16], sc: &[u8], aq: &[i8], ad: &[f32]) -> f32 {
        let nb = aq.len() / BLOCK;
        let ng = nb.div_ceil(Q4K_SUBS);
        assert!(
            wq.len() == nb * BLOCK / 2
                && dm.len() == 2 * ng
                && sc.len() == ng * Q4K_SCALE_BYTES
                && aq.len() == nb * BLOCK
                && ad.len() == nb.div_ceil(Q4K_ACT_SUBS)
        );
        let mut asum = Vec::new();
        act_block_sums(aq, &mut asum);
        let mut out = [0f32; MAX_TILE];
        let w = KRows { qs: wq, dm, sc };
        (self.isa.q4k_tile)(w, aq, ad, &asum, nb, 1, 1, &mut out);
        out[0]
    }

    /// One row of 8-bit weight blocks against one 16-bit activation row.
    pub fn dot_q8_q16(&self, wq: &[i8], wd: &[f16], aq: &[i16], ad: &[f32]) -> f32 {
        let nb = wd.len();
        assert!(wq.len() == nb * BLOCK && aq.len() == nb * BLOCK && ad.len() == nb);
        let mut out = [0f32; MAX_TILE];
        (self.isa.q8_tile)(bytemuck::cast_slice(wq), wd, aq, ad, nb, 1, 1, &mut out);
        out[0]
    }

    pub fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f32: lengths");
        (self.isa.dot_f32)(a, b)
    }

    pub fn dot_f16(&self, a: &[f16], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot_f16: lengths");
        (self.isa.dot_f16)(a, b)
    }

    /// See [`attend_f16`].
    pub fn attend_f16(
        &self,
        q: &[f32],
        keys: &[f16],
        values: &[f16],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (hd, len) = (q.len(), scores.len());
        assert!(
            hd > 0
                && len > 0
                && out.len() == hd
                && keys.len() >= len * hd
                && values.len() >= len * hd,
            "attend_f16: shapes"
        );
        (self.isa.attend_f16)(q, keys, values, scale, scores, out)
    }

    /// See [`attend_f32`]: one query of [`Kernels::attend_f32_many`].
    pub fn attend_f32(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let len = scores.len();
        self.attend_f32_many(q, &[len], keys, values, scale, scores, out)
    }

    /// See [`attend_f32_many`].
    #[allow(clippy::too_many_arguments)]
    pub fn attend_f32_many(
        &self,
        q: &[f32],
        lens: &[usize],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        check_attend_many(q, lens, keys, values, scores, out);
        (self.isa.attend_f32_many)(q, lens, keys, values, scale, scores, out)
    }

    /// See [`swiglu`].
    pub fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "swiglu: lengths");
        (self.isa.swiglu)(gate, up)
    }
}

/// One query head's causal attention over `len = scores.len()` cached
/// positions: `out = softmax(scale * K q) · V`, with `keys`/`values` the
/// head's f16 cache rows `[len, q.len()]` (row-major, at least `len` rows).
/// `scores` is scratch and ends up holding the softmax weights. The SIMD sets
/// keep `out` in registers across positions and use a vector `exp` (relative
/// error below 1e-6), so results differ from the scalar set within float
/// tolerance.
pub fn attend_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    Kernels::active().attend_f16(q, keys, values, scale, scores, out)
}

/// [`attend_f16`] over keys and values held in f32 (the f32 KV cache; one
/// query of [`attend_f32_many`]). On the same values it gives exactly what
/// [`attend_f16`] gives on their f16 originals.
pub fn attend_f32(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    Kernels::active().attend_f32(q, keys, values, scale, scores, out)
}

/// Attention of several queries over one KV head held in f32 (rows of `q`,
/// of `hd = q.len() / lens.len()` each), query `i` seeing the first
/// `lens[i]` positions; `scores` is scratch of `lens.len()` rows of at least
/// the longest length, `out` gets one row of `hd` per query. Each query's
/// result equals, bit for bit, what [`attend_f16`] gives that query alone on
/// the f16 originals of the values: prefill (which widens an f16 cache once
/// per batch) and decode agree. Batching only changes the order memory is
/// walked in (the AVX2 set reuses each L1-sized block of keys and values
/// across all the queries).
#[allow(clippy::too_many_arguments)]
pub fn attend_f32_many(
    q: &[f32],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    Kernels::active().attend_f32_many(q, lens, keys, values, scale, scores, out)
}

/// The SwiGLU gate: `gate[i] = silu(gate[i]) * up[i]` with `silu(x) = x /
/// (1 + e^-x)`. The x86 sets use a vector `exp` (relative error below 1e-6).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    Kernels::active().swiglu(gate, up)
}

/// Name of the kernel set in use (e.g. `"avx2"`), for logs and `--json`.
pub fn active_name() -> &'static str {
    Kernels::active().set().name()
}

/// `y[t * rows + r] = sum_c W[r, c] * x[t * cols + c]` for each of `n_tokens`
/// activation rows. For quantized weights the activations are first quantized
/// to blocks (8-bit for q4 weights, 16-bit for q8; see
/// [`scalar::quantize_act`], [`scalar::quantize_act16`]); for f32/f16 weights
/// the product is computed in f32. Rows are split across the global
/// [`crate::pool`].
pub fn matmul(w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    Kernels::active().matmul(w, x, n_tokens, y)
}

/// Several matrices applied to the same activations (`outs[i].1 = outs[i].0 ·
/// x`, each as in [`matmul`]), e.g. the query, key and value projections. When
/// they share a quantized type the activations are quantized once and the row
/// chunks of all of them run in one parallel section, so the threads meet once
/// instead of once per matrix. Results are identical to separate [`matmul`]s.
pub fn matmul_many(x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
    Kernels::active().matmul_many(x, n_tokens, outs)
}

// ---------------------------------------------------------------------------
// The matmul driver: activation quantization into reused scratch, row chunks
// over the thread pool, register tiles inside a chunk.

thread_local! {
    /// Quantized activations of the current call, reused across calls so the
    /// decode loop does not allocate. Taken out (not borrowed) while in use, so
    /// a nested call on the same thread just gets a fresh buffer.
    static ACT_SCRATCH: RefCell<QuantAct> = RefCell::new(QuantAct::default());
    /// Per-block activation sums ([`act_block_sums`]), reused likewise.
    static OFFSET_SCRATCH: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    static ACT16_SCRATCH: RefCell<QuantAct16> = RefCell::new(QuantAct16::default());
    /// A q8r row tile's scales repeated per block (see [`QRows::row_scale`]).
    static ROW_SCALE_SCRATCH: RefCell<Vec<f16>> = const { RefCell::new(Vec::new()) };
}

/// An activation block element of the quantized matmul: its quantizer in a
/// kernel set and its scratch buffer.
trait ActElem: Copy + Default + Sync + 'static {
    /// Quantizes rows of `cols` values into `out`, one scale per block, or
    /// per q4k group when `grouped`.
    fn quantize(isa: &Isa, x: &[f32], cols: usize, grouped: bool, out: &mut QuantBlocks<Self>);
    fn scratch() -> &'static LocalKey<RefCell<QuantBlocks<Self>>>;
    /// The activations as 8-bit blocks, for the 4-bit-only [`Q4LanesFn`].
    fn as_act8(act: &QuantBlocks<Self>) -> Option<&QuantAct>;
}

impl ActElem for i8 {
    fn quantize(isa: &Isa, x: &[f32], cols: usize, grouped: bool, out: &mut QuantAct) {
        let group = if grouped { Q4K_ACT_SUBS } else { 1 };
        out.qs.resize(x.len(), 0);
        out.d
            .resize(x.len() / cols * (cols / BLOCK).div_ceil(group), 0.0);
        quantize_act_rows(isa.quantize_act, x, cols, group, &mut out.qs, &mut out.d)
    }
    fn scratch() -> &'static LocalKey<RefCell<QuantAct>> {
        &ACT_SCRATCH
    }
    fn as_act8(act: &QuantAct) -> Option<&QuantAct> {
        Some(act)
    }
}

impl ActElem for i16 {
    fn quantize(isa: &Isa, x: &[f32], _cols: usize, grouped: bool, out: &mut QuantAct16) {
        assert!(!grouped, "16-bit activations have one scale per block");
        out.qs.resize(x.len(), 0);
        out.d.resize(x.len() / BLOCK, 0.0);
        (isa.quantize_act16)(x, &mut out.qs, &mut out.d)
    }
    fn scratch() -> &'static LocalKey<RefCell<QuantAct16>> {
        &ACT16_SCRATCH
    }
    fn as_act8(_: &QuantAct16) -> Option<&QuantAct> {
        None
    }
}

/// The register-tile kernel of a quantized type.
#[derive(Clone, Copy)]
enum Tile<A> {
    /// q8, q4: quants and one f16 scale per block.
    Block(QTileFn<A>),
    /// q4k (8-bit activations only): three planes and activation block sums.
    K(Q4kTileFn),
}

/// Rows of a quantized matrix, as the tile kernels read them.
struct QRows<'a, A> {
    qs: &'a [u8],
    rows: usize,
    /// Quant bytes per row.
    row_bytes: usize,
    /// Block scales (q8, q4), row scales (q8r) or `(d, dmin)` pairs (q4k).
    d: &'a [f16],
    /// Values of `d` per row.
    d_row: usize,
    /// One scale per row (q8r), which the block tile kernels get repeated
    /// per block: one tile's worth, written once per row tile.
    row_scale: bool,
    /// Packed sub-block scales (q4k; empty otherwise).
    sc: &'a [u8],
    /// Bytes of `sc` per row.
    sc_row: usize,
    tile: Tile<A>,
    /// Prefill kernel with rows in lanes (4-bit weights only).
    lanes: Option<Q4Lanes>,
}

/// Output pointer shared by the row chunks; each chunk writes only its rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint row ranges of one `y`
// borrowed mutably for the whole parallel section.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `y[i] = v`.
    ///
    /// # Safety
    /// `i` is in bounds of `y`, and no other thread writes or reads `y[i]`
    /// during the parallel section.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v }
    }
}

/// Below this many multiply-adds a matmul runs on the calling thread: waking
/// the pool costs more than it saves.
const MIN_PARALLEL_MACS: usize = 1 << 17;
/// Multiply-adds per parallel chunk we aim for (big enough to amortize the
/// scheduling, small enough to balance).
const TARGET_CHUNK_MACS: usize = 1 << 20;

fn matmul_impl(isa: &Isa, w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    if rows == 0 || n_tokens == 0 {
        return;
    }
    match *w {
        WeightView::F32 { data, .. } => {
            let dot = isa.dot_f32;
            float_rows(rows, cols, n_tokens, y, &|r, t| {
                dot(
                    &data[r * cols..(r + 1) * cols],
                    &x[t * cols..(t + 1) * cols],
                )
            })
        }
        WeightView::F16 { data, .. } => {
            let dot = isa.dot_f16;
            float_rows(rows, cols, n_tokens, y, &|r, t| {
                dot(
                    &data[r * cols..(r + 1) * cols],
                    &x[t * cols..(t + 1) * cols],
                )
            })
        }
        WeightView::Q8 { .. }
        | WeightView::Q8R { .. }
        | WeightView::Q4 { .. }
        | WeightView::Q4K { .. } => matmul_many_impl(isa, x, n_tokens, &mut [(w, y)]),
    }
}

/// Most matrices one [`matmul_many`] section fuses; longer lists are split.
const MAX_FUSED: usize = 3;

/// Rows of a quantized matrix with 8-bit weights (q8, q8r), for the tile
/// kernels.
fn q8_rows<'a>(isa: &Isa, w: &WeightView<'a>) -> Option<QRows<'a, i16>> {
    let (qs, d, rows, cols, row_scale) = match *w {
        WeightView::Q8 { qs, d, rows, cols } => (qs, d, rows, cols, false),
        WeightView::Q8R { qs, d, rows, cols } => (qs, d, rows, cols, true),
        _ => return None,
    };
    Some(QRows {
        qs: bytemuck::cast_slice(qs),
        rows,
        row_bytes: cols,
        d,
        d_row: if row_scale { 1 } else { cols / BLOCK },
        row_scale,
        sc: &[],
        sc_row: 0,
        tile: Tile::Block(isa.q8_tile),
        lanes: None,
    })
}

/// Rows of a quantized matrix with 4-bit weights (q4, q4k), for the tile
/// kernels.
fn q4_rows<'a>(isa: &Isa, w: &WeightView<'a>) -> Option<QRows<'a, i8>> {
    match *w {
        WeightView::Q4 { qs, d, rows, cols } => Some(QRows {
            qs,
            rows,
            row_bytes: cols / 2,
            d,
            d_row: cols / BLOCK,
            row_scale: false,
            sc: &[],
            sc_row: 0,
            tile: Tile::Block(isa.q4_tile),
            lanes: isa.q4_lanes,
        }),
        WeightView::Q4K {
            qs,
            dm,
            sc,
            rows,
            cols,
        } => {
            let [row_bytes, dm_bytes, sc_row] = w.tensor_type().row_planes(cols);
            Some(QRows {
                qs,
                rows,
                row_bytes,
                d: dm,
                d_row: dm_bytes / 2,
                row_scale: false,
                sc,
                sc_row,
                tile: Tile::K(isa.q4k_tile),
                lanes: isa.q4k_lanes,
            })
        }
        _ => None,
    }
}

fn matmul_many_impl(isa: &Isa, x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
    if n_tokens == 0 {
        return;
    }
    let quantized = |w: &WeightView| !matches!(w, WeightView::F32 { .. } | WeightView::F16 { .. });
    let fusable = outs.len() <= MAX_FUSED
        && outs.iter().all(|(w, _)| {
            quantized(w)
                && w.tensor_type() == outs[0].0.tensor_type()
                && w.cols() == outs[0].0.cols()
        });
    if !fusable {
        // Fuse each run of neighbours that share a quantized type (e.g. q and
        // k when v has more bits), the rest one by one.
        let mut rest = outs;
        while !rest.is_empty() {
            let head = rest[0].0;
            let same = rest
                .iter()
                .take(MAX_FUSED)
                .take_while(|(w, _)| {
                    quantized(w) && w.tensor_type() == head.tensor_type() && w.cols() == head.cols()
                })
                .count()
                .max(1);
            let (run, tail) = rest.split_at_mut(same);
            if quantized(head) {
                matmul_many_impl(isa, x, n_tokens, run);
            } else {
                matmul_impl(isa, head, x, n_tokens, run[0].1);
            }
            rest = tail;
        }
        return;
    }
    let cols = outs[0].0.cols();
    let n = outs.len();
    let mut ys: [&mut [f32]; MAX_FUSED] = Default::default();
    if matches!(outs[0].0, WeightView::Q8 { .. } | WeightView::Q8R { .. }) {
        let mut ws: [Option<QRows<i16>>; MAX_FUSED] = Default::default();
        for (i, (w, y)) in outs.iter_mut().enumerate() {
            ws[i] = q8_rows(isa, w);
            ys[i] = &mut **y;
        }
        quant_matmul(isa, &ws[..n], cols, x, n_tokens, &mut ys[..n])
    } else {
        let mut ws: [Option<QRows<i8>>; MAX_FUSED] = Default::default();
        for (i, (w, y)) in outs.iter_mut().enumerate() {
            ws[i] = q4_rows(isa, w);
            ys[i] = &mut **y;
        }
        quant_matmul(isa, &ws[..n], cols, x, n_tokens, &mut ys[..n])
    }
}

/// Number of parallel chunks for `rows` rows of `macs_per_row` work each,
/// and the chunk size in rows (a multiple of `align`).
fn chunking(rows: usize, macs_per_row: usize, align: usize) -> (usize, usize) {
    let total = rows.saturating_mul(macs_per_row);
    let threads = crate::pool::global().threads();
    if threads <= 1 || total < MIN_PARALLEL_MACS {
        return (1, rows);
    }
    let want = (total / TARGET_CHUNK_MACS).clamp(threads, threads * 8);
    // round the chunk count to a multiple of the thread count so the last
    // wave is not one thread working alone
    let want = want.div_ceil(threads) * threads;
    let chunk = rows.div_ceil(want).div_ceil(align) * align;
    (rows.div_ceil(chunk), chunk)
}

/// The quantized matmul of one or more matrices (`ws[i]`, all with `cols`
/// columns) against the same activations, writing `ys[i]`: activations
/// quantized once, then the row chunks of every matrix in one parallel
/// section. (`ws` entries are all `Some`; `Option` only lets the caller fill
/// a fixed array.)
fn quant_matmul<A: ActElem>(
    isa: &Isa,
    ws: &[Option<QRows<A>>],
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) {
    assert!(
        cols.is_multiple_of(BLOCK),
        "matmul: cols not a multiple of the block"
    );
    assert!(!ws.is_empty() && ws.len() == ys.len() && ws.len() <= MAX_FUSED);
    let nb = cols / BLOCK;
    let ws: [&QRows<A>; MAX_FUSED] =
        std::array::from_fn(|i| ws[i.min(ws.len() - 1)].as_ref().expect("matmul: matrix"));
    let ws = &ws[..ys.len()];
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert!(
            w.qs.len() >= w.rows * w.row_bytes
                && w.d.len() >= w.rows * w.d_row
                && w.sc.len() >= w.rows * w.sc_row
        );
        assert_eq!(y.len(), w.rows * n_tokens, "matmul: output shape");
    }
    let mut act = A::scratch().with(|s| std::mem::take(&mut *s.borrow_mut()));
    let q4k = matches!(ws[0].tile, Tile::K(_));
    A::quantize(isa, x, cols, q4k, &mut act);

    let lanes = ws[0].lanes.filter(|_| n_tokens > 1).zip(A::as_act8(&act));
    let mut asum = OFFSET_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if lanes.is_some() || q4k {
        let act8 = A::as_act8(&act).expect("block sums are of 8-bit activations");
        act_block_sums(&act8.qs, &mut asum);
    }
    let align = lanes.map_or(isa.tile_rows, |(l, _)| l.rows);
    // the chunks of matrix i are tasks first[i]..first[i + 1]
    let mut first = [0usize; MAX_FUSED + 1];
    let mut chunk = [0usize; MAX_FUSED];
    for (i, w) in ws.iter().enumerate() {
        let (n_chunks, c) = chunking(w.rows, cols * n_tokens, align);
        chunk[i] = c;
        first[i + 1] = first[i] + n_chunks;
    }
    let outs: [OutPtr; MAX_FUSED] = std::array::from_fn(|i| {
        OutPtr(
            ys.get_mut(i)
                .map_or(std::ptr::null_mut(), |y| y.as_mut_ptr()),
        )
    });
    let run = |task: usize| {
        let i = (0..ws.len())
            .rfind(|&i| first[i] <= task)
            .expect("task in range");
        let (w, out) = (ws[i], outs[i]);
        let r0 = (task - first[i]) * chunk[i];
        let r1 = (r0 + chunk[i]).min(w.rows);
        let mut r = r0;
        if let Some((lanes, act8)) = lanes {
            r = q4_lanes_range(lanes, w, nb, r0..r1, w.rows, act8, &asum, n_tokens, out);
        }
        quant_rows(isa, w, nb, r..r1, w.rows, &act, &asum, n_tokens, out);
    };
    let tasks = first[ws.len()];
    if tasks == 1 {
        run(0)
    } else {
        crate::pool::global().run(tasks, &run);
    }
    OFFSET_SCRATCH.with(|s| *s.borrow_mut() = asum);
    A::scratch().with(|s| *s.borrow_mut() = act);
}

/// Computes rows `range` for all tokens, tile by tile: for each group of
/// `tile_rows` weight rows, every token tile runs against the same weight
/// bytes (which stay in L1/L2), so each weight block is unpacked once per
/// token tile rather than once per token.
#[allow(clippy::too_many_arguments)]
fn quant_rows<A: ActElem>(
    isa: &Isa,
    w: &QRows<A>,
    nb: usize,
    range: std::ops::Range<usize>,
    rows: usize,
    act: &QuantBlocks<A>,
    asum: &[i32],
    n_tokens: usize,
    out: OutPtr,
) {
    let (tr, tt) = if n_tokens == 1 {
        (isa.tile_rows, 1)
    } else {
        (isa.tile_rows, isa.tile_tokens)
    };
    let cols = nb * BLOCK;
    let mut tile = [0f32; MAX_TILE];
    let mut repeated = ROW_SCALE_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut r0 = range.start;
    while r0 < range.end {
        let nr = tr.min(range.end - r0);
        let wq = &w.qs[r0 * w.row_bytes..(r0 + nr) * w.row_bytes];
        let mut wd = &w.d[r0 * w.d_row..(r0 + nr) * w.d_row];
        if w.row_scale {
            repeated.clear();
            for &d in wd {
                repeated.extend(std::iter::repeat_n(d, nb));
            }
            wd = &repeated;
        }
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = tt.min(n_tokens - t0);
            // one scale per block, or per group for q4k
            let ds = act.d.len() / n_tokens;
            let ad = &act.d[t0 * ds..(t0 + nt) * ds];
            match w.tile {
                Tile::Block(f) => {
                    let aq = &act.qs[t0 * cols..(t0 + nt) * cols];
                    f(wq, wd, aq, ad, nb, nr, nt, &mut tile)
                }
                Tile::K(f) => {
                    let act8 = A::as_act8(act).expect("q4k multiplies 8-bit activations");
                    let k = KRows {
                        qs: wq,
                        dm: wd,
                        sc: &w.sc[r0 * w.sc_row..(r0 + nr) * w.sc_row],
                    };
                    let aq = &act8.qs[t0 * cols..(t0 + nt) * cols];
                    let asum = &asum[t0 * nb..(t0 + nt) * nb];
                    f(k, aq, ad, asum, nb, nr, nt, &mut tile)
                }
            }
            for t in 0..nt {
                for r in 0..nr {
                    let idx = (t0 + t) * rows + r0 + r;
                    // SAFETY: idx < n_tokens * rows == y.len() (checked by the
                    // caller), and row r0 + r lies in this chunk's range, which
                    // no other chunk writes.
                    unsafe { out.write(idx, tile[r * MAX_TILE_T + t]) };
                }
            }
            t0 += nt;
        }
        r0 += nr;
    }
    ROW_SCALE_SCRATCH.with(|s| *s.borrow_mut() = repeated);
}

/// Computes the whole groups of `lanes.rows` rows at the start of `range`
/// with the rows-in-lanes kernel; returns the first row left for the row tiles.
#[allow(clippy::too_many_arguments)]
fn q4_lanes_range<A>(
    lanes: Q4Lanes,
    w: &QRows<A>,
    nb: usize,
    range: std::ops::Range<usize>,
    rows: usize,
    act: &QuantAct,
    asum: &[i32],
    n_tokens: usize,
    out: OutPtr,
) -> usize {
    let cols = nb * BLOCK;
    let mut tile = [0f32; MAX_TILE];
    let mut r0 = range.start;
    let n = lanes.rows;
    while r0 + n <= range.end {
        let wq = &w.qs[r0 * w.row_bytes..(r0 + n) * w.row_bytes];
        let wd = &w.d[r0 * w.d_row..(r0 + n) * w.d_row];
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = lanes.tokens.min(n_tokens - t0);
            let ds = act.d.len() / n_tokens;
            let (aq, ad) = (
                &act.qs[t0 * cols..(t0 + nt) * cols],
                &act.d[t0 * ds..(t0 + nt) * ds],
            );
            let asum = &asum[t0 * nb..(t0 + nt) * nb];
            match lanes.kernel {
                LanesKernel::Q4(f) => f(wq, w.row_bytes, wd, nb, aq, ad, asum, nt, &mut tile),
                LanesKernel::Q4K(f) => {
                    let k = KRows {
                        qs: wq,
                        dm: wd,
                        sc: &w.sc[r0 * w.sc_row..(r0 + n) * w.sc_row],
                    };
                    f(k, nb, aq, ad, asum, nt, &mut tile)
                }
            }
            for t in 0..nt {
                for r in 0..n {
                    // SAFETY: as in `quant_rows`: in bounds, and row r0 + r
                    // belongs to this chunk only.
                    unsafe { out.write((t0 + t) * rows + r0 + r, tile[r * MAX_TILE_T + t]) };
                }
            }
            t0 += nt;
        }
        r0 += n;
    }
    r0
}

/// f32/f16 weights: one dot product per (row, token), rows split across the pool.
fn float_rows(
    rows: usize,
    cols: usize,
    n_tokens: usize,
    y: &mut [f32],
    dot: &(dyn Fn(usize, usize) -> f32 + Sync),
) {
    let (n_chunks, chunk) = chunking(rows, cols * n_tokens, 1);
    let out = OutPtr(y.as_mut_ptr());
    let run = |c: usize| {
        let r0 = c * chunk;
        for r in r0..(r0 + chunk).min(rows) {
            for t in 0..n_tokens {
                // SAFETY: as in `quant_rows`: in bounds, and row r belongs to
                // this chunk only.
                unsafe { out.write(t * rows + r, dot(r, t)) };
            }
        }
    };
    if n_chunks == 1 {
        run(0)
    } else {
        crate::pool::global().run(n_chunks, &run);
    }
}
