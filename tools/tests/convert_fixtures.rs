//! Converts the tiny HuggingFace fixtures and checks the result against the
//! source safetensors, tensor by tensor.

mod common;

use nibble::format::{keys, names, NblFile};
use nibble::quant::{
    q4k_unpack_scales, TensorType, WeightView, BLOCK, Q4K_GROUP, Q4K_SCALE_BYTES, Q4K_SUBS,
};
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny")
        .join(name)
}

/// Every tensor of a fixture checkpoint, upcast to f32.
fn source_tensors(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("fixture dtype {other:?}"),
            };
            out.insert(name, (view.shape().to_vec(), values));
        }
    }
    out
}

fn convert_to(dir: &Path, quant: QuantPolicy, out: &Path) -> NblFile {
    let summary = convert(&ConvertOptions::new(dir, out, quant)).unwrap();
    assert_eq!(summary.output_bytes, std::fs::metadata(out).unwrap().len());
    let file = NblFile::open(out).unwrap();
    file.verify_checksums().unwrap();
    assert_eq!(summary.tensors, file.tensors().len());
    file
}

/// Checks every converted tensor against its source: exact for f32 and f16
/// (one rounding), and for q8/q4 exactly the documented level for the stored
/// block scale.
fn check_against_source(file: &NblFile, dir: &Path, expected_type: impl Fn(&str) -> TensorType) {
    let src = source_tensors(dir);
    assert_eq!(
        file.tensors().len(),
        src.len(),
        "one output tensor per source tensor"
    );
    for info in file.tensors() {
        let (shape, values) = &src[&info.name];
        let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        assert_eq!(info.shape, shape64, "{}", info.name);
        let ty = info.tensor_type.unwrap();
        assert_eq!(ty, expected_type(&info.name), "{}", info.name);
        let view = file.tensor(&info.name).unwrap();
        if shape.len() == 1 {
            assert_eq!(view.f32s().unwrap(), values.as_slice(), "{}", info.name);
            continue;
        }
        let m = view.matrix().unwrap();
        let cols = shape[1];
        let mut row = vec![0f32; cols];
        for (r, want_row) in values.chunks_exact(cols).enumerate() {
            m.dequantize_row(r, &mut row);
            for (b, (got, want)) in row.chunks(BLOCK).zip(want_row.chunks(BLOCK)).enumerate() {
                let what = format!("{} row {r} block {b} ({ty})", info.name);
                match m {
                    WeightView::F32 { .. } => assert_eq!(got, want, "{what}"),
                    WeightView::F16 { .. } => {
                        for (g, w) in got.iter().zip(want) {
                            assert_eq!(*g, half::f16::from_f32(*w).to_f32(), "{what}");
                        }
                    }
                    WeightView::Q8 { d, .. } => {
                        check_block(got, want, d[r * cols / BLOCK + b].to_f32(), 127, &what)
                    }
                    WeightView::Q8R { d, .. } => check_block(got, want, d[r].to_f32(), 127, &what),
                    WeightView::Q4 { d, .. } => {
                        let s = d[r * cols / BLOCK + b].to_f32();
                        check_block(got, want, s, 7, &what);
                        // Whatever scale the quantizer picks, the block is no
                        // worse than plain max scaling (the largest magnitude
                        // on level -8).
                        let m = want
                            .iter()
                            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                        let s0 = half::f16::from_f32(m / -8.0).to_f32();
                        let sse = |g: &mut dyn Iterator<Item = f32>| -> f64 {
                            g.zip(want).map(|(g, w)| ((g - w) as f64).powi(2)).sum()
                        };
                        let baseline = sse(&mut want.iter().map(|&w| s0 * level(w, s0, 7) as f32));
                        let actual = sse(&mut got.iter().copied());
                        assert!(actual <= baseline * (1.0 + 1e-6) + 1e-30, "{what}");
                    }
                    WeightView::Q4K { dm, sc, .. } => {
                        // within half a step of the sub-block's stored grid,
                        // or at its nearer end (tests/q4k_quant.rs)
                        let ng = cols.div_ceil(Q4K_GROUP);
                        let (gi, k) = (r * ng + b / Q4K_SUBS, b % Q4K_SUBS);
                        let (scs, ms) = q4k_unpack_scales(
                            &sc[gi * Q4K_SCALE_BYTES..(gi + 1) * Q4K_SCALE_BYTES],
                        );
                        let s = dm[2 * gi].to_f32() * scs[k] as f32;
                        let o = dm[2 * gi + 1].to_f32() * ms[k] as f32;
                        for (g, w) in got.iter().zip(want) {
                            let bound = (s / 2.0).max(-o - w).max(w - (15.0 * s - o))
                                + 1e-5 * (w.abs() + o + 15.0 * s);
                            assert!((g - w).abs() <= bound, "{what}: {w} -> {g}");
                        }
                    }
                }
            }
        }
    }
}

/// `clamp(round(w / s), -hi - 1, hi)` for q4 (`hi` 7) or `±127` for q8.
fn level(w: f32, s: f32, hi: i32) -> i32 {
    if s == 0.0 {
        return 0;
    }
    let lo = if hi == 7 { -8 } else { -hi };
    ((w / s).round() as i32).clamp(lo, hi)
}

/// Every decoded weight is exactly its block scale times the level the
/// documented rounding gives: the encoding is right for the stored scale.
fn check_block(got: &[f32], want: &[f32], s: f32, hi: i32, what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert_eq!(*g, s * level(*w, s, hi) as f32, "{what}: source {w}");
    }
}

#[test]
fn f32_conversion_is_exact_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-mha");
    let file = convert_to(&dir, QuantPolicy::F32, &tmp.path().join("m.nbl"));
    check_against_source(&file, &dir, |_| TensorType::F32);
    let m = file.metadata();
    assert_eq!(m.get_str(keys::ARCHITECTURE).unwrap(), Some("llama"));
    assert_eq!(m.get_uint(keys::VOCAB_SIZE).unwrap(), Some(512));
    assert_eq!(m.get_uint(keys::HIDDEN_SIZE).unwrap(), Some(128));
    assert_eq!(m.get_uint(keys::NUM_LAYERS).unwrap(), Some(2));
    assert_eq!(m.get_uint(keys::NUM_HEADS).unwrap(), Some(4));
    assert_eq!(m.get_uint(keys::NUM_KV_HEADS).unwrap(), Some(4));
    assert_eq!(m.get_uint(keys::HEAD_DIM).unwrap(), Some(32));
    assert_eq!(m.get_uint(keys::INTERMEDIATE_SIZE).unwrap(), Some(352));
    assert_eq!(m.get_uint(keys::CONTEXT_LENGTH).unwrap(), Some(256));
    assert_eq!(m.get_f32(keys::ROPE_THETA).unwrap(), Some(10000.0));
    assert_eq!(m.get_f32(keys::RMS_NORM_EPS).unwrap(), Some(1e-5));
    assert_eq!(m.get_str(keys::ROPE_SCALING_TYPE).unwrap(), Some("none"));
    assert_eq!(m.get_bool(keys::TIE_WORD_EMBEDDINGS).unwrap(), Some(false));
    assert_eq!(m.get_uint(keys::BOS_TOKEN_ID).unwrap(), Some(1));
    assert_eq!(
        m.get_u32_array(keys::EOS_TOKEN_IDS).unwrap(),
        Some(&[2u32][..])
    );
    assert_eq!(m.get_str(keys::BOS_TOKEN).unwrap(), Some("<s>"));
    assert_eq!(m.get_str(keys::EOS_TOKEN).unwrap(), Some("</s>"));
    assert_eq!(m.get_bool(keys::ADD_BOS_TOKEN).unwrap(), Some(true));
    // the same JSON, without the whitespace between tokens
    let tok = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    let stored = m.get_str(keys::TOKENIZER_JSON).unwrap().unwrap();
    assert!(stored.len() < tok.len() && !stored.contains('\n'));
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(parse(stored), parse(&tok));
    assert!(m
        .get_str(keys::QUANTIZATION)
        .unwrap()
        .unwrap()
        .starts_with("f32"));
    let files = m.get_str_array(keys::SOURCE_FILES).unwrap().unwrap();
    assert!(files.iter().any(|f| f == "model.safetensors"), "{files:?}");
}

#[test]
fn sharded_checkpoint_converts_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-sharded");
    let file = convert_to(&dir, QuantPolicy::F32, &tmp.path().join("s.nbl"));
    check_against_source(&file, &dir, |_| TensorType::F32);
    let files = file
        .metadata()
        .get_str_array(keys::SOURCE_FILES)
        .unwrap()
        .unwrap();
    assert!(files
        .iter()
        .any(|f| f == "model-00002-of-00002.safetensors"));
}

#[test]
fn bf16_gqa_converts_to_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-gqa-small-bf16");
    for quant in [
        QuantPolicy::F32,
        QuantPolicy::F16,
        QuantPolicy::Q8,
        QuantPolicy::Q4,
        QuantPolicy::Q4K,
    ] {
        let file = convert_to(&dir, quant, &tmp.path().join(format!("{quant}.nbl")));
        assert_eq!(
            file.metadata().get_uint(keys::NUM_KV_HEADS).unwrap(),
            Some(2)
        );
        check_against_source(&file, &dir, |name| {
            if name.ends_with("norm.weight") {
                TensorType::F32
            } else if name == names::OUTPUT && matches!(quant, QuantPolicy::Q4 | QuantPolicy::Q4K) {
                TensorType::Q8R
            } else if name.ends_with("v_proj.weight") && quant == QuantPolicy::Q8 {
                // grouped-query: the value projection gets more bits
                TensorType::F16
            } else if name.ends_with("v_proj.weight") && quant == QuantPolicy::Q4 {
                TensorType::Q8
            } else if name == names::LayerTensor::V.name(1) && quant == QuantPolicy::Q4K {
                // past the first quarter of the two layers
                TensorType::Q8
            } else {
                match quant {
                    QuantPolicy::F32 => TensorType::F32,
                    QuantPolicy::F16 => TensorType::F16,
                    QuantPolicy::Q8 => TensorType::Q8,
                    QuantPolicy::Q4 => TensorType::Q4,
                    // widths 128 (4 sub-blocks) and 352 (8 + 3): every row
                    // ends in a short group
                    QuantPolicy::Q4K => TensorType::Q4K,
                }
            }
        });
    }
}

#[test]
fn q4_and_q8_follow_the_policy_and_shrink_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-gqa-small");
    let f32_len = convert(&ConvertOptions::new(
        &dir,
        tmp.path().join("a.nbl"),
        QuantPolicy::F32,
    ))
    .unwrap()
    .output_bytes;
    let q8 = convert(&ConvertOptions::new(
        &dir,
        tmp.path().join("b.nbl"),
        QuantPolicy::Q8,
    ))
    .unwrap();
    let q4 = convert(&ConvertOptions::new(
        &dir,
        tmp.path().join("c.nbl"),
        QuantPolicy::Q4,
    ))
    .unwrap();
    // q8 everywhere except the grouped value projection (f16): what the
    // summary reports is what was written, and lies between the two types.
    let bpw = q8.bits_per_weight();
    assert_eq!(bpw, common::file_bits_per_weight(&tmp.path().join("b.nbl")));
    assert!(bpw > 8.5 && bpw < 16.0, "{bpw}");
    let q8_file = NblFile::open(&tmp.path().join("b.nbl")).unwrap();
    let q8_ty = |n: &str| q8_file.tensor(n).unwrap().info.tensor_type.unwrap();
    assert_eq!(
        q8_ty("model.layers.1.self_attn.v_proj.weight"),
        TensorType::F16
    );
    assert_eq!(
        q8_ty("model.layers.1.self_attn.k_proj.weight"),
        TensorType::Q8
    );
    // q4 everywhere except lm_head (q8r) and v_proj (q8): strictly between 4.5 and 8.5.
    let bpw = q4.bits_per_weight();
    assert_eq!(bpw, common::file_bits_per_weight(&tmp.path().join("c.nbl")));
    assert!(bpw > 4.5 && bpw < 8.5, "{bpw}");
    assert!(q4.output_bytes < q8.output_bytes && q8.output_bytes < f32_len);
    let file = NblFile::open(&tmp.path().join("c.nbl")).unwrap();
    let ty = |n: &str| file.tensor(n).unwrap().info.tensor_type.unwrap();
    assert_eq!(ty(names::OUTPUT), TensorType::Q8R);
    assert_eq!(ty(names::TOKEN_EMBEDDING), TensorType::Q4);
    assert_eq!(ty("model.layers.1.mlp.down_proj.weight"), TensorType::Q4);
    assert_eq!(ty("model.layers.1.self_attn.v_proj.weight"), TensorType::Q8);
    assert_eq!(ty(names::FINAL_NORM), TensorType::F32);
    assert!(file
        .metadata()
        .get_str(keys::QUANTIZATION)
        .unwrap()
        .unwrap()
        .contains("output projection q8"));
}

/// `--tensor-type` overrides win over the policy, the first matching
/// pattern first, and are recorded in the provenance.
/// A multi-head model's value projection is as large as its query
/// projection, so it keeps the policy's common type.
#[test]
fn multi_head_value_projection_keeps_the_common_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-mha");
    for (quant, want) in [
        (QuantPolicy::Q8, TensorType::Q8),
        (QuantPolicy::Q4, TensorType::Q4),
    ] {
        let out = tmp.path().join(format!("{quant}.nbl"));
        let summary = convert(&ConvertOptions::new(&dir, &out, quant)).unwrap();
        let file = NblFile::open(&out).unwrap();
        let ty = |n: &str| file.tensor(n).unwrap().info.tensor_type.unwrap();
        assert_eq!(
            ty("model.layers.0.self_attn.v_proj.weight"),
            want,
            "{quant}"
        );
        if quant == QuantPolicy::Q8 {
            assert!((summary.bits_per_weight() - 8.5).abs() < 1e-9);
        }
    }
}

#[test]
fn tensor_type_overrides_win_over_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-gqa-small");
    let out = tmp.path().join("o.nbl");
    let mut options = ConvertOptions::new(&dir, &out, QuantPolicy::Q4);
    options.overrides = ["layers.1.mlp=f16", "mlp.down_proj=q8", "lm_head=q4k"]
        .iter()
        .map(|o| o.parse().unwrap())
        .collect();
    convert(&options).unwrap();
    let file = NblFile::open(&out).unwrap();
    let ty = |n: &str| file.tensor(n).unwrap().info.tensor_type.unwrap();
    assert_eq!(ty(names::OUTPUT), TensorType::Q4K);
    assert_eq!(ty("model.layers.0.mlp.down_proj.weight"), TensorType::Q8);
    assert_eq!(ty("model.layers.1.mlp.down_proj.weight"), TensorType::F16);
    assert_eq!(ty("model.layers.1.mlp.up_proj.weight"), TensorType::F16);
    assert_eq!(ty("model.layers.0.mlp.up_proj.weight"), TensorType::Q4);
    assert_eq!(
        ty("model.layers.1.post_attention_layernorm.weight"),
        TensorType::F32
    );
    let q = file
        .metadata()
        .get_str(keys::QUANTIZATION)
        .unwrap()
        .unwrap();
    assert!(
        q.ends_with(
            "overrides (name contains pattern): layers.1.mlp=f16, mlp.down_proj=q8, lm_head=q4k"
        ),
        "{q}"
    );
}

#[test]
fn conversion_is_byte_for_byte_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    for (fx, quant) in [
        ("tiny-sharded", QuantPolicy::Q4),
        ("tiny-gqa-small-bf16", QuantPolicy::Q8),
    ] {
        let a = tmp.path().join("a.nbl");
        let b = tmp.path().join("b.nbl");
        convert(&ConvertOptions::new(fixture(fx), &a, quant)).unwrap();
        convert(&ConvertOptions::new(fixture(fx), &b, quant)).unwrap();
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{fx} {quant}"
        );
    }
}

#[test]
fn policy_falls_back_to_f16_for_odd_widths() {
    use nibble_tools::convert::{is_early_layer, Role};
    assert_eq!(
        QuantPolicy::Q4.tensor_type(Role::Matrix, 48),
        TensorType::F16
    );
    assert_eq!(
        QuantPolicy::Q4.tensor_type(Role::Matrix, 64),
        TensorType::Q4
    );
    assert_eq!(
        QuantPolicy::Q4.tensor_type(Role::OutputProjection, 64),
        TensorType::Q8R
    );
    assert_eq!(QuantPolicy::Q8.tensor_type(Role::Norm, 64), TensorType::F32);
    assert_eq!(
        QuantPolicy::Q8.tensor_type(Role::GroupedValue { early: false }, 64),
        TensorType::F16
    );
    assert_eq!(
        QuantPolicy::Q4.tensor_type(Role::GroupedValue { early: true }, 64),
        TensorType::Q8
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::GroupedValue { early: true }, 512),
        TensorType::Q4K
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::GroupedValue { early: false }, 512),
        TensorType::Q8
    );
    // SmolLM2's 30 layers: the first 8 early; one layer is early
    let early: Vec<usize> = (0..30).filter(|&l| is_early_layer(l, 30)).collect();
    assert_eq!(early, (0..8).collect::<Vec<_>>());
    assert!(is_early_layer(0, 1) && !is_early_layer(1, 2));
    // q4k: whole sub-blocks (a row may end in a short group), else f16
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::Matrix, 512),
        TensorType::Q4K
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::Matrix, 576),
        TensorType::Q4K
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::Matrix, 48),
        TensorType::F16
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::OutputProjection, 512),
        TensorType::Q8R
    );
    assert_eq!(
        QuantPolicy::Q4K.tensor_type(Role::Norm, 512),
        TensorType::F32
    );
    assert_eq!(QuantPolicy::parse("q4k"), Some(QuantPolicy::Q4K));
    assert_eq!(
        QuantPolicy::F16.tensor_type(Role::Norm, 64),
        TensorType::F32
    );
    assert_eq!(
        QuantPolicy::F32.tensor_type(Role::Matrix, 48),
        TensorType::F32
    );
}
