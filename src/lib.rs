//! nibble: run LLaMA-2-family language models on ordinary CPUs from a single
//! memory-mapped `.nbl` file.
//!
//! - [`format`]: the `.nbl` container (reader, writer)
//! - [`quant`]: tensor types and scalar block quantization
//! - [`kernels`]: dequant-matmul and friends, scalar and SIMD, one dispatch point
//! - [`model`]: the LLaMA forward pass and KV cache ([`Model`], [`Session`])
//! - [`tokenizer`], [`sampler`], [`generate`], [`chat`]: text in, text out
//!
//! ```no_run
//! use nibble::{generate, GenerateOptions, Model, Sampler, SamplerOptions, Session, SessionOptions};
//! let model = Model::open("model.nbl")?;
//! let prompt = model.tokenizer().encode("The capital of France is", true)?;
//! let mut session = Session::new(&model, SessionOptions::default())?;
//! let mut sampler = Sampler::new(SamplerOptions::greedy())?;
//! for piece in generate(&mut session, &prompt, &mut sampler, GenerateOptions::default())? {
//!     print!("{}", piece?.text);
//! }
//! # Ok::<(), nibble::Error>(())
//! ```

pub mod bench;
pub mod chat;
pub mod error;
pub mod format;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod perplexity;
pub mod pool;
pub mod quant;
pub mod sampler;
pub mod server;
pub mod tokenizer;

pub use chat::{ChatTemplate, Conversation, Message};
pub use error::{Error, Result};
pub use generate::{generate, GenerateOptions, Generator, Piece, StopReason};
pub use model::{Config, KvType, Model, Session, SessionOptions};
pub use sampler::{Sampler, SamplerOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
