//! Importance files: the per-column activation statistics
//! ([`nibble::model::ActivationStats`]) of a model on a calibration text,
//! saved so a later conversion can weigh each weight's rounding error by how
//! strongly its input channel is driven (`convert --imatrix`).
//!
//! The file is a safetensors file: one 1-D F32 tensor per weight matrix,
//! named as the matrix (`model.layers.0.self_attn.q_proj.weight`), holding
//! the mean square of each input column; the metadata records the format,
//! the number of tokens and the window length. Any safetensors reader can
//! open it.

use crate::ToolError;
use indicatif::{ProgressBar, ProgressStyle};
use nibble::model::{collect_activation_stats, ActivationStats};
use nibble::Model;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// `format` metadata value of an importance file.
const FORMAT: &str = "nibble-imatrix";

/// What [`collect`] did.
pub struct CollectSummary {
    pub tokens: u64,
    pub matrices: usize,
    pub seconds: f64,
}

/// Runs `model_path` over the text in `text_path` in windows of `ctx` tokens
/// and writes the statistics to `output` (atomically: a temporary file
/// renamed into place, removed on failure). Refuses an `output` that is the
/// model or the text, or exists and is not a regular file.
pub fn collect(
    model_path: &Path,
    text_path: &Path,
    ctx: usize,
    output: &Path,
    progress: bool,
) -> Result<CollectSummary, ToolError> {
    let started = std::time::Instant::now();
    nibble::fsutil::check_output_path(output, &[model_path, text_path])
        .map_err(|e| ToolError::new(output, e))?;
    let model = Model::open(model_path).map_err(|e| ToolError::named(e.to_string()))?;
    let bytes = std::fs::read(text_path).map_err(|e| ToolError::new(text_path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| ToolError::new(text_path, format!("not UTF-8 text: {e}")))?;
    let bar = if progress {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {eta} left")
                .expect("a valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let stats = collect_activation_stats(&model, &text, ctx, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .map_err(|e| match e {
        // Names the model already; the context is what to change.
        nibble::Error::OutOfMemory { .. } => ToolError::named(format!("{e} (lower --ctx)")),
        e => ToolError::new(text_path, e),
    })?;
    bar.finish_and_clear();
    let matrices = save(&stats, ctx, output)?;
    Ok(CollectSummary {
        tokens: stats.tokens(),
        matrices,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `stats` to `output`; returns the number of matrices.
fn save(stats: &ActivationStats, ctx: usize, output: &Path) -> Result<usize, ToolError> {
    let means = stats.mean_squares();
    let bytes: Vec<(String, Vec<u8>, usize)> = means
        .iter()
        .map(|(name, v)| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), b, v.len())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, b, n)| {
            let view = TensorView::new(Dtype::F32, vec![*n], b).expect("the length is n * 4");
            (name.as_str(), view)
        })
        .collect::<Vec<_>>();
    let info = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("tokens".to_string(), stats.tokens().to_string()),
        ("ctx".to_string(), ctx.to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| ToolError::new(output, format!("cannot encode: {e}")))?;
    let written = nibble::fsutil::AtomicFile::create(output).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.commit()
    });
    written.map_err(|e| ToolError::new(output, format!("cannot write: {e}")))?;
    Ok(means.len())
}

/// Column importances per matrix name, read from an importance file.
#[derive(Debug, Default)]
pub struct Importance {
    columns: HashMap<String, Vec<f32>>,
}

impl Importance {
    /// Reads and checks an importance file: every tensor 1-D F32, every
    /// value finite and not negative.
    pub fn load(path: &Path) -> Result<Self, ToolError> {
        let bytes = nibble::fsutil::read_regular(path).map_err(|e| crate::open_error(path, e))?;
        let err = |m: String| ToolError::new(path, m);
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not an importance file (safetensors): {e}")))?;
        if meta.metadata().as_ref().and_then(|m| m.get("format")) != Some(&FORMAT.to_string()) {
            return Err(err(format!(
                "not an importance file (no format = {FORMAT} in its metadata)"
            )));
        }
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("not an importance file (safetensors): {e}")))?;
        let mut columns = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
                return Err(err(format!(
                    "tensor '{name}' is {:?} {:?}, expected 1-D F32",
                    view.dtype(),
                    view.shape()
                )));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(err(format!(
                    "tensor '{name}' holds {v}; importances are finite and not negative"
                )));
            }
            columns.insert(name, values);
        }
        Ok(Self { columns })
    }

    /// The importances of matrix `name` with `cols` columns: `None` if the
    /// file has none for it, an error if it has the wrong number.
    pub fn columns(&self, name: &str, cols: usize) -> Result<Option<&[f32]>, String> {
        match self.columns.get(name) {
            None => Ok(None),
            Some(v) if v.len() == cols => Ok(Some(v)),
            Some(v) => Err(format!(
                "the importance file has {} columns for '{name}', the matrix has {cols} \
                 (statistics of a different model?)",
                v.len()
            )),
        }
    }

    /// Number of matrices with importances.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}
