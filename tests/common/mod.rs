//! Shared helpers for the runtime's integration tests: fixture paths, model
//! conversion (cached under `target/models/`), `.npy` and JSON readers.
#![allow(dead_code)]

use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[path = "shared_data.rs"]
mod shared_data;
#[path = "stdout_errors.rs"]
pub mod stdout_errors;

/// Whether `../shared` is there for [`smollm2_nbl`] (see `shared_data.rs`).
pub fn have_shared() -> bool {
    shared_data::have_shared(&repo())
}

/// Serializes conversions and checkpoint builds between the test threads of
/// one test binary (each file is written via a temporary file and a rename,
/// so separate processes at worst repeat the work).
static BUILD: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

pub fn models_dir() -> PathBuf {
    repo().join("target/models")
}

fn convert_to(input: &Path, output: &Path, quant: &str) {
    let policy = QuantPolicy::parse(quant).unwrap_or_else(|| panic!("unknown quant {quant}"));
    std::fs::create_dir_all(output.parent().unwrap()).unwrap();
    convert(&ConvertOptions::new(input, output, policy))
        .unwrap_or_else(|e| panic!("converting {} to {quant}: {e}", input.display()));
}

/// A tiny fixture checkpoint (`tests/fixtures/tiny/<name>`) converted with
/// `quant`, cached in `target/models/tiny/`.
pub fn tiny_nbl(name: &str, quant: &str) -> PathBuf {
    let out = models_dir().join(format!("tiny/{name}-{quant}.nbl"));
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !out.exists() {
        convert_to(&fixtures().join("tiny").join(name), &out, quant);
    }
    out
}

/// SmolLM2-135M-Instruct converted with `quant`. The f32 checkpoint is built
/// by `../shared/models/smollm2-135m/make.sh` (idempotent) on first use.
pub fn smollm2_nbl(quant: &str) -> PathBuf {
    let out = models_dir().join(format!("smollm2-{quant}.nbl"));
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        return out;
    }
    let ckpt = models_dir().join("smollm2-f32");
    if !ckpt.join(".made-f32").exists() {
        let script = shared_data::smollm2_script(&repo());
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&ckpt)
            .arg("f32")
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(status.success(), "{} failed", script.display());
    }
    convert_to(&ckpt, &out, quant);
    out
}

/// A little-endian f32 `.npy` file: its shape and data (the data are the last
/// `prod(shape) * 4` bytes).
pub fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not .npy", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'"),
        "{}: not f32: {header}",
        path.display()
    );
    let shape_str = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let n: usize = shape.iter().product();
    let data = bytes[bytes.len() - n * 4..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `|a - b| / |b|` (Euclidean norms).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(v: &[f32]) -> usize {
    nibble::sampler::argmax(v) as usize
}

/// Writes `dst` as a copy of the `.nbl` at `src` with `edit` applied to its
/// metadata (the tensors byte for byte): hostile or unusual metadata on a
/// real model.
pub fn rewrite_metadata(src: &Path, dst: &Path, edit: impl FnOnce(&mut nibble::format::Metadata)) {
    let file = nibble::format::NblFile::open(src).unwrap();
    let mut meta = file.metadata().clone();
    edit(&mut meta);
    let mut w = nibble::format::NblWriter::create(dst).unwrap();
    for t in file.tensors() {
        let view = file.tensor(&t.name).unwrap();
        w.add_tensor(&t.name, t.tensor_type.unwrap(), &t.shape, view.bytes)
            .unwrap();
    }
    w.finish(&meta).unwrap();
}

/// A copy of `src` whose chat template is `template`.
pub fn with_chat_template(src: &Path, template: &str, dst: &Path) {
    use nibble::format::{keys, Value};
    rewrite_metadata(src, dst, |m| {
        m.set(keys::CHAT_TEMPLATE, Value::Str(template.to_owned()))
    });
}
