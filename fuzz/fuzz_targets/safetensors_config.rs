//! Feeds arbitrary bytes to the converter's HuggingFace importer: the input
//! is `config.json`, a NUL byte, then a whole `model.safetensors`. Both go
//! into a per-process checkpoint directory beside a fixed, valid tokenizer
//! (the tiny fixture's; the tokenizer has its own target), and
//! `convert::convert` runs on it: the config is parsed and validated, the
//! safetensors header parsed and every range checked, the tensors checked
//! against the plan, and when all of that passes the tensors are quantized
//! (the policy picked from the input's length) and a `.nbl` written, which
//! must then open. Any panic, overflow or out-of-bounds access is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_tools::convert::{convert, ConvertOptions, QuantPolicy};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tiny/tiny-mha"
);

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("nibble-fuzz-hf-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ckpt")).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(Path::new(TOKENIZER).join(f), dir.join("ckpt").join(f)).unwrap();
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let (config, safetensors) = (&data[..split], &data[split + 1..]);
    let dir = scratch();
    let ckpt = dir.join("ckpt");
    std::fs::write(ckpt.join("config.json"), config).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), safetensors).unwrap();
    let policy = [
        QuantPolicy::F32,
        QuantPolicy::F16,
        QuantPolicy::Q8,
        QuantPolicy::Q4,
        QuantPolicy::Q4K,
    ][data.len() % 5];
    let out = dir.join("out.nbl");
    if convert(&ConvertOptions::new(&ckpt, &out, policy)).is_ok() {
        let file = nibble::format::NblFile::open(&out).expect("a converted file opens");
        file.verify_checksums().expect("a converted file verifies");
        std::fs::remove_file(&out).unwrap();
    }
});
