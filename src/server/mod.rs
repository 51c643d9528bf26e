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
//! than the context (code `context_length_exceeded`); 413 for a body over
//! [`ServerOptions::max_body_bytes`]; 404 and 405 for unknown routes and
//! methods; 503 when the queue is full or the server is stopping.
//!
//! One generation runs at a time on a dedicated thread that owns the KV
//! cache; the forward pass already uses every core. Up to
//! [`ServerOptions::max_queue`] further requests wait their turn. A client
//! that disconnects mid-stream frees the worker after the current token.
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
use tokio::net::{TcpListener, ToSocketAddrs};

/// How a [`Server`] runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Context length in tokens of the session requests run in; `None` = the
    /// model's own. Prompts longer than this are refused.
    pub ctx: Option<usize>,
    /// Requests that may wait while one generation runs; further ones get
    /// 503 at once. 0 = only the running one is accepted.
    pub max_queue: usize,
    /// Largest accepted request body in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Print one line per request (peer, method, path, status, time) to
    /// stderr.
    pub log_requests: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            ctx: None,
            max_queue: 16,
            max_body_bytes: 1 << 20,
            log_requests: true,
        }
    }
}

/// A bound, ready server: the listening socket, the routes and the inference
/// thread. Nothing is served until [`Server::run`].
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    worker: worker::Worker,
    ctx: usize,
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
            Some(_) => Ok(Arc::new(ChatTemplate::from_model(&model)?)),
            None => Err(format!(
                "the model '{model_id}' has no chat template; use /v1/completions"
            )),
        };
        let (worker, queue, ctx) =
            worker::Worker::start(model.clone(), options.ctx, options.max_queue)?;
        let state = Arc::new(routes::AppState {
            model,
            model_id,
            template,
            ctx,
            queue,
            max_body_bytes: options.max_body_bytes,
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
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The context length of the session requests run in.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Serves until `shutdown` completes, then stops gracefully: no new
    /// connections, the running generation ends after its current token (its
    /// client gets a `shutting_down` error), waiting requests get 503, and
    /// the call returns once every connection has closed and the inference
    /// thread has ended.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Self {
            listener,
            router,
            worker,
            ..
        } = self;
        let stop = worker.stop_signal();
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Open streams end only when their generation does: end it now.
            stop.stop();
        })
        .await;
        // Joining waits at most for the current token.
        let _ = tokio::task::spawn_blocking(move || worker.stop()).await;
        served.map_err(|e| Error::InvalidArgument(format!("server failed: {e}")))
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
    runtime.block_on(async move {
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
        server.run(shutdown_signal()).await?;
        eprintln!("stopped");
        Ok(())
    })
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
