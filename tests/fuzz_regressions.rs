//! Inputs the fuzz targets (`fuzz/`) found, replayed in the normal suite.

use nibble::format::{keys, Metadata, Value};
use nibble::Tokenizer;
use std::path::Path;

fn tokenizer_of(json: &str) -> nibble::Result<Tokenizer> {
    let mut meta = Metadata::new();
    meta.set(keys::TOKENIZER_JSON, Value::PackedStr(json.to_owned()));
    meta.set(keys::BOS_TOKEN_ID, Value::U32(1));
    meta.set(keys::EOS_TOKEN_IDS, Value::U32Array(vec![2]));
    Tokenizer::from_metadata(&meta)
}

/// `tokenizers` 0.23 panicked (`expect("Helper")`, decoders/mod.rs:90) on
/// malformed JSON inside the "decoder" value; a model file carrying such a
/// tokenizer.json must be an error, not a crash. Minimal form, then the
/// fuzzer's input (tokenizer_template, 2026-12-08: the tiny tokenizer with
/// the vocabulary spliced into the decoder's "content" string).
#[test]
fn malformed_decoder_json_is_an_error_not_a_panic() {
    let e = tokenizer_of(r#"{"decoder": {"type": "Fuse" "x"}}"#)
        .err()
        .expect("malformed JSON must be rejected");
    assert!(e.to_string().contains("not valid JSON"), "{e}");

    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/tokenizer_template-crash-54420a1d");
    let input = std::fs::read(&path).unwrap();
    let json = input.split(|&b| b == 0).next().unwrap();
    let e = tokenizer_of(&String::from_utf8_lossy(json))
        .err()
        .expect("malformed JSON must be rejected");
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

/// `tokenizers` 0.23 read a `TemplateProcessing` post-processor naming a
/// special token missing from its `special_tokens` without complaint, then
/// panicked on the first encode ("no entry found for key",
/// processors/template.rs:563). Minimal form (`Tokenizer::from_metadata`
/// encodes "" to learn whether BOS is added), then the fuzzer's input
/// (tokenizer_template, 2026-12-08: the tiny tokenizer with one byte of
/// `<s>` in the single template mutated).
#[test]
fn post_processor_with_an_undefined_special_token_is_an_error_not_a_panic() {
    let json = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2},
                  "unk_token": "<unk>"}}"#;
    let e = tokenizer_of(json)
        .err()
        .expect("an undefined special token must be rejected");
    assert!(e.to_string().contains("'<x>'"), "{e}");

    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/tokenizer_template-crash-d68df243");
    let input = std::fs::read(&path).unwrap();
    let json = input.split(|&b| b == 0).next().unwrap();
    let e = tokenizer_of(&String::from_utf8_lossy(json))
        .err()
        .expect("an undefined special token must be rejected");
    assert!(
        e.to_string().contains("special_tokens do not define"),
        "{e}"
    );
}
