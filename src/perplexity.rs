//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it, so the
//! numbers compare directly: the whole text is tokenized once (with BOS if
//! the model adds one), cut into full windows of `ctx` tokens (a shorter tail
//! is dropped), the first token of each window is replaced by BOS when the
//! model adds BOS, every window is evaluated from an empty cache, and only
//! its second half is scored: logits at positions `ctx/2 .. ctx-2` predict
//! tokens `ctx/2+1 .. ctx-1`.

use crate::error::{Error, Result};
use crate::model::{Model, Session, SessionOptions};

#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityResult {
    pub perplexity: f64,
    pub tokens_scored: usize,
    pub chunks: usize,
    /// Sum of the negative log-likelihoods (natural log).
    pub nll_sum: f64,
}

/// Evaluates `text` in windows of `ctx` tokens. `progress(done, total, ppl)`
/// is called after each window with the running perplexity.
pub fn perplexity(
    model: &Model,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult> {
    if ctx < 4 {
        return Err(Error::InvalidArgument(format!(
            "--ctx {ctx} is too small for perplexity (at least 4)"
        )));
    }
    let tok = model.tokenizer();
    let tokens = tok.encode(text, true)?;
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one window of --ctx {ctx}",
            tokens.len()
        )));
    }
    let vocab = model.config().vocab_size;
    let mut session = Session::new(
        model,
        SessionOptions {
            ctx: Some(ctx),
            ..SessionOptions::default()
        },
    )?;
    let first = ctx / 2;
    let mut nll_sum = 0f64;
    let mut scored = 0usize;
    let mut window = Vec::with_capacity(ctx);
    for c in 0..chunks {
        window.clear();
        window.extend_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if tok.adds_bos() {
            window[0] = tok.bos_id().expect("a tokenizer that adds BOS has one");
        }
        session.reset();
        let logits = session.forward_from(&window, first)?;
        for (row, &next) in logits.chunks_exact(vocab).zip(&window[first + 1..]) {
            nll_sum -= log_softmax_at(row, next as usize);
            scored += 1;
        }
        progress(c + 1, chunks, (nll_sum / scored as f64).exp());
    }
    Ok(PerplexityResult {
        perplexity: (nll_sum / scored as f64).exp(),
        tokens_scored: scored,
        chunks,
        nll_sum,
    })
}

/// `log_softmax(logits)[i]`, accumulated in f64.
pub fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_softmax_of_uniform_logits() {
        let l = super::log_softmax_at(&[3.0; 4], 2);
        assert!((l - (0.25f64).ln()).abs() < 1e-12);
    }
}
