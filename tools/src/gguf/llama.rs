//! LLaMA-architecture GGUF → the converter's model description and tensors.
//!
//! llama.cpp stores a LLaMA model with its own tensor names, dimensions
//! innermost first, and the rows of the Q and K projections permuted so that
//! RoPE can rotate adjacent pairs (Meta's original layout) instead of the two
//! halves of each head (HuggingFace's layout, which nibble uses). Importing
//! renames, reverses the dimensions (a GGUF `[ne0, ne1]` matrix is HF
//! `[ne1, ne0]` with the same bytes) and reads Q/K rows in un-permuted order.

use super::dequant::dequantize;
use super::{GgufFile, GgufTensor};
use crate::convert::{self, ConvertOptions, ConvertSummary, Planned, Role};
use crate::hf::{LlamaConfig, RopeScaling, TokenizerInfo, DEFAULT_ROPE_THETA};
use crate::ToolError;
use nibble::format::names::{self, LayerTensor};
use nibble::format::NblWriter;
use nibble::quant::{encode_row_weighted, split_rows, take_rows, tensor_planes, TensorType};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The GGUF name of a per-layer tensor (llama.cpp's `LLM_TENSOR_NAMES`).
fn gguf_layer_suffix(t: LayerTensor) -> &'static str {
    match t {
        LayerTensor::AttnNorm => "attn_norm.weight",
        LayerTensor::Q => "attn_q.weight",
        LayerTensor::K => "attn_k.weight",
        LayerTensor::V => "attn_v.weight",
        LayerTensor::O => "attn_output.weight",
        LayerTensor::FfnNorm => "ffn_norm.weight",
        LayerTensor::Gate => "ffn_gate.weight",
        LayerTensor::Up => "ffn_up.weight",
        LayerTensor::Down => "ffn_down.weight",
    }
}

/// A GGUF tensor name's HuggingFace name and, for per-layer tensors, which
/// one it is. `None` for names a LLaMA model does not have.
pub fn hf_name(gguf_name: &str) -> Option<(String, Option<LayerTensor>)> {
    match gguf_name {
        "token_embd.weight" => return Some((names::TOKEN_EMBEDDING.into(), None)),
        "output_norm.weight" => return Some((names::FINAL_NORM.into(), None)),
        "output.weight" => return Some((names::OUTPUT.into(), None)),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    // Reject "01", "+1" and the like so one tensor has exactly one name.
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let t = LayerTensor::ALL
        .into_iter()
        .find(|&t| gguf_layer_suffix(t) == suffix)?;
    Some((t.name(layer), Some(t)))
}

/// Where an HF tensor's rows come from.
#[derive(Clone, Debug)]
struct Mapped {
    gguf: GgufTensor,
    /// For Q and K: the head count whose row permutation is undone.
    unpermute_heads: Option<usize>,
}

/// The GGUF row holding HF row `r` of a Q/K projection with `heads` heads of
/// `head_dim` rows. llama.cpp's converter wrote HF rows `h·hd + j·hd/2 + i`
/// (j ∈ {0,1}, i < hd/2) to `h·hd + 2i + j`, interleaving each head's halves.
pub fn permuted_row(r: usize, head_dim: usize) -> usize {
    let (h, within) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    h * head_dim + 2 * (within % half) + within / half
}

/// A LLaMA model read from a GGUF file.
pub struct LlamaGguf {
    pub file: GgufFile,
    pub config: LlamaConfig,
    pub tokenizer: TokenizerInfo,
    tensors: BTreeMap<String, Mapped>,
}

impl LlamaGguf {
    pub fn open(path: &Path) -> Result<Self, ToolError> {
        let file = GgufFile::open(path)?;
        let config = config(&file)?;
        convert::check_layer_count(
            path,
            "llama.block_count",
            config.num_hidden_layers,
            file.tensors().len(),
        )?;
        let tokenizer = super::tokenizer::build(&file, config.vocab_size)?;
        let mut tensors = BTreeMap::new();
        for t in file.tensors() {
            let Some((name, layer_tensor)) = hf_name(&t.name) else {
                let hint = if t.name == "rope_freqs.weight" {
                    " (LLaMA-3.1-style rope frequency scaling is not supported)"
                } else {
                    ""
                };
                return Err(file.error(format!(
                    "unexpected tensor {} (not part of a LLaMA model){hint}",
                    nibble::error::quote(&t.name)
                )));
            };
            let unpermute_heads = match layer_tensor {
                Some(LayerTensor::Q) => Some(config.num_attention_heads),
                Some(LayerTensor::K) => Some(config.num_key_value_heads),
                _ => None,
            };
            tensors.insert(
                name,
                Mapped {
                    gguf: t.clone(),
                    unpermute_heads,
                },
            );
        }
        let model = Self {
            file,
            config,
            tokenizer,
            tensors,
        };
        model.check(&convert::plan(&model.config))?;
        Ok(model)
    }

    /// Checks that the file holds exactly the tensors of `plan`, shaped as
    /// planned.
    fn check(&self, plan: &[Planned]) -> Result<(), ToolError> {
        for p in plan {
            let Some(m) = self.tensors.get(&p.name) else {
                return Err(self.file.error(format!(
                    "tensor '{}' is missing (HF '{}')",
                    self.gguf_name_of(&p.name),
                    p.name
                )));
            };
            if m.gguf.shape() != p.shape {
                return Err(self.file.error(format!(
                    "tensor '{}' has dimensions {:?} (innermost first), the metadata implies {:?}",
                    m.gguf.name,
                    m.gguf.dims,
                    p.shape.iter().rev().collect::<Vec<_>>()
                )));
            }
            if let Some(heads) = m.unpermute_heads {
                let rows = p.shape[0];
                if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
                    return Err(self.file.error(format!(
                        "tensor '{}' has {rows} rows, not {heads} heads of an even size",
                        m.gguf.name
                    )));
                }
            }
        }
        for (name, m) in &self.tensors {
            // A tied model may still carry an (identical) output matrix.
            if self.config.tie_word_embeddings && name == names::OUTPUT {
                continue;
            }
            if !plan.iter().any(|p| &p.name == name) {
                return Err(self.file.error(format!(
                    "unexpected tensor {} (the metadata describes {} layers)",
                    nibble::error::quote(&m.gguf.name),
                    self.config.num_hidden_layers
                )));
            }
        }
        Ok(())
    }

    fn gguf_name_of(&self, hf: &str) -> String {
        match hf {
            n if n == names::TOKEN_EMBEDDING => "token_embd.weight".into(),
            n if n == names::FINAL_NORM => "output_norm.weight".into(),
            n if n == names::OUTPUT => "output.weight".into(),
            _ => (0..self.config.num_hidden_layers)
                .flat_map(|l| LayerTensor::ALL.into_iter().map(move |t| (l, t)))
                .find(|&(l, t)| t.name(l) == hf)
                .map(|(l, t)| format!("blk.{l}.{}", gguf_layer_suffix(t)))
                .unwrap_or_else(|| hf.to_owned()),
        }
    }

    /// The GGUF tensor behind HF tensor `name`.
    pub fn gguf_tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name).map(|m| &m.gguf)
    }

    /// HF names of every tensor in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Decodes HF rows `rows` of tensor `name` (viewed as `[rows, cols]`, a
    /// 1-D tensor as one row) into `out`, `cols` floats per row.
    ///
    /// # Panics
    /// If `name` is not one of [`LlamaGguf::tensor_names`] or `rows` goes
    /// past the tensor's rows.
    pub fn decode_rows(&self, name: &str, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let m = &self.tensors[name];
        let t = &m.gguf;
        let cols = t.dims[0] as usize;
        let row_bytes = (t.end - t.start) / (t.n_elements() as usize / cols);
        let bytes = self.file.bytes(t);
        let head_dim = m.unpermute_heads.map(|h| t.dims[1] as usize / h);
        out.par_chunks_mut(cols).zip(rows).for_each(|(o, r)| {
            let g = head_dim.map_or(r, |hd| permuted_row(r, hd));
            dequantize(t.ty, &bytes[g * row_bytes..(g + 1) * row_bytes], o);
        });
    }

    /// The whole tensor `name` in HF layout as f32.
    pub fn dequantize(&self, name: &str) -> Option<Vec<f32>> {
        let t = &self.tensors.get(name)?.gguf;
        let n = t.n_elements() as usize;
        let mut out = vec![0f32; n];
        self.decode_rows(name, 0..n / t.dims[0] as usize, &mut out);
        Some(out)
    }
}

fn positive(file: &GgufFile, key: &str, value: Option<u64>) -> Result<Option<usize>, ToolError> {
    match value {
        None => Ok(None),
        Some(v) if v > 0 && v <= u32::MAX as u64 => Ok(Some(v as usize)),
        Some(v) => Err(file.error(format!(
            "metadata '{key}' is {v}, expected a positive 32-bit count"
        ))),
    }
}

/// The hyper-parameters from `general.architecture` and `llama.*`.
pub fn config(file: &GgufFile) -> Result<LlamaConfig, ToolError> {
    match file.get_str("general.architecture")? {
        Some("llama") => {}
        Some(other) => {
            return Err(file.error(format!(
                "architecture {} is not supported (only 'llama')",
                nibble::error::quote(other)
            )))
        }
        None => return Err(file.error("metadata 'general.architecture' is missing")),
    }
    let opt = |key: &str| -> Result<Option<usize>, ToolError> {
        let full = format!("llama.{key}");
        positive(file, &full, file.get_uint(&full)?)
    };
    let req = |key: &str| -> Result<usize, ToolError> {
        opt(key)?.ok_or_else(|| file.error(format!("metadata 'llama.{key}' is missing")))
    };
    if let Some(n) = file.get_uint("llama.expert_count")? {
        if n > 0 {
            return Err(file.error(format!(
                "mixture-of-experts models ({n} experts) are not supported"
            )));
        }
    }
    let tokens = file
        .get_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.error("metadata 'tokenizer.ggml.tokens' is missing"))?;
    let vocab_size = positive(file, "tokenizer.ggml.tokens", Some(tokens.len() as u64))?
        .expect("Some in, Some out");
    let hidden_size = req("embedding_length")?;
    let num_hidden_layers = req("block_count")?;
    let intermediate_size = req("feed_forward_length")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = opt("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(file.error(format!(
            "head count {num_attention_heads} is not a multiple of the KV head count {num_key_value_heads}"
        )));
    }
    let head_dim = match opt("attention.key_length")?.or(opt("rope.dimension_count")?) {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
        None => {
            return Err(file.error(format!(
                "embedding length {hidden_size} is not a multiple of the head count {num_attention_heads} and no head size is given"
            )))
        }
    };
    if let Some(rot) = opt("rope.dimension_count")? {
        if rot != head_dim {
            return Err(file.error(format!(
                "RoPE over {rot} of {head_dim} head dimensions (partial rotary) is not supported"
            )));
        }
    }
    if !head_dim.is_multiple_of(2) {
        return Err(file.error(format!("head size {head_dim} must be even for RoPE")));
    }
    let float = |key: &str| -> Result<Option<f32>, ToolError> {
        match file.get_f64(key)? {
            None => Ok(None),
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
            Some(x) => Err(file.error(format!(
                "metadata '{key}' is {x}, expected a positive number"
            ))),
        }
    };
    let rope_theta = float("llama.rope.freq_base")?.unwrap_or(DEFAULT_ROPE_THETA);
    let rope_scaling = match file.get_str("llama.rope.scaling.type")? {
        None | Some("none") => match float("llama.rope.scale_linear")? {
            // Files from before `rope.scaling.*` existed.
            Some(f) if f != 1.0 => RopeScaling::Linear { factor: f },
            _ => RopeScaling::None,
        },
        Some("linear") => {
            let factor = float("llama.rope.scaling.factor")?.ok_or_else(|| {
                file.error("linear rope scaling without 'llama.rope.scaling.factor'")
            })?;
            RopeScaling::Linear { factor }
        }
        Some(other) => {
            return Err(file.error(format!(
                "rope scaling type {} is not supported (only linear)",
                nibble::error::quote(other)
            )))
        }
    };
    let rms_norm_eps = float("llama.attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
        file.error("metadata 'llama.attention.layer_norm_rms_epsilon' is missing")
    })?;
    let max_position_embeddings = req("context_length")?;
    let tie_word_embeddings = file.tensor("output.weight").is_none();

    // What the weights were stored as, for the provenance record.
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in file.tensors() {
        *counts.entry(t.ty.name()).or_default() += 1;
    }
    let mix: Vec<String> = counts.iter().map(|(ty, n)| format!("{ty} x{n}")).collect();
    Ok(LlamaConfig {
        vocab_size,
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings,
        rope_theta,
        rope_scaling,
        rms_norm_eps,
        tie_word_embeddings,
        dtype: Some(format!("GGUF v{} ({})", file.version(), mix.join(", "))),
    })
}

/// Rows decoded per parallel batch: bounds the f32 staging memory.
const BATCH_WEIGHTS: usize = 4 << 20;

/// Converts a LLaMA GGUF file into a `.nbl`, requantizing every matrix
/// under the converter's policy.
pub fn convert(options: &ConvertOptions) -> Result<ConvertSummary, ToolError> {
    let started = Instant::now();
    convert::check_output(options, std::slice::from_ref(&options.input))?;
    let model = LlamaGguf::open(&options.input)?;
    let plan = convert::plan(&model.config);
    let file_name = options
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| options.input.display().to_string());
    let types = options
        .tensor_types(&plan)
        .map_err(|e| ToolError::new(&options.input, e))?;
    let metadata = convert::metadata(&model.config, &model.tokenizer, options, vec![file_name]);
    convert::check_runtime_accepts(&options.input, &metadata)?;
    let importance = options.importance(&plan)?;

    let total: u64 = plan
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    let bar = convert::progress_bar(options.progress, total);
    let mut writer = NblWriter::create(&options.output)
        .map_err(|e| convert::output_error(&options.output, e))?;
    let mut buf = Vec::new();
    let mut staging = Vec::new();
    let (mut matrix_weights, mut matrix_bytes) = (0u64, 0u64);
    for (p, &ty) in plan.iter().zip(&types) {
        let cols = *p.shape.last().expect("planned shapes are non-empty");
        let rows = p.shape.iter().product::<usize>() / cols;
        bar.set_message(p.name.clone());
        let t = model.gguf_tensor(&p.name).expect("checked at open");
        model.file.will_read(t);
        let columns = importance
            .as_ref()
            .and_then(|imp| imp.columns(&p.name, cols).expect("checked by importance()"));
        encode(
            &model,
            &p.name,
            rows,
            cols,
            (ty, columns),
            &mut staging,
            &mut buf,
            &bar,
        )
        .map_err(|e| model.file.error(format!("tensor '{}': {e}", t.name)))?;
        model.file.release(t);
        let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
        writer
            .add_tensor(&p.name, ty, &shape, &buf)
            .map_err(|e| convert::output_error(&options.output, e))?;
        if p.role != Role::Norm {
            matrix_weights += (rows * cols) as u64;
            matrix_bytes += buf.len() as u64;
        }
    }
    bar.finish_and_clear();
    let output_bytes = writer
        .finish(&metadata)
        .map_err(|e| convert::output_error(&options.output, e))?;
    Ok(ConvertSummary {
        tensors: plan.len(),
        output_bytes,
        matrix_weights,
        matrix_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Decodes HF tensor `name` batch by batch and stores it as `ty` (rounding
/// weighted by the column importances, if any) in `out`
/// (`.nbl` layout: for quantized types each plane of all rows in turn).
#[allow(clippy::too_many_arguments)]
fn encode(
    model: &LlamaGguf,
    name: &str,
    rows: usize,
    cols: usize,
    (ty, importance): (TensorType, Option<&[f32]>),
    staging: &mut Vec<f32>,
    out: &mut Vec<u8>,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let len = ty
        .byte_len(rows as u64, cols as u64)
        .ok_or("size overflows")? as usize;
    out.clear();
    out.resize(len, 0);
    let mut planes = tensor_planes(ty, cols, rows, out);
    let batch_rows = (BATCH_WEIGHTS / cols).max(1);
    let mut row0 = 0;
    while row0 < rows {
        let row1 = (row0 + batch_rows).min(rows);
        staging.clear();
        staging.resize((row1 - row0) * cols, 0.0);
        model.decode_rows(name, row0..row1, staging);
        let batch = take_rows(ty, cols, &mut planes, row1 - row0);
        staging
            .par_chunks(cols)
            .zip(split_rows(ty, cols, batch))
            .enumerate()
            .try_for_each(|(r, (x, planes))| {
                encode_row_weighted(ty, x, importance, planes)
                    .map_err(|e| format!("{}", e.offset((row0 + r) * cols)))
            })?;
        bar.inc(((row1 - row0) * cols) as u64);
        row0 = row1;
    }
    Ok(())
}

/// Whether `path` names a GGUF file (by extension), which `convert` imports
/// instead of reading a HuggingFace directory.
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
