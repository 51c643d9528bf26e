//! nibble-tools: turns HuggingFace LLaMA-2 checkpoints into nibble's `.nbl`
//! container, inspects and verifies `.nbl` files, and synthesizes checkpoints
//! of official shapes for measurements.
//!
//! - [`convert`]: HF directory → `.nbl` (the quantization policy lives there)
//! - [`hf`]: reading `config.json`, the tokenizer files and generation config
//! - [`gguf`]: importing LLaMA models from llama.cpp's GGUF files
//! - [`source`]: mmapped safetensors (single file or sharded)
//! - [`inspect`]: human and JSON reports of a `.nbl`, checksum verification
//! - [`synth`]: deterministic random checkpoints with LLaMA-2 shapes
//!
//! Every fallible function returns [`ToolError`], whose message starts with
//! the file it concerns, so the CLI prints it as `error: <file>: <problem>`.

pub mod convert;
pub mod gguf;
pub mod hf;
pub mod imatrix;
pub mod inspect;
pub mod perturb;
pub mod report;
pub mod source;
pub mod synth;

use std::fmt;
use std::path::Path;

/// An error concerning one file, displayed as `<file>: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    message: String,
}

impl ToolError {
    /// An error about `path`.
    pub fn new(path: &Path, problem: impl fmt::Display) -> Self {
        Self {
            message: format!("{}: {problem}", path.display()),
        }
    }

    /// An error whose message already names its file (e.g. from the `.nbl`
    /// reader, which prefixes its own errors).
    pub fn named(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

/// The error for a file that could not be opened for reading: "is a
/// directory" or "not a regular file (a FIFO)" as they are (from
/// [`nibble::fsutil::open_regular_for_read`]), other errors as "cannot
/// open: ...".
pub(crate) fn open_error(path: &Path, e: std::io::Error) -> ToolError {
    match e.kind() {
        std::io::ErrorKind::IsADirectory | std::io::ErrorKind::InvalidInput => {
            ToolError::new(path, e)
        }
        std::io::ErrorKind::NotFound => ToolError::new(path, "file not found"),
        _ => ToolError::new(path, format!("cannot open: {e}")),
    }
}

/// What [`convert::convert`] returns on failure.
pub type ConvertError = ToolError;
