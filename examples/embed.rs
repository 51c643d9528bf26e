//! Embedding nibble in another program: open a model, tokenize a prompt,
//! stream a greedy continuation, then ask a chat question.
//!
//! `cargo run --release --example embed -- model.nbl "The capital of France is"`

use nibble::{
    generate, Conversation, GenerateOptions, Model, Sampler, SamplerOptions, Session,
    SessionOptions,
};
use std::io::Write;

fn main() -> Result<(), nibble::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(path), prompt) = (args.next(), args.next()) else {
        eprintln!("usage: embed MODEL.nbl [PROMPT]");
        std::process::exit(2);
    };
    let prompt = prompt.unwrap_or_else(|| "The capital of France is".into());

    let model = Model::open(&path)?;
    let ids = model.tokenizer().encode(&prompt, true)?;
    println!("{} prompt tokens: {ids:?}", ids.len());

    let mut session = Session::new(&model, SessionOptions::default())?;
    let mut sampler = Sampler::new(SamplerOptions::greedy())?;
    let opts = GenerateOptions {
        max_tokens: 32,
        ..GenerateOptions::default()
    };
    print!("{prompt}");
    for piece in generate(&mut session, &ids, &mut sampler, opts)? {
        print!("{}", piece?.text);
        std::io::stdout().flush().ok();
    }
    println!();

    // Multi-turn chat keeps earlier turns in the KV cache.
    if model.chat_template().is_some() {
        let mut chat = Conversation::new(&model, None, SessionOptions::default())?;
        for question in ["What is the capital of France?", "And of Italy?"] {
            let new_tokens = chat.user_turn(question)?;
            let mut reply = String::new();
            for piece in generate(
                chat.session(),
                &new_tokens,
                &mut sampler,
                GenerateOptions::default(),
            )? {
                reply.push_str(&piece?.text);
            }
            println!("> {question}\n{reply}");
            chat.add_reply(&reply);
        }
    }
    Ok(())
}
