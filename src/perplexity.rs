//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it, so the
//! numbers compare directly: the whole text is tokenized once (with BOS if
//! the model adds one), cut into full windows of `ctx` tokens (a shorter tail
//! is dropped), the first token of each window is replaced by BOS when the
//! model adds BOS, every window is evaluated from an empty cache, and only
//! its second half is scored: logits at positions `ctx/2 .. ctx-2` predict
//! tokens `ctx/2+1 .. ctx-1`.

use crate::error::{Error, Result};
use crate::model::{Model, Session, SessionOptions};
use rayon::prelude::*;

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
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("model.nbl");
/// # let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/tiny-mha");
/// # nibble_tools::convert::convert(&nibble_tools::convert::ConvertOptions::new(
/// #     tiny, &path, nibble_tools::convert::QuantPolicy::F32))?;
/// let model = nibble::Model::open(&path)?;
/// let text = "It is a truth universally acknowledged, that a single man in \
///             possession of a good fortune, must be in want of a wife.";
/// let mut windows = 0;
/// let r = nibble::perplexity::perplexity(&model, text, 8, |_, _, _| windows += 1)?;
/// assert!(r.chunks > 0);
/// assert_eq!(windows, r.chunks);
/// // Each window scores its second half but the last position.
/// assert_eq!(r.tokens_scored, r.chunks * 3);
/// assert!(r.perplexity >= 1.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn perplexity(
    model: &Model,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult> {
    let windows = Windows::new(model, text, ctx)?;
    let chunks = windows.chunks;
    let vocab = model.config().vocab_size;
    let first = ctx / 2;
    let mut session = Session::new(model, window_options(ctx))?;
    let mut nll_sum = 0f64;
    let mut scored = 0usize;
    let mut window = Vec::with_capacity(ctx);
    for c in 0..chunks {
        windows.fill(c, &mut window);
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

/// How far a model's next-token distributions are from a base model's, over
/// the positions perplexity scores: llama.cpp's `--kl-divergence` statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct KlResult {
    /// Perplexity of the evaluated model.
    pub model: PerplexityResult,
    /// Perplexity of the base model on the same windows.
    pub base: PerplexityResult,
    /// Mean over scored positions of KL(base ‖ model), in nats.
    pub kl_mean: f64,
    /// 99th percentile (nearest rank) of the per-position KL.
    pub kl_p99: f64,
    /// Fraction of positions where both models' most likely token is the same.
    pub top1_agreement: f64,
}

/// Per-position statistics of one logits row pair.
struct RowStats {
    kl: f64,
    agree: bool,
    nll_model: f64,
    nll_base: f64,
}

/// Runs `model` and `base` on the same windows of `text` (as [`perplexity`]
/// does) and compares their distributions at every scored position.
/// `progress(done, total, ppl)` reports the model's running perplexity.
pub fn perplexity_kl(
    model: &Model,
    base: &Model,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<KlResult> {
    let vocab = model.config().vocab_size;
    if base.config().vocab_size != vocab {
        return Err(Error::InvalidArgument(format!(
            "{}: vocabulary of {} tokens, the model has {vocab}",
            base.path().display(),
            base.config().vocab_size
        )));
    }
    let windows = Windows::new(model, text, ctx)?;
    let chunks = windows.chunks;
    if base.tokenizer().encode(text, true)? != windows.tokens {
        return Err(Error::InvalidArgument(format!(
            "{}: its tokenizer splits the text differently from the model's",
            base.path().display()
        )));
    }
    let opts = window_options(ctx);
    let mut session = Session::new(model, opts.clone())?;
    let mut base_session = Session::new(base, opts)?;
    let first = ctx / 2;
    let mut stats: Vec<RowStats> = Vec::with_capacity(chunks * (ctx - first - 1));
    let mut window = Vec::with_capacity(ctx);
    for c in 0..chunks {
        windows.fill(c, &mut window);
        session.reset();
        base_session.reset();
        let logits = session.forward_from(&window, first)?;
        let base_logits = base_session.forward_from(&window, first)?;
        stats.par_extend(
            logits
                .par_chunks_exact(vocab)
                .zip(base_logits.par_chunks_exact(vocab))
                .zip(window[first + 1..].par_iter())
                .map(|((m, b), &next)| compare_rows(b, m, next as usize)),
        );
        let nll: f64 = stats.iter().map(|s| s.nll_model).sum();
        progress(c + 1, chunks, (nll / stats.len() as f64).exp());
    }
    let n = stats.len();
    let result = |nll_sum: f64| PerplexityResult {
        perplexity: (nll_sum / n as f64).exp(),
        tokens_scored: n,
        chunks,
        nll_sum,
    };
    let mut kls: Vec<f64> = stats.iter().map(|s| s.kl).collect();
    kls.sort_by(f64::total_cmp);
    let p99_rank = (n as f64 * 0.99).ceil() as usize;
    Ok(KlResult {
        model: result(stats.iter().map(|s| s.nll_model).sum()),
        base: result(stats.iter().map(|s| s.nll_base).sum()),
        kl_mean: kls.iter().sum::<f64>() / n as f64,
        kl_p99: kls[p99_rank.clamp(1, n) - 1],
        top1_agreement: stats.iter().filter(|s| s.agree).count() as f64 / n as f64,
    })
}

/// A session for windows of `ctx` tokens whose second half is scored.
fn window_options(ctx: usize) -> SessionOptions {
    SessionOptions {
        logits_rows: ctx - ctx / 2,
        ..SessionOptions::with_ctx(ctx)
    }
}

/// `max + ln Σ exp(v - max)` of a logits row, and its argmax (first on ties).
fn log_sum_exp(logits: &[f32]) -> (f64, usize) {
    let (arg, max) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |(a, m), (i, &v)| if v > m { (i, v) } else { (a, m) },
        );
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (max as f64 + sum.ln(), arg)
}

/// KL(p_base ‖ p_model) = Σ p_base (base - model) - lse(base) + lse(model),
/// using Σ p_base = 1; exact 0 when the rows are equal.
fn compare_rows(base: &[f32], model: &[f32], next: usize) -> RowStats {
    let (lse_b, arg_b) = log_sum_exp(base);
    let (lse_m, arg_m) = log_sum_exp(model);
    let cross: f64 = base
        .iter()
        .zip(model)
        .map(|(&b, &m)| (b as f64 - lse_b).exp() * (b as f64 - m as f64))
        .sum();
    RowStats {
        kl: (cross - lse_b + lse_m).max(0.0),
        agree: arg_b == arg_m,
        nll_model: lse_m - model[next] as f64,
        nll_base: lse_b - base[next] as f64,
    }
}

/// A text cut into llama.cpp's evaluation windows for one model.
pub(crate) struct Windows {
    /// The whole text's tokens.
    pub(crate) tokens: Vec<u32>,
    /// Number of full windows.
    pub(crate) chunks: usize,
    ctx: usize,
    /// What each window's first token becomes (the model's BOS, if it adds
    /// one).
    first_token: Option<u32>,
}

impl Windows {
    /// Tokenizes `text` for `model` and counts its full windows of `ctx`
    /// tokens.
    pub(crate) fn new(model: &Model, text: &str, ctx: usize) -> Result<Self> {
        if ctx < 4 {
            return Err(Error::InvalidArgument(format!(
                "a window of {ctx} tokens is too small for perplexity (at least 4)"
            )));
        }
        let tok = model.tokenizer();
        let tokens = tok.encode(text, true)?;
        let chunks = tokens.len() / ctx;
        if chunks == 0 {
            return Err(Error::InvalidArgument(format!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            )));
        }
        let first_token = tok
            .adds_bos()
            .then(|| tok.bos_id().expect("a tokenizer that adds BOS has one"));
        Ok(Self {
            tokens,
            chunks,
            ctx,
            first_token,
        })
    }

    /// Window `c` into `window`.
    pub(crate) fn fill(&self, c: usize, window: &mut Vec<u32>) {
        window.clear();
        window.extend_from_slice(&self.tokens[c * self.ctx..(c + 1) * self.ctx]);
        if let Some(t) = self.first_token {
            window[0] = t;
        }
    }
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
