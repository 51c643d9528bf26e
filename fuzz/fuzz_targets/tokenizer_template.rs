//! Feeds arbitrary bytes to the tokenizer and chat-template construction a
//! model file's metadata drives: the input is a `tokenizer.json`, a NUL
//! byte, a chat template, a NUL byte, then a text. The tokenizer is built
//! from metadata (`Tokenizer::from_metadata`, BOS 1 and EOS 2 as the
//! converter records them) and encodes, decodes and stream-decodes the text;
//! the template is compiled with the tokenizer's BOS/EOS strings and renders
//! a small conversation containing the text. Errors are fine; any panic,
//! overflow or out-of-bounds access is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble::format::{keys, Metadata, Value};
use nibble::{ChatTemplate, Message, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let json = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let template = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();

    let mut meta = Metadata::new();
    meta.set(keys::TOKENIZER_JSON, Value::PackedStr(json));
    meta.set(keys::BOS_TOKEN_ID, Value::U32(1));
    meta.set(keys::EOS_TOKEN_IDS, Value::U32Array(vec![2]));
    let (bos, eos) = match Tokenizer::from_metadata(&meta) {
        Ok(tok) => {
            let _ = tok.vocab_size();
            if let Ok(ids) = tok.encode(&text, true) {
                let _ = tok.decode(&ids);
                let mut stream = tok.stream_decoder(&ids[..ids.len().min(1)]);
                for &id in ids.iter().skip(1).take(256) {
                    let _ = stream.push(id);
                    let _ = tok.id_to_token(id);
                }
                let _ = stream.flush();
            }
            let _ = tok.token_to_id(&text);
            (tok.bos_token().to_owned(), tok.eos_token().to_owned())
        }
        Err(_) => ("<s>".to_owned(), "</s>".to_owned()),
    };

    if let Ok(t) = ChatTemplate::new(&template, &bos, &eos) {
        let messages = [
            Message::new("system", "You are terse."),
            Message::new("user", text.as_str()),
            Message::new("assistant", "Yes."),
            Message::new("user", "And?"),
        ];
        let _ = t.render(&messages, true);
        let _ = t.render(&messages[1..2], false);
    }
});
