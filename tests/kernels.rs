//! Every kernel set this CPU runs, checked against the scalar reference:
//! activation quantization (8- and 16-bit) and integer block sums bit for bit,
//! matmul and the f16/f32 helpers within a float tolerance derived from the
//! inputs.
//!
//! Tolerance: SIMD kernels sum the same per-block products in a different
//! order (lanes, then a horizontal sum), so for an output built from `n`
//! terms of total magnitude `S = sum |term|` the difference is bounded by
//! about `2 n eps S`; we allow `4 (n + 8) eps S`.

use half::f16;
use nibble::kernels::{
    scalar, KernelError, KernelSet, Kernels, QuantAct, QuantAct16, Q4K_ACT_SUBS,
};
use nibble::quant::{
    encode_matrix, q4k_pack_scales, q4k_unpack_scales, TensorType, WeightView, BLOCK,
    Q4K_SCALE_BYTES, Q4K_SUBS,
};
use proptest::prelude::*;

fn sets() -> Vec<Kernels> {
    let sets: Vec<Kernels> = KernelSet::available()
        .into_iter()
        .map(|s| Kernels::new(s).unwrap())
        .collect();
    assert!(sets[0].set() == KernelSet::Scalar);
    sets
}

/// Per-block magnitudes that stress the scales: zero blocks, subnormal-range,
/// tiny, ordinary, huge.
fn block_scale() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        Just(1e-39f32),
        Just(1e-20f32),
        Just(1e-3f32),
        Just(1.0f32),
        Just(1e3f32),
        Just(1e18f32),
    ]
}

/// A vector of `nb` blocks, each block uniform in [-s, s] for its own scale `s`,
/// sometimes with exact .5 ties after 8-bit or after 16-bit quantization.
fn blocks(nb: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(block_scale(), nb),
        prop::collection::vec(-1.0f32..1.0, nb * BLOCK),
        prop::collection::vec(0u8..4, nb),
        prop::collection::vec(-32767i32..32767, nb * BLOCK),
    )
        .prop_map(|(scales, unit, kind, halves)| {
            let mut v = Vec::with_capacity(unit.len());
            for b in 0..scales.len() {
                for j in 0..BLOCK {
                    let i = b * BLOCK + j;
                    // amax 127 (32767) makes the 8-bit (16-bit) inverse scale
                    // exactly 1, so k + 0.5 lands on a rounding tie
                    let qmax = match kind[b] {
                        0 => 127,
                        1 => 32767,
                        _ => 0,
                    };
                    v.push(if qmax == 0 {
                        unit[i] * scales[b]
                    } else if j == 0 {
                        qmax as f32
                    } else {
                        (halves[i] % qmax) as f32 + 0.5
                    });
                }
            }
            v
        })
}

fn weights(rows: usize, nb: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(
            prop_oneof![Just(0.0f32), Just(1e-6), Just(0.02), Just(1.0), Just(3e3)],
            rows * nb,
        ),
        prop::collection::vec(-1.0f32..1.0, rows * nb * BLOCK),
    )
        .prop_map(move |(scales, unit)| {
            unit.iter()
                .enumerate()
                .map(|(i, u)| u * scales[i / BLOCK])
                .collect()
        })
}

fn tolerance(
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
    r: usize,
    t: usize,
    quantized: bool,
) -> f32 {
    let cols = w.cols();
    let mut wr = vec![0f32; cols];
    w.dequantize_row(r, &mut wr);
    let xt = &x[t * cols..(t + 1) * cols];
    let mut xa = xt.to_vec();
    if matches!(w.tensor_type(), TensorType::Q8 | TensorType::Q8R) {
        let mut q = QuantAct16::default();
        scalar::quantize_act16(xt, &mut q);
        for (i, v) in xa.iter_mut().enumerate() {
            *v = q.qs[i] as f32 * q.d[i / BLOCK];
        }
    } else if w.tensor_type() == TensorType::Q4K {
        let mut q = QuantAct::default();
        scalar::quantize_act_grouped(xt, cols, &mut q);
        for (i, v) in xa.iter_mut().enumerate() {
            *v = q.qs[i] as f32 * q.d[i / (BLOCK * Q4K_ACT_SUBS)];
        }
    } else if quantized {
        let mut q = QuantAct::default();
        scalar::quantize_act(xt, &mut q);
        for (i, v) in xa.iter_mut().enumerate() {
            *v = q.qs[i] as f32 * q.d[i / BLOCK];
        }
    }
    // q4k sums the `d * sc * q` and `dmin * m` parts of each weight apart
    let wr = match *w {
        WeightView::Q4K { qs, dm, sc, .. } => q4k_part_magnitudes(qs, dm, sc, r, cols),
        _ => wr,
    };
    let s: f64 = wr
        .iter()
        .zip(&xa)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum();
    let _ = n_tokens;
    let n = if quantized { cols / BLOCK } else { cols };
    (4.0 * (n + 8) as f64 * f32::EPSILON as f64 * s) as f32 + f32::MIN_POSITIVE
}

/// `|d * sc * q| + |dmin * m|` of each weight of row `r` of a q4k matrix.
fn q4k_part_magnitudes(qs: &[u8], dm: &[f16], sc: &[u8], r: usize, cols: usize) -> Vec<f32> {
    let ng = cols.div_ceil(256);
    (0..cols)
        .map(|c| {
            let (g, k, j) = (r * ng + c / 256, c % 256 / 32, c % 32);
            let (s, m) = q4k_unpack_scales(&sc[g * Q4K_SCALE_BYTES..(g + 1) * Q4K_SCALE_BYTES]);
            let byte = qs[(r * cols + c - j) / 2 + j % 16];
            let q = if j < 16 { byte & 15 } else { byte >> 4 };
            (dm[2 * g].to_f32() * s[k] as f32 * q as f32).abs()
                + (dm[2 * g + 1].to_f32() * m[k] as f32).abs()
        })
        .collect()
}

fn check_matmul(
    k: &Kernels,
    w: &WeightView,
    x: &[f32],
    n_tokens: usize,
) -> Result<(), TestCaseError> {
    let rows = w.rows();
    let mut want = vec![0f32; rows * n_tokens];
    scalar::matmul(w, x, n_tokens, &mut want);
    let mut got = vec![f32::NAN; rows * n_tokens];
    k.matmul(w, x, n_tokens, &mut got);
    let quantized = w.tensor_type().is_quantized();
    for t in 0..n_tokens {
        for r in 0..rows {
            let (g, e) = (got[t * rows + r], want[t * rows + r]);
            if k.set() == KernelSet::Scalar {
                prop_assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "scalar set differs from reference at r={} t={}",
                    r,
                    t
                );
                continue;
            }
            let tol = tolerance(w, x, n_tokens, r, t, quantized);
            prop_assert!(
                (g - e).abs() <= tol || (g == e),
                "{} {:?} r={} t={}: got {} want {} (tol {})",
                k.set(),
                w.tensor_type(),
                r,
                t,
                g,
                e,
                tol
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn quantize_act_bit_identical(x in (1usize..24).prop_flat_map(blocks)) {
        let mut want = QuantAct::default();
        scalar::quantize_act(&x, &mut want);
        let mut want16 = QuantAct16::default();
        scalar::quantize_act16(&x, &mut want16);
        let bits = |d: &[f32]| d.iter().map(|d| d.to_bits()).collect::<Vec<u32>>();
        prop_assert!(want16.qs.iter().all(|&q| q != i16::MIN));
        for k in sets() {
            let mut got = QuantAct::default();
            k.quantize_act(&x, &mut got);
            prop_assert_eq!(&got.qs, &want.qs, "{} q", k.set());
            prop_assert_eq!(bits(&got.d), bits(&want.d), "{} d", k.set());
            // rows of one block, of 3, 5 and 9 blocks (runs with 1-block
            // tails), or one row of all
            let widths = [BLOCK, 3 * BLOCK, 5 * BLOCK, 9 * BLOCK, x.len()];
            for cols in widths.into_iter().filter(|c| x.len().is_multiple_of(*c)) {
                let mut want_g = QuantAct::default();
                scalar::quantize_act_grouped(&x, cols, &mut want_g);
                let mut got_g = QuantAct::default();
                k.quantize_act_grouped(&x, cols, &mut got_g);
                prop_assert_eq!(&got_g.qs, &want_g.qs, "{} grouped q", k.set());
                prop_assert_eq!(bits(&got_g.d), bits(&want_g.d), "{} grouped d", k.set());
            }
            let mut got16 = QuantAct16::default();
            k.quantize_act16(&x, &mut got16);
            prop_assert_eq!(&got16.qs, &want16.qs, "{} q16", k.set());
            prop_assert_eq!(bits(&got16.d), bits(&want16.d), "{} d16", k.set());
        }
    }

    /// With unit scales the float result is the sum of the integer block sums,
    /// exact in f32 here (|sum| < 2^24), so any integer difference shows.
    #[test]
    fn integer_block_sums_identical(
        (w4, a) in (1usize..40).prop_flat_map(|nb| (
            prop::collection::vec(any::<u8>(), nb * 16),
            prop::collection::vec(-127i8..=127, nb * 32),
        ))
    ) {
        let nb = a.len() / BLOCK;
        let wd = vec![f16::ONE; nb];
        let ad = vec![1f32; nb];
        let want4 = scalar::dot_q4_q8(&w4, &wd, &a, &ad);
        for k in sets() {
            prop_assert_eq!(k.dot_q4_q8(&w4, &wd, &a, &ad), want4, "{} q4", k.set());
        }
    }

    /// 8-bit weights × 16-bit activations, one block at a time with unit
    /// scales. The SIMD sets convert per-lane partial sums to f32, so their
    /// result is the exact integer block sum whenever `sum |w * a| < 2^24`
    /// (then every partial sum is exact in f32): full-range weights with
    /// |a| <= 4095 (32 * 128 * 4095 < 2^24) and |w| <= 15 with full-range
    /// activations (32 * 15 * 32767 < 2^24) must match bit for bit. Full range
    /// in both (block sums up to 2^27) matches within the rounding of the
    /// final f32 sums.
    #[test]
    fn q8_q16_integer_block_sums_identical(
        (w, a, narrow_w) in (1usize..12).prop_flat_map(|nb| (
            prop::collection::vec(any::<i8>(), nb * 32),
            prop::collection::vec(-32767i16..=32767, nb * 32),
            any::<bool>(),
        ))
    ) {
        let one = [f16::ONE];
        for (wb, ab) in w.chunks(BLOCK).zip(a.chunks(BLOCK)) {
            let (w_exact, a_exact): (Vec<i8>, Vec<i16>) = if narrow_w {
                (wb.iter().map(|&x| x % 16).collect(), ab.to_vec())
            } else {
                (wb.to_vec(), ab.iter().map(|&x| x % 4096).collect())
            };
            let mag: i64 = wb.iter().zip(ab).map(|(&x, &y)| (x as i64 * y as i64).abs()).sum();
            let exact: i64 = w_exact.iter().zip(&a_exact).map(|(&x, &y)| x as i64 * y as i64).sum();
            let want = scalar::dot_q8_q16(&w_exact, &one, &a_exact, &[1.0]);
            prop_assert_eq!(want as i64, exact);
            let want_full = scalar::dot_q8_q16(wb, &one, ab, &[1.0]);
            for k in sets() {
                prop_assert_eq!(k.dot_q8_q16(&w_exact, &one, &a_exact, &[1.0]), want, "{} q8", k.set());
                let got = k.dot_q8_q16(wb, &one, ab, &[1.0]);
                let tol = 8.0 * f32::EPSILON * mag as f32;
                prop_assert!((got - want_full).abs() <= tol,
                    "{} q8 full range: {} vs {} (tol {})", k.set(), got, want_full, tol);
            }
        }
    }

    #[test]
    fn quantized_matmul_matches_scalar(
        (rows, nb, n_tokens, wv, x) in (1usize..19, 1usize..10, 1usize..10)
            .prop_flat_map(|(rows, nb, n)| (Just(rows), Just(nb), Just(n), weights(rows, nb), blocks(nb * n)))
    ) {
        let cols = nb * BLOCK;
        for ty in [TensorType::Q4, TensorType::Q8, TensorType::Q8R, TensorType::F16, TensorType::F32] {
            let bytes = encode_matrix(ty, cols, &wv).unwrap();
            let w = WeightView::from_bytes(ty, rows, cols, &bytes).unwrap();
            // f16 cannot hold the huge activation blocks' products without
            // overflow; keep float weights to the quantized comparisons' range
            for k in sets() {
                check_matmul(&k, &w, &x, n_tokens)?;
            }
        }
    }

    /// q4k weights against every set, prefill and decode, rows and tokens
    /// not multiples of the tiles (16 rows or more reach the rows-in-lanes
    /// prefill kernels), rows of whole groups of 8 blocks or ending in a
    /// shorter group.
    #[test]
    fn q4k_matmul_matches_scalar(
        (rows, nb, n_tokens, wv, x) in (1usize..40, 1usize..21, 1usize..11)
            .prop_flat_map(|(rows, nb, n)| (Just(rows), Just(nb), Just(n), weights(rows, nb), blocks(nb * n)))
    ) {
        let cols = nb * BLOCK;
        let bytes = encode_matrix(TensorType::Q4K, cols, &wv).unwrap();
        let w = WeightView::from_bytes(TensorType::Q4K, rows, cols, &bytes).unwrap();
        for k in sets() {
            check_matmul(&k, &w, &x, n_tokens)?;
        }
    }

    /// The integer parts of the q4k dot (`Σ q a` per block and `Σ a`) bit
    /// for bit: with unit `d`, `dmin` and activation scales the result is
    /// `Σ_b sc_b Σ q a - m_b Σ a`, exact in f32 here (activations within
    /// ±31 keep every partial sum below 2^24), for any scales and nibbles.
    /// Full-range activations agree within the rounding of the f32 sums.
    #[test]
    fn q4k_integer_parts_identical(
        (w, a, scm) in (1usize..21).prop_flat_map(|nb| (
            prop::collection::vec(any::<u8>(), nb * 16),
            prop::collection::vec(-127i8..=127, nb * 32),
            // a short last group's missing fields too: a file may hold any
            prop::collection::vec((0u8..64, 0u8..64), nb.div_ceil(8) * 8),
        ))
    ) {
        let nb = a.len() / 32;
        let ng = nb.div_ceil(Q4K_SUBS);
        let mut sc = vec![0u8; ng * Q4K_SCALE_BYTES];
        for g in 0..ng {
            let s: [u8; 8] = std::array::from_fn(|k| scm[g * 8 + k].0);
            let m: [u8; 8] = std::array::from_fn(|k| scm[g * 8 + k].1);
            q4k_pack_scales(&s, &m, &mut sc[g * 12..(g + 1) * 12]);
        }
        let dm = vec![f16::ONE; 2 * ng];
        let ad = vec![1f32; nb.div_ceil(Q4K_ACT_SUBS)];
        let exact = |a: &[i8]| -> i64 {
            let mut total = 0i64;
            for b in 0..nb {
                let (s, m) = (scm[b].0 as i64, scm[b].1 as i64);
                let mut qa = 0i64;
                let mut sa = 0i64;
                for j in 0..32 {
                    let byte = w[b * 16 + j % 16];
                    let q = if j < 16 { byte & 15 } else { byte >> 4 };
                    qa += q as i64 * a[b * 32 + j] as i64;
                    sa += a[b * 32 + j] as i64;
                }
                total += s * qa - m * sa;
            }
            total
        };
        let narrow: Vec<i8> = a.iter().map(|&v| v % 32).collect();
        let want = scalar_q4k(&w, &dm, &sc, &narrow, &ad);
        prop_assert_eq!(want as i64, exact(&narrow));
        let want_full = scalar_q4k(&w, &dm, &sc, &a, &ad);
        let mag = (nb * 32 * 15 * 127 * 63) as f32;
        for k in sets() {
            prop_assert_eq!(k.dot_q4k_q8(&w, &dm, &sc, &narrow, &ad), want, "{} q4k", k.set());
            let got = k.dot_q4k_q8(&w, &dm, &sc, &a, &ad);
            prop_assert!((got - want_full).abs() <= 4.0 * f32::EPSILON * mag,
                "{} q4k full range: {} vs {}", k.set(), got, want_full);
        }
    }

    #[test]
    fn float_dots_match_scalar(
        (a, b) in (0usize..100).prop_flat_map(|n| (
            prop::collection::vec(-100f32..100.0, n),
            prop::collection::vec(-100f32..100.0, n),
        ))
    ) {
        let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let mag: f32 = ah.iter().zip(&b).map(|(x, y)| (x.to_f32() * y).abs()).sum();
        let mag32: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        let tol = |m: f32| 4.0 * (a.len() + 8) as f32 * f32::EPSILON * m + f32::MIN_POSITIVE;
        let want16 = scalar::dot_f16(&ah, &b);
        let want32 = scalar::dot_f32(&a, &b);
        for k in sets() {
            let g = k.dot_f16(&ah, &b);
            prop_assert!((g - want16).abs() <= tol(mag), "{} dot_f16 {} vs {}", k.set(), g, want16);
            let g = k.dot_f32(&a, &b);
            prop_assert!((g - want32).abs() <= tol(mag32), "{} dot_f32 {} vs {}", k.set(), g, want32);
        }
    }
}

/// The scalar reference q4k dot, with the activation block sums it needs.
fn scalar_q4k(w: &[u8], dm: &[f16], sc: &[u8], a: &[i8], ad: &[f32]) -> f32 {
    let asum: Vec<i32> = a
        .chunks(BLOCK)
        .map(|b| b.iter().map(|&v| v as i32).sum())
        .collect();
    scalar::dot_q4k_q8(w, dm, sc, a, ad, &asum)
}

/// Shapes big enough to be split into parallel chunks, on odd and even pool
/// sizes, prefill and decode, with rows and tokens that are not multiples of
/// the tiles.
#[test]
fn threaded_matmul_matches_scalar() {
    let (rows, cols) = (203, 1024);
    let mut seed = 0x9e37_79b9u32;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    let wv: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
    let x: Vec<f32> = (0..7 * cols).map(|_| rnd()).collect();
    for ty in [
        TensorType::Q4K,
        TensorType::Q4,
        TensorType::Q8,
        TensorType::Q8R,
        TensorType::F16,
    ] {
        let bytes = encode_matrix(ty, cols, &wv).unwrap();
        let w = WeightView::from_bytes(ty, rows, cols, &bytes).unwrap();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for k in sets() {
                for n in [1, 7] {
                    pool.install(|| check_matmul(&k, &w, &x[..n * cols], n))
                        .unwrap();
                }
            }
        }
    }
}

#[test]
fn kernel_set_names_and_errors() {
    for s in KernelSet::ALL {
        if s != KernelSet::NeonDotprod {
            let parsed = KernelSet::parse(s.name()).unwrap();
            assert!(parsed == s || (s == KernelSet::Neon && parsed == KernelSet::NeonDotprod));
        }
    }
    assert_eq!(KernelSet::parse("sse9"), None);
    assert!(KernelSet::Scalar.is_supported());
    for s in KernelSet::ALL {
        match Kernels::new(s) {
            Ok(k) => assert_eq!(k.set(), s),
            Err(e) => {
                assert_eq!(e, KernelError::Unsupported(s));
                let msg = e.to_string();
                assert!(msg.contains(s.name()) && msg.contains("scalar"), "{msg}");
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert!(!KernelSet::Neon.is_supported());
    #[cfg(target_arch = "aarch64")]
    assert!(KernelSet::Neon.is_supported() && !KernelSet::Avx2.is_supported());
}

/// The largest block sums 8-bit weights and 16-bit activations can form
/// (`±128 * ±32767 * 32`, about 2^27): no lane of any set may wrap or
/// saturate. These sums are multiples of 2^5 below 2^28, so exact in f32.
#[test]
fn q8_q16_extreme_blocks() {
    let one = [f16::ONE];
    for (wv, av) in [
        (127i8, 32767i16),
        (-128, 32767),
        (-128, -32767),
        (127, -32767),
    ] {
        let w = [wv; BLOCK];
        let a = [av; BLOCK];
        let want = (32 * wv as i64 * av as i64) as f32;
        assert_eq!(scalar::dot_q8_q16(&w, &one, &a, &[1.0]), want);
        for k in sets() {
            assert_eq!(
                k.dot_q8_q16(&w, &one, &a, &[1.0]),
                want,
                "{} {wv} {av}",
                k.set()
            );
        }
    }
    // large partial products of opposite sign that cancel to a small sum
    let w: Vec<i8> = (0..BLOCK)
        .map(|i| if i < 16 { -128 } else { 127 })
        .collect();
    let a = [32767i16; BLOCK];
    let want = scalar::dot_q8_q16(&w, &one, &a, &[1.0]);
    assert_eq!(want, (-16 * 32767) as f32);
    for k in sets() {
        assert_eq!(
            k.dot_q8_q16(&w, &one, &a, &[1.0]),
            want,
            "{} cancelling",
            k.set()
        );
    }
}

/// The sets detection offers are the ones the CPU has, so a detection bug
/// cannot silently skip a kernel set's tests: a CI script pins them with
/// `NIBBLE_EXPECT_KERNELS` (e.g. that qemu's Cortex-A53 has no dotprod and
/// its "max" CPU has); on x86-64 without it, they are derived from the
/// kernel's own view of the CPU, the flags of `/proc/cpuinfo`, independently
/// of the `cpuid` probing the detection uses.
#[test]
fn expected_kernel_sets_available() {
    let have: Vec<&str> = KernelSet::available().iter().map(|s| s.name()).collect();
    if let Ok(expect) = std::env::var("NIBBLE_EXPECT_KERNELS") {
        assert_eq!(have.join(","), expect);
        return;
    }
    if cfg!(target_arch = "x86_64") {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return; // not Linux: nothing independent to compare with
        };
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let all = |names: &[&str]| names.iter().all(|n| flags.contains(n));
        let avx2 = all(&["avx2", "fma", "f16c"]);
        let mut want = vec!["scalar"];
        if avx2 {
            want.push("avx2");
        }
        if avx2 && all(&["avx_vnni"]) {
            want.push("avxvnni");
        }
        if avx2 && all(&["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]) {
            want.push("avx512");
        }
        assert_eq!(have, want, "/proc/cpuinfo flags: {flags:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Scores differ by dot-product rounding (|q·k| scale up to ~16 here, so
    /// ~1e-6 absolute) and the vector exp (~2e-7 relative); each output is a
    /// convex combination of the values, so 1e-4 × max |v| bounds both.
    #[test]
    fn attend_f16_matches_scalar(
        // head sizes of whole 8-lane vectors (every real model's) take the
        // SIMD sets' eight-keys-at-a-time path
        (hd, len, q, k, v, scale) in (prop_oneof![1usize..100, (1usize..17).prop_map(|k| 8 * k)], 1usize..70).prop_flat_map(|(hd, len)| (
            Just(hd),
            Just(len),
            prop::collection::vec(-2f32..2.0, hd),
            prop::collection::vec(-2f32..2.0, hd * len),
            prop::collection::vec(-50f32..50.0, hd * len),
            0.01f32..1.0,
        ))
    ) {
        let k: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let vmax = v.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
        let (mut want, mut ws) = (vec![0f32; hd], vec![0f32; len]);
        scalar::attend_f16(&q, &k, &v, scale, &mut ws, &mut want);
        for kset in sets() {
            let (mut got, mut gs) = (vec![f32::NAN; hd], vec![0f32; len]);
            kset.attend_f16(&q, &k, &v, scale, &mut gs, &mut got);
            for c in 0..hd {
                prop_assert!((got[c] - want[c]).abs() <= 1e-4 * vmax + 1e-30,
                    "{} out[{}] {} vs {}", kset.set(), c, got[c], want[c]);
            }
            for j in 0..len {
                prop_assert!((gs[j] - ws[j]).abs() <= 1e-5, "{} p[{}] {} vs {}", kset.set(), j, gs[j], ws[j]);
            }
        }
    }

    /// Several queries over one KV head, each with its own length (block
    /// sizes from 8 keys at hd 512 to 64 at hd 64, so lengths up to 200 span
    /// several blocks), on f32 rows widened from f16: every set gives each
    /// query exactly what its one-query f16 attention gives on the f16 rows,
    /// so prefill (which widens the cache) and decode agree bit for bit.
    #[test]
    fn attend_f32_many_equals_f16_attention_per_query(
        (hd, lens, q, k, v) in (prop_oneof![1usize..40, (1usize..9).prop_map(|k| 8 * k), Just(512)],
                                prop::collection::vec(1usize..200, 1..12))
            .prop_flat_map(|(hd, lens)| {
                let longest = *lens.iter().max().unwrap();
                (
                    Just(hd),
                    Just(lens.clone()),
                    prop::collection::vec(-2f32..2.0, hd * lens.len()),
                    prop::collection::vec(-2f32..2.0, hd * longest),
                    prop::collection::vec(-50f32..50.0, hd * longest),
                )
            })
    ) {
        let (nq, longest) = (lens.len(), *lens.iter().max().unwrap());
        let scale = 0.125;
        let (k16, v16): (Vec<f16>, Vec<f16>) =
            (k.iter().map(|&x| f16::from_f32(x)).collect(), v.iter().map(|&x| f16::from_f32(x)).collect());
        let (kw, vw): (Vec<f32>, Vec<f32>) =
            (k16.iter().map(|x| x.to_f32()).collect(), v16.iter().map(|x| x.to_f32()).collect());
        for kset in sets() {
            let (mut out, mut scores) = (vec![f32::NAN; nq * hd], vec![0f32; nq * longest]);
            kset.attend_f32_many(&q, &lens, &kw, &vw, scale, &mut scores, &mut out);
            for (i, &len) in lens.iter().enumerate() {
                let (mut want, mut ws) = (vec![0f32; hd], vec![0f32; len]);
                kset.attend_f16(&q[i * hd..(i + 1) * hd], &k16, &v16, scale, &mut ws, &mut want);
                prop_assert_eq!(&out[i * hd..(i + 1) * hd], &want[..], "{} query {} of {}", kset.set(), i, nq);
                prop_assert_eq!(&scores[i * longest..i * longest + len], &ws[..], "{} scores {}", kset.set(), i);
            }
        }
    }

    /// The vector exp's relative error (~2e-7) and the division's rounding
    /// bound each SIMD result within 1e-6 of the scalar one relative to
    /// |up · gate| (which also covers gates past exp's clamping range,
    /// where silu is ~0 or ~the gate itself); lengths cover the tails.
    #[test]
    fn swiglu_matches_scalar(
        (gate, up) in (0usize..70).prop_flat_map(|n| (
            prop::collection::vec(prop_oneof![-20f32..20.0, -200f32..200.0], n),
            prop::collection::vec(-5f32..5.0, n),
        ))
    ) {
        let mut want = gate.clone();
        scalar::swiglu(&mut want, &up);
        for kset in sets() {
            let mut got = gate.clone();
            kset.swiglu(&mut got, &up);
            for i in 0..gate.len() {
                let bound = 1e-6 * (up[i] * gate[i]).abs() + 1e-30;
                prop_assert!((got[i] - want[i]).abs() <= bound,
                    "{} gate {} up {}: {} vs {}", kset.set(), gate[i], up[i], got[i], want[i]);
            }
        }
    }
}

/// `matmul_many` (one activation quantization, one parallel section for
/// several matrices) gives exactly what separate `matmul`s give: same types
/// fused, mixed types split, on every set, decode and prefill, with row
/// counts that are not multiples of the tiles or lane groups.
#[test]
fn matmul_many_equals_separate_matmuls() {
    let cols = 320;
    let mut seed = 0x1234_5679u32;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..9 * cols).map(|_| rnd()).collect();
    // the first two of each list fuse; with all three the first two still
    // fuse and the third (another type) runs on its own
    let lists = [
        [
            (517, TensorType::Q4),
            (67, TensorType::Q4),
            (133, TensorType::Q8),
        ],
        [
            (133, TensorType::Q8R),
            (61, TensorType::Q8R),
            (70, TensorType::Q8),
        ],
        [
            (45, TensorType::Q8),
            (61, TensorType::Q8),
            (29, TensorType::F16),
        ],
    ];
    for shapes in lists {
        let bytes: Vec<_> = shapes
            .iter()
            .map(|&(rows, ty)| {
                let wv: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
                (rows, ty, encode_matrix(ty, cols, &wv).unwrap())
            })
            .collect();
        let views: Vec<WeightView> = bytes
            .iter()
            .map(|(rows, ty, b)| WeightView::from_bytes(*ty, *rows, cols, b).unwrap())
            .collect();
        for k in sets() {
            for n in [1, 9] {
                let want: Vec<Vec<f32>> = views
                    .iter()
                    .map(|w| {
                        let mut y = vec![0f32; n * w.rows()];
                        k.matmul(w, &x[..n * cols], n, &mut y);
                        y
                    })
                    .collect();
                for m in [2, 3] {
                    let mut ys: Vec<Vec<f32>> = views[..m]
                        .iter()
                        .map(|w| vec![f32::NAN; n * w.rows()])
                        .collect();
                    let mut outs: Vec<(&WeightView, &mut [f32])> = views[..m]
                        .iter()
                        .zip(ys.iter_mut())
                        .map(|(w, y)| (w, y.as_mut_slice()))
                        .collect();
                    k.matmul_many(&x[..n * cols], n, &mut outs);
                    for (i, y) in ys.iter().enumerate() {
                        assert!(y == &want[i], "{} n={n} matrix {i} of {m}", k.set());
                    }
                }
            }
        }
    }
}
