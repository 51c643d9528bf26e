//! Activation statistics (`Session::collect_activation_stats`), importance
//! files (`nibble-tools imatrix`) and importance-weighted conversion
//! (`convert --imatrix`) on the tiny fixtures.

use nibble::format::names::{self, LayerTensor};
use nibble::format::NblFile;
use nibble::quant::WeightView;
use nibble::{KvType, Model, Session, SessionOptions};
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use nibble_tools::imatrix::{self, Importance};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny")
        .join(name)
}

fn convert_to(src: &Path, quant: QuantPolicy, out: &Path, imatrix: Option<&Path>) {
    let mut o = ConvertOptions::new(src, out, quant);
    o.imatrix = imatrix.map(Path::to_owned);
    convert(&o).unwrap();
}

/// Plain English prose, long enough for a few 64-token windows of the tiny
/// models' byte-level tokenizer.
fn calibration_text() -> String {
    let sentences = [
        "The river ran quietly past the mill, and the miller counted his sacks.",
        "In the spring the orchards bloomed white, then pink, then green again.",
        "She wrote three letters that evening and sealed none of them.",
        "Numbers like 1024 and 3.14159 appear in the ledger beside the names.",
    ];
    (0..12)
        .map(|i| sentences[i % 4])
        .collect::<Vec<_>>()
        .join(" ")
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// The hook records each matrix's actual input: for layer 0's projections
/// that is the RMS-normalized token embedding, computed here independently
/// from the file's tensors; q, k and v (gate and up) share one input; and
/// collecting leaves the logits untouched.
#[test]
fn statistics_are_the_mean_squares_of_each_matrix_input() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f32.nbl");
    convert_to(&fixture("tiny-mha"), QuantPolicy::F32, &path, None);
    let model = Model::open(&path).unwrap();
    let c = model.config().clone();
    let opts = SessionOptions {
        kv_type: KvType::F32,
        ..Default::default()
    };
    let tokens: Vec<u32> = (0..40)
        .map(|i| (i * 37 + 5) % c.vocab_size as u32)
        .collect();

    let mut plain = Session::new(&model, opts.clone()).unwrap();
    let want_logits = plain.forward(&tokens).unwrap().to_vec();
    let mut session = Session::new(&model, opts).unwrap();
    session.collect_activation_stats();
    assert_eq!(session.forward(&tokens).unwrap(), want_logits.as_slice());
    let stats = session.take_activation_stats().unwrap();
    assert!(session.take_activation_stats().is_none(), "taking ends it");
    assert_eq!(stats.tokens(), tokens.len() as u64);

    let means = stats.mean_squares();
    let get = |name: &str| &means.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(
        means.len(),
        7 * c.num_layers + 1,
        "7 matrices a layer + lm_head"
    );
    for l in 0..c.num_layers {
        let q = get(&LayerTensor::Q.name(l));
        assert_eq!(q.len(), c.hidden_size);
        assert_eq!(get(&LayerTensor::K.name(l)), q);
        assert_eq!(get(&LayerTensor::V.name(l)), q);
        assert_eq!(get(&LayerTensor::O.name(l)).len(), c.q_dim());
        let gate = get(&LayerTensor::Gate.name(l));
        assert_eq!(get(&LayerTensor::Up.name(l)), gate);
        assert_ne!(
            gate, q,
            "the MLP input is a different norm of a different stream"
        );
        assert_eq!(get(&LayerTensor::Down.name(l)).len(), c.intermediate_size);
    }
    assert_eq!(get(names::OUTPUT).len(), c.hidden_size);

    let file = NblFile::open(&path).unwrap();
    let embed = file
        .require(names::TOKEN_EMBEDDING)
        .unwrap()
        .matrix()
        .unwrap();
    let norm = file
        .require(&LayerTensor::AttnNorm.name(0))
        .unwrap()
        .f32s()
        .unwrap();
    let WeightView::F32 { data, .. } = embed else {
        panic!("an f32 conversion")
    };
    let h = c.hidden_size;
    let mut want = vec![0f64; h];
    for &t in &tokens {
        let row = &data[t as usize * h..(t as usize + 1) * h];
        for (s, v) in want.iter_mut().zip(rms_norm(row, norm, c.rms_norm_eps)) {
            *s += (v as f64).powi(2) / tokens.len() as f64;
        }
    }
    for (j, (&got, &want)) in get(&LayerTensor::Q.name(0)).iter().zip(&want).enumerate() {
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want.abs() + 1e-12,
            "column {j}: {got} vs {want}"
        );
    }
}

/// The output projection's input counts only where logits are computed:
/// every position with `forward_all`, the last one with `forward`.
#[test]
fn output_statistics_follow_the_requested_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f32.nbl");
    convert_to(&fixture("tiny-mha"), QuantPolicy::F32, &path, None);
    let model = Model::open(&path).unwrap();
    let tokens = [1u32, 50, 7, 300, 2, 9];
    let collect = |all: bool| {
        let mut s = Session::new(&model, SessionOptions::default()).unwrap();
        s.collect_activation_stats();
        if all {
            s.forward_all(&tokens).unwrap();
        } else {
            s.forward(&tokens).unwrap();
        }
        s.take_activation_stats().unwrap().mean_squares()
    };
    let (all, last) = (collect(true), collect(false));
    let out = |m: &[(String, Vec<f32>)]| m.last().unwrap().clone();
    assert_eq!(out(&all).0, names::OUTPUT);
    assert_ne!(out(&all).1, out(&last).1);
    // the layers saw the same rows either way
    assert_eq!(all[..all.len() - 1], last[..last.len() - 1]);
}

/// `nibble-tools imatrix` writes a file `convert --imatrix` accepts; the
/// weighted q4k conversion differs from the plain one and has a smaller
/// importance-weighted error over all its q4k matrices.
#[test]
fn weighted_conversion_lowers_the_weighted_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-mha");
    let f32_path = tmp.path().join("f32.nbl");
    convert_to(&src, QuantPolicy::F32, &f32_path, None);
    let text = tmp.path().join("cal.txt");
    std::fs::write(&text, calibration_text()).unwrap();
    let imat = tmp.path().join("tiny.imatrix");
    let out = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(["imatrix", "--ctx", "64", "-m"])
        .arg(&f32_path)
        .arg("-f")
        .arg(&text)
        .arg("-o")
        .arg(&imat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("15 matrices"), "{stdout}");
    let importance = Importance::load(&imat).unwrap();
    assert_eq!(importance.len(), 15);

    let (plain_path, weighted_path) = (tmp.path().join("q4k.nbl"), tmp.path().join("w.nbl"));
    convert_to(&src, QuantPolicy::Q4K, &plain_path, None);
    convert_to(&src, QuantPolicy::Q4K, &weighted_path, Some(&imat));
    let (f32_file, plain, weighted) = (
        NblFile::open(&f32_path).unwrap(),
        NblFile::open(&plain_path).unwrap(),
        NblFile::open(&weighted_path).unwrap(),
    );
    weighted.verify_checksums().unwrap();
    let (mut e_plain, mut e_weighted) = (0f64, 0f64);
    let mut q4k_matrices = 0;
    for info in weighted.tensors() {
        let m = weighted.require(&info.name).unwrap().matrix();
        let Ok(w @ WeightView::Q4K { .. }) = m else {
            continue;
        };
        let cols = info.shape[1] as usize;
        // the (untied) token embedding is looked up, not multiplied: no
        // statistics, plain rounding
        let Some(imp) = importance.columns(&info.name, cols).unwrap() else {
            assert_eq!(info.name, names::TOKEN_EMBEDDING);
            continue;
        };
        q4k_matrices += 1;
        let x = f32_file.require(&info.name).unwrap().matrix().unwrap();
        let p = plain.require(&info.name).unwrap().matrix().unwrap();
        let (mut xr, mut pr, mut wr) = (vec![0f32; cols], vec![0f32; cols], vec![0f32; cols]);
        for r in 0..info.shape[0] as usize {
            x.dequantize_row(r, &mut xr);
            p.dequantize_row(r, &mut pr);
            w.dequantize_row(r, &mut wr);
            for j in 0..cols {
                e_plain += imp[j] as f64 * ((xr[j] - pr[j]) as f64).powi(2);
                e_weighted += imp[j] as f64 * ((xr[j] - wr[j]) as f64).powi(2);
            }
        }
    }
    assert_eq!(q4k_matrices, 14, "every layer matrix is q4k");
    // Random weights and near-uniform importances leave little to move
    // (3% here); unweighted rounding would give exactly e_plain.
    assert!(
        e_weighted < 0.99 * e_plain,
        "weighted {e_weighted} vs plain {e_plain}"
    );
    let meta = weighted
        .metadata()
        .get_str(nibble::format::keys::QUANTIZATION);
    assert!(
        meta.unwrap().unwrap().contains("activation statistics"),
        "the file says how it was made"
    );
}

/// Importances of another model, a file that is not an importance file,
/// and a text too short for one window are one-line errors.
#[test]
fn bad_importance_input_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_path = tmp.path().join("f32.nbl");
    convert_to(&fixture("tiny-mha"), QuantPolicy::F32, &f32_path, None);
    let model = Model::open(&f32_path).unwrap();
    let stats = nibble::model::collect_activation_stats(&model, &calibration_text(), 64, |_, _| {})
        .unwrap();
    assert!(stats.tokens() >= 64);

    // a file whose matrices have other widths
    let imat = tmp.path().join("other.imatrix");
    let text = tmp.path().join("cal.txt");
    std::fs::write(&text, calibration_text()).unwrap();
    imatrix::collect(&f32_path, &text, 64, &imat, false).unwrap();
    let bytes = std::fs::read(&imat).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = LayerTensor::Down.name(0);
    let short = vec![0u8; 4 * 32];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| *n != name)
        .collect();
    tensors.push((
        name.clone(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![32], &short).unwrap(),
    ));
    let info = std::collections::HashMap::from([("format".into(), "nibble-imatrix".into())]);
    let wrong = tmp.path().join("wrong.imatrix");
    safetensors::serialize_to_file(tensors, Some(info), &wrong).unwrap();

    let cases: [(&Path, &str); 3] = [
        (&wrong, "statistics of a different model"),
        (
            &fixture("tiny-mha").join("model.safetensors"),
            "not an importance file",
        ),
        (&tmp.path().join("missing.imatrix"), "missing.imatrix"),
    ];
    for (file, want) in cases {
        let out = tmp.path().join("q4k.nbl");
        let mut o = ConvertOptions::new(fixture("tiny-mha"), &out, QuantPolicy::Q4K);
        o.imatrix = Some(file.to_owned());
        let e = convert(&o).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        assert!(!out.exists(), "no output on error");
    }

    let tiny_text = tmp.path().join("short.txt");
    std::fs::write(&tiny_text, "too short").unwrap();
    let e = imatrix::collect(&f32_path, &tiny_text, 64, &imat, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fewer than one window"), "{e}");
}

#[test]
fn imatrix_checks_the_context_against_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.nbl");
    convert_to(&fixture("tiny-mha"), QuantPolicy::F32, &model, None);
    let text = dir.path().join("calib.txt");
    std::fs::write(&text, calibration_text()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nibble-tools"))
        .args(["imatrix", "-m"])
        .arg(&model)
        .arg("-f")
        .arg(&text)
        .arg("-o")
        .arg(dir.path().join("imatrix.safetensors"))
        .args(["--ctx", "64", "--max-memory", "1M"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("a context of 64 tokens needs")
            && stderr.contains("the memory limit allows 1.0 MiB (lower --ctx)"),
        "{stderr}"
    );
    assert!(!dir.path().join("imatrix.safetensors").exists());
}
