//! `convert --report`: how much each tensor lost to quantization, measured
//! against the source checkpoint, so users see where the bits go.

use crate::source::Source;
use crate::ToolError;
use nibble::format::NblFile;
use nibble::quant::TensorType;
use rayon::prelude::*;
use std::fmt;
use std::path::Path;

/// One tensor's quantization error.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorError {
    pub name: String,
    pub ty: TensorType,
    pub elements: u64,
    /// RMSE of the decoded tensor against the source, divided by the source's
    /// RMS (0 for a tensor stored exactly; 0 also for an all-zero source).
    pub relative_rmse: f64,
}

/// Per-tensor errors of every matrix in `nbl` (1-D tensors are stored f32,
/// exactly) against the HuggingFace checkpoint `hf_dir` it was converted from.
pub fn quantization_report(hf_dir: &Path, nbl: &Path) -> Result<Vec<TensorError>, ToolError> {
    let file = NblFile::open(nbl).map_err(|e| ToolError::new(nbl, e))?;
    let source = Source::open(hf_dir)?;
    let mut out = Vec::new();
    for info in file.tensors() {
        if info.shape.len() != 2 {
            continue;
        }
        let Some(src) = source.get(&info.name) else {
            continue;
        };
        let view = file
            .require(&info.name)
            .and_then(|t| t.matrix())
            .map_err(|e| ToolError::new(nbl, e))?;
        let cols = view.cols();
        let bytes = source.bytes(src);
        let row_bytes = cols * src.dtype.size();
        let (err2, ref2) = bytes
            .par_chunks(row_bytes)
            .enumerate()
            .map_init(
                || (vec![0f32; cols], vec![0f32; cols]),
                |(x, y), (r, raw)| {
                    src.dtype.decode(raw, x);
                    view.dequantize_row(r, y);
                    x.iter()
                        .zip(y.iter())
                        .fold((0f64, 0f64), |(e, s), (&a, &b)| {
                            let d = a as f64 - b as f64;
                            (e + d * d, s + a as f64 * a as f64)
                        })
                },
            )
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        out.push(TensorError {
            name: info.name.clone(),
            ty: view.tensor_type(),
            elements: info.elements(),
            relative_rmse: if ref2 > 0.0 {
                (err2 / ref2).sqrt()
            } else {
                0.0
            },
        });
    }
    Ok(out)
}

/// The report as a table, one tensor per line, and the element-weighted mean
/// of the relative RMSE per type.
pub struct Report<'a>(pub &'a [TensorError]);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<48} {:>5} {:>12} {:>10}",
            "tensor", "type", "elements", "rel. RMSE"
        )?;
        for t in self.0 {
            writeln!(
                f,
                "{:<48} {:>5} {:>12} {:>9.4}%",
                t.name,
                t.ty.name(),
                t.elements,
                t.relative_rmse * 100.0
            )?;
        }
        for ty in TensorType::ALL {
            let of_type: Vec<&TensorError> = self.0.iter().filter(|t| t.ty == ty).collect();
            let n: u64 = of_type.iter().map(|t| t.elements).sum();
            if n > 0 {
                let mean = of_type
                    .iter()
                    .map(|t| t.relative_rmse * t.elements as f64)
                    .sum::<f64>()
                    / n as f64;
                writeln!(
                    f,
                    "{ty}: {} tensors, {n} weights, mean relative RMSE {:.4}%",
                    of_type.len(),
                    mean * 100.0
                )?;
            }
        }
        Ok(())
    }
}
