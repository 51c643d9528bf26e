//! `nibble-tools perturb`: a copy of a HuggingFace checkpoint whose weights are
//! moved off any 4-bit grid they may sit on.
//!
//! A checkpoint dequantized from a llama.cpp Q4_1 file (as the SmolLM2 test
//! model is) has every 32-weight block exactly on an asymmetric 16-level grid,
//! which flatters any format with a per-block scale and minimum. This adds
//! deterministic Gaussian noise of a quarter of the local Q4_1 step,
//! `(max - min) / 15` of each block of 32 consecutive weights of a row, to
//! every 2-D tensor; 1-D tensors (norms) are copied unchanged. Output weights
//! are f32 in one `model.safetensors`; the other files are copied. Each file
//! is written under a temporary name and renamed into place; an output
//! directory that is or contains the input, or a file in it that is one of
//! the input's files (through a link), is refused.

use crate::source::Source;
use crate::ToolError;
use nibble::fsutil::{self, AtomicFile};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Weights per noise block (llama.cpp's Q4_1 block).
const NOISE_BLOCK: usize = 32;

/// Writes the perturbed copy of `input` into the directory `output`.
pub fn perturb(input: &Path, output: &Path, seed: u64) -> Result<(), ToolError> {
    let source = Source::open(input)?;
    fsutil::check_output_dir(output, &[input]).map_err(|e| ToolError::new(output, e))?;
    fs::create_dir_all(output)
        .map_err(|e| ToolError::new(output, format!("cannot create the directory: {e}")))?;
    let entries = fs::read_dir(input)
        .map_err(|e| ToolError::new(input, format!("cannot list the directory: {e}")))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if entry.path().is_file() && !is_weights {
            let dest = output.join(&*name);
            fsutil::check_output_path(&dest, &[input]).map_err(|e| ToolError::new(&dest, e))?;
            let bytes = fsutil::read_regular(&entry.path())
                .map_err(|e| ToolError::new(&entry.path(), format!("cannot read: {e}")))?;
            crate::synth::write_atomically(&dest, &bytes)?;
        }
    }

    // safetensors: u64 header length, JSON header, then the data.
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (name, t) in source.tensors() {
        let n: usize = t.shape.iter().product();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + 4 * n]}),
        );
        offset += 4 * n;
    }
    let mut header = serde_json::to_string(&header).expect("plain JSON serializes");
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let path = output.join("model.safetensors");
    fsutil::check_output_path(&path, &[input]).map_err(|e| ToolError::new(&path, e))?;
    let write_err = |e: std::io::Error| ToolError::new(&path, format!("cannot write: {e}"));
    let mut w = BufWriter::new(AtomicFile::create(&path).map_err(write_err)?);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(write_err)?;
    w.write_all(header.as_bytes()).map_err(write_err)?;
    for (name, t) in source.tensors() {
        let n: usize = t.shape.iter().product();
        let mut x = vec![0f32; n];
        t.dtype.decode(source.bytes(t), &mut x);
        if t.shape.len() == 2 {
            add_noise(&mut x, t.shape[1], seed ^ fnv1a(name.as_bytes()));
        }
        w.write_all(bytemuck::cast_slice(&x)).map_err(write_err)?;
    }
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(AtomicFile::commit)
        .map_err(write_err)?;
    Ok(())
}

/// Adds `N(0, 1) * step / 4` to every weight, `step = (max - min) / 15` of its
/// block of `NOISE_BLOCK` weights within a row of `cols`.
pub fn add_noise(x: &mut [f32], cols: usize, seed: u64) {
    let mut rng = Gaussian::new(seed);
    for row in x.chunks_mut(cols) {
        for block in row.chunks_mut(NOISE_BLOCK) {
            let (min, max) = block
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let sigma = (max - min) / 15.0 / 4.0;
            for v in block.iter_mut() {
                *v += (rng.next() * sigma as f64) as f32;
            }
        }
    }
}

/// 64-bit FNV-1a, to give each tensor its own noise stream.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Standard normal samples: SplitMix64 uniforms through Box-Muller. Written
/// out here so the perturbed copy never changes with a dependency's version.
struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // In (0, 1]: never 0, so the logarithm is finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let a = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * a.sin());
        r * a.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_a_quarter_step_and_deterministic() {
        // Blocks with step 1 (range 15): noise sd should be 0.25.
        let base: Vec<f32> = (0..32 * 2000).map(|i| (i % 16) as f32).collect();
        let mut a = base.clone();
        add_noise(&mut a, 64, 7);
        let mut b = base.clone();
        add_noise(&mut b, 64, 7);
        assert_eq!(a, b);
        let n = a.len() as f64;
        let d: Vec<f64> = a.iter().zip(&base).map(|(x, y)| (x - y) as f64).collect();
        let mean = d.iter().sum::<f64>() / n;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((sd - 0.25).abs() < 0.01, "sd {sd}");
        let mut c = base.clone();
        add_noise(&mut c, 64, 8);
        assert_ne!(a, c);
    }
}
