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
//! This file is that selection and the public façade ([`Kernels`] and the
//! free functions on the active set). `tile.rs` holds the ABI of the
//! register-tile kernels (function-pointer types, the weight-row views, the
//! `target_instance!` macro that compiles a set's kernel bodies with its
//! features) and `matmul.rs` the threaded matmul driver.
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

mod matmul;
pub mod scalar;
mod tile;

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
use std::fmt;
use std::sync::OnceLock;

use matmul::quantize_act_rows;
use tile::{BlockRows, KRows, Q4Lanes, Q4kTileFn, QTileFn, MAX_TILE};

pub use matmul::act_block_sums;
pub use scalar::{QuantAct, QuantAct16, QuantBlocks};
pub use tile::Q4K_ACT_SUBS;

/// Environment variable that overrides kernel detection.
pub const KERNELS_ENV: &str = "NIBBLE_KERNELS";

/// See [`Isa::quantize_act`].
pub(crate) type QuantizeActFn = fn(x: &[f32], qs: &mut [i8], d: &mut [f32], blocks: usize);

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
/// detection). Idempotent. [`crate::Model::open`] calls it, so a bad
/// override is an error there; a program that calls the kernel functions
/// directly calls it first (otherwise the first kernel call panics with the
/// message).
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

    /// The process-wide set ([`init`]).
    pub fn active() -> Result<Kernels, KernelError> {
        init()
    }

    /// The process-wide set for the free kernel functions, which have no
    /// error path: [`Model::open`](crate::Model::open) calls [`init`] first
    /// and returns a bad `NIBBLE_KERNELS` as an error, so only a caller that
    /// skips both can reach the panic.
    fn chosen() -> Kernels {
        init().unwrap_or_else(|e| panic!("{e} (kernels::init() returns this as an error)"))
    }

    pub fn set(&self) -> KernelSet {
        self.isa.set
    }

    /// See [`matmul`].
    pub fn matmul(&self, w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
        self.matmul_many(x, n_tokens, &mut [(w, y)])
    }

    /// See [`matmul_many`].
    pub fn matmul_many(&self, x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
        for (w, y) in outs.iter() {
            assert_eq!(x.len(), n_tokens * w.cols(), "matmul: activation shape");
            assert_eq!(y.len(), n_tokens * w.rows(), "matmul: output shape");
        }
        matmul::matmul_many(self.isa, x, n_tokens, outs)
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
        (self.isa.q4_tile)(BlockRows { qs: wq, d: wd }, aq, ad, nb, 1, 1, &mut out);
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
        let w = BlockRows {
            qs: bytemuck::cast_slice(wq),
            d: wd,
        };
        (self.isa.q8_tile)(w, aq, ad, nb, 1, 1, &mut out);
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
    Kernels::chosen().attend_f16(q, keys, values, scale, scores, out)
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
    Kernels::chosen().attend_f32(q, keys, values, scale, scores, out)
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
    Kernels::chosen().attend_f32_many(q, lens, keys, values, scale, scores, out)
}

/// The SwiGLU gate: `gate[i] = silu(gate[i]) * up[i]` with `silu(x) = x /
/// (1 + e^-x)`. The x86 sets use a vector `exp` (relative error below 1e-6).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    Kernels::chosen().swiglu(gate, up)
}

/// Name of the kernel set in use (e.g. `"avx2"`), for logs and `--json`.
pub fn active_name() -> &'static str {
    Kernels::chosen().set().name()
}

/// `y[t * rows + r] = sum_c W[r, c] * x[t * cols + c]` for each of `n_tokens`
/// activation rows. For quantized weights the activations are first quantized
/// to blocks (8-bit for q4 weights, 16-bit for q8; see
/// [`scalar::quantize_act`], [`scalar::quantize_act16`]); for f32/f16 weights
/// the product is computed in f32. Rows are split across the global
/// [`crate::pool`].
pub fn matmul(w: &WeightView, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    Kernels::chosen().matmul(w, x, n_tokens, y)
}

/// Several matrices applied to the same activations (`outs[i].1 = outs[i].0 ·
/// x`, each as in [`matmul`]), e.g. the query, key and value projections. When
/// they share a quantized type the activations are quantized once and the row
/// chunks of all of them run in one parallel section, so the threads meet once
/// instead of once per matrix. Results are identical to separate [`matmul`]s.
pub fn matmul_many(x: &[f32], n_tokens: usize, outs: &mut [(&WeightView, &mut [f32])]) {
    Kernels::chosen().matmul_many(x, n_tokens, outs)
}
