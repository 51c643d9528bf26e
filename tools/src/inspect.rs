//! Reports on `.nbl` files (`inspect`) and full integrity checks (`verify`).

use crate::ToolError;
use nibble::format::{keys, NblFile, TensorInfo, Value};
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

/// Longest metadata string shown in full by the text report.
const SHOW_CHARS: usize = 120;

/// Opens and validates the structure of a `.nbl` file.
pub fn open(path: &Path) -> Result<NblFile, ToolError> {
    NblFile::open(path).map_err(|e| ToolError::named(e.to_string()))
}

/// Weights and bytes over all matrices (tensors of two or more dimensions).
pub fn matrix_totals(file: &NblFile) -> (u64, u64) {
    file.tensors()
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .fold((0, 0), |(w, b), t| (w + t.elements(), b + t.len))
}

fn bits_per_weight(t: &TensorInfo) -> f64 {
    t.len as f64 * 8.0 / t.elements() as f64
}

fn type_name(t: &TensorInfo) -> String {
    match t.tensor_type {
        Some(ty) => ty.name().to_owned(),
        None => format!("unknown({})", t.type_id),
    }
}

/// A metadata value for display; `tokenizer.json` and long strings are cut
/// short.
fn show_value(key: &str, v: &Value) -> String {
    match v {
        Value::Str(s) if key == keys::TOKENIZER_JSON => format!("<{} bytes of JSON>", s.len()),
        Value::PackedStr(s) if key == keys::TOKENIZER_JSON => {
            format!("<{} bytes of JSON, stored zlib-packed>", s.len())
        }
        Value::Str(s) | Value::PackedStr(s) => {
            let escaped: String = s.escape_debug().collect();
            if escaped.chars().count() > SHOW_CHARS {
                let cut: String = escaped.chars().take(SHOW_CHARS).collect();
                format!("\"{cut}…\" ({} bytes)", s.len())
            } else {
                format!("\"{escaped}\"")
            }
        }
        Value::U32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::F32(x) => format!("{x:?}"),
        Value::Bool(x) => x.to_string(),
        Value::U32Array(xs) => format!("{xs:?}"),
        Value::StrArray(xs) => format!("{xs:?}"),
    }
}

/// The human-readable report of `nibble-tools inspect`.
pub fn text_report(path: &Path, file: &NblFile) -> String {
    let h = file.header();
    let mut s = String::new();
    let _ = writeln!(s, "file: {} ({} bytes)", path.display(), file.file_len());
    let _ = writeln!(
        s,
        "format: .nbl {}.{}, flags {:#010x}, {} tensors",
        h.version_major, h.version_minor, h.flags, h.tensor_count
    );
    let _ = writeln!(
        s,
        "sections: data [{}, +{}), metadata [{}, +{}), directory [{}, +{})",
        h.data_offset,
        h.data_len,
        h.metadata_offset,
        h.metadata_len,
        h.directory_offset,
        h.directory_len
    );
    let _ = writeln!(s, "\nmetadata ({} keys):", file.metadata().len());
    let width = file
        .metadata()
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (k, v) in file.metadata().iter() {
        let _ = writeln!(s, "  {k:width$}  {}", show_value(k, v));
    }
    let name_w = file
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(s, "\ntensors:");
    let _ = writeln!(
        s,
        "  {:name_w$}  {:>6}  {:>14}  {:>12}  {:>6}",
        "name", "type", "shape", "bytes", "bpw"
    );
    for t in file.tensors() {
        let shape = t
            .shape
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("x");
        let _ = writeln!(
            s,
            "  {:name_w$}  {:>6}  {:>14}  {:>12}  {:>6.2}",
            t.name,
            type_name(t),
            shape,
            t.len,
            bits_per_weight(t)
        );
    }
    let (w, b) = matrix_totals(file);
    let all: u64 = file.tensors().iter().map(|t| t.elements()).sum();
    let _ = writeln!(
        s,
        "\n{all} weights; matrices: {w} weights in {b} bytes, {:.3} bits per weight",
        if w == 0 {
            0.0
        } else {
            b as f64 * 8.0 / w as f64
        }
    );
    s
}

/// The machine-readable report of `nibble-tools inspect --json`.
pub fn json_report(path: &Path, file: &NblFile) -> serde_json::Value {
    let h = file.header();
    let metadata: serde_json::Map<String, serde_json::Value> = file
        .metadata()
        .iter()
        .map(|(k, v)| {
            let jv = match v {
                Value::Str(s) if k == keys::TOKENIZER_JSON => {
                    json!({"abbreviated": true, "bytes": s.len()})
                }
                Value::PackedStr(s) if k == keys::TOKENIZER_JSON => {
                    json!({"abbreviated": true, "bytes": s.len(), "packed": true})
                }
                Value::Str(s) | Value::PackedStr(s) => json!(s),
                Value::U32(x) => json!(x),
                Value::U64(x) => json!(x),
                Value::F32(x) => json!(x),
                Value::Bool(x) => json!(x),
                Value::U32Array(xs) => json!(xs),
                Value::StrArray(xs) => json!(xs),
            };
            (k.to_owned(), jv)
        })
        .collect();
    let tensors: Vec<_> = file
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": type_name(t),
                "shape": t.shape,
                "offset": t.offset,
                "bytes": t.len,
                "crc32": t.crc32,
                "bits_per_weight": bits_per_weight(t),
            })
        })
        .collect();
    let (w, b) = matrix_totals(file);
    json!({
        "file": path.display().to_string(),
        "file_bytes": file.file_len(),
        "header": {
            "version": [h.version_major, h.version_minor],
            "flags": h.flags,
            "tensor_count": h.tensor_count,
            "data": [h.data_offset, h.data_len],
            "metadata": [h.metadata_offset, h.metadata_len],
            "directory": [h.directory_offset, h.directory_len],
        },
        "metadata": metadata,
        "tensors": tensors,
        "matrix_weights": w,
        "matrix_bytes": b,
        "bits_per_weight": if w == 0 { 0.0 } else { b as f64 * 8.0 / w as f64 },
    })
}

/// What a successful [`verify`] checked.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifySummary {
    pub tensors: usize,
    pub bytes: u64,
}

/// Validates the whole structure and every tensor checksum.
pub fn verify(path: &Path) -> Result<VerifySummary, ToolError> {
    let file = open(path)?;
    file.verify_checksums()
        .map_err(|e| ToolError::new(path, e))?;
    // Packed strings are inflated when read; verify inflates every one.
    file.metadata()
        .check()
        .map_err(|e| ToolError::new(path, e))?;
    Ok(VerifySummary {
        tensors: file.tensors().len(),
        bytes: file.file_len(),
    })
}
