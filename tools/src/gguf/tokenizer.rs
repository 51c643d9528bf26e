//! `tokenizer.ggml.*` metadata → a HuggingFace `tokenizer.json`, built the
//! way HuggingFace's own files for these tokenizers are:
//!
//! - model `llama` (SentencePiece BPE, LLaMA-2 style): a BPE model with
//!   byte fallback, normalizer `Prepend("▁")` + `Replace(" ", "▁")`, decoder
//!   `Replace("▁", " ")` + `ByteFallback` + `Fuse` + `Strip`, and merges
//!   derived from the vocabulary and scores as transformers'
//!   `SentencePieceExtractor` does.
//! - model `gpt2` (byte-level BPE): the vocabulary and
//!   `tokenizer.ggml.merges`, with the pre-tokenizer `tokenizer.ggml.pre`
//!   names (GPT-2's, SmolLM's digit-splitting one, or LLaMA-3's).
//!
//! Control tokens (token type 3) and the unknown token become special added
//! tokens, user-defined ones (type 4) plain added tokens, so text that spells
//! them is tokenized as one id, as llama.cpp does.

use super::{brief, GgufFile, MetaValue};
use crate::hf::TokenizerInfo;
use crate::ToolError;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// llama.cpp's `llama_token_type`.
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// LLaMA-3's pre-tokenizer regex (HF's `tokenizer.json` for Meta-Llama-3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The SentencePiece word-boundary marker.
const SPACE_MARK: &str = "\u{2581}";

struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
    ids: HashMap<&'a str, u32>,
}

fn read_vocab(file: &GgufFile) -> Result<Vocab<'_>, ToolError> {
    let key = "tokenizer.ggml.tokens";
    let list = file
        .get_array(key)?
        .ok_or_else(|| file.error(format!("metadata '{key}' is missing")))?;
    let mut tokens = Vec::with_capacity(list.len());
    let mut ids = HashMap::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let s = v.as_str().ok_or_else(|| {
            file.error(format!(
                "'{key}'[{i}] should be a string, found {}",
                brief(v)
            ))
        })?;
        if let Some(first) = ids.insert(s, i as u32) {
            return Err(file.error(format!(
                "'{key}' holds {} twice (ids {first} and {i}); a tokenizer.json vocabulary cannot",
                nibble::error::quote(s)
            )));
        }
        tokens.push(s);
    }
    let types = match file.get_array("tokenizer.ggml.token_type")? {
        None => vec![token_type::NORMAL; tokens.len()],
        Some(list) if list.len() == tokens.len() => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| {
                    file.error(format!(
                        "'tokenizer.ggml.token_type'[{i}] should be an integer, found {}",
                        brief(v)
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(list) => {
            return Err(file.error(format!(
                "'tokenizer.ggml.token_type' has {} entries for {} tokens",
                list.len(),
                tokens.len()
            )))
        }
    };
    Ok(Vocab { tokens, types, ids })
}

/// A token-id key, checked against the vocabulary.
fn token_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>, ToolError> {
    match file.get_uint(key)? {
        None => Ok(None),
        Some(id) if id < vocab as u64 => Ok(Some(id as u32)),
        // llama.cpp writes -1 (as u32: 0xFFFFFFFF) for "none".
        Some(id) if id == u32::MAX as u64 => Ok(None),
        Some(id) => Err(file.error(format!(
            "metadata '{key}' is {id}, outside the vocabulary of {vocab} tokens"
        ))),
    }
}

/// Builds the tokenizer of `file` and checks that the `tokenizers` crate
/// accepts it. `vocab_size` is the model's (the token list's length).
pub fn build(file: &GgufFile, vocab_size: usize) -> Result<TokenizerInfo, ToolError> {
    let vocab = read_vocab(file)?;
    let n = vocab.tokens.len();
    if n != vocab_size {
        return Err(file.error(format!("{n} tokens for a vocabulary of {vocab_size}")));
    }
    let bos = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(file, "tokenizer.ggml.eos_token_id", n)?;
    let unk = token_id(file, "tokenizer.ggml.unknown_token_id", n)?;
    let model = file
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| file.error("metadata 'tokenizer.ggml.model' is missing"))?;
    let is_spm = match model {
        "llama" => true,
        "gpt2" => false,
        other => {
            return Err(file.error(format!(
                "tokenizer model {} is not supported (only 'llama' and 'gpt2')",
                nibble::error::quote(other)
            )))
        }
    };
    // llama.cpp's defaults when the keys are absent.
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(is_spm);
    let add_eos = file
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let add_space_prefix = file
        .get_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(is_spm);
    if add_bos && bos.is_none() {
        return Err(file
            .error("the tokenizer adds a BOS token but 'tokenizer.ggml.bos_token_id' is missing"));
    }
    if add_eos && eos.is_none() {
        return Err(file.error(
            "the tokenizer adds an EOS token but 'tokenizer.ggml.eos_token_id' is missing",
        ));
    }

    let mut vocab_json = Map::with_capacity(n);
    for (i, t) in vocab.tokens.iter().enumerate() {
        vocab_json.insert((*t).to_owned(), json!(i));
    }
    let unk_piece = unk
        .or_else(|| {
            vocab
                .types
                .iter()
                .position(|&t| t == token_type::UNKNOWN)
                .map(|i| i as u32)
        })
        .map(|i| vocab.tokens[i as usize]);
    let mut added = Vec::new();
    for (i, (&t, &ty)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
        let special = match ty {
            token_type::CONTROL | token_type::UNKNOWN => true,
            token_type::USER_DEFINED => false,
            _ => continue,
        };
        added.push(
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special}),
        );
    }

    let (model_json, normalizer, pre_tokenizer, decoder) = if is_spm {
        let merges = spm_merges(file, &vocab)?;
        let model = json!({"type": "BPE", "dropout": null, "unk_token": unk_piece,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab_json, "merges": merges});
        let mut norms = Vec::new();
        if add_space_prefix {
            norms.push(json!({"type": "Prepend", "prepend": SPACE_MARK}));
        }
        norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            model,
            json!({"type": "Sequence", "normalizers": norms}),
            Value::Null,
            json!({"type": "Sequence", "decoders": decoders}),
        )
    } else {
        let merges = bpe_merges(file)?;
        let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": add_space_prefix, "trim_offsets": true,
                "use_regex": use_regex})
        };
        let (pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
            "smollm" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama3" | "llama-v3" | "llama-bpe" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
                     "invert": false},
                    byte_level(false)]}),
                true,
            ),
            other => {
                return Err(file.error(format!(
                    "pre-tokenizer {} ('tokenizer.ggml.pre') is not supported (supported: default, gpt2, smollm, llama3, llama-bpe)",
                    nibble::error::quote(other)
                )))
            }
        };
        let model = json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab_json,
            "merges": merges});
        let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true});
        (model, Value::Null, pre_tokenizer, decoder)
    };

    let post_processor = post_processor(&vocab, bos.filter(|_| add_bos), eos.filter(|_| add_eos));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor, "decoder": decoder, "model": model_json,
    });
    let tokenizer_json = serde_json::to_string(&tokenizer).expect("a JSON value serializes");
    if let Err(e) = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes()) {
        return Err(file.error(format!(
            "the tokenizer built from the metadata does not load: {e}"
        )));
    }

    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    // End-of-turn and end-of-message tokens also end a chat reply.
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = token_id(file, key, n)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    Ok(TokenizerInfo {
        tokenizer_json,
        chat_template: file.get_str("tokenizer.chat_template")?.map(str::to_owned),
        bos_token_id: bos,
        bos_token: bos.map(|i| vocab.tokens[i as usize].to_owned()),
        eos_token: eos_token_ids
            .first()
            .map(|&i| vocab.tokens[i as usize].to_owned()),
        eos_token_ids,
        add_bos_token: add_bos,
        source_files: Vec::new(),
    })
}

/// `TemplateProcessing` adding `bos`/`eos` around each sequence as the
/// tokenizer's `add_bos_token`/`add_eos_token` say.
fn post_processor(vocab: &Vocab, bos: Option<u32>, eos: Option<u32>) -> Value {
    let special =
        |id: u32| json!({"SpecialToken": {"id": vocab.tokens[id as usize], "type_id": 0}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id) in [("A", 0), ("B", 1)] {
        let mut part: Vec<Value> = bos.map(special).into_iter().collect();
        part.push(seq(name, type_id));
        part.extend(eos.map(special));
        if name == "A" {
            single = part.clone();
        }
        pair.extend(part);
    }
    let mut specials = Map::new();
    for id in bos.into_iter().chain(eos) {
        let t = vocab.tokens[id as usize];
        specials.insert(t.to_owned(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// `tokenizer.ggml.merges` ("left right" strings) as `[left, right]` pairs.
fn bpe_merges(file: &GgufFile) -> Result<Vec<[&str; 2]>, ToolError> {
    let key = "tokenizer.ggml.merges";
    let list = file.get_array(key)?.ok_or_else(|| {
        file.error(format!(
            "metadata '{key}' is missing (a gpt2 tokenizer needs its merges)"
        ))
    })?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .and_then(|s| s.split_once(' '))
                .map(|(a, b)| [a, b])
                .ok_or_else(|| {
                    file.error(format!(
                        "'{key}'[{i}] should be a string \"left right\", found {}",
                        brief(v)
                    ))
                })
        })
        .collect()
}

/// The merges of a SentencePiece BPE vocabulary, as transformers'
/// `generate_merges` derives them: every split of a piece into two pieces of
/// the vocabulary is a merge ranked by the merged piece's score (higher
/// first), then by longer left and right parts; ties keep vocabulary order,
/// and splits of one piece are ordered by their parts' ids.
fn spm_merges<'a>(file: &'a GgufFile, vocab: &Vocab<'a>) -> Result<Vec<[&'a str; 2]>, ToolError> {
    let scores: Vec<f32> = match file.get_array("tokenizer.ggml.scores")? {
        Some(list) if list.len() == vocab.tokens.len() => list
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetaValue::F32(x) if x.is_finite() => Ok(*x),
                other => Err(file.error(format!(
                    "'tokenizer.ggml.scores'[{i}] should be a finite f32, found {}",
                    brief(other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(list) => {
            return Err(file.error(format!(
                "'tokenizer.ggml.scores' has {} entries for {} tokens",
                list.len(),
                vocab.tokens.len()
            )))
        }
        // Without scores, transformers ranks merges by the merged piece's id.
        None => (0..vocab.tokens.len()).map(|i| -(i as f32)).collect(),
    };
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges = Vec::new();
    let mut local = Vec::new();
    for (piece, &score) in vocab.tokens.iter().zip(&scores) {
        local.clear();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&il), Some(&ir)) = (vocab.ids.get(l), vocab.ids.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.iter().map(|&(_, _, l, r)| Merge {
            left: l,
            right: r,
            score,
            left_chars: l.chars().count(),
            right_chars: r.chars().count(),
        }));
    }
    // Stable, so equal keys keep the order above (Python's sorted(reverse=True)
    // is stable too).
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    Ok(merges.into_iter().map(|m| [m.left, m.right]).collect())
}
