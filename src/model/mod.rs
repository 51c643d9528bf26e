//! The LLaMA model: a validated `.nbl` file ([`Model`]) and the state of one
//! conversation over it ([`Session`], which owns the KV cache).
//!
//! Weights are never copied: a [`Session`] borrows [`WeightView`]s straight
//! from the model's memory map, built once when the session is created.

mod config;
pub mod memory;
mod session;
mod stats;

pub use config::{Config, RopeScaling};
pub use memory::{set_memory_limit, MemoryLimit, SessionMemory};
pub use session::{ContextPlan, KvType, Session, SessionOptions};
pub use stats::{collect_activation_stats, ActivationStats};

use crate::error::{Error, Result};
use crate::format::names::{self, LayerTensor};
use crate::format::{keys, NblFile};
use crate::quant::WeightView;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// An open model: the mapped file, its hyper-parameters and its tokenizer.
///
/// Opening validates the whole file up front, so a [`Session`] over it never
/// fails on a malformed tensor later:
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("model.nbl");
/// # let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/tiny-mha");
/// # nibble_tools::convert::convert(&nibble_tools::convert::ConvertOptions::new(
/// #     tiny, &path, nibble_tools::convert::QuantPolicy::F32))?;
/// use nibble::Model;
///
/// let model = Model::open(&path)?;
/// let c = model.config();
/// assert_eq!(c.hidden_size % c.num_heads, 0);
/// assert!(model.tokenizer().vocab_size() <= c.vocab_size);
/// assert!(Model::open(dir.path().join("missing.nbl")).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Model {
    file: NblFile,
    config: Config,
    tokenizer: Tokenizer,
    path: PathBuf,
}

/// Borrowed views of every weight, checked against the [`Config`].
pub(crate) struct Weights<'a> {
    pub embed: WeightView<'a>,
    pub layers: Vec<LayerWeights<'a>>,
    pub final_norm: &'a [f32],
    /// `lm_head`, or the token embedding when the model ties them.
    pub output: WeightView<'a>,
}

pub(crate) struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    pub q: WeightView<'a>,
    pub k: WeightView<'a>,
    pub v: WeightView<'a>,
    pub o: WeightView<'a>,
    pub ffn_norm: &'a [f32],
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down: WeightView<'a>,
}

impl Model {
    /// Maps `path` and checks that it holds a complete LLaMA model: every
    /// tensor present with the shape the metadata implies, and a usable
    /// tokenizer. Nothing is read beyond the metadata and directory; weight
    /// pages are loaded by the OS as they are first used.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        crate::kernels::init().map_err(Error::Kernels)?;
        let mut file = NblFile::open(path)?;
        let (config, tokenizer) =
            Self::check_metadata(file.metadata()).map_err(|m| Error::model(path, m))?;
        // Megabytes of JSON, useless once parsed (see `Model::file`).
        file.metadata_mut().remove(keys::TOKENIZER_JSON);
        release_free_heap();
        let model = Self {
            file,
            config,
            tokenizer,
            path: path.to_owned(),
        };
        model.weights()?;
        Ok(model)
    }

    /// Everything [`Model::open`] checks before looking at a tensor: the
    /// hyper-parameters ([`Config::from_metadata`]) and the tokenizer
    /// ([`Tokenizer::from_metadata`], every token id within the model's
    /// vocabulary). The converter runs the same check on the metadata it is
    /// about to write, so it never writes a file the runtime refuses; the
    /// message lacks the file name (the caller adds it).
    pub fn check_metadata(
        m: &crate::format::Metadata,
    ) -> std::result::Result<(Config, Tokenizer), String> {
        let config = Config::from_metadata(m)?;
        let tokenizer = Tokenizer::from_metadata(m).map_err(|e| e.to_string())?;
        tokenizer
            .check_vocab(config.vocab_size)
            .map_err(|e| e.to_string())?;
        Ok((config, tokenizer))
    }

    /// The hyper-parameters read from the metadata.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The tokenizer built from the `tokenizer.json` embedded in the file.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The path the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying container (metadata, tensor directory). Its metadata
    /// lacks `tokenizer.json`, dropped once the tokenizer is built; open the
    /// file with [`NblFile::open`] to read it.
    pub fn file(&self) -> &NblFile {
        &self.file
    }

    /// The HF Jinja chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.file
            .metadata()
            .get_str(keys::CHAT_TEMPLATE)
            .ok()
            .flatten()
    }

    /// Builds and checks every weight view.
    pub(crate) fn weights(&self) -> Result<Weights<'_>> {
        let c = &self.config;
        let err = |m: String| Error::model(&self.path, m);
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<WeightView<'_>> {
            let w = self
                .file
                .require(name)
                .and_then(|t| t.matrix())
                .map_err(|e| err(e.to_string()))?;
            if (w.rows(), w.cols()) != (rows, cols) {
                return Err(err(format!(
                    "tensor '{name}' is {}x{}, expected {rows}x{cols}",
                    w.rows(),
                    w.cols()
                )));
            }
            Ok(w)
        };
        let norm = |name: &str| -> Result<&[f32]> {
            let v = self
                .file
                .require(name)
                .and_then(|t| t.f32s())
                .map_err(|e| err(e.to_string()))?;
            if v.len() != c.hidden_size {
                return Err(err(format!(
                    "tensor '{name}' has {} values, expected {}",
                    v.len(),
                    c.hidden_size
                )));
            }
            Ok(v)
        };
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let embed = matrix(names::TOKEN_EMBEDDING, c.vocab_size, h)?;
        let output = if self.file.tensor(names::OUTPUT).is_some() {
            matrix(names::OUTPUT, c.vocab_size, h)?
        } else if c.tie_word_embeddings {
            embed
        } else {
            return Err(err(format!(
                "missing tensor '{}' and embeddings are not tied",
                names::OUTPUT
            )));
        };
        let layers = (0..c.num_layers)
            .map(|l| {
                let m = |t: LayerTensor, rows, cols| matrix(&t.name(l), rows, cols);
                Ok(LayerWeights {
                    attn_norm: norm(&LayerTensor::AttnNorm.name(l))?,
                    q: m(LayerTensor::Q, c.q_dim(), h)?,
                    k: m(LayerTensor::K, c.kv_dim(), h)?,
                    v: m(LayerTensor::V, c.kv_dim(), h)?,
                    o: m(LayerTensor::O, h, c.q_dim())?,
                    ffn_norm: norm(&LayerTensor::FfnNorm.name(l))?,
                    gate: m(LayerTensor::Gate, f, h)?,
                    up: m(LayerTensor::Up, f, h)?,
                    down: m(LayerTensor::Down, h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            embed,
            layers,
            final_norm: norm(names::FINAL_NORM)?,
            output,
        })
    }
}

/// Hands freed heap memory back to the OS. Building the tokenizer parses
/// tokenizer.json into hundreds of thousands of short-lived allocations; glibc
/// keeps the holes they leave resident (13 MiB for SmolLM2's 49k-token BPE,
/// 15% of its q4 weights) because live allocations sit above them.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: glibc's malloc_trim takes no pointers and may be called
        // at any time from any thread; it only returns free pages to the OS.
        unsafe {
            malloc_trim(0);
        }
    }
}
