//! Properties of the tensor encodings, checked against the bounds and rules
//! stated in `format-spec/SPEC.md` (section 6): per-element error bounds,
//! exact round trips of on-grid values, zero and constant blocks, extreme
//! magnitudes, refusal of NaN/Inf and of scales beyond f16, determinism.

use half::f16;
use nibble::quant::{encode_matrix, QuantError, TensorType, WeightView, BLOCK};
use proptest::prelude::*;

const TWO: f64 = 2.0;

/// Encodes one row and decodes it through the reader's view.
fn round_trip(ty: TensorType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bytes = encode_matrix(ty, x.len(), x).unwrap();
    let view = WeightView::from_bytes(ty, 1, x.len(), &bytes).unwrap();
    let mut out = vec![0f32; x.len()];
    view.dequantize_row(0, &mut out);
    (bytes, out)
}

/// The f16 scale of block `b` of a one-row quantized encoding, as f32.
fn scale(ty: TensorType, bytes: &[u8], b: usize) -> f32 {
    let q = if ty == TensorType::Q8 {
        bytes.len() / 34 * 32
    } else {
        bytes.len() / 18 * 16
    };
    f16::from_bits(u16::from_le_bytes([bytes[q + 2 * b], bytes[q + 2 * b + 1]])).to_f32()
}

fn amax(b: &[f32]) -> f64 {
    b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64))
}

/// q4's `m`: the first element of largest magnitude.
fn q4_m(b: &[f32]) -> f32 {
    b.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Checks every element of a q8 row against both bounds of SPEC.md.
fn check_q8(x: &[f32]) -> Result<(), TestCaseError> {
    let (bytes, y) = round_trip(TensorType::Q8, x);
    for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
        let s = scale(TensorType::Q8, &bytes, b) as f64;
        prop_assert!(s >= 0.0 && s.is_sign_positive());
        let a = amax(xb);
        let by_scale = (s * (0.5 + TWO.powi(-17))).max(a - 127.0 * s);
        let by_values = a / 254.0 * (1.0 + TWO.powi(-10)) + TWO.powi(-18);
        for (j, (&xj, &yj)) in xb.iter().zip(yb).enumerate() {
            let e = (xj as f64 - yj as f64).abs();
            prop_assert!(
                e <= by_scale,
                "block {b} elt {j}: {xj} -> {yj}, err {e} > {by_scale} (s {s})"
            );
            prop_assert!(
                e <= by_values,
                "block {b} elt {j}: {xj} -> {yj}, err {e} > {by_values} (a {a})"
            );
        }
        // -128 is never written.
        prop_assert!(bytes[b * 32..b * 32 + 32].iter().all(|&q| q != 0x80));
    }
    Ok(())
}

/// Checks every element of a q8r row (one scale for the whole row, its last
/// two bytes) against q8's bounds taken over the row.
fn check_q8r(x: &[f32]) -> Result<(), TestCaseError> {
    let (bytes, y) = round_trip(TensorType::Q8R, x);
    prop_assert_eq!(bytes.len(), x.len() + 2);
    let s = f16::from_le_bytes([bytes[x.len()], bytes[x.len() + 1]]).to_f32() as f64;
    prop_assert!(s >= 0.0 && s.is_sign_positive());
    let a = amax(x);
    let by_scale = (s * (0.5 + TWO.powi(-17))).max(a - 127.0 * s);
    let by_values = a / 254.0 * (1.0 + TWO.powi(-10)) + TWO.powi(-18);
    for (j, (&xj, &yj)) in x.iter().zip(&y).enumerate() {
        let e = (xj as f64 - yj as f64).abs();
        prop_assert!(
            e <= by_scale,
            "elt {j}: {xj} -> {yj}, err {e} > {by_scale} (s {s})"
        );
        prop_assert!(
            e <= by_values,
            "elt {j}: {xj} -> {yj}, err {e} > {by_values} (a {a})"
        );
    }
    prop_assert!(bytes[..x.len()].iter().all(|&q| q != 0x80));
    Ok(())
}

/// Round half away from zero, as SPEC.md prescribes.
fn round_half_away(v: f32) -> f32 {
    let t = v.abs().floor();
    let r = if v.abs() - t >= 0.5 { t + 1.0 } else { t };
    r.copysign(v)
}

/// Squared error of a q4 block decoded with scale `d` and the levels SPEC.md
/// derives from it.
fn q4_sse(xb: &[f32], d: f32) -> f64 {
    xb.iter()
        .map(|&x| {
            let k = if d == 0.0 {
                0.0
            } else {
                round_half_away(x / d).clamp(-8.0, 7.0)
            };
            (x as f64 - (d * k) as f64).powi(2)
        })
        .sum()
}

/// Checks a q4 row against SPEC.md: the scale's sign, each nibble being the
/// level its value rounds to under the stored scale, the per-element bound
/// that follows, and a block error no larger than plain max scaling's
/// (`d = f16(m / -8)`), the baseline every q4 scale choice must match.
fn check_q4(x: &[f32]) -> Result<(), TestCaseError> {
    let (bytes, y) = round_trip(TensorType::Q4, x);
    for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
        let d = scale(TensorType::Q4, &bytes, b);
        let s = d.abs() as f64;
        let m = q4_m(xb);
        if d == 0.0 {
            prop_assert!(d.is_sign_positive(), "a zero scale is stored as +0");
        } else {
            prop_assert!((d < 0.0) == (m > 0.0), "d {d} has the sign of m {m}");
        }
        for (j, (&xj, &yj)) in xb.iter().zip(yb).enumerate() {
            let byte = bytes[b * 16 + j % 16];
            let nibble = if j < 16 { byte & 0x0f } else { byte >> 4 };
            let expect = if d == 0.0 {
                8
            } else {
                (round_half_away(xj / d) + 8.0).clamp(0.0, 15.0) as u8
            };
            prop_assert_eq!(nibble, expect, "block {} elt {}: {} / {}", b, j, xj, d);
            // Below the grid's middle the levels reach 8 steps, above it 7.
            let steps = if d != 0.0 && xj / d > 0.0 { 7.0 } else { 8.0 };
            let bound = (s * (0.5 + TWO.powi(-20))).max(xj.abs() as f64 - steps * s);
            let e = (xj as f64 - yj as f64).abs();
            prop_assert!(
                e <= bound,
                "block {b} elt {j}: {xj} -> {yj}, err {e} > {bound} (d {d})"
            );
        }
        let plain = f16::from_f32(m / -8.0).to_f32();
        let (chosen, baseline) = (q4_sse(xb, d), q4_sse(xb, plain));
        // The encoder may compare errors summed in f32 (SPEC.md): allow for
        // that rounding, a few parts per million of the sum.
        prop_assert!(
            chosen <= baseline * (1.0 + 1e-5),
            "block {b}: squared error {chosen} > max scaling's {baseline}"
        );
    }
    Ok(())
}

/// The q4 per-element bounds of SPEC.md in terms of the block's values, for
/// max scaling (`d = f16(m / -8)`): checked on the reference formula itself.
fn check_q4_max_scaling_bounds(xb: &[f32]) -> Result<(), TestCaseError> {
    let m = q4_m(xb);
    let d = f16::from_f32(m / -8.0).to_f32();
    let big_m = m.abs() as f64;
    for &x in xb {
        let k = if d == 0.0 {
            0.0
        } else {
            round_half_away(x / d).clamp(-8.0, 7.0)
        };
        let e = (x as f64 - (d * k) as f64).abs();
        let same_side = x == 0.0 || (x > 0.0) == (m > 0.0);
        let bound = if same_side {
            big_m / 16.0 * (1.0 + TWO.powi(-10)) + TWO.powi(-21)
        } else {
            big_m / 8.0 * (1.0 + TWO.powi(-8)) + TWO.powi(-21)
        };
        prop_assert!(e <= bound, "{x} -> {}, err {e} > {bound} (m {m})", d * k);
    }
    Ok(())
}

/// Blocks whose values span a chosen binary exponent range: most of the
/// interesting behaviour (subnormal scales, scales near f16's top) depends on
/// the block's magnitude, which uniform sampling would rarely reach.
fn blocks(n_blocks: usize, max_exp: i32) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        (
            prop::collection::vec(-1.0f32..=1.0, BLOCK),
            -140i32..=max_exp,
            prop::collection::vec(prop::bool::weighted(0.1), BLOCK),
        ),
        n_blocks,
    )
    .prop_map(|bs| {
        bs.into_iter()
            .flat_map(|(v, e, zero)| {
                let k = 2f32.powi(e.max(-126)) * 2f32.powi((e + 126).min(0));
                v.into_iter()
                    .zip(zero)
                    .map(move |(x, z)| if z { 0.0 } else { x * k })
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn q8_error_within_bound(x in blocks(3, 22)) {
        check_q8(&x)?;
    }

    #[test]
    fn q8r_error_within_bound(x in blocks(3, 22)) {
        check_q8r(&x)?;
    }

    #[test]
    fn q4_error_within_bound(x in blocks(3, 18)) {
        check_q4(&x)?;
        for b in x.chunks(BLOCK) {
            check_q4_max_scaling_bounds(b)?;
        }
    }

    #[test]
    fn q8_q4_uniform_values_within_bound(x in prop::collection::vec(-1e3f32..1e3, 64)) {
        check_q8(&x)?;
        check_q8r(&x)?;
        check_q4(&x)?;
    }

    /// f16 encoding: within max(|x| 2^-11, 2^-25), and it is IEEE
    /// round-to-nearest-even (the rounding SPEC.md prescribes for scales too).
    #[test]
    fn f16_is_round_to_nearest_even(x in prop_oneof![-65519.0f32..65519.0, -1e-3f32..1e-3, -1e-6f32..1e-6]) {
        let (bytes, y) = round_trip(TensorType::F16, &[x]);
        let h = u16::from_le_bytes([bytes[0], bytes[1]]);
        let y = y[0] as f64;
        let x64 = x as f64;
        let e = (x64 - y).abs();
        prop_assert!(e <= (x64.abs() * TWO.powi(-11)).max(TWO.powi(-25)), "{x} -> {y}");
        // No neighbouring f16 is closer, and a tie went to the even one.
        let mag = h & 0x7fff;
        for n in [mag.wrapping_sub(1), mag + 1] {
            if n > 0x7bff {
                continue;
            }
            let other = f16::from_bits(n | (h & 0x8000)).to_f32() as f64;
            let e2 = (x64 - other).abs();
            prop_assert!(e <= e2, "{x}: {y} is not nearest, {other} is");
            if e == e2 {
                prop_assert!(h & 1 == 0, "{x}: tie not to even");
            }
        }
        // Also on the other side of zero for values near it.
        if mag == 0 {
            prop_assert!(x64.abs() <= TWO.powi(-25));
        }
    }

    /// On-grid q8 values: `d * k` with d a positive f16 and some |k| = 127.
    #[test]
    fn q8_grid_values_round_trip_exactly(
        d_bits in 1u16..=0x7bff,
        mut k in prop::collection::vec(-127i32..=127, BLOCK),
        at in 0..BLOCK,
        neg in any::<bool>(),
    ) {
        k[at] = if neg { -127 } else { 127 };
        let d = f16::from_bits(d_bits).to_f32();
        let x: Vec<f32> = k.iter().map(|&k| d * k as f32).collect();
        let (bytes, y) = round_trip(TensorType::Q8, &x);
        prop_assert_eq!(&y, &x);
        prop_assert_eq!(scale(TensorType::Q8, &bytes, 0), d);
        let q: Vec<i32> = bytes[..BLOCK].iter().map(|&b| b as i8 as i32).collect();
        prop_assert_eq!(q, k);
    }

    /// On-grid q4 values: `d * k`, d a non-zero f16, k in -8..=7, some k = -8.
    #[test]
    fn q4_grid_values_round_trip_exactly(
        d_bits in 1u16..=0x7bff,
        negative_d in any::<bool>(),
        mut k in prop::collection::vec(-8i32..=7, BLOCK),
        at in 0..BLOCK,
    ) {
        k[at] = -8;
        let d = f16::from_bits(d_bits | if negative_d { 0x8000 } else { 0 }).to_f32();
        let x: Vec<f32> = k.iter().map(|&k| d * k as f32).collect();
        let (bytes, y) = round_trip(TensorType::Q4, &x);
        prop_assert_eq!(&y, &x);
        prop_assert_eq!(scale(TensorType::Q4, &bytes, 0), d);
    }

    /// Every finite f16 value survives f16 encoding bit for bit.
    #[test]
    fn f16_values_round_trip_exactly(bits in prop::collection::vec(any::<u16>(), 1..64)) {
        let x: Vec<f32> = bits.iter().map(|&b| f16::from_bits(b)).filter(|h| h.is_finite()).map(f16::to_f32).collect();
        prop_assume!(!x.is_empty());
        let (_, y) = round_trip(TensorType::F16, &x);
        prop_assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn constant_blocks(c in prop_oneof![-1e5f32..1e5, -1e-5f32..1e-5]) {
        let x = vec![c; BLOCK];
        check_q8(&x)?;
        check_q4(&x)?;
        let (bytes, y) = round_trip(TensorType::Q8, &x);
        prop_assert!(y.iter().all(|&v| v == y[0]), "q8 constant block decodes unevenly");
        prop_assert!(bytes[..BLOCK].iter().all(|&q| q == bytes[0]));
        let (_, y) = round_trip(TensorType::Q4, &x);
        prop_assert!(y.iter().all(|&v| v == y[0]), "q4 constant block decodes unevenly");
    }

    /// NaN or an infinity anywhere is an error naming its index, for every type.
    #[test]
    fn non_finite_inputs_are_refused(
        x in prop::collection::vec(-10f32..10.0, 512),
        at in 0..512usize,
        bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ) {
        let mut x = x;
        x[at] = bad;
        for ty in TensorType::ALL {
            match encode_matrix(ty, ty.cols_multiple().max(32), &x) {
                Err(QuantError::NonFinite { index, .. }) => prop_assert_eq!(index, at, "{}", ty),
                other => prop_assert!(false, "{ty}: {other:?}"),
            }
        }
    }

    /// The same input always gives the same bytes, and a matrix is its rows'
    /// quants followed by its rows' scales.
    #[test]
    fn encoding_is_deterministic_and_row_major(x in blocks(6, 10)) {
        // q4k has three planes: tests/q4k_quant.rs checks its layout
        for ty in TensorType::ALL.into_iter().filter(|&t| t != TensorType::Q4K) {
            let all = encode_matrix(ty, 64, &x).unwrap();
            prop_assert_eq!(&all, &encode_matrix(ty, 64, &x).unwrap());
            if ty.is_quantized() {
                let rows: Vec<Vec<u8>> = x.chunks(64).map(|r| encode_matrix(ty, 64, r).unwrap()).collect();
                let qlen = ty.row_planes(64)[0];
                let mut expect: Vec<u8> = rows.iter().flat_map(|r| r[..qlen].to_vec()).collect();
                expect.extend(rows.iter().flat_map(|r| r[qlen..].to_vec()));
                prop_assert_eq!(&all, &expect, "{}", ty);
            }
        }
    }
}

#[test]
fn zero_blocks_have_one_encoding() {
    for zero in [0.0f32, -0.0] {
        let x = [zero; BLOCK];
        let (bytes, y) = round_trip(TensorType::Q8, &x);
        assert_eq!(bytes, [0u8; 34], "q8 block of {zero:?}");
        assert!(y.iter().all(|v| v.to_bits() == 0));
        let (bytes, y) = round_trip(TensorType::Q4, &x);
        let mut expect = vec![0x88u8; 16];
        expect.extend([0, 0]);
        assert_eq!(bytes, expect, "q4 block of {zero:?}");
        assert!(y.iter().all(|v| v.to_bits() == 0));
    }
}

#[test]
fn tiny_blocks_decode_to_zero_with_a_zero_scale() {
    for ty in [TensorType::Q8, TensorType::Q4] {
        for v in [1e-30f32, -1e-30, 1e-38, 1e-45] {
            let (bytes, y) = round_trip(ty, &[v; BLOCK]);
            assert_eq!(&bytes[bytes.len() - 2..], [0, 0], "{ty} {v}");
            assert!(y.iter().all(|v| v.to_bits() == 0), "{ty} {v}: {y:?}");
        }
    }
    // The largest magnitudes whose scale still rounds to zero (a tie to the
    // even f16 zero), and the next f32 up, which gets the smallest subnormal.
    let q8_edge = 127.0 * 2f32.powi(-25);
    assert_eq!(round_trip(TensorType::Q8, &[q8_edge; BLOCK]).1[0], 0.0);
    // Just above, d becomes the smallest subnormal 2^-24 and x / d = 63.5+.
    let next = f32::from_bits(q8_edge.to_bits() + 1);
    let (bytes, y) = round_trip(TensorType::Q8, &[next; BLOCK]);
    assert_eq!(scale(TensorType::Q8, &bytes, 0), 2f32.powi(-24));
    assert_eq!(y[0], 64.0 * 2f32.powi(-24));
    let q4_edge = 2f32.powi(-22);
    assert_eq!(round_trip(TensorType::Q4, &[q4_edge; BLOCK]).1[0], 0.0);
    // Just above, d = -2^-24 and x / d = -4.0-: level 4, decoding to 4 * 2^-24.
    let next = f32::from_bits(q4_edge.to_bits() + 1);
    let (bytes, y) = round_trip(TensorType::Q4, &[next; BLOCK]);
    assert_eq!(scale(TensorType::Q4, &bytes, 0), -(2f32.powi(-24)));
    assert_eq!(y[0], 4.0 * 2f32.powi(-24));
}

#[test]
fn extreme_magnitudes_stay_within_bounds() {
    let mixed: Vec<f32> = (0..BLOCK)
        .map(|j| [1e-30, 1e4, -1e4, 3e-7, 5e3, -1.0, 0.0, 65504.0][j % 8])
        .collect();
    check_q8(&mixed).unwrap();
    check_q4(&mixed).unwrap();
    for v in [1e4f32, -1e4, 65504.0, 3e5, -5.2e5] {
        let mut x: Vec<f32> = (0..BLOCK).map(|j| v * (j as f32 / 31.0)).collect();
        x[3] = -v / 3.0;
        check_q8(&x).unwrap();
        check_q4(&x).unwrap();
    }
}

/// The q8 scale is `f16(a / 127)`: finite up to `a / 127 < 65520`.
#[test]
fn scales_beyond_f16_are_refused() {
    // Largest f32 a with fl(a / 127) < 65520, found by walking down from the edge.
    let mut a = 65520.0f32 * 127.0;
    while a / 127.0 >= 65520.0 {
        a = f32::from_bits(a.to_bits() - 1);
    }
    let mut x = vec![1.0f32; BLOCK];
    x[5] = -a;
    check_q8(&x).unwrap();
    assert_eq!(
        scale(
            TensorType::Q8,
            &encode_matrix(TensorType::Q8, 32, &x).unwrap(),
            0
        ),
        65504.0
    );
    let above = f32::from_bits(a.to_bits() + 1);
    x[5] = above;
    assert_eq!(
        encode_matrix(TensorType::Q8, 32, &x),
        Err(QuantError::TooLarge {
            index: 5,
            value: above
        })
    );

    // q4: f16(m / -8), finite up to |m| < 8 * 65520 = 524160.
    let mut x = vec![1.0f32; BLOCK];
    x[7] = 524_000.0;
    check_q4(&x).unwrap();
    x[7] = 524_160.0;
    assert_eq!(
        encode_matrix(TensorType::Q4, 32, &x),
        Err(QuantError::TooLarge {
            index: 7,
            value: 524_160.0
        })
    );

    // The error names the weight's place in the row, past the first block.
    for ty in [TensorType::Q8, TensorType::Q4] {
        let mut x = vec![1.0f32; 3 * BLOCK];
        x[BLOCK + 9] = -1e7;
        assert_eq!(
            encode_matrix(ty, 3 * BLOCK, &x),
            Err(QuantError::TooLarge {
                index: BLOCK + 9,
                value: -1e7
            }),
            "{ty:?}"
        );
    }

    // f16 tensors: 65519 rounds to the f16 max, 65520 would be infinite.
    let (_, y) = round_trip(TensorType::F16, &[65519.0, -65519.0]);
    assert_eq!(y, [65504.0, -65504.0]);
    assert_eq!(
        encode_matrix(TensorType::F16, 2, &[1.0, -65520.0]),
        Err(QuantError::TooLarge {
            index: 1,
            value: -65520.0
        })
    );
    // f32 holds anything finite.
    assert_eq!(round_trip(TensorType::F32, &[f32::MAX]).1, [f32::MAX]);
}

/// q4's scale takes its sign from the first element of largest magnitude:
/// `-M` then `+M` puts `-M` below the grid's middle (where it reaches 8
/// steps) and `+M` above it (7 steps), and the other way round.
#[test]
fn q4_first_largest_magnitude_sets_the_scale_sign() {
    for sign in [1.0f32, -1.0] {
        let mut x = vec![0.25f32; BLOCK];
        x[4] = -4.0 * sign;
        x[20] = 4.0 * sign;
        let (bytes, _) = round_trip(TensorType::Q4, &x);
        assert_eq!(scale(TensorType::Q4, &bytes, 0).signum(), sign);
        assert!(
            bytes[4] & 0x0f < 8,
            "x[4] (low nibble of byte 4) below the middle"
        );
        assert!(bytes[4] >> 4 > 8, "x[20] (high nibble of byte 4) above it");
        check_q4(&x).unwrap();
    }
}

/// Halfway values round away from zero (not to even).
#[test]
fn ties_round_away_from_zero() {
    // q8 with d = 0.125: x = 0.125 * (k + 0.5).
    let mut x = vec![0.0f32; BLOCK];
    x[0] = 15.875; // a = 127 * 0.125
    x[1] = 0.0625; // 0.5 -> 1
    x[2] = -0.0625; // -0.5 -> -1
    x[3] = 0.3125; // 2.5 -> 3
    x[4] = -0.3125; // -2.5 -> -3
    let (bytes, _) = round_trip(TensorType::Q8, &x);
    let q: Vec<i8> = bytes[..5].iter().map(|&b| b as i8).collect();
    assert_eq!(q, [127, 1, -1, 3, -3]);
    // q4 rounds the same way; check_q4 compares every nibble with
    // round-half-away of x / d, and this row makes x / d land on halves.
    let x: Vec<f32> = (0..BLOCK)
        .map(|j| [4.0, 0.25, -1.25, -0.75, 1.75, 0.0][j % 6])
        .collect();
    check_q4(&x).unwrap();
    assert_eq!(round_half_away(2.5), 3.0);
    assert_eq!(round_half_away(-0.5), -1.0);
    assert_eq!(round_half_away(0.49999997), 0.0);
}

/// SPEC.md's q8 encoding written out independently, to check that the spec
/// text determines nibble's bytes exactly. (q4's levels are checked against
/// the stored scale by `check_q4`.)
fn spec_q8_block(x: &[f32]) -> Vec<u8> {
    let a = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let h = f16::from_f32(a / 127.0);
    let d = if h.to_f32() == 0.0 { f16::ZERO } else { h };
    let s = d.to_f32();
    let mut out: Vec<u8> = x
        .iter()
        .map(|&v| {
            if s == 0.0 {
                0
            } else {
                round_half_away(v / s).clamp(-127.0, 127.0) as i8 as u8
            }
        })
        .collect();
    out.extend(d.to_le_bytes());
    out
}

proptest! {
    #[test]
    fn spec_q8_reference_gives_nibbles_bytes(x in blocks(1, 22)) {
        prop_assert_eq!(encode_matrix(TensorType::Q8, BLOCK, &x).unwrap(), spec_q8_block(&x));
    }
}
