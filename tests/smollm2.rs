//! SmolLM2-135M-Instruct (a real model) against transformers' goldens:
//! tokenizer, chat template, greedy continuations, quantized agreement and
//! llama.cpp-style perplexity.

mod common;

use common::*;
use nibble::perplexity::{log_softmax_at, perplexity};
use nibble::{
    generate, ChatTemplate, GenerateOptions, KvType, Message, Model, Sampler, SamplerOptions,
    Session, SessionOptions,
};
use std::sync::OnceLock;

fn prompts() -> &'static serde_json::Value {
    static P: OnceLock<serde_json::Value> = OnceLock::new();
    P.get_or_init(|| read_json(&fixtures().join("smollm2/prompts.json")))
}

fn model(quant: &str) -> Model {
    Model::open(smollm2_nbl(quant)).unwrap()
}

#[test]
fn tokenizer_cases_match() {
    if !have_shared() {
        return;
    }
    let m = model("q4");
    let tok = m.tokenizer();
    let cases = read_json(&fixtures().join("smollm2/tokenizer_cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "encode {text:?}");
        assert_eq!(
            tok.decode(&want).unwrap(),
            c["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
    }
    assert!(!tok.adds_bos(), "SmolLM2 adds no BOS");
    for p in prompts()["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&p["ids"]),
            "{}",
            p["name"]
        );
    }
}

#[test]
fn chat_prompt_renders_like_transformers() {
    if !have_shared() {
        return;
    }
    let m = model("q4");
    let chat = &prompts()["prompts"].as_array().unwrap()[1];
    assert_eq!(chat["name"], "chat");
    let t = ChatTemplate::from_model(&m).unwrap();
    let text = t
        .render(
            &[Message::new(
                "user",
                "Give me three tips for staying healthy.",
            )],
            true,
        )
        .unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    assert_eq!(
        m.tokenizer().encode(&text, false).unwrap(),
        ids(&chat["ids"])
    );
}

/// Greedy continuations match token for token up to the first step whose
/// golden top-1/top-2 margin is below 0.02 (there numerical noise may flip it).
#[test]
fn f32_greedy_continuations_match() {
    if !have_shared() {
        return;
    }
    let m = model("f32");
    for p in prompts()["prompts"].as_array().unwrap() {
        let g = &p["greedy"];
        let golden = ids(&g["new_ids"]);
        let margins = g["top1_minus_top2"].as_array().unwrap();
        let n = margins
            .iter()
            .position(|x| x.as_f64().unwrap() < 0.02)
            .unwrap_or(golden.len());
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        let mut sampler = Sampler::new(SamplerOptions::greedy()).unwrap();
        let opts = GenerateOptions {
            max_tokens: n,
            stop: vec![],
            stop_at_eos: false,
            cancel: None,
        };
        let ours: Vec<u32> = generate(&mut s, &ids(&p["ids"]), &mut sampler, opts)
            .unwrap()
            .filter_map(|x| x.unwrap().token)
            .collect();
        assert_eq!(ours, golden[..n], "{}", p["name"]);
    }
}

/// Stopping at EOS gives the golden up to and including the EOS, and the text
/// without it.
#[test]
fn generation_stops_at_eos() {
    if !have_shared() {
        return;
    }
    let m = model("f32");
    let p = &prompts()["prompts"].as_array().unwrap()[0];
    let g = &p["greedy"];
    let eos_at = g["first_eos_index"].as_u64().unwrap() as usize;
    let mut s = Session::new(&m, SessionOptions::default()).unwrap();
    let mut sampler = Sampler::new(SamplerOptions::greedy()).unwrap();
    let (mut tokens, mut text) = (vec![], String::new());
    for piece in generate(
        &mut s,
        &ids(&p["ids"]),
        &mut sampler,
        GenerateOptions::default(),
    )
    .unwrap()
    {
        let piece = piece.unwrap();
        tokens.extend(piece.token);
        text.push_str(&piece.text);
    }
    assert_eq!(tokens, ids(&g["new_ids"])[..=eos_at]);
    let want = g["text_until_eos"].as_str().unwrap();
    assert_eq!(text, want.strip_suffix("<|im_end|>").unwrap());
}

/// Top-1 agreement with the golden greedy choices, teacher-forced: every
/// prompt plus its golden continuation is fed as one batch.
fn teacher_forced_agreement(quant: &str) -> (usize, usize) {
    let m = model(quant);
    let vocab = m.config().vocab_size;
    let (mut agree, mut total) = (0, 0);
    for p in prompts()["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        let golden = ids(&p["greedy"]["new_ids"]);
        let mut input = prompt.clone();
        input.extend_from_slice(&golden[..golden.len() - 1]);
        let mut s = Session::new(&m, SessionOptions::default()).unwrap();
        let logits = s.forward_from(&input, prompt.len() - 1).unwrap();
        for (row, &want) in logits.chunks(vocab).zip(&golden) {
            agree += (argmax(row) == want as usize) as usize;
            total += 1;
        }
    }
    eprintln!("{quant}: teacher-forced top-1 agreement {agree}/{total}");
    (agree, total)
}

// Bounds just under the measured values (q8 233/240 = 97.1%, q4 183/240 =
// 76%). The golden continuations include near-ties (margins down to 0.016),
// where any rounding may pick the other token: q8's seven misses all have
// golden margins of 0.016-0.17 and q8 logit gaps of 0.02-0.06. With 8-bit
// activations q8 scored 237/240 here although its KL divergence from f32 over
// the whole evaluation text is worse (benches/RESULTS.md): on so few
// near-ties, which ones flip is chance.
#[test]
fn q8_top1_agreement_bound() {
    if !have_shared() {
        return;
    }
    let (agree, total) = teacher_forced_agreement("q8");
    assert!(agree as f64 >= 0.97 * total as f64, "{agree}/{total}");
}

#[test]
fn q4_top1_agreement_bound() {
    if !have_shared() {
        return;
    }
    let (agree, total) = teacher_forced_agreement("q4");
    assert!(agree as f64 >= Q4_BOUND * total as f64, "{agree}/{total}");
}

const Q4_BOUND: f64 = 0.72;

#[test]
fn q4k_top1_agreement_bound() {
    if !have_shared() {
        return;
    }
    let (agree, total) = teacher_forced_agreement("q4k");
    assert!(agree as f64 >= Q4K_BOUND * total as f64, "{agree}/{total}");
}

// Measured 231/240 (96.3%) on 2026-12-05, with `v_proj` at q8 after the
// first quarter of the layers.
const Q4K_BOUND: f64 = 0.95;

/// The size of llama.cpp's Q4_0 of this model (`llama-quantize` of its F16
/// GGUF, build 11312; `benches/RESULTS.md`): issue 5 asks for q4 in a file no
/// larger, so the default policy (embedded tokenizer and the bits `v_proj`
/// gets included) must keep q4k under it.
const LLAMA_CPP_Q4_0_BYTES: u64 = 91_726_912;

#[test]
fn q4k_file_is_no_larger_than_llama_cpp_q4_0() {
    if !have_shared() {
        return;
    }
    let len = std::fs::metadata(smollm2_nbl("q4k")).unwrap().len();
    eprintln!("q4k file {len} bytes, llama.cpp Q4_0 {LLAMA_CPP_Q4_0_BYTES}");
    assert!(len <= LLAMA_CPP_Q4_0_BYTES, "{len} bytes");
}

/// The second-half NLL of the first two 512-token windows of the evaluation
/// text, against the per-window values in perplexity.json (fast check of
/// long-context attention; the full run is below).
#[test]
fn first_windows_nll_match_reference() {
    if !have_shared() {
        return;
    }
    let m = model("f32");
    let text = std::fs::read_to_string(fixtures().join("eval-text.txt")).unwrap();
    let tokens = m.tokenizer().encode(&text, true).unwrap();
    let reference = read_json(&fixtures().join("smollm2/perplexity.json"));
    assert_eq!(tokens.len() as u64, reference["n_tokens"].as_u64().unwrap());
    let vocab = m.config().vocab_size;
    let mut s = Session::new(
        &m,
        SessionOptions {
            ctx: Some(512),
            kv_type: KvType::F16,
            ..SessionOptions::default()
        },
    )
    .unwrap();
    for w in 0..2 {
        let window = &tokens[w * 512..(w + 1) * 512];
        s.reset();
        let logits = s.forward_from(window, 256).unwrap();
        let nll: f64 = logits
            .chunks(vocab)
            .zip(&window[257..])
            .map(|(row, &t)| -log_softmax_at(row, t as usize))
            .sum();
        let want = reference["windows"][w]["second_half_nll_sum"]
            .as_f64()
            .unwrap();
        assert!(
            (nll - want).abs() / want < 2e-4,
            "window {w}: {nll} vs {want}"
        );
    }
}

/// The acceptance check: all 66 windows, within 0.05% of the reference.
/// About 2-5 minutes of CPU, so it runs in optimized builds without debug
/// assertions only (`cargo test --release`, as CI does).
#[test]
#[cfg_attr(debug_assertions, ignore = "slow: runs under cargo test --release")]
fn perplexity_matches_llama_cpp_style_reference() {
    if !have_shared() {
        return;
    }
    let m = model("f32");
    let text = std::fs::read_to_string(fixtures().join("eval-text.txt")).unwrap();
    let r = perplexity(&m, &text, 512, |_, _, _| {}).unwrap();
    let reference = read_json(&fixtures().join("smollm2/perplexity.json"));
    let v = &reference["variants"]["llama_cpp_style"];
    assert_eq!(r.chunks as u64, v["n_windows"].as_u64().unwrap());
    assert_eq!(r.tokens_scored as u64, v["n_scored"].as_u64().unwrap());
    let want = v["perplexity"].as_f64().unwrap();
    assert!(
        (r.perplexity - want).abs() / want < 5e-4,
        "perplexity {} vs {want}",
        r.perplexity
    );
}

/// Streaming detokenization never emits half a character and adds up to the
/// full decode, on multi-byte text (accents, CJK, emoji split across tokens).
#[test]
fn streaming_decoder_never_splits_characters() {
    if !have_shared() {
        return;
    }
    let m = model("q4");
    let tok = m.tokenizer();
    let cases = read_json(&fixtures().join("smollm2/tokenizer_cases.json"));
    let mut multi_token_chars = 0;
    for c in cases["cases"].as_array().unwrap() {
        let want = ids(&c["ids"]);
        let mut dec = tok.stream_decoder(&[]);
        let mut text = String::new();
        for &id in &want {
            let piece = dec.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
            multi_token_chars += piece.is_empty() as usize;
            text.push_str(&piece);
        }
        text.push_str(&dec.flush().unwrap());
        assert_eq!(text, tok.decode(&want).unwrap());
    }
    assert!(
        multi_token_chars > 0,
        "the cases split characters across tokens"
    );
}
