//! The library's one error type. Every variant displays as a single line that
//! names the file or the argument at fault, so the CLI can print it as is.

use crate::format::FormatError;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// The `.nbl` container could not be read (the message names the file).
    Format(FormatError),
    /// A valid container that does not describe a model nibble can run.
    Model {
        path: PathBuf,
        message: String,
    },
    /// Reading a file other than the model failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The tokenizer could not be built or could not encode/decode.
    Tokenizer(String),
    /// The chat template could not be rendered.
    Template(String),
    /// A prompt file is not UTF-8.
    InvalidUtf8 {
        path: PathBuf,
    },
    EmptyPrompt,
    /// Processing `needed` tokens would run past the `ctx`-token context.
    ContextFull {
        ctx: usize,
        needed: usize,
    },
    /// A session of `ctx` tokens over the model at `path` could grow to
    /// `needed` bytes (`kv_cache` of them keys and values), more than
    /// `limit`. Checked before anything is allocated.
    OutOfMemory {
        path: PathBuf,
        ctx: usize,
        needed: u64,
        kv_cache: u64,
        limit: crate::model::MemoryLimit,
    },
    /// A bad value for an option (names the option).
    InvalidArgument(String),
    /// The kernel set asked for (`NIBBLE_KERNELS`) cannot run here.
    Kernels(crate::kernels::KernelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn model(path: &Path, message: impl Into<String>) -> Self {
        Self::Model {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format(e) => write!(f, "{e}"),
            Self::Model { path, message } => write!(f, "{}: {message}", path.display()),
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Tokenizer(m) => write!(f, "tokenizer: {m}"),
            Self::Template(m) => write!(f, "chat template: {m}"),
            Self::Kernels(e) => write!(f, "{e}"),
            Self::InvalidUtf8 { path } => {
                write!(f, "{}: prompt file is not valid UTF-8", path.display())
            }
            Self::EmptyPrompt => write!(f, "the prompt is empty"),
            Self::ContextFull { ctx, needed } => write!(
                f,
                "context full: {needed} tokens do not fit in the context of {ctx} tokens"
            ),
            Self::OutOfMemory {
                path,
                ctx,
                needed,
                kv_cache,
                limit,
            } => {
                use crate::model::memory::human_bytes;
                write!(
                    f,
                    "{}: a context of {ctx} tokens needs {} of KV cache",
                    path.display(),
                    human_bytes(*kv_cache)
                )?;
                if needed > kv_cache {
                    write!(f, " ({} with buffers)", human_bytes(*needed))?;
                }
                match limit {
                    crate::model::MemoryLimit::Available(b) => {
                        write!(f, "; {} are available", human_bytes(*b))
                    }
                    crate::model::MemoryLimit::Limit(b) => {
                        write!(f, "; the memory limit allows {}", human_bytes(*b))
                    }
                }
            }
            Self::InvalidArgument(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Format(e) => Some(e),
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Self::Format(e)
    }
}

/// Longest value (in characters) an error message quotes whole.
pub const QUOTE_CHARS: usize = 80;

/// `value` in single quotes for an error message, cut to [`QUOTE_CHARS`]
/// characters with "…" and the full length when longer, control characters
/// escaped: a hostile file cannot make an error line megabytes long or
/// break it over several lines. Every quoted value goes through here.
pub fn quote(value: &str) -> String {
    let mut out = String::from("'");
    for (i, ch) in value.chars().enumerate() {
        if i == QUOTE_CHARS {
            out.push_str(&format!("…' ({} bytes)", value.len()));
            return out;
        }
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out.push('\'');
    out
}

/// Reads a prompt file, refusing bytes that are not UTF-8.
pub fn read_prompt_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 {
        path: path.to_owned(),
    })
}
