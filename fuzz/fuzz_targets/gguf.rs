//! Feeds arbitrary bytes to the converter's GGUF importer. Any panic,
//! overflow or out-of-bounds access is a bug: the parser must turn every
//! input into either a validated file or an error naming it.
//!
//! The input is written to a per-process file (the importer maps files) and
//! opened twice: as a generic GGUF (`GgufFile`: every metadata value through
//! every typed getter, every tensor's bytes, its first row dequantized), and
//! as a LLaMA model (`LlamaGguf`: hyper-parameters, the tokenizer built from
//! `tokenizer.ggml.*` and loaded by the `tokenizers` crate, the tensor set
//! checked against the plan, the first row of every tensor decoded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_tools::gguf::dequant::dequantize;
use nibble_tools::gguf::llama::LlamaGguf;
use nibble_tools::gguf::GgufFile;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("nibble-fuzz-{}.gguf", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).unwrap();
    if let Ok(file) = GgufFile::open(path) {
        generic(&file);
    }
    if let Ok(model) = LlamaGguf::open(path) {
        let _ = model.tokenizer.tokenizer_json.len();
        let names: Vec<String> = model.tensor_names().map(str::to_owned).collect();
        for name in names {
            let t = model.gguf_tensor(&name).expect("a listed tensor");
            let cols = t.dims[0] as usize;
            let mut row = vec![0f32; cols];
            model.decode_rows(&name, 0..1, &mut row);
        }
    }
});

fn generic(file: &GgufFile) {
    let _ = (file.version(), file.alignment(), file.path());
    for (key, value) in file.metadata() {
        let _ = (value.type_name(), value.as_u64(), value.as_i64());
        let _ = (value.as_f64(), value.as_bool(), value.as_str());
        let _ = value.as_array().map(|a| a.len());
        let _ = file.get_uint(key);
        let _ = file.get_f64(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_array(key);
    }
    for t in file.tensors() {
        let bytes = file.bytes(t);
        assert_eq!(Some(bytes.len() as u64), t.ty.byte_len(t.n_elements()));
        let cols = t.dims.first().copied().unwrap_or(1) as usize;
        if let Some(row_bytes) = t.ty.byte_len(cols as u64) {
            if cols > 0 && (row_bytes as usize) <= bytes.len() {
                let mut row = vec![0f32; cols];
                dequantize(t.ty, &bytes[..row_bytes as usize], &mut row);
            }
        }
    }
}
