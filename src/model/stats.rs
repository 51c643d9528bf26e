//! Activation statistics: how strongly each input channel of each weight
//! matrix is driven on real text.
//!
//! A matrix's output error from quantizing weight `W[r][j]` by `δ` is
//! `δ · x[j]`, so over many tokens the expected squared error of row `r` is
//! `Σ_j δ[r][j]² · E[x[j]²]` when channels are uncorrelated. The per-column
//! mean squares `E[x[j]²]` collected here are the weights a quantizer can
//! minimize that error with (llama.cpp calls them an "importance matrix").

use super::{Config, Model, Session, SessionOptions};
use crate::error::Result;
use crate::format::names::{self, LayerTensor};
use crate::perplexity::Windows;

/// Runs `model` over `text` in `llama-perplexity`'s windows of `ctx` tokens
/// (each from an empty cache, BOS first when the model adds it) and returns
/// the statistics of every position. `progress(done, total)` is called after
/// each window.
pub fn collect_activation_stats(
    model: &Model,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<ActivationStats> {
    let windows = Windows::new(model, text, ctx)?;
    let opts = SessionOptions {
        logits_rows: ctx,
        ..SessionOptions::with_ctx(ctx)
    };
    let mut session = Session::new(model, opts)?;
    session.collect_activation_stats();
    let mut window = Vec::with_capacity(ctx);
    for c in 0..windows.chunks {
        windows.fill(c, &mut window);
        session.reset();
        session.forward_all(&window)?;
        progress(c + 1, windows.chunks);
    }
    Ok(session
        .take_activation_stats()
        .expect("collection was switched on above"))
}

/// Sums of squares of one layer's four distinct matrix inputs.
#[derive(Clone, Debug)]
pub(super) struct LayerSums {
    /// Normalized block input, read by `q_proj`, `k_proj`, `v_proj`.
    pub(super) attention_in: Vec<f64>,
    /// Concatenated attention heads, read by `o_proj`.
    pub(super) heads: Vec<f64>,
    /// Normalized MLP input, read by `gate_proj` and `up_proj`.
    pub(super) mlp_in: Vec<f64>,
    /// SwiGLU output, read by `down_proj`.
    pub(super) swiglu: Vec<f64>,
}

/// Per-column sums of squared inputs of every matrix, accumulated while a
/// [`Session`](super::Session) runs with collection on
/// ([`Session::collect_activation_stats`](super::Session::collect_activation_stats)).
#[derive(Clone, Debug)]
pub struct ActivationStats {
    pub(super) layers: Vec<LayerSums>,
    /// Rows that went through the layers.
    pub(super) layer_rows: u64,
    /// Final-norm output, read by the output projection.
    pub(super) output_in: Vec<f64>,
    /// Rows that went through the output projection.
    pub(super) output_rows: u64,
    /// Name of the output projection's tensor (`lm_head`, or the token
    /// embedding when tied).
    output_name: &'static str,
}

impl ActivationStats {
    pub(super) fn new(c: &Config) -> Self {
        let layer = LayerSums {
            attention_in: vec![0.0; c.hidden_size],
            heads: vec![0.0; c.q_dim()],
            mlp_in: vec![0.0; c.hidden_size],
            swiglu: vec![0.0; c.intermediate_size],
        };
        Self {
            layers: vec![layer; c.num_layers],
            layer_rows: 0,
            output_in: vec![0.0; c.hidden_size],
            output_rows: 0,
            output_name: if c.tie_word_embeddings {
                names::TOKEN_EMBEDDING
            } else {
                names::OUTPUT
            },
        }
    }

    /// Tokens whose activations were collected.
    pub fn tokens(&self) -> u64 {
        self.layer_rows
    }

    /// Every matrix's tensor name with the mean square of each of its input
    /// columns, in file order (the output projection last). Matrices that
    /// saw no rows are left out.
    pub fn mean_squares(&self) -> Vec<(String, Vec<f32>)> {
        let mean = |sums: &[f64], rows: u64| -> Vec<f32> {
            sums.iter().map(|&s| (s / rows as f64) as f32).collect()
        };
        let mut out = Vec::new();
        if self.layer_rows > 0 {
            for (l, sums) in self.layers.iter().enumerate() {
                for t in LayerTensor::ALL {
                    let input = match t {
                        LayerTensor::Q | LayerTensor::K | LayerTensor::V => &sums.attention_in,
                        LayerTensor::O => &sums.heads,
                        LayerTensor::Gate | LayerTensor::Up => &sums.mlp_in,
                        LayerTensor::Down => &sums.swiglu,
                        LayerTensor::AttnNorm | LayerTensor::FfnNorm => continue,
                    };
                    out.push((t.name(l), mean(input, self.layer_rows)));
                }
            }
        }
        if self.output_rows > 0 {
            out.push((
                self.output_name.to_string(),
                mean(&self.output_in, self.output_rows),
            ));
        }
        out
    }
}

/// Adds the squares of each column of `rows` (rows of `sums.len()` values)
/// to `sums`.
pub(super) fn add_squares(sums: &mut [f64], rows: &[f32]) {
    for row in rows.chunks_exact(sums.len()) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += (v as f64) * (v as f64);
        }
    }
}
