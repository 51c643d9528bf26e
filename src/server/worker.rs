//! The inference worker: one OS thread that owns the [`Session`] (and so the
//! KV cache) and runs one generation at a time.
//!
//! The forward pass is CPU-bound and already spreads each matrix product over
//! every core with rayon, so running requests side by side would only make
//! each slower; they wait in a bounded queue instead. Admission counts the
//! running job plus the waiting ones, so memory stays bounded however many
//! clients connect: past the limit a request is refused at once (503).

use super::error::ApiError;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions, StopReason};
use crate::model::{Model, Session, SessionOptions};
use crate::sampler::{Sampler, SamplerOptions};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// One generation to run.
pub(crate) struct Job {
    /// The place in the queue the request was admitted to; freed when the
    /// job is dropped (done, failed, or never run).
    pub _slot: Slot,
    /// Never empty and at most the context length (checked by the handler).
    pub prompt: Vec<u32>,
    pub sampler: SamplerOptions,
    pub options: GenerateOptions,
    /// Where the generation goes. Unbounded, but a job yields at most one
    /// message per token of the context. When the receiver is dropped (the
    /// client went away), the worker stops after the current token.
    pub events: UnboundedSender<Event>,
}

/// What the worker reports about a job, in order: any number of `Text`, then
/// exactly one `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Event {
    Text(String),
    Done {
        completion_tokens: usize,
        reason: StopReason,
    },
    Failed(ApiError),
}

/// The handle through which requests reach the worker; cheap to share.
#[derive(Clone)]
pub(crate) struct Queue {
    jobs: mpsc::Sender<Job>,
    /// Jobs admitted and not yet finished: the running one plus the waiting.
    pending: Arc<AtomicUsize>,
    capacity: usize,
    stopping: Arc<AtomicBool>,
}

impl Queue {
    /// Takes a place for one request, or refuses it when `capacity` requests
    /// are already admitted or the server is stopping. Everything costly
    /// about a request (reading its body, tokenizing) happens after this.
    pub fn admit(&self) -> Result<Slot, ApiError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < self.capacity).then_some(p + 1)
            })
            .is_ok();
        if !admitted {
            return Err(ApiError::unavailable(
                "server_overloaded",
                format!(
                    "the server is busy: {} requests are already running or queued; retry later",
                    self.capacity
                ),
            ));
        }
        Ok(Slot(self.pending.clone()))
    }

    /// Hands `job` (with the slot it was admitted to) to the worker.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        self.jobs.send(job).map_err(|_| shutting_down())
    }
}

/// An admitted request's place in the queue; dropping it frees the place.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn shutting_down() -> ApiError {
    ApiError::unavailable("shutting_down", "the server is shutting down")
}

/// The worker thread.
pub(crate) struct Worker {
    thread: JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

/// How often an idle worker checks whether the server is stopping.
const IDLE_POLL: Duration = Duration::from_millis(50);

impl Worker {
    /// Starts the worker with a session of `ctx` tokens (the model's own
    /// context when `None`) and room for `max_queue` waiting jobs. Returns
    /// the queue and the context length, or the error creating the session.
    pub fn start(
        model: Arc<Model>,
        ctx: Option<usize>,
        max_queue: usize,
    ) -> Result<(Self, Queue, usize)> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<usize>>();
        let stopping = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("nibble-inference".into())
                .spawn(move || {
                    let mut session = match Session::new(
                        &model,
                        SessionOptions {
                            ctx,
                            ..SessionOptions::default()
                        },
                    ) {
                        Ok(s) => {
                            let _ = ready_tx.send(Ok(s.ctx()));
                            s
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    serve_jobs(&mut session, &jobs_rx, &stopping);
                })
                .map_err(|e| {
                    Error::InvalidArgument(format!("cannot start the inference thread: {e}"))
                })?
        };
        let ctx = ready_rx.recv().map_err(|_| {
            Error::InvalidArgument("the inference thread ended before it started".into())
        })??;
        let queue = Queue {
            jobs: jobs_tx,
            pending,
            capacity: max_queue.saturating_add(1),
            stopping: stopping.clone(),
        };
        Ok((Self { thread, stopping }, queue, ctx))
    }

    /// A handle that makes the worker stop as [`Worker::stop`] does, without
    /// waiting for it.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal(self.stopping.clone())
    }

    /// Refuses new jobs, ends the running generation after its current token
    /// and fails the waiting ones; returns once the thread has ended, or at
    /// `deadline`, leaving the thread to end by itself.
    pub async fn stop_by(self, deadline: tokio::time::Instant) {
        self.stopping.store(true, Ordering::Release);
        while !self.thread.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

/// See [`Worker::stop_signal`].
pub(crate) struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

fn serve_jobs(session: &mut Session, jobs: &mpsc::Receiver<Job>, stopping: &AtomicBool) {
    loop {
        let job = match jobs.recv_timeout(IDLE_POLL) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) if stopping.load(Ordering::Acquire) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if stopping.load(Ordering::Acquire) {
            let _ = job.events.send(Event::Failed(shutting_down()));
        } else if !job.events.is_closed() {
            // A panic is a bug, but it must cost one request, not the server:
            // the session is reset before every job, so its state is not reused.
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| run(session, &job, stopping)));
            if run.is_err() {
                let _ = job.events.send(Event::Failed(ApiError::internal(
                    "generation failed unexpectedly (a bug in nibble)",
                )));
            }
        }
        // Dropping the job frees its slot.
    }
}

/// Runs one job to its end, or until its client leaves or the server stops.
fn run(session: &mut Session, job: &Job, stopping: &AtomicBool) {
    let send = |e: Event| job.events.send(e).is_ok();
    session.reset();
    let failed = |e: Error| {
        Event::Failed(match e {
            Error::ContextFull { .. } | Error::EmptyPrompt | Error::InvalidArgument(_) => {
                ApiError::invalid("invalid_request", e.to_string())
            }
            e => ApiError::internal(e.to_string()),
        })
    };
    let mut sampler = match Sampler::new(job.sampler.clone()) {
        Ok(s) => s,
        Err(e) => {
            send(failed(e));
            return;
        }
    };
    let mut gen = match generate(session, &job.prompt, &mut sampler, job.options.clone()) {
        Ok(g) => g,
        Err(e) => {
            send(failed(e));
            return;
        }
    };
    for piece in gen.by_ref() {
        match piece {
            Ok(p) if !p.text.is_empty() => {
                if !send(Event::Text(p.text)) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                send(failed(e));
                return;
            }
        }
        if job.events.is_closed() {
            return;
        }
        if stopping.load(Ordering::Acquire) {
            send(Event::Failed(shutting_down()));
            return;
        }
    }
    send(Event::Done {
        completion_tokens: gen.generated(),
        // The iterator only ends once a reason is set.
        reason: gen.stop_reason().unwrap_or(StopReason::MaxTokens),
    });
}
