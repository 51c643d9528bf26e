//! The HTTP routes and the OpenAI response shapes.

use super::error::ApiError;
use super::request::{self, Endpoint, Input};
use super::worker::{Event, Job, Queue};
use crate::chat::{is_budget_error, ChatTemplate};
use crate::generate::{GenerateOptions, StopReason};
use crate::model::Model;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What every handler shares.
pub(crate) struct AppState {
    pub model: Arc<Model>,
    /// The name clients use for the model (the file stem).
    pub model_id: String,
    /// The compiled chat template, or the answer to chat requests when
    /// there is none or it cannot be used.
    pub template: Result<Arc<ChatTemplate>, ApiError>,
    /// The session's context length in tokens.
    pub ctx: usize,
    pub queue: Queue,
    /// The largest body accepted, in bytes.
    pub body_cap: usize,
    /// One tokenization at a time: they are short next to a generation, and
    /// on one thread at a time the allocator reuses one arena instead of
    /// keeping a megabyte-sized one per blocking thread.
    pub tokenizing: tokio::sync::Semaphore,
    pub body_timeout: Duration,
    /// When the server started, reported as the model's `created`.
    pub started: u64,
}

pub(crate) fn router(state: Arc<AppState>, log_requests: bool) -> Router {
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    if log_requests {
        router.layer(middleware::from_fn(log_request))
    } else {
        router
    }
}

/// One line per request on stderr. For a stream the time is until the
/// response started, not until it ended.
async fn log_request(request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".into());
    let mut line = LogLine {
        what: format!("{peer} {} {}", request.method(), request.uri().path()),
        started: Instant::now(),
        status: None,
    };
    let response = next.run(request).await;
    line.status = Some(response.status().as_u16());
    response
}

/// Printed when dropped, so that a request whose client left before the
/// answer (and whose handler was therefore cancelled) is logged too.
struct LogLine {
    what: String,
    started: Instant,
    status: Option<u16>,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        match self.status {
            Some(status) => eprintln!("{} {status} {ms:.1} ms", self.what),
            None => eprintln!("{} - client left after {ms:.1} ms", self.what),
        }
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

fn model_object(s: &AppState) -> Value {
    json!({
        "id": s.model_id,
        "object": "model",
        "created": s.started,
        "owned_by": "nibble",
    })
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&s)]}))
}

async fn model_by_id(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == s.model_id {
        Json(model_object(&s)).into_response()
    } else {
        ApiError {
            code: "model_not_found",
            ..ApiError::invalid(
                "model_not_found",
                format!("the model '{id}' does not exist"),
            )
        }
        .with_status(StatusCode::NOT_FOUND)
        .into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid("not_found", format!("no route for {method} {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid(
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn chat_completions(State(s): State<Arc<AppState>>, request: Request) -> Response {
    complete(s, Endpoint::Chat, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, request: Request) -> Response {
    complete(s, Endpoint::Completion, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A completion request, in the order that keeps hostile ones cheap: a
/// declared body over the cap is refused before anything else, then the
/// request takes its place in the queue (or gets 503), and only then is its
/// body read (within the body timeout and the cap), parsed and tokenized.
async fn complete(
    s: Arc<AppState>,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let admitted = match declared_length(&parts.headers) {
        Ok(Some(n)) if n > s.body_cap as u64 => Err(too_large(s.body_cap)),
        Ok(_) => s.queue.admit(),
        Err(e) => Err(e),
    };
    let slot = match admitted {
        Ok(slot) => slot,
        Err(e) => {
            linger(body.into_data_stream());
            return Err(e);
        }
    };
    let body = read_body(body, s.body_cap, s.body_timeout).await?;
    let req = request::parse(endpoint, &body)?;
    drop(body);
    let prompt = tokenize(&s, endpoint, req.input).await?;
    let reply = Reply::new(endpoint, &s.model_id, req.include_usage, prompt.len());
    let (tx, rx) = unbounded_channel();
    s.queue.submit(Job {
        _slot: slot,
        prompt,
        sampler: req.sampler,
        options: GenerateOptions {
            // Generation also ends when the context is full.
            max_tokens: req.max_tokens.unwrap_or(s.ctx),
            stop: req.stop,
            stop_at_eos: !req.ignore_eos,
            cancel: None,
        },
        events: tx,
    })?;
    if req.stream {
        Ok(reply.stream(rx))
    } else {
        reply.collect(rx).await
    }
}

/// The request's `Content-Length`, if it has one.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid("invalid_body", "the Content-Length is not a number")),
    }
}

fn too_large(cap: usize) -> ApiError {
    ApiError::invalid(
        "body_too_large",
        format!(
            "the request body is larger than the limit of {cap} bytes (the prompt cannot be \
             longer than the context)"
        ),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// How long, and for how many bytes, the unread rest of a refused body is
/// read and thrown away. A client still sending when the refusal comes
/// would otherwise see the connection reset instead of reading it.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Reads and drops (a bounded part of) the rest of a body the answer does
/// not need, on a task of its own so that the answer goes out at once.
fn linger(mut data: axum::body::BodyDataStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER, async {
            let mut seen = 0;
            while let Some(Ok(chunk)) = data.next().await {
                seen += chunk.len();
                if seen > LINGER_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

/// Reads the body, refusing it once it passes `cap` bytes (413) or when it
/// has not all arrived within `timeout` (408).
async fn read_body(body: Body, cap: usize, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let read = async {
        let mut data = body.into_data_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid("invalid_body", format!("cannot read the request body: {e}"))
            })?;
            if buf.len() + chunk.len() > cap {
                linger(data);
                return Err(too_large(cap));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::invalid(
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )
        .with_status(StatusCode::REQUEST_TIMEOUT)
    })?
}

/// The answer to a chat request when the model's template ran past its
/// budget: the template is the operator's, so it is a server error.
pub(crate) fn template_budget_error(e: &crate::Error) -> ApiError {
    ApiError {
        code: "chat_template_budget_exceeded",
        ..ApiError::internal(format!(
            "the model's chat template exceeded its budget ({e}); the server's operator \
             must fix the template in the model file"
        ))
    }
}

/// Turns the request's input into prompt tokens: renders a conversation with
/// the chat template (contents stay text, see
/// [`ChatTemplate::encode_untrusted`]), tokenizes text, checks token ids.
/// Runs on tokio's blocking pool since a long prompt takes a while to
/// tokenize; only admitted requests get here.
async fn tokenize(
    s: &Arc<AppState>,
    endpoint: Endpoint,
    input: Input,
) -> Result<Vec<u32>, ApiError> {
    let state = s.clone();
    let _one_at_a_time = s
        .tokenizing
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the tokenizer is closed (a bug in nibble)"))?;
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        let tok = state.model.tokenizer();
        let internal = |e: crate::Error| ApiError::internal(e.to_string());
        match input {
            Input::Messages(messages) => {
                let template = state.template.as_ref().map_err(Clone::clone)?;
                // The template writes the special tokens (BOS included) itself.
                template
                    .encode_untrusted(tok, &messages, true)
                    .map_err(|e| match e {
                        e if is_budget_error(&e) => template_budget_error(&e),
                        crate::Error::Template(_) | crate::Error::InvalidArgument(_) => {
                            ApiError::param("messages", e.to_string())
                        }
                        e => internal(e),
                    })
            }
            Input::Text(text) => tok.encode(&text, true).map_err(internal),
            Input::Tokens(ids) => {
                let vocab = state.model.config().vocab_size;
                match ids.iter().find(|&&t| t as usize >= vocab) {
                    Some(bad) => Err(ApiError::param(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
                    )),
                    None => Ok(ids),
                }
            }
        }
    })
    .await
    .map_err(|_| ApiError::internal("tokenization failed unexpectedly (a bug in nibble)"))??;
    let field = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::param(field, "the prompt is empty"));
    }
    if prompt.len() > s.ctx {
        return Err(ApiError {
            code: "context_length_exceeded",
            ..ApiError::param(
                field,
                format!(
                    "the prompt is {} tokens long but the context is only {} tokens",
                    prompt.len(),
                    s.ctx
                ),
            )
        });
    }
    Ok(prompt)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A unique-enough response id: the time and a process-wide counter.
fn response_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos:x}{:04x}",
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        // The server sets no cancel flag; a cancelled reply would have
        // stopped on request, as a stop string does.
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// The fixed parts of one response, and how to shape its pieces.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
}

impl Reply {
    fn new(endpoint: Endpoint, model: &str, include_usage: bool, prompt_tokens: usize) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: response_id(prefix),
            created: unix_now(),
            model: model.to_owned(),
            include_usage,
            prompt_tokens,
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// Waits for the whole generation and answers with one JSON object.
    async fn collect(self, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Failed(e)) => return Err(e),
                None => {
                    return Err(ApiError::unavailable(
                        "shutting_down",
                        "the server is shutting down",
                    ))
                }
                Some(Event::Done {
                    completion_tokens,
                    reason,
                }) => {
                    let choice = match self.endpoint {
                        Endpoint::Chat => json!({
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": null,
                            "finish_reason": finish_reason(reason),
                        }),
                        Endpoint::Completion => json!({
                            "index": 0,
                            "text": text,
                            "logprobs": null,
                            "finish_reason": finish_reason(reason),
                        }),
                    };
                    let object = match self.endpoint {
                        Endpoint::Chat => "chat.completion",
                        Endpoint::Completion => "text_completion",
                    };
                    return Ok(Json(json!({
                        "id": self.id,
                        "object": object,
                        "created": self.created,
                        "model": self.model,
                        "choices": [choice],
                        "usage": self.usage(completion_tokens),
                    }))
                    .into_response());
                }
            }
        }
    }

    /// One streamed chunk with the given choice (or none).
    fn chunk(&self, choice: Option<Value>, usage: Option<Value>) -> SseEvent {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choice.into_iter().collect::<Vec<_>>(),
        });
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(chunk.to_string())
    }

    fn text_choice(&self, text: &str, finish: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        }
    }

    /// The SSE chunks for one worker event.
    fn events_for(&self, event: Event) -> Vec<SseEvent> {
        match event {
            Event::Text(t) => vec![self.chunk(Some(self.text_choice(&t, None)), None)],
            Event::Done {
                completion_tokens,
                reason,
            } => {
                let mut out = vec![self.chunk(
                    Some(self.text_choice("", Some(finish_reason(reason)))),
                    None,
                )];
                if self.include_usage {
                    out.push(self.chunk(None, Some(self.usage(completion_tokens))));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            // OpenAI's clients raise an error for a chunk with an `error` key.
            Event::Failed(e) => vec![SseEvent::default().data(e.body().to_string())],
        }
    }

    /// Answers with server-sent events as the tokens come.
    fn stream(self, rx: UnboundedReceiver<Event>) -> Response {
        let head = match self.endpoint {
            Endpoint::Chat => vec![self.chunk(
                Some(json!({
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })),
                None,
            )],
            Endpoint::Completion => Vec::new(),
        };
        let body = stream::unfold(rx, |mut rx| async move {
            let event = rx.recv().await?;
            Some((event, rx))
        })
        .flat_map(move |event| stream::iter(self.events_for(event)));
        let events = stream::iter(head).chain(body).map(Ok::<_, Infallible>);
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}
