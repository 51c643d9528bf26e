//! Serving accepted connections with HTTP/1.1 under the server's timeouts.
//!
//! Each connection runs hyper's HTTP/1 state machine beside a watchdog that
//! knows, from the bytes it reads and the requests it is serving, what the
//! connection is waiting for, and closes it when that takes too long: the
//! request line and headers ([`Timeouts::header`], counted from the accept or
//! from the first byte of a keep-alive request), the next request on an idle
//! keep-alive connection ([`Timeouts::idle`]), or a client that stopped
//! reading its answer ([`Timeouts::idle`] without a byte written). Bodies are
//! timed by the handler that reads them, since only it can answer 408.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

/// The time limits of [`super::ServerOptions`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

/// How often a watchdog looks again when nothing it waits for has a deadline.
const POLL: Duration = Duration::from_millis(250);

/// Serves one connection until it closes, a timeout closes it, or, once
/// `closing` turns true, its current request is done.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    mut closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let state = Arc::new(Mutex::new(State::new()));
    let io = TokioIo::new(Watched {
        inner: stream,
        state: state.clone(),
    });
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = InFlight::new(state.clone());
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|inner| Tracked {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        if !draining && *closing.borrow() {
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        let now = Instant::now();
        let deadline = lock(&state).deadline(&timeouts, draining);
        let wake = deadline.map_or(now + POLL, |d| d.min(now + POLL));
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = closing.changed(), if !draining => {}
            _ = tokio::time::sleep_until(wake) => {
                let deadline = lock(&state).deadline(&timeouts, draining);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a connection is waiting for, as far as timeouts go.
#[derive(Debug)]
struct State {
    /// Requests whose answer has not been sent completely.
    in_flight: usize,
    phase: Phase,
    /// Since when the phase lasts.
    since: Instant,
    /// Since when a write has been waiting for the client to read.
    write_blocked: Option<Instant>,
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Accepted, no request yet: the client has the header timeout.
    Fresh,
    /// Between requests with nothing read: the idle timeout.
    Idle,
    /// Part of a next request arrived: the header timeout.
    Head,
    /// Serving.
    Busy,
}

impl State {
    fn new() -> Self {
        Self {
            in_flight: 0,
            phase: Phase::Fresh,
            since: Instant::now(),
            write_blocked: None,
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while a
    /// request is served and its client keeps up.
    fn deadline(&self, t: &Timeouts, draining: bool) -> Option<Instant> {
        if draining && self.in_flight == 0 {
            return Some(self.since);
        }
        match self.phase {
            Phase::Fresh | Phase::Head => Some(self.since + t.header),
            Phase::Idle => Some(self.since + t.idle),
            Phase::Busy => self.write_blocked.map(|w| w + t.idle),
        }
    }

    fn read(&mut self) {
        if self.phase == Phase::Idle {
            self.phase = Phase::Head;
            self.since = Instant::now();
        }
    }
}

/// Counts one request as in flight until its response body is gone.
struct InFlight(Arc<Mutex<State>>);

impl InFlight {
    fn new(state: Arc<Mutex<State>>) -> Self {
        {
            let mut s = lock(&state);
            s.in_flight += 1;
            s.phase = Phase::Busy;
        }
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.phase = Phase::Idle;
            s.since = Instant::now();
            s.write_blocked = None;
        }
    }
}

/// A response body that holds its request's [`InFlight`].
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, reporting reads and stalled writes to the watchdog.
struct Watched {
    inner: TcpStream,
    state: Arc<Mutex<State>>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            lock(&self.state).read();
        }
        polled
    }
}

impl Watched {
    fn wrote<T>(&self, polled: &Poll<io::Result<T>>) {
        let mut s = lock(&self.state);
        match polled {
            Poll::Pending => {
                s.write_blocked.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => s.write_blocked = None,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[test]
    fn deadlines_follow_what_the_connection_waits_for() {
        let state = Arc::new(Mutex::new(State::new()));
        let accepted = lock(&state).since;
        // A new connection has the header timeout, however it dribbles.
        lock(&state).read();
        assert_eq!(lock(&state).deadline(&T, false), Some(accepted + T.header));
        // Serving: no deadline while the client keeps up.
        let guard = InFlight::new(state.clone());
        assert_eq!(lock(&state).deadline(&T, false), None);
        lock(&state).write_blocked = Some(accepted);
        assert_eq!(lock(&state).deadline(&T, false), Some(accepted + T.idle));
        // Draining waits for the request in flight, not for the client.
        lock(&state).write_blocked = None;
        assert_eq!(lock(&state).deadline(&T, true), None);
        drop(guard);
        // Idle between requests: the idle timeout; at shutdown, now.
        let idle = lock(&state).since;
        assert_eq!(lock(&state).deadline(&T, false), Some(idle + T.idle));
        assert_eq!(lock(&state).deadline(&T, true), Some(idle));
        // The first byte of the next request starts its header timeout.
        lock(&state).read();
        let s = lock(&state);
        assert_eq!(s.phase, Phase::Head);
        assert_eq!(s.deadline(&T, false), Some(s.since + T.header));
    }
}
