//! Reading a HuggingFace LLaMA checkpoint directory's JSON files:
//! `config.json` (transformers 4.x and 5.x spellings), `tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`.

use crate::ToolError;
use nibble::error::quote;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// transformers' default when a LLaMA config names no rope base.
pub const DEFAULT_ROPE_THETA: f32 = 10000.0;
/// transformers' `LlamaConfig` defaults for keys older configs may omit.
const DEFAULT_RMS_NORM_EPS: f32 = 1e-6;
const DEFAULT_MAX_POSITIONS: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are divided by `factor` (position interpolation).
    Linear {
        factor: f32,
    },
}

/// The architecture hyper-parameters of a LLaMA checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` (4.x) or `dtype` (5.x), informational only: the
    /// safetensors headers are the truth about tensor types.
    pub dtype: Option<String>,
}

pub(crate) fn read_json(path: &Path) -> Result<Value, ToolError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| ToolError::new(path, format!("malformed JSON: {e}")))
}

pub(crate) fn read_text(path: &Path) -> Result<String, ToolError> {
    match nibble::fsutil::read_regular(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| ToolError::new(path, "not UTF-8 text")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ToolError::new(path, "file not found"))
        }
        Err(e) => Err(crate::open_error(path, e)),
    }
}

fn as_object<'a>(path: &Path, v: &'a Value) -> Result<&'a Map<String, Value>, ToolError> {
    v.as_object()
        .ok_or_else(|| ToolError::new(path, "expected a JSON object at the top level"))
}

/// A key's value, treating JSON `null` as absent.
/// A JSON value for an error message, cut to a readable length.
fn q(v: &Value) -> String {
    quote(&v.to_string())
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<Self, ToolError> {
        let json = read_json(path)?;
        Self::from_json(path, &json)
    }

    /// Validates a parsed `config.json`; `path` is only used in errors.
    pub fn from_json(path: &Path, json: &Value) -> Result<Self, ToolError> {
        let obj = as_object(path, json)?;
        let err = |m: String| ToolError::new(path, m);
        check_architecture(path, obj)?;
        let uint = |key: &str| -> Result<Option<usize>, ToolError> {
            match get(obj, key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= u32::MAX as u64 => Ok(Some(n as usize)),
                    _ => Err(err(format!(
                        "'{key}' should be a positive integer, found {}",
                        q(v)
                    ))),
                },
            }
        };
        let required = |key: &str| -> Result<usize, ToolError> {
            uint(key)?.ok_or_else(|| err(format!("missing required key '{key}'")))
        };
        let float = |o: &Map<String, Value>, key: &str| -> Result<Option<f32>, ToolError> {
            match get(o, key) {
                None => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
                    _ => Err(err(format!(
                        "'{key}' should be a positive number, found {}",
                        q(v)
                    ))),
                },
            }
        };
        for (key, what) in [
            ("attention_bias", "attention biases"),
            ("mlp_bias", "MLP biases"),
        ] {
            if get(obj, key).and_then(Value::as_bool) == Some(true) {
                return Err(err(format!("{what} ('{key}': true) are not supported")));
            }
        }
        if let Some(act) = get(obj, "hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(err(format!(
                    "activation {} is not supported (LLaMA uses \"silu\")",
                    q(act)
                )));
            }
        }

        let vocab_size = required("vocab_size")?;
        let hidden_size = required("hidden_size")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let num_attention_heads = required("num_attention_heads")?;
        let intermediate_size = required("intermediate_size")?;
        let num_key_value_heads = uint("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match uint("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(err(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim {head_dim} must be even for RoPE")));
        }

        // transformers 5.x folds rope_theta and the scaling into
        // `rope_parameters`; 4.x has `rope_theta` and `rope_scaling`. When
        // both are present (5.x writes both) the 5.x block wins.
        let params = match get(obj, "rope_parameters") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(v) => {
                return Err(err(format!(
                    "'rope_parameters' should be an object, found {}",
                    q(v)
                )))
            }
        };
        let rope_theta = match params
            .map(|p| float(p, "rope_theta"))
            .transpose()?
            .flatten()
        {
            Some(t) => t,
            None => float(obj, "rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA),
        };
        let scaling_block = match params {
            Some(p) if get(p, "rope_type").is_some() || get(p, "type").is_some() => Some(p),
            _ => match get(obj, "rope_scaling") {
                None => None,
                Some(Value::Object(s)) => Some(s),
                Some(v) => {
                    return Err(err(format!(
                        "'rope_scaling' should be an object, found {}",
                        q(v)
                    )))
                }
            },
        };
        let rope_scaling = match scaling_block {
            None => RopeScaling::None,
            Some(s) => {
                let kind = get(s, "rope_type")
                    .or_else(|| get(s, "type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => {
                        let factor = float(s, "factor")?
                            .ok_or_else(|| err("linear rope scaling without a 'factor'".into()))?;
                        RopeScaling::Linear { factor }
                    }
                    other => {
                        return Err(err(format!(
                            "rope scaling type {} is not supported (only linear)",
                            quote(other)
                        )))
                    }
                }
            }
        };
        let tie_word_embeddings = match get(obj, "tie_word_embeddings") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                err(format!(
                    "'tie_word_embeddings' should be true or false, found {}",
                    q(v)
                ))
            })?,
        };
        let dtype = get(obj, "dtype")
            .or_else(|| get(obj, "torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Self {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size,
            max_position_embeddings: uint("max_position_embeddings")?
                .unwrap_or(DEFAULT_MAX_POSITIONS),
            rope_theta,
            rope_scaling,
            rms_norm_eps: float(obj, "rms_norm_eps")?.unwrap_or(DEFAULT_RMS_NORM_EPS),
            tie_word_embeddings,
            dtype,
        })
    }
}

fn check_architecture(path: &Path, obj: &Map<String, Value>) -> Result<(), ToolError> {
    let model_type = get(obj, "model_type").and_then(Value::as_str);
    if let Some(t) = model_type {
        if t != "llama" {
            return Err(ToolError::new(
                path,
                format!("model_type {} is not supported (only 'llama')", quote(t)),
            ));
        }
    }
    let archs = get(obj, "architectures").and_then(Value::as_array);
    if let Some(archs) = archs {
        for a in archs {
            if a.as_str() != Some("LlamaForCausalLM") {
                return Err(ToolError::new(
                    path,
                    format!("architecture {a} is not supported (only LlamaForCausalLM)"),
                ));
            }
        }
    }
    if model_type.is_none() && archs.is_none() {
        return Err(ToolError::new(
            path,
            "neither 'model_type' nor 'architectures' says this is a LLaMA model",
        ));
    }
    Ok(())
}

/// Everything the runtime needs to tokenize and to run a chat.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerInfo {
    /// `tokenizer.json`, verbatim.
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    pub bos_token: Option<String>,
    /// Every id that ends generation; the first is the primary one.
    pub eos_token_ids: Vec<u32>,
    pub eos_token: Option<String>,
    pub add_bos_token: bool,
    /// The files that were read, by file name.
    pub source_files: Vec<String>,
}

/// A special token in `tokenizer_config.json`: a string, or an
/// `AddedToken` object with a `content` field.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` may be an integer or a list of integers.
fn id_list(path: &Path, key: &str, v: Option<&Value>) -> Result<Option<Vec<u32>>, ToolError> {
    let bad = || {
        ToolError::new(
            path,
            format!("'{key}' should be a token id or a list of ids"),
        )
    };
    let one = |x: &Value| {
        x.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
    };
    match v {
        None => Ok(None),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| one(x).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(x) => one(x).map(|id| Some(vec![id])).ok_or_else(bad),
    }
}

/// Token string → id over `tokenizer.json`'s model vocabulary and its added
/// tokens.
struct Vocab {
    ids: HashMap<String, u32>,
}

impl Vocab {
    fn from_tokenizer(json: &Value) -> Self {
        let mut ids = HashMap::new();
        match json.pointer("/model/vocab") {
            // BPE and WordPiece: {"piece": id}
            Some(Value::Object(v)) => {
                for (k, id) in v {
                    if let Some(id) = id.as_u64() {
                        ids.insert(k.clone(), id as u32);
                    }
                }
            }
            // Unigram: [["piece", score], ...], the id is the position.
            Some(Value::Array(v)) => {
                for (i, e) in v.iter().enumerate() {
                    if let Some(piece) = e.get(0).and_then(Value::as_str) {
                        ids.insert(piece.to_owned(), i as u32);
                    }
                }
            }
            _ => {}
        }
        if let Some(Value::Array(added)) = json.get("added_tokens") {
            for t in added {
                if let (Some(c), Some(id)) = (
                    t.get("content").and_then(Value::as_str),
                    t.get("id").and_then(Value::as_u64),
                ) {
                    ids.insert(c.to_owned(), id as u32);
                }
            }
        }
        Self { ids }
    }

    fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    fn token(&self, id: u32) -> Option<String> {
        // Several pieces can share an id only in broken files; the smallest
        // string keeps the answer deterministic.
        self.ids
            .iter()
            .filter(|(_, &i)| i == id)
            .map(|(k, _)| k)
            .min()
            .cloned()
    }
}

/// Whether `tokenizer.json`'s post-processor puts `bos` in front of a single
/// sequence — how tokenizers without an explicit `add_bos_token` say it.
fn post_processor_adds(json: &Value, bos: &str, bos_id: Option<u32>) -> bool {
    fn adds(p: &Value, bos: &str, bos_id: Option<u32>) -> bool {
        match p.get("type").and_then(Value::as_str) {
            Some("Sequence") => p
                .get("processors")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|q| adds(q, bos, bos_id))),
            Some("TemplateProcessing") => {
                let Some(single) = p.get("single").and_then(Value::as_array) else {
                    return false;
                };
                single.iter().any(|piece| {
                    let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) else {
                        return false;
                    };
                    if id == bos {
                        return true;
                    }
                    let ids = p
                        .get("special_tokens")
                        .and_then(|s| s.get(id))
                        .and_then(|s| s.get("ids"))
                        .and_then(Value::as_array);
                    match (bos_id, ids) {
                        (Some(b), Some(ids)) => ids.iter().any(|x| x.as_u64() == Some(b as u64)),
                        _ => false,
                    }
                })
            }
            _ => false,
        }
    }
    json.get("post_processor")
        .is_some_and(|p| adds(p, bos, bos_id))
}

/// `json` (valid JSON) without the whitespace between its tokens, every
/// string and the order of every object kept byte for byte. Checkpoints ship
/// tokenizer.json pretty-printed: SmolLM2's 3.5 MB shrink to 1.6 MB, which
/// is file size and, while the tokenizer is parsed, resident memory.
pub fn strip_json_whitespace(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

impl TokenizerInfo {
    /// Reads the tokenizer files of checkpoint directory `dir`.
    /// `config` is the parsed `config.json`, which may also hold bos/eos ids.
    pub fn load(dir: &Path, config: &Value, vocab_size: usize) -> Result<Self, ToolError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json = read_text(&tok_path)?;
        let tok: Value = serde_json::from_str(&tokenizer_json)
            .map_err(|e| ToolError::new(&tok_path, format!("malformed JSON: {e}")))?;
        if !tok.is_object() || tok.get("model").is_none() {
            return Err(ToolError::new(
                &tok_path,
                "no 'model' section: not a tokenizers file",
            ));
        }
        let vocab = Vocab::from_tokenizer(&tok);
        let mut source_files = vec!["tokenizer.json".to_owned()];

        let optional = |name: &str| -> Result<Option<(PathBuf, Value)>, ToolError> {
            let p = dir.join(name);
            if p.exists() {
                let v = read_json(&p)?;
                as_object(&p, &v)?;
                Ok(Some((p, v)))
            } else {
                Ok(None)
            }
        };
        let tcfg = optional("tokenizer_config.json")?;
        let gcfg = optional("generation_config.json")?;
        let empty = Map::new();
        let tobj = tcfg
            .as_ref()
            .and_then(|(_, v)| v.as_object())
            .unwrap_or(&empty);
        let gobj = gcfg
            .as_ref()
            .and_then(|(_, v)| v.as_object())
            .unwrap_or(&empty);
        let cobj = config.as_object().unwrap_or(&empty);
        let tpath = dir.join("tokenizer_config.json");
        let gpath = dir.join("generation_config.json");
        let cpath = dir.join("config.json");
        if tcfg.is_some() {
            source_files.push("tokenizer_config.json".into());
        }
        if gcfg.is_some() {
            source_files.push("generation_config.json".into());
        }

        // A separate chat_template.jinja (transformers ≥ 4.43 writes one) is
        // what transformers itself prefers over the config's copy.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            source_files.push("chat_template.jinja".into());
            Some(read_text(&jinja)?)
        } else {
            match get(tobj, "chat_template") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                // Older configs hold a list of named templates.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                Some(v) => {
                    return Err(ToolError::new(
                        &tpath,
                        format!("'chat_template' should be a string, found {}", q(v)),
                    ))
                }
            }
        };

        let bos_str = token_string(get(tobj, "bos_token"));
        let eos_str = token_string(get(tobj, "eos_token"));
        let lookup = |s: &Option<String>| -> Result<Option<u32>, ToolError> {
            match s {
                None => Ok(None),
                Some(s) => vocab.id(s).map(Some).ok_or_else(|| {
                    ToolError::new(
                        &tpath,
                        format!(
                            "special token {} is not in tokenizer.json's vocabulary",
                            quote(s)
                        ),
                    )
                }),
            }
        };
        // generation_config.json is what transformers' generate() obeys, so
        // it comes first; then config.json; then the tokenizer's strings.
        let first_ids = |key: &str| -> Result<Option<Vec<u32>>, ToolError> {
            if let Some(ids) = id_list(&gpath, key, get(gobj, key))? {
                return Ok(Some(ids));
            }
            id_list(&cpath, key, get(cobj, key))
        };
        let bos_token_id = match first_ids("bos_token_id")? {
            Some(ids) => ids.first().copied(),
            None => lookup(&bos_str)?,
        };
        let eos_token_ids = match first_ids("eos_token_id")? {
            Some(ids) => ids,
            None => lookup(&eos_str)?.into_iter().collect(),
        };
        for id in bos_token_id.iter().chain(&eos_token_ids) {
            if *id as usize >= vocab_size {
                return Err(ToolError::new(
                    &cpath,
                    format!("special token id {id} is outside the vocabulary of {vocab_size}"),
                ));
            }
        }
        let bos_token = bos_token_id.and_then(|id| vocab.token(id)).or(bos_str);
        let eos_token = eos_token_ids
            .first()
            .and_then(|&id| vocab.token(id))
            .or(eos_str);

        let add_bos_token = match get(tobj, "add_bos_token") {
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ToolError::new(
                    &tpath,
                    format!("'add_bos_token' should be true or false, found {}", q(v)),
                ))
            }
            None => bos_token
                .as_deref()
                .is_some_and(|b| post_processor_adds(&tok, b, bos_token_id)),
        };
        Ok(Self {
            tokenizer_json: strip_json_whitespace(&tokenizer_json),
            chat_template,
            bos_token_id,
            bos_token,
            eos_token_ids,
            eos_token,
            add_bos_token,
            source_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<LlamaConfig, ToolError> {
        LlamaConfig::from_json(Path::new("config.json"), &v)
    }

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 96})
    }

    #[test]
    fn defaults_fill_optional_keys() {
        let c = parse(base()).unwrap();
        assert_eq!(c.rope_theta, DEFAULT_ROPE_THETA);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn transformers_4_rope_keys() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    }

    #[test]
    fn transformers_5_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1e4, "rope_type": "default"});
        assert_eq!(parse(v).unwrap().rope_scaling, RopeScaling::None);
    }

    #[test]
    fn unsupported_rope_scaling_is_an_error() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(v)
            .unwrap_err()
            .message()
            .contains("'yarn' is not supported"));
    }

    #[test]
    fn non_llama_is_rejected() {
        let mut v = base();
        v["model_type"] = json!("mistral");
        assert!(parse(v)
            .unwrap_err()
            .message()
            .contains("model_type 'mistral'"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("model_type");
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(parse(v).unwrap_err().message().contains("GPT2LMHeadModel"));
    }

    #[test]
    fn gqa_heads_must_divide() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).unwrap_err().message().contains("not a multiple"));
    }

    #[test]
    fn post_processor_detection() {
        let tok = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}});
        assert!(post_processor_adds(&tok, "<s>", Some(1)));
        assert!(!post_processor_adds(&tok, "<|im_start|>", Some(5)));
        let none = json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}});
        assert!(!post_processor_adds(&none, "<s>", Some(1)));
    }

    #[test]
    fn stripping_whitespace_keeps_strings_and_order() {
        let pretty = "{\n  \"b\": [1, 2.5e-3,\ttrue],\r\n  \"a\": \" x \\\" y\\\\\",\n  \"c\": {\"\\u0120 \": null}\n}";
        let flat = strip_json_whitespace(pretty);
        assert_eq!(
            flat,
            "{\"b\":[1,2.5e-3,true],\"a\":\" x \\\" y\\\\\",\"c\":{\"\\u0120 \":null}}"
        );
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(parse(&flat), parse(pretty));
    }
}
