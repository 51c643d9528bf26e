//! Streaming text generation: a [`Generator`] is an iterator of [`Piece`]s,
//! one per sampled token, each with the text that token completes.

use crate::error::{Error, Result};
use crate::model::Session;
use crate::sampler::Sampler;
use crate::tokenizer::StreamDecoder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// When generation ends, and how it can be stopped from outside.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends when the text contains one of these; the stop string
    /// itself is not returned.
    pub stop: Vec<String>,
    /// End at the model's end-of-sequence tokens (returned as a token with
    /// empty text).
    pub stop_at_eos: bool,
    /// Generation ends (with [`StopReason::Cancelled`]) before the next token
    /// once this is set, e.g. from a Ctrl-C handler or another thread. The
    /// prompt itself is processed in one piece and is not interrupted.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            stop: Vec::new(),
            stop_at_eos: true,
            cancel: None,
        }
    }
}

/// One step of generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The sampled token; `None` for the final piece that only releases text
    /// held back (an incomplete character, or a possible stop-string start).
    pub token: Option<u32>,
    /// Text to show now (may be empty).
    pub text: String,
}

/// Why a [`Generator`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The text reached one of [`GenerateOptions::stop`].
    StopString,
    /// [`GenerateOptions::max_tokens`] tokens were generated.
    MaxTokens,
    /// The context is full: generation ends there rather than failing.
    ContextFull,
    /// [`GenerateOptions::cancel`] was set.
    Cancelled,
}

/// The iterator returned by [`generate`].
pub struct Generator<'s, 'm> {
    session: &'s mut Session<'m>,
    sampler: &'s mut Sampler,
    decoder: StreamDecoder<'m>,
    opts: GenerateOptions,
    eos: &'m [u32],
    logits: Vec<f32>,
    /// The last sampled token, fed to the model at the next step.
    unfed: Option<u32>,
    generated: usize,
    /// Decoded text not yet returned because it may start a stop string.
    held: String,
    stop: Option<StopReason>,
    flushed: bool,
}

/// Feeds `prompt` (after whatever the session already holds) and returns an
/// iterator over the continuation. The prompt must not be empty. The sampler
/// is borrowed so that its random stream continues across calls (chat turns).
///
/// Stop strings are cut from the text, and a cancel flag (set here from the
/// loop itself; a Ctrl-C handler or another thread works the same way) ends
/// generation before the next token:
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("model.nbl");
/// # let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/tiny-mha");
/// # nibble_tools::convert::convert(&nibble_tools::convert::ConvertOptions::new(
/// #     tiny, &path, nibble_tools::convert::QuantPolicy::F32))?;
/// use nibble::{generate, GenerateOptions, Model, Sampler, SamplerOptions, Session, StopReason};
/// use std::sync::{atomic::{AtomicBool, Ordering}, Arc};
///
/// let model = Model::open(&path)?;
/// let mut session = Session::new(&model, Default::default())?;
/// let mut sampler = Sampler::new(SamplerOptions::greedy())?;
/// let cancel = Arc::new(AtomicBool::new(false));
/// let opts = GenerateOptions {
///     max_tokens: 100,
///     stop_at_eos: false,
///     cancel: Some(cancel.clone()),
///     ..GenerateOptions::default()
/// };
/// let prompt = model.tokenizer().encode("Once upon a time", true)?;
/// let mut gen = generate(&mut session, &prompt, &mut sampler, opts)?;
/// let mut tokens = 0;
/// for piece in &mut gen {
///     tokens += piece?.token.is_some() as usize;
///     if tokens == 3 {
///         cancel.store(true, Ordering::Relaxed);
///     }
/// }
/// assert_eq!(tokens, 3);
/// assert_eq!(gen.stop_reason(), Some(StopReason::Cancelled));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn generate<'s, 'm>(
    session: &'s mut Session<'m>,
    prompt: &[u32],
    sampler: &'s mut Sampler,
    opts: GenerateOptions,
) -> Result<Generator<'s, 'm>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let model = session.model();
    let logits = session.forward(prompt)?.to_vec();
    let decoder = model.tokenizer().stream_decoder(session.tokens());
    Ok(Generator {
        sampler,
        decoder,
        eos: model.tokenizer().eos_ids(),
        session,
        opts,
        logits,
        unfed: None,
        generated: 0,
        held: String::new(),
        stop: None,
        flushed: false,
    })
}

impl Generator<'_, '_> {
    /// Why generation ended (`None` while it is running).
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    fn step(&mut self) -> Result<Option<Piece>> {
        if self.stop.is_some() {
            if self.flushed {
                return Ok(None);
            }
            self.flushed = true;
            let mut text = std::mem::take(&mut self.held);
            if self.stop != Some(StopReason::StopString) {
                text.push_str(&self.decoder.flush()?);
            }
            return Ok((!text.is_empty()).then_some(Piece { token: None, text }));
        }
        if let Some(t) = self.unfed.take() {
            if self.session.len() >= self.session.ctx() {
                self.stop = Some(StopReason::ContextFull);
                return self.step();
            }
            let logits = self.session.forward(&[t])?;
            self.logits.copy_from_slice(logits);
        }
        if self.generated >= self.opts.max_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return self.step();
        }
        if let Some(c) = &self.opts.cancel {
            if c.load(Ordering::Relaxed) {
                self.stop = Some(StopReason::Cancelled);
                return self.step();
            }
        }
        let token = self.sampler.sample(&mut self.logits, self.session.tokens());
        self.generated += 1;
        if self.opts.stop_at_eos && self.eos.contains(&token) {
            self.stop = Some(StopReason::Eos);
            return Ok(Some(Piece {
                token: Some(token),
                text: String::new(),
            }));
        }
        self.unfed = Some(token);
        self.held.push_str(&self.decoder.push(token)?);
        let text = self.release_text();
        Ok(Some(Piece {
            token: Some(token),
            text,
        }))
    }

    /// Returns the held text that cannot be part of a stop string; on a
    /// complete stop string, the text before it, and ends generation.
    fn release_text(&mut self) -> String {
        let stop_at = self
            .opts
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(i) = stop_at {
            self.stop = Some(StopReason::StopString);
            let mut text = std::mem::take(&mut self.held);
            text.truncate(i);
            return text;
        }
        // Keep the longest tail that is a proper prefix of a stop string.
        let keep = self
            .opts
            .stop
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .find(|&k| self.held.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let rest = self.held.split_off(split);
        std::mem::replace(&mut self.held, rest)
    }
}

impl Iterator for Generator<'_, '_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.stop = Some(StopReason::MaxTokens);
                self.flushed = true;
                Some(Err(e))
            }
        }
    }
}
