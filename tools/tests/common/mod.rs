//! Helpers shared by the converter's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The real SmolLM2-135M-Instruct f32 checkpoint in `target/models/smollm2-f32`
/// (shared with the root crate's tests), built on first use by
/// `../shared/models/smollm2-135m/make.sh`.
pub fn smollm2_checkpoint() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = repo.join("target/models/smollm2-f32");
    if !dir.join(".made-f32").exists() {
        let script = repo.join("../shared/models/smollm2-135m/make.sh");
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
