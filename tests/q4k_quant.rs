//! Properties of the q4k encoder (`format-spec/SPEC.md`, section 6): never a
//! larger squared error than plain min/max affine quantization through the
//! same 6-bit group stage, an element bound from the stored scales, exact round
//! trips of representable groups, zero and constant groups, refusal of
//! NaN/Inf and of values whose scales overflow f16; and the same for the
//! importance-weighted encoder under its weighted error.

use half::f16;
use nibble::quant::{
    dequantize_q4k_row, encode_matrix, q4k_pack_scales, q4k_unpack_scales, quantize_q4k_row,
    quantize_q4k_row_minmax, quantize_q4k_row_weighted, QuantError, TensorType, WeightView,
    Q4K_GROUP, Q4K_SCALE_BYTES,
};
use proptest::prelude::*;

/// A row's three planes.
struct Encoded {
    qs: Vec<u8>,
    dm: Vec<f16>,
    sc: Vec<u8>,
}

type Quantizer = fn(&[f32], &mut [u8], &mut [f16], &mut [u8]) -> Result<(), QuantError>;

fn encode_with(f: Quantizer, x: &[f32]) -> Result<Encoded, QuantError> {
    let ng = x.len().div_ceil(Q4K_GROUP);
    let mut e = Encoded {
        qs: vec![0; x.len() / 2],
        dm: vec![f16::ZERO; 2 * ng],
        sc: vec![0; ng * Q4K_SCALE_BYTES],
    };
    f(x, &mut e.qs, &mut e.dm, &mut e.sc)?;
    Ok(e)
}

fn decode(e: &Encoded) -> Vec<f32> {
    let mut y = vec![0f32; e.qs.len() * 2];
    dequantize_q4k_row(&e.qs, &e.dm, &e.sc, &mut y);
    y
}

fn sq_err(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum()
}

/// `Σ w (x - y)²`.
fn weighted_sq_err(x: &[f32], y: &[f32], w: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .zip(w)
        .map(|((&a, &b), &w)| w as f64 * (a as f64 - b as f64).powi(2))
        .sum()
}

fn encode_weighted(x: &[f32], importance: &[f32]) -> Result<Encoded, QuantError> {
    let ng = x.len().div_ceil(Q4K_GROUP);
    let mut e = Encoded {
        qs: vec![0; x.len() / 2],
        dm: vec![f16::ZERO; 2 * ng],
        sc: vec![0; ng * Q4K_SCALE_BYTES],
    };
    quantize_q4k_row_weighted(x, importance, &mut e.qs, &mut e.dm, &mut e.sc)?;
    Ok(e)
}

/// `(d * sc, dmin * m)` of the sub-block holding element `i`.
fn step_and_offset(e: &Encoded, i: usize) -> (f64, f64) {
    let g = i / Q4K_GROUP;
    let (s, m) = q4k_unpack_scales(&e.sc[g * Q4K_SCALE_BYTES..(g + 1) * Q4K_SCALE_BYTES]);
    let k = i % Q4K_GROUP / 32;
    (
        e.dm[2 * g].to_f64() * s[k] as f64,
        e.dm[2 * g + 1].to_f64() * m[k] as f64,
    )
}

/// Rows of 1 to 23 sub-blocks (whole groups of 8, or ending in a shorter
/// group), each 32-value sub-block uniform in `[lo, hi] * s` with its own
/// scale `s` and asymmetric bounds, or heavy-tailed (a Cauchy sample: rare
/// huge values among ordinary ones).
fn rows() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![Just(8usize), Just(16), 1usize..24]
        .prop_flat_map(|nsub| {
            (
                prop::collection::vec(
                    prop_oneof![Just(1e-6f32), Just(0.02), Just(1.0), Just(300.0)],
                    nsub,
                ),
                prop::collection::vec((-1.0f32..0.5, 0.0f32..1.0), nsub),
                prop::collection::vec(0.0f32..1.0, nsub * 32),
                prop::collection::vec(any::<bool>(), nsub),
            )
        })
        .prop_map(|(scales, bounds, unit, heavy)| {
            unit.iter()
                .enumerate()
                .map(|(i, &u)| {
                    let k = i / 32;
                    let v = if heavy[k] {
                        // Cauchy, cut to stay far from f16 scale overflow
                        (std::f32::consts::PI * (u.clamp(0.002, 0.998) - 0.5)).tan() * 0.05
                    } else {
                        let (lo, w) = bounds[k];
                        lo + w * u
                    };
                    v * scales[k]
                })
                .collect()
        })
}

/// Column importances shaped like activation statistics: most channels of
/// ordinary strength, some nearly silent or exactly zero, a few outliers
/// thousands of times stronger (the channels weighting exists for).
fn rows_with_importance() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    rows().prop_flat_map(|x| {
        let n = x.len();
        let importance = prop_oneof![
            6 => 0.1f32..2.0,
            1 => Just(0.0f32),
            1 => 1e-6f32..1e-3,
            1 => 50.0f32..5000.0,
        ];
        (Just(x), prop::collection::vec(importance, n))
    })
}

/// A deterministic xorshift stream of uniforms in (0, 1).
fn uniforms(mut seed: u32) -> impl FnMut() -> f32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed as f32 + 0.5) / (u32::MAX as f32 + 1.0)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Under importances, the weighted encoder's weighted squared error
    /// never exceeds plain min/max's (the property, for the error
    /// the weighted encoder minimizes).
    #[test]
    fn weighted_never_worse_than_minmax((x, w) in rows_with_importance()) {
        let weighted = decode(&encode_weighted(&x, &w).unwrap());
        let plain = decode(&encode_with(quantize_q4k_row_minmax, &x).unwrap());
        for g in 0..x.len().div_ceil(Q4K_GROUP) {
            let r = g * Q4K_GROUP..x.len().min((g + 1) * Q4K_GROUP);
            let ew = weighted_sq_err(&x[r.clone()], &weighted[r.clone()], &w[r.clone()]);
            let ep = weighted_sq_err(&x[r.clone()], &plain[r.clone()], &w[r]);
            prop_assert!(ew <= ep * (1.0 + 1e-5) + 1e-30, "group {g}: weighted {ew} > min/max {ep}");
        }
    }

    /// Importance 1 everywhere is the unweighted encoder, byte for byte
    /// (it takes the portable fits, the unweighted one the AVX2 lanes).
    #[test]
    fn unit_importance_is_the_unweighted_encoding(x in rows()) {
        let a = encode_weighted(&x, &vec![1.0; x.len()]).unwrap();
        let b = encode_with(quantize_q4k_row, &x).unwrap();
        prop_assert_eq!(&a.qs, &b.qs);
        prop_assert_eq!(&a.dm, &b.dm);
        prop_assert_eq!(&a.sc, &b.sc);
    }

    /// The searched fit never loses to plain min/max (up to the rounding of
    /// the encoder's f32 error sums).
    #[test]
    fn never_worse_than_minmax(x in rows()) {
        let searched = encode_with(quantize_q4k_row, &x).unwrap();
        let plain = encode_with(quantize_q4k_row_minmax, &x).unwrap();
        for g in 0..x.len().div_ceil(Q4K_GROUP) {
            let r = g * Q4K_GROUP..x.len().min((g + 1) * Q4K_GROUP);
            let (ys, yp) = (decode(&searched), decode(&plain));
            let (es, ep) = (sq_err(&x[r.clone()], &ys[r.clone()]), sq_err(&x[r.clone()], &yp[r]));
            prop_assert!(es <= ep * (1.0 + 1e-5) + 1e-30, "group {g}: searched {es} > min/max {ep}");
        }
    }

    /// Every element is within half a step of its sub-block's grid, or at
    /// the grid's nearer end: `|x - y| <= max(s / 2, -o - x, x - (15 s - o))`
    /// with `s = d * sc`, `o = dmin * m` as stored, plus f32 rounding, for
    /// whatever scales the search stored, weighted or not.
    #[test]
    fn element_bound_from_stored_scales((x, w) in rows_with_importance()) {
        for e in [
            encode_with(quantize_q4k_row, &x).unwrap(),
            encode_weighted(&x, &w).unwrap(),
        ] {
        let y = decode(&e);
        for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
            let (s, o) = step_and_offset(&e, i);
            let xi64 = xi as f64;
            let bound = (s / 2.0).max(-o - xi64).max(xi64 - (15.0 * s - o))
                + 2f64.powi(-20) * (xi64.abs() + o + 15.0 * s)
                + 1e-38;
            let err = (xi64 - yi as f64).abs();
            prop_assert!(err <= bound, "element {i}: {xi} -> {yi}, err {err} > {bound} (s {s}, o {o})");
            // the decoded value is on the grid
            let q = ((yi as f64 + o) / s).round();
            prop_assert!(s == 0.0 || (0.0..=15.0).contains(&q));
        }
        }
    }

    /// Groups built from f16 powers of two, 6-bit scales with 63 present,
    /// and levels with 0 and 15 present in every sub-block decode exactly.
    #[test]
    fn representable_groups_are_exact(
        (e1, e2, sc, m, q) in (
            -12i32..2,
            -12i32..2,
            prop::collection::vec(0u8..64, 8),
            prop::collection::vec(0u8..64, 8),
            prop::collection::vec(0u8..16, 256),
        )
    ) {
        let (d, dmin) = (2f32.powi(e1), 2f32.powi(e2));
        let mut sc: [u8; 8] = sc.try_into().unwrap();
        let mut m: [u8; 8] = m.try_into().unwrap();
        sc[3] = 63;
        m[5] = 63;
        let mut q = q;
        for k in 0..8 {
            q[k * 32 + 7] = 0;
            q[k * 32 + 20] = 15;
        }
        let x: Vec<f32> = (0..256)
            .map(|i| d * sc[i / 32] as f32 * q[i] as f32 - dmin * m[i / 32] as f32)
            .collect();
        let e = encode_with(quantize_q4k_row, &x).unwrap();
        prop_assert_eq!(decode(&e), x.clone());
        prop_assert_eq!((e.dm[0].to_f32(), e.dm[1].to_f32()), (d, dmin));
        let mut packed = [0u8; 12];
        q4k_pack_scales(&sc, &m, &mut packed);
        // sub-blocks with sc = 0 are constant: their levels are free, but
        // their scales are not
        prop_assert_eq!(&e.sc[..], &packed[..]);
    }
}

/// On Gaussian-like weights (the common case) the search must pay off, not
/// merely tie: it cuts the squared error of min/max by a clear margin.
#[test]
fn search_beats_minmax_on_gaussian_rows() {
    let mut uniform = uniforms(0x2545_f491);
    // sum of 4 uniforms: close enough to a normal distribution
    let x: Vec<f32> = (0..64 * Q4K_GROUP)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect();
    let s = sq_err(&x, &decode(&encode_with(quantize_q4k_row, &x).unwrap()));
    let p = sq_err(
        &x,
        &decode(&encode_with(quantize_q4k_row_minmax, &x).unwrap()),
    );
    assert!(s < 0.9 * p, "searched {s} vs min/max {p}");
}

/// Weighting pays: on Gaussian rows with log-uniform column importances
/// (1 to 1000), the weighted encoder's importance-weighted error is well
/// below the unweighted encoder's, which spends its accuracy evenly.
#[test]
fn importance_moves_error_off_strong_columns() {
    let cols = 4 * Q4K_GROUP;
    let mut u = uniforms(0x9e37_79b9);
    let importance: Vec<f32> = (0..cols).map(|_| 10f32.powf(3.0 * u())).collect();
    let (mut weighted, mut unweighted) = (0f64, 0f64);
    for _ in 0..16 {
        let x: Vec<f32> = (0..cols)
            .map(|_| (0..4).map(|_| u()).sum::<f32>() - 2.0)
            .collect();
        let yw = decode(&encode_weighted(&x, &importance).unwrap());
        let yu = decode(&encode_with(quantize_q4k_row, &x).unwrap());
        weighted += weighted_sq_err(&x, &yw, &importance);
        unweighted += weighted_sq_err(&x, &yu, &importance);
    }
    assert!(
        weighted < 0.8 * unweighted,
        "weighted {weighted} vs unweighted {unweighted}"
    );
}

#[test]
fn bad_importances_are_errors() {
    let x = vec![0.5f32; 64];
    let mut w = vec![1.0f32; 64];
    assert!(matches!(
        encode_weighted(&x, &w[..32]),
        Err(QuantError::BadLength { .. })
    ));
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        w[40] = bad;
        match encode_weighted(&x, &w) {
            Err(QuantError::BadImportance { column: 40, .. }) => {}
            other => panic!("importance {bad}: {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn zero_and_constant_groups() {
    let zero = encode_with(quantize_q4k_row, &[0.0; 256]).unwrap();
    assert!(zero.qs.iter().all(|&b| b == 0));
    assert!(zero.dm.iter().all(|&h| h.to_bits() == 0));
    assert!(zero.sc.iter().all(|&b| b == 0));
    assert_eq!(decode(&zero), vec![0.0; 256]);
    // a positive constant is 15 steps of d * 63, a negative one 63 steps of
    // dmin: within f16's relative 2^-11 of `d` or `dmin` while they are
    // normal (|c| >= 63 * 15 * 2^-14 resp. 63 * 2^-14), within 945 or 63
    // absolute f16 subnormal steps (2^-25 each) below
    for c in [0.5f32, -0.5, 0.07, -0.01, -7.25, 1000.0, 3e-3, -2e-4] {
        let y = decode(&encode_with(quantize_q4k_row, &[c; 256]).unwrap());
        let tiny = if c > 0.0 { 945.0 } else { 63.0 } * 2f32.powi(-25);
        for v in y {
            let err = (v - c).abs();
            assert!(
                err <= (c.abs() * 2f32.powi(-10)).max(tiny),
                "constant {c} decodes to {v}"
            );
        }
    }
}

#[test]
fn non_finite_and_huge_values_are_refused() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.1f32; 512];
        x[300] = bad;
        match encode_matrix(TensorType::Q4K, 256, &x) {
            Err(QuantError::NonFinite { index, .. }) => assert_eq!(index, 300),
            other => panic!("{bad}: {other:?}"),
        }
    }
    // a range of 1e9 needs d = 1e9 / 15 / 63, beyond f16
    let mut x = vec![0.0f32; 512];
    x[400] = 1e9;
    assert_eq!(
        encode_matrix(TensorType::Q4K, 256, &x),
        Err(QuantError::TooLarge {
            index: 400,
            value: 1e9
        })
    );
    // rows must be whole sub-blocks
    assert_eq!(
        encode_matrix(TensorType::Q4K, 48, &[0.0; 48]),
        Err(QuantError::BadLength { len: 48 })
    );
    // a short last group reports indices within the row like a whole one
    let mut x = vec![0.0f32; 2 * 320];
    x[320 + 300] = 1e9;
    assert_eq!(
        encode_matrix(TensorType::Q4K, 320, &x),
        Err(QuantError::TooLarge {
            index: 620,
            value: 1e9
        })
    );
}

/// The matrix encoder lays the planes out as the view reads them: decoding
/// through `WeightView` equals decoding the row encoder's planes.
#[test]
fn matrix_layout_matches_row_encoder() {
    for (rows, cols) in [(3, 512), (2, 576), (4, 96)] {
        check_matrix_layout(rows, cols);
    }
    let x: Vec<f32> = (0..3 * 512).map(|i| (i % 37) as f32 / 40.0 - 0.3).collect();
    let bytes = encode_matrix(TensorType::Q4K, 512, &x).unwrap();
    assert!(WeightView::from_bytes(TensorType::Q4K, 6, 256, &bytes).is_some());
    assert!(WeightView::from_bytes(TensorType::Q4K, 12, 128, &bytes).is_none());
}

/// A short last group holds only its sub-blocks' quants, and zero in the
/// scale fields of the sub-blocks it lacks.
#[test]
fn short_last_group_layout() {
    let x: Vec<f32> = (0..320)
        .map(|i| ((i * 31 % 17) as f32 - 5.0) / 7.0)
        .collect();
    let bytes = encode_matrix(TensorType::Q4K, 320, &x).unwrap();
    // 160 quant bytes, 2 (d, dmin) pairs, 2 × 12 scale bytes
    assert_eq!(bytes.len(), 160 + 8 + 24);
    let last = &bytes[160 + 8 + 12..];
    let (sc, m) = q4k_unpack_scales(last);
    assert!(sc[..2].iter().chain(&m[..2]).any(|&v| v != 0));
    assert!(
        sc[2..].iter().chain(&m[2..]).all(|&v| v == 0),
        "{sc:?} {m:?}"
    );
    // the whole groups are encoded as they would be alone
    let head = encode_matrix(TensorType::Q4K, 256, &x[..256]).unwrap();
    assert_eq!(&bytes[..128], &head[..128]);
    assert_eq!(&bytes[160..164], &head[128..132]);
    assert_eq!(&bytes[168..180], &head[132..144]);
}

fn check_matrix_layout(rows: usize, cols: usize) {
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 0.7) * (1 + i % 3) as f32)
        .collect();
    let bytes = encode_matrix(TensorType::Q4K, cols, &x).unwrap();
    assert_eq!(
        bytes.len() as u64,
        TensorType::Q4K.byte_len(rows as u64, cols as u64).unwrap()
    );
    let view = WeightView::from_bytes(TensorType::Q4K, rows, cols, &bytes).unwrap();
    for r in 0..rows {
        let mut got = vec![0f32; cols];
        view.dequantize_row(r, &mut got);
        let want = decode(&encode_with(quantize_q4k_row, &x[r * cols..(r + 1) * cols]).unwrap());
        assert_eq!(got, want, "row {r} of {rows}x{cols}");
    }
}
