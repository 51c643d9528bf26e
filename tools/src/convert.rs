//! HuggingFace LLaMA checkpoint → `.nbl`.
//!
//! # Quantization policy
//!
//! | tensor | `f32` | `f16` | `q8` | `q4` | `q4k` |
//! |---|---|---|---|---|---|
//! | RMSNorm weights | f32 | f32 | f32 | f32 | f32 |
//! | attention and MLP matrices | f32 | f16 | q8 | q4 | q4k |
//! | token embedding (untied) | f32 | f16 | q8 | q4 | q4k |
//! | `v_proj` of a grouped-query model | f32 | f16 | **f16** | **q8** | q4k in the first quarter of the layers, then **q8** |
//! | output projection (`lm_head`, or the token embedding when tied) | f32 | f16 | q8 | **q8r** | **q8r** |
//!
//! - Norms are tiny and every activation passes through them: never quantized.
//! - Under `q4` and `q4k` the output projection stays at 8 bits: its errors
//!   land directly on the logits (on SmolLM2, a 4-bit tied embedding costs
//!   +8.9% perplexity against +0.4% at 8 bits), and at ~2% of a 7B model's
//!   weights the cost is small. It is q8r (one scale per row, 8.03 bits per
//!   weight on SmolLM2 instead of 8.5): SmolLM2's rows have no outlier
//!   blocks, so perplexity stays within noise (26.571 vs 26.586 with q8) and
//!   the q4k file drops below llama.cpp's Q4_0.
//! - The value projection is the most sensitive matrix per weight: on
//!   SmolLM2 (first 20,000 bytes of the eval text) storing only `v_proj` at
//!   f16 under `q8` cuts the mean KL divergence from f32 by 38% (0.00101 →
//!   0.00063; `k_proj` or `o_proj` as well add little, the token embedding
//!   nothing), and `v_proj` at q8 under `q4` by 34% (0.259 → 0.172). In a
//!   grouped-query model it is small — 1/group of `q_proj`, 2.5% of
//!   SmolLM2's weights, 1% of a 70B's — so the extra bits are cheap (the q4
//!   file stays below llama.cpp's Q4_0). In a multi-head model (LLaMA-2-7B)
//!   it is 8% of the weights and q4 would grow from 4.6 to 4.9 bits per
//!   weight, so it keeps the common type there. Under q4k it is q8 after
//!   the first quarter of the layers ([`is_early_layer`]): on the perturbed
//!   SmolLM2 with `--imatrix` (first 24,000 bytes of the eval text; mean KL
//!   of only that matrix at q4k in an f32 model: `v_proj` 0.0067, `k_proj`
//!   0.0023, `q_proj` 0.0025 for three times the weights) q8 in all 30
//!   layers cuts the whole model's KL from 0.0542 to 0.0478, in the last 22
//!   to 0.0487, in the first 22 to 0.0498 (the early layers' `v_proj`
//!   matters least), and the last 22 fit under Q4_0's file size once the
//!   tokenizer is stored packed (format 1.1).
//! - A q4k row whose width is not a multiple of 256 ends in a shorter group
//!   (SmolLM2's 576: 4.67 bits per weight instead of 4.5).
//! - `--tensor-type PATTERN=TYPE` ([`TypeOverride`]) overrides the table
//!   for the matrices whose name contains PATTERN.
//! - A matrix whose column count is not a multiple of the 32-weight block
//!   cannot be block-quantized and is stored as f16 instead.
//!
//! The chosen policy is written into the file as `provenance.quantization`.
//!
//! # Streaming
//!
//! Tensors are converted one at a time, in row batches of about
//! [`BATCH_BYTES`] of source data: each batch is decoded and quantized on all
//! cores straight from the mmapped safetensors, then its source pages are
//! released. A reader thread brings the batches into memory a few ahead of
//! the quantizer, so the disk and the cores work at the same time. Resident
//! memory is two output tensors plus a few batches, not the model. Output
//! goes through [`NblWriter`] (temporary file, renamed at the end), so a
//! failure never leaves a partial `.nbl`.

use crate::hf::{read_json, LlamaConfig, RopeScaling, TokenizerInfo};
use crate::imatrix::Importance;
use crate::source::{Source, SourceTensor};
pub use crate::ConvertError;
use crate::ToolError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nibble::format::names::{self, LayerTensor};
use nibble::format::{keys, Metadata, NblWriter, Value};
use nibble::quant::{
    encode_row_weighted, split_rows, take_rows, tensor_planes, QuantError, TensorType, BLOCK,
    Q4K_GROUP,
};
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Source bytes per processing batch: large enough to keep all cores busy,
/// small enough that resident memory stays low.
pub const BATCH_BYTES: usize = 16 << 20;

/// Batches the reader thread may have in memory ahead of the one being
/// quantized: enough to ride out the disk's hiccups, few next to memory.
const READ_AHEAD_BATCHES: usize = 4;

/// What `--quant` asks for; see the module documentation for the full policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantPolicy {
    F32,
    F16,
    Q8,
    Q4,
    Q4K,
}

/// The role a tensor plays, which with the policy decides its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Norm,
    Matrix,
    /// `v_proj` of a grouped-query model, where each value head serves
    /// several query heads; `early` in the first quarter of the layers
    /// ([`is_early_layer`]).
    GroupedValue {
        early: bool,
    },
    /// The matrix producing the logits.
    OutputProjection,
}

/// Whether `layer` is in the first quarter (rounded up) of `layers`, where
/// q4k keeps a grouped-query `v_proj` at 4 bits (see the module docs).
pub fn is_early_layer(layer: usize, layers: usize) -> bool {
    layer < layers.div_ceil(4)
}

impl QuantPolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
            Self::Q4K => "q4k",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q8, Self::Q4, Self::Q4K]
            .into_iter()
            .find(|p| p.name() == s)
    }

    /// The stored type of a tensor with this role and innermost dimension.
    pub fn tensor_type(self, role: Role, cols: usize) -> TensorType {
        let wanted = match (role, self) {
            (Role::Norm, _) | (_, Self::F32) => return TensorType::F32,
            (_, Self::F16) => TensorType::F16,
            (Role::GroupedValue { .. }, Self::Q8) => TensorType::F16,
            (_, Self::Q8) => TensorType::Q8,
            (Role::OutputProjection, Self::Q4 | Self::Q4K) => TensorType::Q8R,
            (Role::GroupedValue { .. }, Self::Q4) => TensorType::Q8,
            (Role::GroupedValue { early: false }, Self::Q4K) => TensorType::Q8,
            (Role::Matrix, Self::Q4) => TensorType::Q4,
            (Role::Matrix | Role::GroupedValue { early: true }, Self::Q4K) => TensorType::Q4K,
        };
        if cols.is_multiple_of(wanted.cols_multiple()) {
            wanted
        } else if cols.is_multiple_of(BLOCK) {
            TensorType::Q8
        } else {
            TensorType::F16
        }
    }

    /// The policy in words, as recorded in `provenance.quantization`.
    pub fn describe(self) -> String {
        let rest = match self {
            Self::F32 => "all matrices f32".to_owned(),
            Self::F16 => "all matrices f16".to_owned(),
            Self::Q8 => format!(
                "matrices q8 (blocks of {BLOCK}, f16 scales), v_proj of a grouped-query model f16"
            ),
            Self::Q4 => format!(
                "matrices q4 (blocks of {BLOCK}, f16 scales), v_proj of a grouped-query model q8, \
                 output projection q8r (one f16 scale per row)"
            ),
            Self::Q4K => format!(
                "matrices q4k (affine, 6-bit scales and minimums per {BLOCK}, f16 per {Q4K_GROUP}), \
                 v_proj of a grouped-query model q8 after the first quarter of the layers, \
                 output projection q8r (one f16 scale per row)"
            ),
        };
        format!(
            "{}: norms f32; {rest}; matrices whose columns are not a multiple of {BLOCK} f16",
            self.name()
        )
    }
}

impl fmt::Display for QuantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `PATTERN=TYPE` (`--tensor-type`): matrices whose name contains `pattern`
/// are stored as `ty`, whatever the policy says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeOverride {
    pub pattern: String,
    pub ty: TensorType,
}

impl std::str::FromStr for TypeOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (pattern, ty) = s
            .rsplit_once('=')
            .filter(|(p, _)| !p.is_empty())
            .ok_or_else(|| format!("'{s}' is not PATTERN=TYPE"))?;
        let ty = TensorType::ALL
            .into_iter()
            .find(|t| t.name() == ty)
            .ok_or_else(|| format!("'{ty}' is not a tensor type (f32, f16, q8, q8r, q4, q4k)"))?;
        Ok(Self {
            pattern: pattern.to_owned(),
            ty,
        })
    }
}

impl fmt::Display for TypeOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pattern, self.ty)
    }
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The HuggingFace checkpoint directory.
    pub input: PathBuf,
    /// The `.nbl` file to create (replaced atomically if it exists).
    pub output: PathBuf,
    pub quant: QuantPolicy,
    /// Per-tensor exceptions to the policy; the first whose pattern a
    /// matrix's name contains applies. Norms always stay f32.
    pub overrides: Vec<TypeOverride>,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// An importance file (`nibble-tools imatrix`): q4k matrices minimize
    /// their rounding error weighted by each input column's mean square.
    pub imatrix: Option<PathBuf>,
}

impl ConvertOptions {
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, quant: QuantPolicy) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            quant,
            overrides: Vec::new(),
            progress: false,
            imatrix: None,
        }
    }

    /// The importance file's columns, checked against the planned matrices:
    /// `None` without `--imatrix`; an error if a matrix's column count
    /// differs or no matrix has importances (a different model's file).
    pub(crate) fn importance(&self, plan: &[Planned]) -> Result<Option<Importance>, ToolError> {
        let Some(path) = &self.imatrix else {
            return Ok(None);
        };
        let imp = Importance::load(path)?;
        let mut matched = 0;
        for p in plan.iter().filter(|p| p.role != Role::Norm) {
            let cols = *p.shape.last().expect("planned shapes are non-empty");
            if imp
                .columns(&p.name, cols)
                .map_err(|e| ToolError::new(path, e))?
                .is_some()
            {
                matched += 1;
            }
        }
        if matched == 0 {
            return Err(ToolError::new(
                path,
                "no matrix of this model has importances in it (statistics of a different model?)",
            ));
        }
        Ok(Some(imp))
    }

    /// The stored type of each planned tensor, or an error naming the first
    /// override that does not fit a tensor's width or matches no matrix.
    pub(crate) fn tensor_types(&self, plan: &[Planned]) -> Result<Vec<TensorType>, String> {
        let mut used = vec![false; self.overrides.len()];
        let types = plan
            .iter()
            .map(|p| {
                let cols = *p.shape.last().expect("planned shapes are non-empty");
                let found = (p.role != Role::Norm)
                    .then(|| {
                        self.overrides
                            .iter()
                            .position(|o| p.name.contains(&o.pattern))
                    })
                    .flatten();
                let Some(i) = found else {
                    return Ok(self.quant.tensor_type(p.role, cols));
                };
                used[i] = true;
                let ty = self.overrides[i].ty;
                if !cols.is_multiple_of(ty.cols_multiple()) {
                    return Err(format!(
                        "--tensor-type {}: tensor '{}' has {cols} columns, not a multiple of {}",
                        self.overrides[i],
                        p.name,
                        ty.cols_multiple()
                    ));
                }
                Ok(ty)
            })
            .collect::<Result<Vec<_>, String>>()?;
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(format!(
                "--tensor-type {}: no matrix name contains '{}'",
                self.overrides[i], self.overrides[i].pattern
            ));
        }
        Ok(types)
    }

    /// The policy and its exceptions in words, as recorded in
    /// `provenance.quantization`.
    pub fn describe_quantization(&self) -> String {
        let mut s = self.quant.describe();
        if !self.overrides.is_empty() {
            let list: Vec<String> = self.overrides.iter().map(|o| o.to_string()).collect();
            s.push_str(&format!(
                "; overrides (name contains pattern): {}",
                list.join(", ")
            ));
        }
        if self.imatrix.is_some() {
            s.push_str("; q4k rounding weighted by activation statistics");
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConvertSummary {
    pub tensors: usize,
    pub output_bytes: u64,
    /// Weights in all matrices (norms excluded).
    pub matrix_weights: u64,
    /// Bytes those matrices occupy, scales included.
    pub matrix_bytes: u64,
    pub seconds: f64,
}

impl ConvertSummary {
    /// Average bits per weight over all matrices.
    pub fn bits_per_weight(&self) -> f64 {
        if self.matrix_weights == 0 {
            0.0
        } else {
            self.matrix_bytes as f64 * 8.0 / self.matrix_weights as f64
        }
    }
}

impl fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tensors, {:.1} MiB, {:.2} bits per weight over {} matrix weights, {:.1} s",
            self.tensors,
            self.output_bytes as f64 / (1u64 << 20) as f64,
            self.bits_per_weight(),
            self.matrix_weights,
            self.seconds
        )
    }
}

/// One tensor the output will hold.
pub(crate) struct Planned {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Expected HF shape, outermost first.
    pub(crate) shape: Vec<usize>,
}

/// Every tensor of a LLaMA model with `config`, in output order.
pub(crate) fn plan(config: &LlamaConfig) -> Vec<Planned> {
    let c = config;
    let q_dim = c.num_attention_heads * c.head_dim;
    let kv_dim = c.num_key_value_heads * c.head_dim;
    let mut out = vec![Planned {
        name: names::TOKEN_EMBEDDING.into(),
        role: if c.tie_word_embeddings {
            Role::OutputProjection
        } else {
            Role::Matrix
        },
        shape: vec![c.vocab_size, c.hidden_size],
    }];
    for layer in 0..c.num_hidden_layers {
        for t in LayerTensor::ALL {
            let shape = match t {
                LayerTensor::AttnNorm | LayerTensor::FfnNorm => vec![c.hidden_size],
                LayerTensor::Q => vec![q_dim, c.hidden_size],
                LayerTensor::K | LayerTensor::V => vec![kv_dim, c.hidden_size],
                LayerTensor::O => vec![c.hidden_size, q_dim],
                LayerTensor::Gate | LayerTensor::Up => vec![c.intermediate_size, c.hidden_size],
                LayerTensor::Down => vec![c.hidden_size, c.intermediate_size],
            };
            let grouped = c.num_key_value_heads < c.num_attention_heads;
            out.push(Planned {
                name: t.name(layer),
                role: match t {
                    _ if t.is_norm() => Role::Norm,
                    LayerTensor::V if grouped => Role::GroupedValue {
                        early: is_early_layer(layer, c.num_hidden_layers),
                    },
                    _ => Role::Matrix,
                },
                shape,
            });
        }
    }
    out.push(Planned {
        name: names::FINAL_NORM.into(),
        role: Role::Norm,
        shape: vec![c.hidden_size],
    });
    if !c.tie_word_embeddings {
        out.push(Planned {
            name: names::OUTPUT.into(),
            role: Role::OutputProjection,
            shape: vec![c.vocab_size, c.hidden_size],
        });
    }
    out
}

/// Refuses a layer count the tensors present cannot come near (every layer
/// has nine), before anything proportional to it is allocated: a
/// `config.json` claiming 2^32-1 layers would otherwise grow the plan without
/// bound. A count off by a little is left to the tensor check, which names
/// the missing tensor.
pub(crate) fn check_layer_count(
    file: &Path,
    field: &str,
    layers: usize,
    tensors: usize,
) -> Result<(), ToolError> {
    if layers > tensors {
        return Err(ToolError::new(
            file,
            format!(
                "'{field}' is {layers}, but the checkpoint has only {tensors} tensors ({} per layer)",
                LayerTensor::ALL.len()
            ),
        ));
    }
    Ok(())
}

/// Runs the runtime's own check of the metadata ([`nibble::Model::check_metadata`]:
/// hyper-parameters and tokenizer) on what is about to be written, so convert
/// refuses, with the runtime's message, what `nibble` would refuse to load.
pub(crate) fn check_runtime_accepts(input: &Path, metadata: &Metadata) -> Result<(), ToolError> {
    nibble::Model::check_metadata(metadata)
        .map(|_| ())
        .map_err(|m| ToolError::new(input, m))
}

/// Checks that the checkpoint holds exactly the planned tensors with the
/// planned shapes.
fn check_tensors(
    dir: &Path,
    source: &Source,
    plan: &[Planned],
    tied: bool,
) -> Result<(), ToolError> {
    for p in plan {
        let Some(t) = source.get(&p.name) else {
            return Err(ToolError::new(
                dir,
                format!("tensor '{}' is missing from the checkpoint", p.name),
            ));
        };
        if t.shape != p.shape {
            return Err(ToolError::new(
                source.path(t),
                format!(
                    "tensor '{}' has shape {:?}, config.json implies {:?}",
                    p.name, t.shape, p.shape
                ),
            ));
        }
    }
    for (name, t) in source.tensors() {
        // A tied model saved with its (identical) lm_head anyway is fine:
        // the token embedding serves as the output projection.
        if tied && name == names::OUTPUT {
            continue;
        }
        if !plan.iter().any(|p| &p.name == name) {
            return Err(ToolError::new(
                source.path(t),
                format!(
                    "unexpected tensor {} (not part of a LLaMA model with this config)",
                    nibble::error::quote(name)
                ),
            ));
        }
    }
    Ok(())
}

/// Converts a HuggingFace LLaMA checkpoint directory into a `.nbl` file.
pub fn convert(options: &ConvertOptions) -> Result<ConvertSummary, ConvertError> {
    let started = Instant::now();
    // A `.gguf` file is imported from llama.cpp's format (crate::gguf).
    if crate::gguf::llama::is_gguf_path(&options.input) && !options.input.is_dir() {
        return crate::gguf::llama::convert(options);
    }
    let dir = &options.input;
    if !dir.is_dir() {
        return Err(ToolError::new(
            dir,
            "not a directory (expected a HuggingFace checkpoint)",
        ));
    }
    let config_path = dir.join("config.json");
    let config_json = read_json(&config_path)?;
    let config = LlamaConfig::from_json(&config_path, &config_json)?;
    let tokenizer = TokenizerInfo::load(dir, &config_json, config.vocab_size)?;
    let source = Source::open(dir)?;
    check_layer_count(
        &config_path,
        "num_hidden_layers",
        config.num_hidden_layers,
        source.tensors().len(),
    )?;
    let mut source_files = vec!["config.json".to_owned()];
    source_files.extend(tokenizer.source_files.iter().cloned());
    source_files.extend(source.file_names());
    let mut read: Vec<PathBuf> = source_files.iter().map(|f| dir.join(f)).collect();
    read.push(dir.join("model.safetensors.index.json"));
    check_output(options, &read)?;
    let metadata = metadata(&config, &tokenizer, options, source_files);
    check_runtime_accepts(dir, &metadata)?;
    let plan = plan(&config);
    check_tensors(dir, &source, &plan, config.tie_word_embeddings)?;

    let types = options
        .tensor_types(&plan)
        .map_err(|e| ToolError::new(dir, e))?;
    let importance = options.importance(&plan)?;

    let total_bytes: u64 = plan
        .iter()
        .map(|p| {
            let t = &source.tensors()[&p.name];
            (t.end - t.start) as u64
        })
        .sum();
    let bar = progress_bar(options.progress, total_bytes);

    let writer =
        NblWriter::create(&options.output).map_err(|e| output_error(&options.output, e))?;
    let (matrix_weights, matrix_bytes) = matrix_totals(&plan, &types);
    let writer = encode_and_write(
        &source,
        &plan,
        &types,
        importance.as_ref(),
        options,
        writer,
        &bar,
    )?;
    bar.finish_and_clear();
    let output_bytes = writer
        .finish(&metadata)
        .map_err(|e| output_error(&options.output, e))?;
    Ok(ConvertSummary {
        tensors: plan.len(),
        output_bytes,
        matrix_weights,
        matrix_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The weights of the plan's matrices (every tensor but the norms) and
/// their stored bytes under `types`: what bits per weight are counted over.
fn matrix_totals(plan: &[Planned], types: &[TensorType]) -> (u64, u64) {
    let (mut weights, mut bytes) = (0u64, 0u64);
    for (p, ty) in plan.iter().zip(types) {
        if p.role != Role::Norm {
            let cols = *p.shape.last().expect("planned shapes are non-empty") as u64;
            let rows = p.shape.iter().product::<usize>() as u64 / cols;
            weights += rows * cols;
            bytes += ty
                .byte_len(rows, cols)
                .expect("the plan checked the block size");
        }
    }
    (weights, bytes)
}

/// One encoded tensor on its way to the writer thread.
struct Encoded {
    name: String,
    ty: TensorType,
    shape: Vec<u64>,
    /// 4-byte words so every tensor type's data is suitably aligned; `len`
    /// bytes of it are the tensor.
    buf: Vec<u32>,
    len: usize,
}

/// Encodes every planned tensor while a second thread writes the previous
/// one, so disk writes and checksums overlap the quantization. At most two
/// encoded tensors exist at a time (the rendezvous channel holds none).
/// Returns the writer (not yet finished) and the matrix weight and byte
/// totals. On any error the writer is dropped, deleting its temporary file.
fn encode_and_write(
    source: &Source,
    plan: &[Planned],
    types: &[TensorType],
    importance: Option<&Importance>,
    options: &ConvertOptions,
    mut writer: NblWriter,
    bar: &ProgressBar,
) -> Result<NblWriter, ToolError> {
    let (to_writer, from_encoder) = std::sync::mpsc::sync_channel::<Encoded>(0);
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u32>>();
    let output = &options.output;
    std::thread::scope(|scope| {
        let write_thread = scope.spawn(move || -> Result<NblWriter, ToolError> {
            for e in from_encoder {
                let bytes = &bytemuck::cast_slice::<u32, u8>(&e.buf)[..e.len];
                writer
                    .add_tensor(&e.name, e.ty, &e.shape, bytes)
                    .map_err(|err| output_error(output, err))?;
                // The encoder may have finished already; then the buffer is
                // simply freed.
                let _ = recycle.send(e.buf);
            }
            Ok(writer)
        });
        let mut encode_error = None;
        let (batch_read, read_batches) = std::sync::mpsc::sync_channel::<()>(READ_AHEAD_BATCHES);
        // Reads the source batch by batch in the order the loop below
        // quantizes it, staying at most READ_AHEAD_BATCHES ahead, so the
        // disk works while the cores quantize. Stops when the loop does
        // (its receiver is gone).
        scope.spawn(move || {
            for p in plan {
                let t = &source.tensors()[&p.name];
                let row_src = row_bytes(t, &p.shape);
                source.will_read(t);
                for rows in batches(t, &p.shape) {
                    source.populate(t, rows.start * row_src, rows.end * row_src);
                    if batch_read.send(()).is_err() {
                        return;
                    }
                }
            }
        });
        for (p, &ty) in plan.iter().zip(types) {
            let t = &source.tensors()[&p.name];
            bar.set_message(p.name.clone());
            let mut buf = recycled.try_recv().unwrap_or_default();
            let cols = *p.shape.last().expect("planned shapes are non-empty");
            let columns = importance
                .and_then(|imp| imp.columns(&p.name, cols).expect("checked by importance()"));
            let len = match encode_tensor(
                source,
                t,
                &p.shape,
                &read_batches,
                (ty, columns),
                &mut buf,
                bar,
            ) {
                Ok(len) => len,
                Err(e) => {
                    encode_error = Some(ToolError::new(
                        source.path(t),
                        format!("tensor '{}': {e}", p.name),
                    ));
                    break;
                }
            };
            let shape: Vec<u64> = p.shape.iter().map(|&d| d as u64).collect();
            let job = Encoded {
                name: p.name.clone(),
                ty,
                shape,
                buf,
                len,
            };
            if to_writer.send(job).is_err() {
                // The writer thread stopped on an error; join reports it.
                break;
            }
        }
        drop(to_writer);
        drop(read_batches);
        let writer = write_thread
            .join()
            .expect("the writer thread does not panic")?;
        match encode_error {
            // Dropping the writer deletes the temporary file.
            Some(e) => Err(e),
            None => Ok(writer),
        }
    })
}

/// Refuses an output that is not a regular file or that is one of the
/// files read (`inputs`, and the importance file), before anything is
/// written.
pub(crate) fn check_output(options: &ConvertOptions, inputs: &[PathBuf]) -> Result<(), ToolError> {
    let mut all: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    all.extend(options.imatrix.as_deref());
    nibble::fsutil::check_output_path(&options.output, &all)
        .map_err(|e| ToolError::new(&options.output, e))
}

pub(crate) fn output_error(output: &Path, e: nibble::format::FormatError) -> ToolError {
    use nibble::format::FormatError;
    match e {
        // The writer's own I/O messages already quote the path; report the
        // underlying reason once, after ours.
        FormatError::Io(io) => {
            let text = io.to_string();
            let quoted = format!("cannot write {}: ", output.display());
            match text.strip_prefix(&quoted) {
                Some(reason) => {
                    ToolError::new(output, format!("cannot write the output: {reason}"))
                }
                None => ToolError::new(output, format!("cannot write the output: {}", io.kind())),
            }
        }
        other => ToolError::new(output, other),
    }
}

pub(crate) fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar
}

/// Builds the metadata section.
pub fn metadata(
    config: &LlamaConfig,
    tok: &TokenizerInfo,
    options: &ConvertOptions,
    source_files: Vec<String>,
) -> Metadata {
    let mut m = Metadata::new();
    let u = |x: usize| Value::U32(x as u32);
    m.set(keys::ARCHITECTURE, Value::Str("llama".into()));
    m.set(keys::VOCAB_SIZE, u(config.vocab_size));
    m.set(keys::HIDDEN_SIZE, u(config.hidden_size));
    m.set(keys::NUM_LAYERS, u(config.num_hidden_layers));
    m.set(keys::NUM_HEADS, u(config.num_attention_heads));
    m.set(keys::NUM_KV_HEADS, u(config.num_key_value_heads));
    m.set(keys::HEAD_DIM, u(config.head_dim));
    m.set(keys::INTERMEDIATE_SIZE, u(config.intermediate_size));
    m.set(keys::CONTEXT_LENGTH, u(config.max_position_embeddings));
    m.set(keys::ROPE_THETA, Value::F32(config.rope_theta));
    let (kind, factor) = match config.rope_scaling {
        RopeScaling::None => ("none", 1.0),
        RopeScaling::Linear { factor } => ("linear", factor),
    };
    m.set(keys::ROPE_SCALING_TYPE, Value::Str(kind.into()));
    m.set(keys::ROPE_SCALING_FACTOR, Value::F32(factor));
    m.set(keys::RMS_NORM_EPS, Value::F32(config.rms_norm_eps));
    m.set(
        keys::TIE_WORD_EMBEDDINGS,
        Value::Bool(config.tie_word_embeddings),
    );
    m.set(
        keys::TOKENIZER_JSON,
        Value::PackedStr(tok.tokenizer_json.clone()),
    );
    if let Some(t) = &tok.chat_template {
        m.set(keys::CHAT_TEMPLATE, Value::Str(t.clone()));
    }
    if let Some(id) = tok.bos_token_id {
        m.set(keys::BOS_TOKEN_ID, Value::U32(id));
    }
    if let Some(t) = &tok.bos_token {
        m.set(keys::BOS_TOKEN, Value::Str(t.clone()));
    }
    m.set(
        keys::EOS_TOKEN_IDS,
        Value::U32Array(tok.eos_token_ids.clone()),
    );
    if let Some(t) = &tok.eos_token {
        m.set(keys::EOS_TOKEN, Value::Str(t.clone()));
    }
    m.set(keys::ADD_BOS_TOKEN, Value::Bool(tok.add_bos_token));
    m.set(keys::SOURCE_FILES, Value::StrArray(source_files));
    m.set(
        keys::CONVERTER,
        Value::Str(format!("nibble-tools {}", env!("CARGO_PKG_VERSION"))),
    );
    m.set(
        keys::QUANTIZATION,
        Value::Str(options.describe_quantization()),
    );
    if let Some(d) = &config.dtype {
        m.set(keys::SOURCE_DTYPE, Value::Str(d.clone()));
    }
    m
}

/// Bytes of one row of `t` in the source, rows being `shape`'s last
/// dimension.
fn row_bytes(t: &SourceTensor, shape: &[usize]) -> usize {
    shape.last().expect("planned shapes are non-empty") * t.dtype.size()
}

/// The row ranges of `t` processed together, about [`BATCH_BYTES`] of source
/// each (at least one row).
fn batches(t: &SourceTensor, shape: &[usize]) -> impl Iterator<Item = std::ops::Range<usize>> {
    let rows = shape.iter().product::<usize>() / shape.last().expect("non-empty shape");
    let per_batch = (BATCH_BYTES / row_bytes(t, shape)).max(1);
    (0..rows)
        .step_by(per_batch)
        .map(move |r| r..(r + per_batch).min(rows))
}

/// Converts tensor `t` of shape `shape` to `ty` (its rounding weighted by
/// the column importances, if any), leaving its on-disk bytes at
/// the start of `buf` and returning their length. Each batch is taken once
/// `batch_read` says the reader thread has brought it into memory (if that
/// thread is gone, the batch is simply read on access).
fn encode_tensor(
    source: &Source,
    t: &SourceTensor,
    shape: &[usize],
    batch_read: &std::sync::mpsc::Receiver<()>,
    (ty, importance): (TensorType, Option<&[f32]>),
    buf: &mut Vec<u32>,
    bar: &ProgressBar,
) -> Result<usize, QuantError> {
    let cols = *shape.last().expect("planned shapes are non-empty");
    let rows = shape.iter().product::<usize>() / cols;
    let len = ty
        .byte_len(rows as u64, cols as u64)
        .expect("the plan checked the block size") as usize;
    buf.clear();
    buf.resize(len.div_ceil(4), 0);
    let out: &mut [u8] = &mut bytemuck::cast_slice_mut(buf.as_mut_slice())[..len];
    let mut planes = tensor_planes(ty, cols, rows, out);

    let src = source.bytes(t);
    let row_src = row_bytes(t, shape);
    for rows in batches(t, shape) {
        let _ = batch_read.recv();
        let (row0, row1) = (rows.start, rows.end);
        let src_b = &src[row0 * row_src..row1 * row_src];
        let batch = take_rows(ty, cols, &mut planes, row1 - row0);
        src_b
            .par_chunks(row_src)
            .zip(split_rows(ty, cols, batch))
            .enumerate()
            .try_for_each_init(
                || vec![0f32; cols],
                |x, (r, (s, planes))| {
                    t.dtype.decode(s, x);
                    encode_row_weighted(ty, x, importance, planes)
                        .map_err(|e| e.offset((row0 + r) * cols))
                },
            )?;
        source.release(t, row0 * row_src, row1 * row_src);
        bar.inc(src_b.len() as u64);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits per weight over all matrices of the LLaMA-2-7B shape under
    /// `quant` with `overrides`, from the plan and each type's byte length.
    fn llama2_7b_bits_per_weight(quant: QuantPolicy, overrides: &[&str]) -> f64 {
        let shapes = crate::synth::Preset::Llama2_7b.shapes();
        let json = crate::synth::config_json(&shapes, crate::synth::SynthDtype::F16);
        let config = LlamaConfig::from_json(Path::new("config.json"), &json).unwrap();
        let plan = plan(&config);
        let mut options = ConvertOptions::new("in", "out.nbl", quant);
        options.overrides = overrides.iter().map(|o| o.parse().unwrap()).collect();
        let types = options.tensor_types(&plan).unwrap();
        let (weights, bytes) = matrix_totals(&plan, &types);
        assert_eq!(weights, 6_738_149_376, "LLaMA-2-7B's matrix weights");
        ConvertSummary {
            tensors: plan.len(),
            output_bytes: 0,
            matrix_weights: weights,
            matrix_bytes: bytes,
            seconds: 0.0,
        }
        .bits_per_weight()
    }

    /// The 7B figures the README gives: q4 and q4k spend 8 bits on the output
    /// projection (4.57 bits per weight over all matrices), and storing it at
    /// 4 bits instead brings the whole model to exactly 4.5.
    #[test]
    fn llama2_7b_q4_bits_per_weight() {
        for quant in [QuantPolicy::Q4, QuantPolicy::Q4K] {
            let default = llama2_7b_bits_per_weight(quant, &[]);
            assert!((4.56..4.58).contains(&default), "{quant}: {default}");
        }
        assert_eq!(
            llama2_7b_bits_per_weight(QuantPolicy::Q4K, &["lm_head=q4k"]),
            4.5
        );
        assert_eq!(
            llama2_7b_bits_per_weight(QuantPolicy::Q4, &["lm_head=q4"]),
            4.5
        );
    }

    /// An override whose type needs whole blocks is refused on a matrix
    /// whose width is not a multiple of the block.
    #[test]
    fn override_must_fit_the_width() {
        let plan = [Planned {
            name: "model.layers.0.mlp.down_proj.weight".into(),
            role: Role::Matrix,
            shape: vec![64, 48],
        }];
        let mut options = ConvertOptions::new("in", "out.nbl", QuantPolicy::Q8);
        assert_eq!(options.tensor_types(&plan), Ok(vec![TensorType::F16]));
        options.overrides = vec!["down_proj=q4k".parse().unwrap()];
        let err = options.tensor_types(&plan).unwrap_err();
        assert!(
            err.contains("has 48 columns, not a multiple of 32"),
            "{err}"
        );
        options.overrides = vec!["down_proj=f32".parse().unwrap()];
        assert_eq!(options.tensor_types(&plan), Ok(vec![TensorType::F32]));
    }
}
