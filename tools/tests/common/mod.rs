//! Helpers shared by the converter's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

#[path = "../../../tests/common/shared_data.rs"]
mod shared_data;
#[path = "../../../tests/common/stdout_errors.rs"]
pub mod stdout_errors;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether `../shared` is there for [`smollm2_checkpoint`] (see
/// `tests/common/shared_data.rs`).
pub fn have_shared() -> bool {
    shared_data::have_shared(&repo())
}

/// The script that builds the SmolLM2 checkpoint.
pub fn smollm2_script() -> PathBuf {
    shared_data::smollm2_script(&repo())
}

/// The real SmolLM2-135M-Instruct f32 checkpoint in `target/models/smollm2-f32`
/// (shared with the root crate's tests), built on first use by
/// `../shared/models/smollm2-135m/make.sh`.
pub fn smollm2_checkpoint() -> PathBuf {
    let dir = repo().join("target/models/smollm2-f32");
    if !dir.join(".made-f32").exists() {
        let script = smollm2_script();
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .arg("f32")
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(status.success(), "{} failed", script.display());
    }
    dir
}

/// Bits per weight over the matrices of a written `.nbl`, from its tensor
/// directory: what a conversion's summary must report, counted independently.
pub fn file_bits_per_weight(path: &Path) -> f64 {
    let file = nibble::format::NblFile::open(path).unwrap();
    let (bytes, weights) = file
        .tensors()
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .fold((0u64, 0u64), |(b, w), t| (b + t.len, w + t.elements()));
    bytes as f64 * 8.0 / weights as f64
}
