//! Feeds arbitrary bytes to the server's request-body parser: the first
//! byte picks the endpoint (odd: `/v1/chat/completions`, even:
//! `/v1/completions`), the rest is the body. Every input must become either
//! a request or an OpenAI-style error; any panic, overflow or out-of-bounds
//! access is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let _ = nibble::server::fuzz_parse_request(first & 1 == 1, body);
});
