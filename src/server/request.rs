//! Reading the body of a completion request into typed values.
//!
//! The body is parsed as untyped JSON first and each known field is then
//! checked by hand, so a wrong type is reported with the field's name (in the
//! message and in the error's `param`) rather than as a serde position.
//! Fields nibble does not know are ignored, as OpenAI-compatible servers
//! commonly do; fields it knows but cannot honour (`n` > 1, `logprobs`) are
//! refused rather than silently ignored.

use super::error::ApiError;
use crate::chat::Message;
use crate::sampler::SamplerOptions;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// Which endpoint a body was sent to: they differ in their input field and
/// their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

/// What the model is asked to continue.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Input {
    /// A conversation, to be rendered with the model's chat template.
    Messages(Vec<Message>),
    /// A plain-text prompt, tokenized with the model's special tokens (BOS).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A validated completion request.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub input: Input,
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
    /// `None`: until the end of sequence or of the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (llama.cpp's extension).
    pub ignore_eos: bool,
    pub sampler: SamplerOptions,
}

/// OpenAI accepts at most this many stop strings; more is almost certainly a
/// client bug.
const MAX_STOP_STRINGS: usize = 16;

/// Parses and validates a request body.
pub(crate) fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::invalid(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let f = Fields(map);

    let input = match endpoint {
        Endpoint::Chat => Input::Messages(messages(&f)?),
        Endpoint::Completion => prompt(&f)?,
    };
    f.str("model")?;
    if let Some(n) = f.uint("n")? {
        if n != 1 {
            return Err(ApiError::param("n", "only n = 1 is supported"));
        }
    }
    let logprobs_requested = match endpoint {
        Endpoint::Chat => f.bool("logprobs")?.unwrap_or(false),
        Endpoint::Completion => f.uint("logprobs")?.is_some(),
    };
    if logprobs_requested {
        return Err(ApiError::param("logprobs", "logprobs are not supported"));
    }
    if endpoint == Endpoint::Completion {
        if f.bool("echo")?.unwrap_or(false) {
            return Err(ApiError::param("echo", "echo is not supported"));
        }
        if f.str("suffix")?.is_some() {
            return Err(ApiError::param("suffix", "suffix is not supported"));
        }
    }

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(type_error("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(type_error("stream_options", "an object", v)),
    };

    // The chat API renamed max_tokens; the new name wins.
    let max_key = match endpoint {
        Endpoint::Chat if f.get("max_completion_tokens").is_some() => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens = match f.uint(max_key)? {
        Some(0) => {
            return Err(ApiError::param(
                max_key,
                format!("'{max_key}' must be at least 1"),
            ))
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        // OpenAI's legacy completions default to 16 tokens; chat runs to the end.
        None if endpoint == Endpoint::Completion => Some(16),
        None => None,
    };

    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::param(
                    "stop",
                    format!("at most {MAX_STOP_STRINGS} stop strings are allowed"),
                ));
            }
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(type_error("stop", "a string or an array of strings", other)),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(type_error("stop", "a string or an array of strings", v)),
    };

    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::param(
            "temperature",
            "'temperature' must be between 0 and 2",
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::param(
            "top_p",
            "'top_p' must be greater than 0 and at most 1",
        ));
    }
    // Extensions llama.cpp's server also accepts; off unless given, so that
    // plain OpenAI requests sample from the distribution OpenAI's would.
    let top_k = f.uint("top_k")?.unwrap_or(0);
    let min_p = f.number("min_p")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::param("min_p", "'min_p' must be between 0 and 1"));
    }
    let repeat_penalty = f.number("repeat_penalty")?.unwrap_or(1.0);
    if !(repeat_penalty > 0.0 && repeat_penalty.is_finite()) {
        return Err(ApiError::param(
            "repeat_penalty",
            "'repeat_penalty' must be greater than 0",
        ));
    }
    let seed = match f.get("seed") {
        None => fresh_seed(),
        // OpenAI's seed is any 64-bit integer; negative ones are as good.
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or_default(),
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or_default() as u64,
        Some(v) => return Err(type_error("seed", "an integer", v)),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);

    Ok(Request {
        input,
        stream,
        include_usage,
        max_tokens,
        stop,
        ignore_eos,
        sampler: SamplerOptions {
            temperature,
            top_k: usize::try_from(top_k).unwrap_or(usize::MAX),
            top_p,
            min_p,
            repeat_penalty,
            seed,
            ..SamplerOptions::default()
        },
    })
}

/// A different seed for every request that gives none.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    let items = match f.get("messages") {
        None => return Err(ApiError::param("messages", "'messages' is required")),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(type_error("messages", "an array", v)),
    };
    if items.is_empty() {
        return Err(ApiError::param("messages", "'messages' must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Value::Object(m) = item else {
                return Err(type_error(&format!("messages[{i}]"), "an object", item));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.clone(),
                None | Some(Value::Null) => {
                    return Err(ApiError::param(
                        &at("role"),
                        format!("'{}' is required", at("role")),
                    ))
                }
                Some(v) => return Err(type_error(&at("role"), "a string", v)),
            };
            let content = match m.get("content") {
                // An assistant turn that only called tools has no content.
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(parts, &at("content"))?,
                Some(v) => {
                    return Err(type_error(
                        &at("content"),
                        "a string or an array of text parts",
                        v,
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// The newer content form, `[{"type": "text", "text": ...}, ...]`, joined.
fn text_parts(parts: &[Value], field: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{field}[{j}]");
        let kind = part.get("type").and_then(Value::as_str);
        match (kind, part.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some("text"), other) => {
                return Err(type_error(
                    &format!("{at}.text"),
                    "a string",
                    other.unwrap_or(&Value::Null),
                ))
            }
            (Some(other), _) => {
                return Err(ApiError::param(
                    &at,
                    format!("content parts of type '{other}' are not supported (only 'text')"),
                ))
            }
            (None, _) => return Err(type_error(&at, "an object with a 'type'", part)),
        }
    }
    Ok(text)
}

fn prompt(f: &Fields) -> Result<Input, ApiError> {
    const WANT: &str = "a string, an array of one string, or an array of token ids";
    let one_prompt = || ApiError::param("prompt", "only one prompt per request is supported");
    let tokens = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| type_error("prompt", "token ids (non-negative integers)", v))
            })
            .collect()
    };
    match f.get("prompt") {
        None => Err(ApiError::param("prompt", "'prompt' is required")),
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(items)) => match items.first() {
            None => Err(ApiError::param("prompt", "'prompt' must not be empty")),
            Some(Value::String(s)) if items.len() == 1 => Ok(Input::Text(s.clone())),
            Some(Value::Array(inner)) if items.len() == 1 => Ok(Input::Tokens(tokens(inner)?)),
            Some(Value::String(_) | Value::Array(_)) => Err(one_prompt()),
            Some(Value::Number(_)) => Ok(Input::Tokens(tokens(items)?)),
            Some(v) => Err(type_error("prompt", WANT, v)),
        },
        Some(v) => Err(type_error("prompt", WANT, v)),
    }
}

/// The fields of the body; `null` counts as absent, as in OpenAI's API.
struct Fields(Map<String, Value>);

impl Fields {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn number(&self, key: &str) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
            Some(v) => Err(type_error(key, "a number", v)),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(v) => Err(type_error(key, "a non-negative integer", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_error(key, "a boolean", v)),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(type_error(key, "a string", v)),
        }
    }
}

fn type_error(field: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError {
        code: "invalid_type",
        ..ApiError::param(field, format!("'{field}' must be {expected}, not {got}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(endpoint: Endpoint, v: Value) -> Result<Request, ApiError> {
        parse(endpoint, v.to_string().as_bytes())
    }

    #[test]
    fn chat_defaults_follow_openai() {
        let r = parse_json(
            Endpoint::Chat,
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(r.input, Input::Messages(vec![Message::new("user", "hi")]));
        assert_eq!(r.max_tokens, None);
        assert!(!r.stream);
        assert_eq!(r.sampler.temperature, 1.0);
        assert_eq!(r.sampler.top_p, 1.0);
        assert_eq!(r.sampler.top_k, 0);
        assert_eq!(r.sampler.min_p, 0.0);
    }

    #[test]
    fn prompt_forms() {
        let p = |v: Value| parse_json(Endpoint::Completion, serde_json::json!({"prompt": v}));
        assert_eq!(p("a".into()).unwrap().input, Input::Text("a".into()));
        assert_eq!(
            p(serde_json::json!(["a"])).unwrap().input,
            Input::Text("a".into())
        );
        assert_eq!(
            p(serde_json::json!([1, 2])).unwrap().input,
            Input::Tokens(vec![1, 2])
        );
        assert_eq!(
            p(serde_json::json!([[3]])).unwrap().input,
            Input::Tokens(vec![3])
        );
        assert_eq!(
            p(serde_json::json!(["a", "b"]))
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(p(serde_json::json!([-1])).unwrap_err().code, "invalid_type");
        assert_eq!(p(serde_json::json!([])).unwrap_err().code, "invalid_value");
        assert_eq!(p(serde_json::json!({})).unwrap_err().code, "invalid_type");
        assert_eq!(p("x".into()).unwrap().max_tokens, Some(16));
    }

    #[test]
    fn content_parts_are_joined_and_images_refused() {
        let r = parse_json(
            Endpoint::Chat,
            serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
        )
        .unwrap();
        assert_eq!(r.input, Input::Messages(vec![Message::new("user", "ab")]));
        let e = parse_json(
            Endpoint::Chat,
            serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, param) in [
            (
                serde_json::json!({"prompt": "x", "temperature": "hot"}),
                "temperature",
            ),
            (
                serde_json::json!({"prompt": "x", "max_tokens": 1.5}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "x", "max_tokens": -3}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": "x", "stream": "yes"}),
                "stream",
            ),
            (serde_json::json!({"prompt": "x", "stop": [1]}), "stop"),
            (serde_json::json!({"prompt": "x", "seed": "s"}), "seed"),
            (serde_json::json!({"prompt": "x", "model": 3}), "model"),
        ] {
            let e = parse_json(Endpoint::Completion, body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.code, "invalid_type");
            assert_eq!(e.param.as_deref(), Some(param));
            assert!(e.message.contains(param), "{}", e.message);
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (body, param) in [
            (
                serde_json::json!({"prompt": "x", "temperature": 2.5}),
                "temperature",
            ),
            (serde_json::json!({"prompt": "x", "top_p": 0}), "top_p"),
            (
                serde_json::json!({"prompt": "x", "max_tokens": 0}),
                "max_tokens",
            ),
            (serde_json::json!({"prompt": "x", "n": 2}), "n"),
            (
                serde_json::json!({"prompt": "x", "logprobs": 3}),
                "logprobs",
            ),
        ] {
            let e = parse_json(Endpoint::Completion, body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
    }

    #[test]
    fn null_means_absent_and_stop_takes_both_forms() {
        let r = parse_json(
            Endpoint::Completion,
            serde_json::json!({"prompt": "x", "temperature": null, "stop": "\n", "seed": -1}),
        )
        .unwrap();
        assert_eq!(r.sampler.temperature, 1.0);
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert_eq!(r.sampler.seed, u64::MAX);
        let r = parse_json(
            Endpoint::Completion,
            serde_json::json!({"prompt": "x", "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(r.stop, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let e = parse(Endpoint::Chat, b"{\"messages\": [").unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse(Endpoint::Chat, b"[1, 2]").unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }
}
