//! `nibble serve` over real HTTP on loopback: each test starts a server on an
//! ephemeral port in its own thread and talks to it with reqwest.
//!
//! Outputs are checked against the library itself (greedy `generate` on the
//! same prompt), and the limits (queue, body size, context) by provoking
//! them. Tests that need a generation long enough to still be running when
//! the next request arrives use SmolLM2 (`ignore_eos`, thousands of tokens);
//! every wait is bounded.

mod common;

use common::*;
use nibble::server::{Server, ServerOptions};
use nibble::{
    generate, ChatTemplate, GenerateOptions, Message, Model, Sampler, SamplerOptions, Session,
    SessionOptions,
};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on any one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(model: &Path, options: ServerOptions) -> Self {
        let model = model.to_owned();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let model = Arc::new(Model::open(&model).unwrap());
                let server = Server::bind("127.0.0.1:0", model, options).await.unwrap();
                addr_tx.send(server.local_addr()).unwrap();
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits (bounded) for it to finish.
    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !thread.is_finished() {
                assert!(Instant::now() < deadline, "the server did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
            thread.join().expect("the server thread panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn quiet(options: ServerOptions) -> ServerOptions {
    ServerOptions {
        log_requests: false,
        ..options
    }
}

fn tiny() -> PathBuf {
    tiny_nbl("tiny-mha", "f32")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Runs an async test body on a fresh runtime, bounded by [`TEST_TIMEOUT`].
fn run<F: Future<Output = ()>>(body: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(TEST_TIMEOUT, body)
                .await
                .expect("test timed out")
        });
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Asserts an OpenAI-style error body and returns its `error` object.
fn error_of(body: &Value) -> &Value {
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    assert!(e["code"].is_string(), "{body}");
    e
}

/// Reads `data:` payloads of a server-sent event stream as they arrive.
struct Sse {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl Sse {
    async fn open(url: &str, body: &Value) -> Self {
        let response = client().post(url).json(body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let ct = response.headers()["content-type"].to_str().unwrap();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            response,
            buf: Vec::new(),
        }
    }

    /// The next `data:` payload; `None` at the end of the stream.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("SSE is UTF-8");
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(data.join("\n"));
            }
            match self.response.chunk().await.unwrap() {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => {
                    assert!(
                        self.buf.iter().all(|b| b.is_ascii_whitespace()),
                        "truncated event"
                    );
                    return None;
                }
            }
        }
    }

    async fn all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next().await {
            out.push(d);
        }
        out
    }
}

/// What the library itself generates greedily from `prompt`.
fn direct(model: &Path, prompt: &[u32], max_tokens: usize) -> (String, usize) {
    let model = Model::open(model).unwrap();
    let mut session = Session::new(&model, SessionOptions::default()).unwrap();
    let mut sampler = Sampler::new(SamplerOptions::greedy()).unwrap();
    let opts = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    let mut gen = generate(&mut session, prompt, &mut sampler, opts).unwrap();
    let text: String = gen.by_ref().map(|p| p.unwrap().text).collect();
    (text, gen.generated())
}

const PROMPT: &str = "Once upon a time there was";

#[test]
fn health_and_models() {
    let s = TestServer::start(&tiny(), quiet(ServerOptions::default()));
    run(async {
        let r = client().get(s.url("/health")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));

        let r = client().get(s.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0]["id"], "tiny-mha-f32");
        assert_eq!(data[0]["object"], "model");

        let r = client()
            .get(s.url("/v1/models/tiny-mha-f32"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let r = client()
            .get(s.url("/v1/models/gpt-4"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert_eq!(
            error_of(&r.json().await.unwrap())["code"],
            "model_not_found"
        );
    });
}

#[test]
fn completion_matches_the_library() {
    let path = tiny();
    let model = Model::open(&path).unwrap();
    let prompt = model.tokenizer().encode(PROMPT, true).unwrap();
    let (want_text, want_tokens) = direct(&path, &prompt, 24);
    let s = TestServer::start(&path, quiet(ServerOptions::default()));
    run(async {
        let body = json!({"model": "x", "prompt": PROMPT, "max_tokens": 24, "temperature": 0});
        let (status, v) = post(&s.url("/v1/completions"), &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(v["model"], "tiny-mha-f32");
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["text"], want_text.as_str());
        let finish = if want_tokens == 24 { "length" } else { "stop" };
        assert_eq!(choice["finish_reason"], finish);
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"], prompt.len());
        assert_eq!(u["completion_tokens"], want_tokens);
        assert_eq!(u["total_tokens"], prompt.len() + want_tokens);

        // Token ids are taken as they are: the same ids, the same text.
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
        let (status, v) = post(&s.url("/v1/completions"), &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], want_text.as_str());
    });
}

#[test]
fn streamed_completion_equals_the_whole_one() {
    let s = TestServer::start(&tiny(), quiet(ServerOptions::default()));
    run(async {
        let body = json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0});
        let (status, whole) = post(&s.url("/v1/completions"), &body).await;
        assert_eq!(status, 200, "{whole}");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let events = Sse::open(&s.url("/v1/completions"), &streamed)
            .await
            .all()
            .await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let mut text = String::new();
        let mut finish = None;
        for c in &chunks {
            assert_eq!(c["object"], "text_completion");
            if let Some(choice) = c["choices"].as_array().unwrap().first() {
                assert!(finish.is_none(), "text after the finish reason");
                text.push_str(choice["text"].as_str().unwrap());
                if !choice["finish_reason"].is_null() {
                    finish = Some(choice["finish_reason"].clone());
                }
            }
        }
        assert!(chunks.len() > 3, "one chunk per piece of text");
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
        assert_eq!(finish.unwrap(), whole["choices"][0]["finish_reason"]);
        // The usage chunk comes last, with no choices.
        let usage = chunks.last().unwrap();
        assert!(usage["choices"].as_array().unwrap().is_empty());
        assert_eq!(usage["usage"], whole["usage"]);
    });
}

#[test]
fn stop_strings_and_seeds() {
    let s = TestServer::start(&tiny(), quiet(ServerOptions::default()));
    run(async {
        let url = s.url("/v1/completions");
        let body = json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 0});
        let (_, whole) = post(&url, &body).await;
        let text = whole["choices"][0]["text"].as_str().unwrap().to_owned();
        // Stop at a piece of the greedy continuation: the text ends before it.
        let chars: Vec<char> = text.chars().collect();
        assert!(chars.len() >= 8, "continuation too short to test: {text:?}");
        let stop: String = chars[5..8].iter().collect();
        let expected = &text[..text.find(&stop).unwrap()];
        for stop_field in [json!(stop), json!(["never-appears", stop])] {
            let mut b = body.clone();
            b["stop"] = stop_field;
            let (status, v) = post(&url, &b).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["text"], expected);
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }

        // Sampling with a seed is repeatable.
        let sampled = json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": 7});
        let (_, a) = post(&url, &sampled).await;
        let (_, b) = post(&url, &sampled).await;
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    });
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = TestServer::start(&tiny(), quiet(ServerOptions::default()));
    run(async {
        let url = s.url("/v1/completions");
        let c = client();

        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body("{\"prompt\": \"hi\", ")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_of(&v)["code"], "invalid_json");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let (status, v) = post(&url, &json!({"prompt": "hi", "temperature": "hot"})).await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&v)["code"], "invalid_type");
        assert_eq!(v["error"]["param"], "temperature");

        let (status, v) = post(&url, &json!({"prompt": "hi", "max_tokens": "many"})).await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&v)["param"], "max_tokens");

        let (status, v) = post(&url, &json!({"max_tokens": 3})).await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&v)["param"], "prompt");

        let (status, v) = post(&url, &json!({"prompt": [100000]})).await;
        assert_eq!(status, 400, "token id out of vocabulary");
        assert_eq!(error_of(&v)["param"], "prompt");

        // The tiny model has no chat template.
        let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
        let (status, v) = post(&s.url("/v1/chat/completions"), &chat).await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&v)["code"], "no_chat_template");

        let r = c.get(s.url("/v1/nothing")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert_eq!(error_of(&r.json().await.unwrap())["code"], "not_found");

        let r = c.get(s.url("/v1/chat/completions")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 405);
        assert_eq!(
            error_of(&r.json().await.unwrap())["code"],
            "method_not_allowed"
        );

        // The server is still fine.
        let (status, _) = post(&url, &json!({"prompt": "hi", "max_tokens": 2})).await;
        assert_eq!(status, 200);
    });
}

#[test]
fn oversized_body_is_413() {
    let limit = ServerOptions::default().max_body_bytes;
    let s = TestServer::start(&tiny(), quiet(ServerOptions::default()));
    run(async {
        let url = s.url("/v1/completions");
        let big = json!({"prompt": "a".repeat(limit), "max_tokens": 1});
        let r = client().post(&url).json(&big).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 413);
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_of(&v)["code"], "body_too_large");
        // Just under the limit is read (and then refused for its length).
        let ctx_only = json!({"prompt": "a b ".repeat(limit / 8), "max_tokens": 1});
        let (status, v) = post(&url, &ctx_only).await;
        assert_eq!(status, 400, "{v}");
    });
}

#[test]
fn prompt_longer_than_the_context_is_400() {
    let s = TestServer::start(
        &tiny(),
        quiet(ServerOptions {
            ctx: Some(32),
            ..ServerOptions::default()
        }),
    );
    run(async {
        let url = s.url("/v1/completions");
        let long = "the cat sat on the mat ".repeat(20);
        let (status, v) = post(&url, &json!({"prompt": long, "max_tokens": 4})).await;
        assert_eq!(status, 400);
        let e = error_of(&v);
        assert_eq!(e["code"], "context_length_exceeded");
        assert!(e["message"].as_str().unwrap().contains("context"), "{v}");
        // A prompt that fits but whose continuation does not ends at the
        // context: "length". Greedy, because a sampled continuation of the
        // tiny model may reach EOS first ("stop"), as one full run showed.
        let body = json!({"prompt": PROMPT, "max_tokens": 100, "temperature": 0});
        let (status, v) = post(&url, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let u = &v["usage"];
        assert!(u["total_tokens"].as_u64().unwrap() <= 33, "{u}");
    });
}

fn smollm2() -> PathBuf {
    smollm2_nbl("q4")
}

#[test]
fn chat_matches_the_library_on_smollm2() {
    if !have_shared() {
        return;
    }
    let path = smollm2();
    let messages = [
        Message::new("system", "You are a concise assistant."),
        Message::new("user", "What is the capital of France?"),
    ];
    let model = Model::open(&path).unwrap();
    let rendered = ChatTemplate::from_model(&model)
        .unwrap()
        .render(&messages, true)
        .unwrap();
    let prompt = model.tokenizer().encode(&rendered, false).unwrap();
    let (want_text, want_tokens) = direct(&path, &prompt, 40);
    assert!(want_text.contains("Paris"), "{want_text}");
    let s = TestServer::start(&path, quiet(ServerOptions::default()));
    run(async {
        let url = s.url("/v1/chat/completions");
        let body = json!({
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
            ],
            "max_tokens": 40,
            "temperature": 0,
        });
        let (status, v) = post(&url, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], want_text.as_str());
        let finish = if want_tokens == 40 { "length" } else { "stop" };
        assert_eq!(choice["finish_reason"], finish);
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(v["usage"]["completion_tokens"], want_tokens);

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = Sse::open(&url, &streamed).await.all().await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let mut text = String::new();
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], chunks[0]["id"]);
            text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
        assert_eq!(text, want_text);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], finish);
        assert_eq!(last["choices"][0]["delta"], json!({}));
    });
}

/// A streamed generation that runs for a long time unless stopped.
fn endless() -> Value {
    json!({"prompt": "Write a very long story.", "max_tokens": 3500, "ignore_eos": true,
           "temperature": 0, "stream": true})
}

fn long_ctx(max_queue: usize) -> ServerOptions {
    quiet(ServerOptions {
        ctx: Some(4096),
        max_queue,
        ..ServerOptions::default()
    })
}

#[test]
fn full_queue_is_503_and_a_disconnect_frees_the_slot() {
    if !have_shared() {
        return;
    }
    let s = TestServer::start(&smollm2(), long_ctx(0));
    run(async {
        let url = s.url("/v1/completions");
        let short = json!({"prompt": "Hello", "max_tokens": 2});
        let mut running = Sse::open(&url, &endless()).await;
        running.next().await.expect("a first chunk");

        let (status, v) = post(&url, &short).await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(error_of(&v)["code"], "server_overloaded");

        // The client goes away; the worker notices after its current token.
        drop(running);
        wait_until_accepted(&url, &short).await;
    });
}

/// Posts `body` until the server takes it (200), failing if it is still
/// refused with 503 after 20 s: the busy slot was never freed.
async fn wait_until_accepted(url: &str, body: &Value) {
    let left = Instant::now();
    loop {
        let (status, v) = post(url, body).await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{v}");
        assert!(
            left.elapsed() < Duration::from_secs(20),
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_non_streaming_client_that_leaves_frees_the_slot() {
    if !have_shared() {
        return;
    }
    let s = TestServer::start(&smollm2(), long_ctx(0));
    run(async {
        let url = s.url("/v1/completions");
        let mut long = endless();
        long["stream"] = json!(false);
        // The client gives up long before the 3500 tokens are done.
        let gave_up = client()
            .post(&url)
            .json(&long)
            .timeout(Duration::from_millis(1500))
            .send()
            .await;
        assert!(gave_up.unwrap_err().is_timeout());
        let short = json!({"prompt": "Hello", "max_tokens": 2});
        wait_until_accepted(&url, &short).await;
    });
}

#[test]
fn queued_requests_wait_and_overflow_is_refused() {
    if !have_shared() {
        return;
    }
    let s = TestServer::start(&smollm2(), long_ctx(1));
    run(async {
        let url = s.url("/v1/completions");
        let mut running = Sse::open(&url, &endless()).await;
        running.next().await.expect("a first chunk");

        // One of two more requests waits in the queue, the other is refused.
        let short = json!({"prompt": "Hello", "max_tokens": 2});
        let b = Box::pin(post(&url, &short));
        let c = Box::pin(post(&url, &short));
        let (first, rest) = futures_util::future::select(b, c).await.factor_first();
        assert_eq!(first.0, 503, "{}", first.1);
        assert_eq!(error_of(&first.1)["code"], "server_overloaded");

        let left = Instant::now();
        drop(running);
        let (status, v) = rest.await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert!(left.elapsed() < Duration::from_secs(20));
    });
}

#[test]
fn shutdown_ends_open_streams() {
    if !have_shared() {
        return;
    }
    let mut s = TestServer::start(&smollm2(), long_ctx(4));
    let url = s.url("/v1/completions");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        run(async {
            let mut stream = Sse::open(&url, &endless()).await;
            stream.next().await.expect("a first chunk");
            tx.send(()).unwrap();
            let mut last = None;
            while let Some(d) = stream.next().await {
                last = Some(d);
            }
            let last: Value = serde_json::from_str(&last.expect("an error event")).unwrap();
            assert_eq!(error_of(&last)["code"], "shutting_down");
        })
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the stream started");
    let stopping = Instant::now();
    s.shutdown();
    assert!(stopping.elapsed() < Duration::from_secs(20));
    reader.join().expect("the stream ended with an error event");
}
