//! Text ⇄ token ids with the HF `tokenizer.json` embedded in the model file,
//! and a streaming decoder that never splits a UTF-8 character.

use crate::error::{Error, Result};
use crate::format::{keys, Metadata};
use std::sync::OnceLock;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special-token parsing off, made on first use.
    text_only: OnceLock<tokenizers::Tokenizer>,
    /// The added tokens marked special, longest first.
    specials: Vec<(u32, String)>,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// Whether a BOS token starts every encoded text (the model's
    /// `add_bos_token`).
    add_bos: bool,
    bos_text: String,
    eos_text: String,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Every special token a `TemplateProcessing` post-processor (also inside a
/// `Sequence`) places must be among its `special_tokens`: the `tokenizers`
/// crate (0.23) checks this when a template is built in code but not when
/// one is read from JSON, and then panics on the first encode ("no entry
/// found for key", processors/template.rs; found by
/// fuzz/fuzz_targets/tokenizer_template.rs).
fn check_post_processor(p: Option<&serde_json::Value>) -> Result<()> {
    use serde_json::Value;
    let Some(Value::Object(p)) = p else {
        return Ok(());
    };
    if let Some(Value::Array(list)) = p.get("processors") {
        for q in list {
            check_post_processor(Some(q))?;
        }
    }
    if p.get("type").and_then(Value::as_str) != Some("TemplateProcessing") {
        return Ok(());
    }
    let known = |id: &str| {
        p.get("special_tokens")
            .and_then(Value::as_object)
            .is_some_and(|m| m.contains_key(id))
    };
    for key in ["single", "pair"] {
        let mut used = Vec::new();
        match p.get(key) {
            Some(Value::Array(pieces)) => {
                for piece in pieces {
                    if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
                        used.push(id.to_owned());
                    }
                }
            }
            // The string form, e.g. "<s> $A:0": pieces not starting with '$'
            // are special tokens, with an optional ":type_id".
            Some(Value::String(t)) => {
                for piece in t.split_whitespace().filter(|w| !w.starts_with('$')) {
                    let id = match piece.rsplit_once(':') {
                        Some((id, n)) if n.parse::<u32>().is_ok() => id,
                        _ => piece,
                    };
                    used.push(id.to_owned());
                }
            }
            _ => {}
        }
        if let Some(id) = used.iter().find(|id| !known(id)) {
            return Err(Error::Tokenizer(format!(
                "tokenizer.json: the post-processor's '{key}' template uses the special \
                 token '{id}', which its special_tokens do not define"
            )));
        }
    }
    Ok(())
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.json` and the special-token keys
    /// in the metadata.
    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        let json = m.get_str(keys::TOKENIZER_JSON)?.ok_or_else(|| {
            Error::Tokenizer(format!("metadata '{}' is missing", keys::TOKENIZER_JSON))
        })?;
        // The `tokenizers` crate (0.23) panics instead of failing on two
        // kinds of input the fuzzer found: malformed JSON inside the
        // "decoder" value (`expect("Helper")`), and a post-processor
        // template naming an undefined special token (on the first encode).
        // Both are checked here first and become errors.
        // One pass that checks the whole text's syntax but keeps only the
        // post-processor (a full `Value` of megabytes of JSON would cost
        // more than the tokenizer itself at load).
        #[derive(serde::Deserialize)]
        struct PostProcessorOnly {
            post_processor: Option<serde_json::Value>,
        }
        let probe: PostProcessorOnly = serde_json::from_str(json)
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json is not valid JSON: {e}")))?;
        check_post_processor(probe.post_processor.as_ref())?;
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(tok_err)?;
        let bos = m.get_uint(keys::BOS_TOKEN_ID)?.map(|v| v as u32);
        let eos = m
            .get_u32_array(keys::EOS_TOKEN_IDS)?
            .map(<[u32]>::to_vec)
            .unwrap_or_default();
        // Without the key, do what the tokenizer's own post-processor does.
        let add_bos = match m.get_bool(keys::ADD_BOS_TOKEN)? {
            Some(b) => b,
            None => match bos {
                Some(b) => inner.encode("", true).map_err(tok_err)?.get_ids().first() == Some(&b),
                None => false,
            },
        };
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(
                "the model adds a BOS token but names none".into(),
            ));
        }
        let text_of = |key: &str, id: Option<u32>| -> Result<String> {
            Ok(match m.get_str(key)? {
                Some(s) => s.to_owned(),
                None => id.and_then(|i| inner.id_to_token(i)).unwrap_or_default(),
            })
        };
        let bos_text = text_of(keys::BOS_TOKEN, bos)?;
        let eos_text = text_of(keys::EOS_TOKEN, eos.first().copied())?;
        let mut specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (id, t.content))
            .collect();
        specials.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        Ok(Self {
            inner,
            text_only: OnceLock::new(),
            specials,
            bos,
            eos,
            add_bos,
            bos_text,
            eos_text,
        })
    }

    /// Checks that every token id, added tokens included, and the special
    /// tokens' ids are below the model's `vocab_size` (the rows of its
    /// embedding), so no encoded text can index past them.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let n = self.vocab_size();
        if n > vocab_size {
            return Err(Error::Tokenizer(format!(
                "tokenizer has {n} tokens but the model only {vocab_size}"
            )));
        }
        let vocab = self.inner.get_vocab(true);
        if let Some((tok, id)) = vocab
            .iter()
            .filter(|(_, &id)| id as usize >= vocab_size)
            .min_by_key(|(_, &id)| id)
        {
            return Err(Error::Tokenizer(format!(
                "token {} has id {id}, outside the model's vocabulary of {vocab_size}",
                crate::error::quote(tok)
            )));
        }
        for id in self.bos.iter().chain(&self.eos) {
            if *id as usize >= vocab_size {
                return Err(Error::Tokenizer(format!(
                    "special token id {id} is outside the model's vocabulary of {vocab_size}"
                )));
            }
        }
        Ok(())
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether [`Tokenizer::encode`] with `add_special` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_text
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_text
    }

    /// Encodes `text`. With `add_special`, the model's special tokens are
    /// added as its tokenizer would (`tokenizer(text)` in transformers: BOS for
    /// LLaMA-2, nothing for SmolLM2), and BOS is never doubled. Special tokens
    /// written in the text (`<s>`, `<|im_start|>`) are always recognized.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = self
            .inner
            .encode(text, add_special)
            .map_err(tok_err)?
            .get_ids()
            .to_vec();
        if add_special && self.add_bos {
            let bos = self.bos.expect("checked at construction");
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Encodes `text` with special-token text read as ordinary text
    /// (`<|im_start|>` becomes the tokens of its characters, not the control
    /// token), and nothing added: for text from someone not trusted with
    /// control tokens.
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.text_only.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        Ok(inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The special tokens (the tokenizer's added tokens marked special, such
    /// as `<s>` or `<|im_start|>`): id and text, longest text first.
    pub fn special_tokens(&self) -> &[(u32, String)] {
        &self.specials
    }

    /// Decodes `ids` to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The vocabulary string of one token (e.g. `Ġworld`), for diagnostics.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A decoder for text generated after `context` (usually the prompt).
    pub fn stream_decoder(&self, context: &[u32]) -> StreamDecoder<'_> {
        StreamDecoder::new(self, context)
    }
}

/// Incremental detokenization. Decoding tokens one at a time is wrong for
/// SentencePiece-style tokenizers (leading spaces depend on the previous
/// token) and for byte-level ones (a character can span tokens), so each step
/// decodes a short window of recent tokens twice, with and without the new
/// ones, and emits the difference once it no longer ends in an incomplete
/// character (U+FFFD).
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// Tokens before this have been emitted.
    read: usize,
}

/// Context tokens kept before the first generated one: enough for every
/// tokenizer's decoder to see a preceding token.
const CONTEXT_TOKENS: usize = 4;

impl<'t> StreamDecoder<'t> {
    fn new(tok: &'t Tokenizer, context: &[u32]) -> Self {
        let keep = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tok,
            ids: keep.to_vec(),
            prefix: 0,
            read: keep.len(),
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                if now.starts_with(&before) {
                    let new = new.to_owned();
                    self.prefix = self.read;
                    self.read = self.ids.len();
                    return Ok(new);
                }
            }
        }
        Ok(String::new())
    }

    /// Text of tokens still held back (an incomplete character at the end of
    /// generation is emitted as U+FFFD).
    pub fn flush(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}
