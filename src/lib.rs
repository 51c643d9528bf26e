//! nibble: run LLaMA-2-family language models on ordinary CPUs from a single
//! memory-mapped `.nbl` file.
//!
//! - [`format`](mod@format): the `.nbl` container ([`format::NblFile`], [`format::NblWriter`])
//! - [`quant`]: tensor types and scalar block quantization
//! - [`kernels`]: dequant-matmul and friends, scalar and SIMD, one dispatch point
//! - [`model`]: the LLaMA forward pass and KV cache ([`Model`], [`Session`])
//! - [`tokenizer`], [`sampler`], [`generate`](mod@generate), [`chat`]: text in, text out
//! - [`perplexity`](mod@perplexity): llama.cpp-compatible evaluation
//! - [`fsutil`]: refusing FIFOs, devices and inputs as outputs; atomic writes
//!
//! # Generating text
//!
//! Open a model, tokenize a prompt, and iterate over the continuation. (The
//! hidden lines of this example convert a tiny test checkpoint with
//! `nibble-tools`; a real program opens an existing `.nbl` file.)
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("model.nbl");
//! # let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/tiny-mha");
//! # nibble_tools::convert::convert(&nibble_tools::convert::ConvertOptions::new(
//! #     tiny, &path, nibble_tools::convert::QuantPolicy::Q8))?;
//! use nibble::{generate, GenerateOptions, Model, Sampler, SamplerOptions, Session, SessionOptions};
//!
//! let model = Model::open(&path)?;
//! let prompt = model.tokenizer().encode("The capital of France is", true)?;
//! let mut session = Session::new(&model, SessionOptions::default())?;
//! let mut sampler = Sampler::new(SamplerOptions::greedy())?;
//! let opts = GenerateOptions { max_tokens: 8, ..GenerateOptions::default() };
//! let mut text = String::new();
//! for piece in generate(&mut session, &prompt, &mut sampler, opts)? {
//!     text.push_str(&piece?.text);
//! }
//! // The prompt and every generated token but the last are in the KV cache.
//! assert!(session.len() > prompt.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Quantized weights and the kernels
//!
//! [`quant::encode_matrix`] produces the on-disk layout of a tensor type,
//! [`quant::WeightView`] reads it in place (from a file map or any byte
//! slice), and [`kernels::matmul`] multiplies it with activations using the
//! best instruction set of this CPU, chosen once at run time
//! ([`kernels::init`], [`kernels::active_name`]).
//!
//! ```
//! use nibble::quant::{encode_matrix, TensorType, WeightView};
//!
//! nibble::kernels::init()?; // picks AVX2, AVX-512, NEON... or scalar
//! let (rows, cols) = (2, 64);
//! let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
//! let bytes = encode_matrix(TensorType::Q8, cols, &w)?;
//! let view = WeightView::from_bytes(TensorType::Q8, rows, cols, &bytes).unwrap();
//!
//! let x = vec![1.0f32; cols]; // one token's activations
//! let mut y = vec![0.0f32; rows];
//! nibble::kernels::matmul(&view, &x, 1, &mut y);
//! for r in 0..rows {
//!     let exact: f32 = w[r * cols..(r + 1) * cols].iter().sum();
//!     assert!((y[r] - exact).abs() < 0.05, "row {r}: {} vs {exact}", y[r]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod chat;
pub mod error;
pub mod format;
pub mod fsutil;
pub mod generate;
pub mod kernels;
pub mod mapped_file_guard;
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
