//! An OpenAI-compatible HTTP server over one model (`nibble serve`).
//!
//! Routes:
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | `chat.completion`, or `chat.completion.chunk` server-sent events with `"stream": true` |
//! | `POST /v1/completions` | `text_completion`, streamed the same way |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the one model; its id is the file name without extension |
//! | `GET /health` | `{"status": "ok"}` |
//!
//! Request fields: `model` (any name is accepted), `messages` or `prompt`,
//! `temperature` (default 1; 0 = greedy), `top_p`, `max_tokens` (chat also
//! `max_completion_tokens`; default: chat runs to the end of the sequence or
//! of the context, completions stop after 16 tokens as in OpenAI's API),
//! `stop` (a string or an array), `seed`, `stream`,
//! `stream_options.include_usage`, and llama.cpp's extensions `top_k`,
//! `min_p`, `repeat_penalty` and `ignore_eos`. Unknown fields are ignored;
//! `n` other than 1 and `logprobs` are refused. Chat messages are rendered
//! with the model's own chat template (with the assistant header appended);
//! a model without one answers chat requests with 400.
//!
//! Errors have OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, and status: 400 for
//! malformed JSON, a field of the wrong type or value, or a prompt longer
//! than the context (code `context_length_exceeded`); 408 for a body that
//! does not arrive within [`ServerOptions::body_timeout`]; 413 for a body
//! over the body cap (below); 404 and 405 for unknown routes and methods;
//! 500 with code `chat_template_budget_exceeded` when the model's chat
//! template runs past its budget (see [`crate::chat`]: the template is the
//! operator's file, not the client's fault); 503 when the queue is full or
//! the server is stopping.
//!
//! One generation runs at a time on a dedicated thread that owns the KV
//! cache; the forward pass already uses every core. Up to
//! [`ServerOptions::max_queue`] further requests wait their turn. A client
//! that disconnects mid-stream frees the worker after the current token.
//!
//! # Hostile input and load
//!
//! * **Body cap.** A prompt can never be longer than the context, so a body
//!   may have at most [`BODY_BYTES_PER_TOKEN`] bytes per token of the context
//!   plus [`BODY_EXTRA_BYTES`] for the JSON around it (192 KiB for a 4096-token
//!   context), and never more than [`ServerOptions::max_body_bytes`]; see
//!   [`Server::max_body_bytes`]. A declared `Content-Length` over the cap is
//!   answered 413 at once, before any of the body is read; a chunked body is
//!   cut off at the cap. (The unread rest of a refused body is read and
//!   dropped for up to a second, so that a client still sending sees the
//!   answer rather than a reset connection.)
//! * **Admission before work.** A completion request takes its place in the
//!   queue (or gets 503) before its body is read, and the body is parsed, the
//!   chat template rendered and the prompt tokenized only inside that place,
//!   one tokenization at a time. So at most `max_queue + 1` requests hold a
//!   body at any time, each at most its body, the parsed JSON and the fields
//!   taken from it (together about 3 × the body cap) and later its prompt
//!   (4 bytes per token of the context): request memory is bounded by about
//!   `3 × (max_queue + 1) ×` the body cap, some 10 MiB with the defaults and
//!   a 4096-token context, plus the working memory of the one running
//!   tokenization (tens of bytes per byte of prompt), however many clients
//!   connect. A refused request costs nothing beyond its headers.
//! * **Timeouts** ([`ServerOptions`]): a client has
//!   [`header_timeout`](ServerOptions::header_timeout) (10 s) to send a
//!   request line and headers, counted from the accept or from the first byte
//!   of a keep-alive request, then the connection is closed;
//!   [`body_timeout`](ServerOptions::body_timeout) (30 s) to send the body,
//!   then 408; a keep-alive connection idle for
//!   [`idle_timeout`](ServerOptions::idle_timeout) (60 s) is closed, and so
//!   is one whose client has not read any of its answer for that long.
//! * **Shutdown.** On the signal the server stops accepting, closes idle
//!   connections and those still sending headers, ends the running generation
//!   after its current token and fails the waiting ones with 503; requests
//!   still open after [`shutdown_grace`](ServerOptions::shutdown_grace) (5 s)
//!   are dropped, whatever their clients do. In `nibble serve` a second
//!   Ctrl-C or SIGTERM exits at once.
//! * **Special tokens.** The server is a trust boundary: text in a message's
//!   content is tokenized as text, so a client that writes `<|im_start|>` in
//!   its content gets those characters, not a new turn (see
//!   [`ChatTemplate::encode_untrusted`]); a role containing special-token
//!   text is refused with 400. A `/v1/completions` prompt is the client's
//!   whole input and is tokenized as `nibble run` does, special tokens
//!   included.
//!
//! # Example
//!
//! Serve a model on an ephemeral loopback port until a signal arrives:
//!
//! ```no_run
//! use nibble::server::{Server, ServerOptions};
//! use nibble::Model;
//! use std::sync::Arc;
//!
//! # async fn demo() -> nibble::Result<()> {
//! let model = Arc::new(Model::open("model.nbl")?);
//! let server = Server::bind("127.0.0.1:0", model, ServerOptions::default()).await?;
//! println!("listening on http://{}", server.local_addr());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! server.run(async { let _ = stopped.await; }).await?;
//! # Ok(())
//! # }
//! ```
//!
//! From the command line, [`serve`] does the same until Ctrl-C:
//! `nibble serve -m model.nbl --port 8080`.

mod conn;
mod error;
mod request;
mod routes;
mod worker;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::model::Model;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, ToSocketAddrs};

/// Body bytes allowed per token of the context. Generous: English text is
/// about 4 bytes per token, JSON-escaped non-ASCII text about 12, token ids
/// at most 8.
pub const BODY_BYTES_PER_TOKEN: usize = 32;

/// Body bytes allowed on top of [`BODY_BYTES_PER_TOKEN`], for the JSON
/// around the prompt (fields, roles, many short messages).
pub const BODY_EXTRA_BYTES: usize = 64 << 10;

/// How a [`Server`] runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Context length in tokens of the session requests run in; `None` = the
    /// model's own. Prompts longer than this are refused.
    pub ctx: Option<usize>,
    /// Requests that may wait while one generation runs; further ones get
    /// 503 at once. 0 = only the running one is accepted.
    pub max_queue: usize,
    /// Upper limit of the request body in bytes; larger ones get 413. The
    /// cap in force is usually lower, derived from the context (see the
    /// module docs and [`Server::max_body_bytes`]).
    pub max_body_bytes: usize,
    /// Print one line per request (peer, method, path, status, time) to
    /// stderr.
    pub log_requests: bool,
    /// Time to send a request line and its headers, from the accept or from
    /// the first byte of a keep-alive request; then the connection is closed.
    pub header_timeout: Duration,
    /// Time to send a request body once its headers are in; then 408.
    pub body_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests, or a
    /// client may leave its answer unread, before the connection is closed.
    pub idle_timeout: Duration,
    /// After the shutdown signal, time the open requests get before their
    /// connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            ctx: None,
            max_queue: 16,
            max_body_bytes: 1 << 20,
            log_requests: true,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The body cap for a context of `ctx` tokens (see the module docs).
fn body_cap(ctx: usize, max_body_bytes: usize) -> usize {
    ctx.saturating_mul(BODY_BYTES_PER_TOKEN)
        .saturating_add(BODY_EXTRA_BYTES)
        .min(max_body_bytes)
}

/// A bound, ready server: the listening socket, the routes and the inference
/// thread. Nothing is served until [`Server::run`].
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    worker: worker::Worker,
    ctx: usize,
    body_cap: usize,
    timeouts: conn::Timeouts,
    shutdown_grace: Duration,
}

impl Server {
    /// Listens on `addr` (port 0 picks a free port; see
    /// [`Server::local_addr`]) and starts the inference thread.
    pub async fn bind(
        addr: impl ToSocketAddrs,
        model: Arc<Model>,
        options: ServerOptions,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot listen: {e}")))?;
        Self::from_listener(listener, model, options)
    }

    /// Like [`Server::bind`], on a socket already listening.
    pub fn from_listener(
        listener: TcpListener,
        model: Arc<Model>,
        options: ServerOptions,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::InvalidArgument(format!("cannot listen: {e}")))?;
        let model_id = model
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let template = match model.chat_template() {
            Some(_) => {
                let t = ChatTemplate::from_model(&model)?;
                // A template that runs away on "Hello" is not run per request.
                match t.check_budget() {
                    Ok(()) => Ok(Arc::new(t)),
                    Err(e) => Err(routes::template_budget_error(&e)),
                }
            }
            None => Err(error::ApiError::invalid(
                "no_chat_template",
                format!("the model '{model_id}' has no chat template; use /v1/completions"),
            )),
        };
        let (worker, queue, ctx) =
            worker::Worker::start(model.clone(), options.ctx, options.max_queue)?;
        let body_cap = body_cap(ctx, options.max_body_bytes);
        let timeouts = conn::Timeouts {
            header: options.header_timeout,
            idle: options.idle_timeout,
        };
        let state = Arc::new(routes::AppState {
            model,
            model_id,
            template,
            ctx,
            queue,
            body_cap,
            tokenizing: tokio::sync::Semaphore::new(1),
            body_timeout: options.body_timeout,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        Ok(Self {
            listener,
            addr,
            router: routes::router(state, options.log_requests),
            worker,
            ctx,
            body_cap,
            timeouts,
            shutdown_grace: options.shutdown_grace,
        })
    }

    /// The largest request body accepted, in bytes: [`BODY_BYTES_PER_TOKEN`]
    /// per token of the context plus [`BODY_EXTRA_BYTES`], at most
    /// [`ServerOptions::max_body_bytes`].
    pub fn max_body_bytes(&self) -> usize {
        self.body_cap
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The context length of the session requests run in.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Serves until `shutdown` completes, then stops: no new connections,
    /// idle ones and those still sending headers are closed, the running
    /// generation ends after its current token (its client gets a
    /// `shutting_down` error), waiting requests get 503, and the call returns
    /// once every connection has closed and the inference thread has ended,
    /// or after [`ServerOptions::shutdown_grace`], whichever comes first
    /// (what is still open then is dropped).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Self {
            listener,
            router,
            worker,
            timeouts,
            shutdown_grace,
            ..
        } = self;
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(conn::serve(
                            stream,
                            peer,
                            router.clone(),
                            timeouts,
                            closing.clone(),
                        ));
                    }
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: nothing to do but wait a little.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let deadline = tokio::time::Instant::now() + shutdown_grace;
        // Open streams end only when their generation does: end it now.
        worker.stop_signal().stop();
        let _ = closing_tx.send(true);
        let _ = tokio::time::timeout_at(deadline, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.shutdown().await;
        // The worker ends after its current token, but a token of a long
        // prompt can take longer than the grace: then it is left behind.
        worker
            .stop_by(deadline.max(tokio::time::Instant::now() + Duration::from_millis(500)))
            .await;
        Ok(())
    }
}

/// Serves `model` on `host:port` until Ctrl-C (or SIGTERM), printing the
/// address to stderr. This is `nibble serve`; it starts its own tokio
/// runtime, so call it from synchronous code.
pub fn serve(model: Model, host: &str, port: u16, options: ServerOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The HTTP side only shuffles bytes; the cores belong to inference.
        .worker_threads(2)
        .thread_name("nibble-http")
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start the async runtime: {e}")))?;
    let served = runtime.block_on(async move {
        let name = model.path().display().to_string();
        let listener = TcpListener::bind((host, port))
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {host}:{port}: {e}")))?;
        let server = Server::from_listener(listener, Arc::new(model), options)?;
        eprintln!(
            "serving {name} on http://{} (context {} tokens); Ctrl-C stops",
            server.local_addr(),
            server.ctx()
        );
        let grace = server.shutdown_grace;
        server
            .run(async move {
                shutdown_signal().await;
                eprintln!(
                    "stopping (at most {} s; a second Ctrl-C exits at once)",
                    grace.as_secs_f64()
                );
                tokio::spawn(async {
                    shutdown_signal().await;
                    eprintln!("second signal: exiting now");
                    std::process::exit(130);
                });
            })
            .await?;
        eprintln!("stopped");
        Ok(())
    });
    // Do not wait for a tokenization still running on the blocking pool.
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

/// Completes on Ctrl-C, or SIGTERM on Unix (what service managers send).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Parses `body` as the chat (`chat`) or completion endpoint does, returning
/// the parsed request's debug form or the error message. For fuzzing
/// (`fuzz/fuzz_targets/server_request.rs`); not part of the API.
#[doc(hidden)]
pub fn fuzz_parse_request(chat: bool, body: &[u8]) -> std::result::Result<String, String> {
    let endpoint = if chat {
        request::Endpoint::Chat
    } else {
        request::Endpoint::Completion
    };
    request::parse(endpoint, body)
        .map(|r| format!("{r:?}"))
        .map_err(|e| e.message)
}
