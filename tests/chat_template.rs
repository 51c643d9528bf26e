//! Chat templates render byte for byte as transformers' `apply_chat_template`:
//! goldens rendered by jinja2 with transformers' settings
//! (`tests/fixtures/chat/make_goldens.py`) for LLaMA-2-chat's `[INST] <<SYS>>`
//! template and SmolLM2's ChatML.

mod common;

use common::*;
use nibble::{ChatTemplate, Message};

fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    let source = std::fs::read_to_string(fixtures().join("chat").join(name)).unwrap();
    ChatTemplate::new(&source, bos, eos).unwrap()
}

#[test]
fn templates_render_like_jinja2() {
    let goldens = read_json(&fixtures().join("chat/goldens.json"));
    let cases = goldens.as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let t = template(
            c["template"].as_str().unwrap(),
            c["bos_token"].as_str().unwrap(),
            c["eos_token"].as_str().unwrap(),
        );
        let got = t
            .render(
                &messages(&c["messages"]),
                c["add_generation_prompt"].as_bool().unwrap(),
            )
            .unwrap();
        assert_eq!(
            got,
            c["expected"].as_str().unwrap(),
            "{} / {}",
            c["template"],
            c["case"]
        );
    }
}

#[test]
fn llama2_chat_known_output() {
    // The format Meta documents for LLaMA-2-chat, written out by hand.
    let t = template("llama2-chat.jinja", "<s>", "</s>");
    let sys_hi = [Message::new("system", "sys"), Message::new("user", "hi")];
    assert_eq!(
        t.render(&sys_hi, true).unwrap(),
        "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]"
    );
    let turns = [
        Message::new("user", "hi"),
        Message::new("assistant", "hello"),
        Message::new("user", "bye"),
    ];
    assert_eq!(
        t.render(&turns, true).unwrap(),
        "<s>[INST] hi [/INST] hello </s><s>[INST] bye [/INST]"
    );
}

#[test]
fn llama2_chat_rejects_non_alternating_roles() {
    let t = template("llama2-chat.jinja", "<s>", "</s>");
    let bad = [Message::new("user", "a"), Message::new("user", "b")];
    let err = t.render(&bad, true).unwrap_err().to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
    assert!(!err.contains('\n'), "one-line error: {err}");
}

#[test]
fn a_broken_template_is_a_clean_error() {
    let err = ChatTemplate::new("{% for %}", "", "")
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("chat template:"), "{err}");
}
