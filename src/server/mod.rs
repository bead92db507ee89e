//! The connection layer: accepting TCP connections and driving HTTP/1.1 on
//! them, with the limits a server facing hostile clients needs and that
//! `axum::serve` does not have.
//!
//! - A cap on open connections ([`ConnectionLimits::max_connections`]). When it
//!   is reached, a new connection evicts the oldest connection that has no
//!   request being handled (a slow or idle one); only when every connection is
//!   busy is the newcomer answered 503 and closed. So thousands of slow-header
//!   or idle sockets cannot lock out a real client or the health check, and the
//!   process never runs into its open-files limit.
//! - Timers on every connection ([`TimedStream`]): the request head must arrive
//!   within the header-read timeout (counted from accept for the first request,
//!   from its first byte for later ones, so a silent connection is closed too);
//!   a kept-alive connection may idle between requests for the idle timeout;
//!   a write that makes no progress for the write timeout (an answer nobody
//!   reads) fails the connection.
//! - Lingering close: when an answer went out before its request body was read
//!   (an early 4xx/503), the answer says `Connection: close` and, after it is
//!   sent, the rest of the body is read and discarded for a bounded time and
//!   size before the socket closes. Clients that send the whole body before
//!   reading (urllib, HttpURLConnection) then read our JSON instead of getting
//!   a reset.
//! - Shutdown that ends: on the shutdown signal, idle and half-open connections
//!   close at once, requests in flight get until the drain deadline, and what
//!   was cut is logged.
//!
//! - Declared body sizes ([`chunk_watch`]): a chunked body whose chunk-size
//!   lines declare more than [`ConnectionLimits::max_body_bytes`] fails its
//!   request at once (413), without waiting for data that may never come.
//!
//! Only HTTP/1.1 is served (what every client of this API speaks).

pub mod chunk_watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;
use tracing::{debug, info, warn};

/// Connection-level limits (`serve --help` documents each).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; see the module documentation for what happens at the cap.
    pub max_connections: usize,
    /// Time for a request head to arrive.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time a write may make no progress before the connection is dropped.
    pub write_timeout: Duration,
    /// After the shutdown signal, how long requests in flight may take to finish.
    pub shutdown_timeout: Duration,
    /// Largest request body; a chunked body declaring more fails at once
    /// ([`crate::serve`] sets it to the upload limit).
    pub max_body_bytes: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(25),
            max_body_bytes: 64 << 20,
        }
    }
}

/// Lingering close: at most this long in all, this long between reads, and
/// this many bytes discarded, whichever ends first.
const LINGER_TIME: Duration = Duration::from_secs(10);
const LINGER_IDLE: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 256 << 20;

/// What one connection's parts (stream timers, service, middleware, registry) share.
#[derive(Debug, Default)]
pub struct ConnectionState {
    /// Requests being handled now (from head parsed to answer body sent).
    busy: AtomicUsize,
    /// Requests handled so far.
    started: AtomicU64,
    /// An answer went out before its request body was read: linger before closing.
    linger: AtomicBool,
    /// The task waiting to read, woken when the last request ends so that the
    /// idle timer starts even though no byte arrives.
    reader: Mutex<Option<std::task::Waker>>,
    /// What the chunked body being received declared, once over the body
    /// limit (0: not over).
    declared_oversize: AtomicU64,
    /// The request body being read, woken when its declared size goes over.
    body_reader: Mutex<Option<std::task::Waker>>,
    /// A handler that answered 101 and takes the connection over once the answer is sent.
    takeover: Mutex<Option<tokio::sync::oneshot::Sender<TakenOver>>>,
}

impl ConnectionState {
    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }
}

/// Put in each request's extensions, for the middleware that marks early answers.
#[derive(Debug, Clone)]
pub struct ConnectionHandle(Arc<ConnectionState>);

impl ConnectionHandle {
    /// Asks for the connection's byte stream once the answer being made (a 101) is sent:
    /// how a WebSocket handler gets its socket while the connection layer keeps its
    /// accounting (the connection stays open and busy until the [`TakenOver`] is dropped).
    pub fn take_over(&self) -> tokio::sync::oneshot::Receiver<TakenOver> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        if let Ok(mut slot) = self.0.takeover.lock() {
            *slot = Some(sender);
        }
        receiver
    }

    /// The size the chunked body being received declared, when it is over the
    /// body limit: a body read that failed for this should be answered 413.
    pub fn declared_oversize(&self) -> Option<u64> {
        Some(self.0.declared_oversize.load(Ordering::Acquire)).filter(|&n| n > 0)
    }
}

/// A connection handed over after its last HTTP answer (see [`ConnectionHandle::take_over`]).
pub struct TakenOver {
    /// The socket, with its write timeout still on; read timers are off while this lives.
    pub stream: TimedStream,
    /// Bytes the client sent after the request head, already read from the socket.
    pub read_ahead: bytes::Bytes,
    /// Becomes true when the server shuts down.
    pub stop: tokio::sync::watch::Receiver<bool>,
    _busy: BusyGuard,
    _done: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for TakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenOver").field("read_ahead", &self.read_ahead.len()).finish_non_exhaustive()
    }
}

/// The error a request body fails with once its chunks declare more than the body limit.
#[derive(Debug, thiserror::Error)]
#[error("the chunked body declares {0} bytes, over the body limit")]
pub struct DeclaredBodyTooLarge(pub u64);

/// Counts a request as being handled while it lives.
struct BusyGuard(Arc<ConnectionState>);

impl BusyGuard {
    fn new(state: Arc<ConnectionState>) -> BusyGuard {
        state.started.fetch_add(1, Ordering::AcqRel);
        state.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(state)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(reader) = self.0.reader.lock().ok().and_then(|mut r| r.take()) {
                reader.wake();
            }
        }
    }
}

/// The TCP stream of one connection, with the header-read, idle and write timers.
///
/// The timers live here, in the byte stream, because that is where "no request
/// head yet" and "no write progress" are visible whatever hyper is doing. A
/// request being handled (long inference, slow upload: the upload timeout is
/// the handler's) suspends the read timers.
pub struct TimedStream {
    inner: TcpStream,
    state: Arc<ConnectionState>,
    stats: Arc<ConnectionStats>,
    limits: ConnectionLimits,
    /// When reading must have produced a request head (`None`: no read timer).
    read_deadline: Option<Instant>,
    read_sleep: Pin<Box<Sleep>>,
    /// Requests seen started when the read state was last updated.
    seen_started: u64,
    /// Bytes of the next request head have arrived.
    head_begun: bool,
    /// A request was in progress when the read state was last updated.
    in_request: bool,
    write_stalled: bool,
    write_sleep: Pin<Box<Sleep>>,
    /// Follows the request framing for chunk sizes over the body limit.
    chunks: chunk_watch::ChunkWatch,
    /// Our JSON answer standing in for hyper's bodiless one to a request head it
    /// could not parse, and how much of it is sent.
    replacement: Option<(Vec<u8>, usize)>,
}

impl TimedStream {
    fn new(
        inner: TcpStream,
        state: Arc<ConnectionState>,
        stats: Arc<ConnectionStats>,
        limits: ConnectionLimits,
    ) -> TimedStream {
        // The first request's head must arrive within the header timeout of
        // the accept, whether or not the client sends anything.
        let deadline = Instant::now() + limits.header_read_timeout;
        TimedStream {
            inner,
            state,
            stats,
            limits,
            read_deadline: Some(deadline),
            read_sleep: Box::pin(tokio::time::sleep_until(deadline)),
            seen_started: 0,
            head_begun: false,
            in_request: false,
            write_stalled: false,
            write_sleep: Box::pin(tokio::time::sleep(limits.write_timeout)),
            chunks: chunk_watch::ChunkWatch::new(limits.max_body_bytes),
            replacement: None,
        }
    }

    fn set_read_deadline(&mut self, deadline: Instant) {
        self.read_deadline = Some(deadline);
        self.read_sleep.as_mut().reset(deadline);
    }

    /// Brings the read timer up to date with the requests handled since.
    fn update_read_state(&mut self) {
        if self.state.is_busy() {
            self.read_deadline = None;
            self.head_begun = false;
            self.in_request = true;
            return;
        }
        let started = self.state.started.load(Ordering::Acquire);
        if self.in_request || started != self.seen_started {
            self.in_request = false;
            // A request was answered since we last looked: wait for the next one.
            self.seen_started = started;
            self.head_begun = false;
            self.set_read_deadline(Instant::now() + self.limits.idle_timeout);
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl AsyncRead for TimedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.update_read_state();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some(declared) = this.chunks.feed(&buf.filled()[before..]) {
                    this.state.declared_oversize.store(declared, Ordering::Release);
                    if let Some(body) = this.state.body_reader.lock().ok().and_then(|mut b| b.take()) {
                        body.wake();
                    }
                }
                if buf.filled().len() > before && this.read_deadline.is_some() && !this.head_begun {
                    this.head_begun = true;
                    // A later request's head gets the header timeout from its first
                    // byte; the first request's deadline already runs from the accept.
                    if this.seen_started > 0 {
                        let deadline = Instant::now() + this.limits.header_read_timeout;
                        this.set_read_deadline(deadline);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Ok(mut reader) = this.state.reader.lock() {
                    if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *reader = Some(cx.waker().clone());
                    }
                }
                if this.read_deadline.is_some() && this.read_sleep.as_mut().poll(cx).is_ready() {
                    let what = if this.head_begun || this.seen_started == 0 {
                        "no complete request head within the header-read timeout"
                    } else {
                        "kept-alive connection idle past the idle timeout"
                    };
                    this.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Err(timed_out(what)));
                }
                Poll::Pending
            }
        }
    }
}

impl TimedStream {
    fn on_write(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                self.write_stalled = false;
                // Sending an answer is activity: the idle wait starts after it.
                if !self.head_begun && !self.state.is_busy() && self.read_deadline.is_some() {
                    let deadline = Instant::now() + self.limits.idle_timeout;
                    self.set_read_deadline(deadline);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !self.write_stalled {
                    self.write_stalled = true;
                    let deadline = Instant::now() + self.limits.write_timeout;
                    self.write_sleep.as_mut().reset(deadline);
                }
                if self.write_sleep.as_mut().poll(cx).is_ready() {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Err(timed_out("the client read nothing within the write timeout")));
                }
                Poll::Pending
            }
        }
    }
}

impl TimedStream {
    /// Writes our JSON stand-in for hyper's answer `original` (its bytes count
    /// as written once the stand-in is sent whole).
    fn poll_replacement(&mut self, cx: &mut Context<'_>, original: usize) -> Poll<io::Result<usize>> {
        loop {
            let Some((bytes, sent)) = &mut self.replacement else { return Poll::Ready(Ok(original)) };
            if *sent == bytes.len() {
                self.replacement = None;
                return Poll::Ready(Ok(original));
            }
            let result = Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]);
            match self.on_write(cx, result) {
                Poll::Ready(Ok(n)) => {
                    if let Some((_, sent)) = &mut self.replacement {
                        *sent += n;
                    }
                }
                other => return other,
            }
        }
    }

    /// Starts the stand-in when `data` is hyper's own bodiless error answer.
    fn replace_bare_error(&mut self, data: &[u8]) {
        if self.replacement.is_none() {
            if let Some(json) = json_for_bare_error(data) {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                self.replacement = Some((json, 0));
            }
        }
    }
}

/// hyper answers a request head it cannot parse (a request line over the URI
/// limit: 414; headers over its buffer: 431; malformed: 400) itself, before
/// any request reaches the router, with no body. Every answer of this server
/// is JSON, so such an answer (an error status, no content type) is rewritten
/// with our error object, its code from the status's reason.
fn json_for_bare_error(data: &[u8]) -> Option<Vec<u8>> {
    let head_end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let status: u16 = status_line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let bare = head.lines().skip(1).all(|line| !line.to_ascii_lowercase().starts_with("content-type:"));
    if !(400..600).contains(&status) || !bare || data.len() != head_end + 4 {
        return None;
    }
    let reason = axum::http::StatusCode::from_u16(status).ok()?.canonical_reason().unwrap_or("error");
    let code = reason.to_ascii_lowercase().replace([' ', '-'], "_");
    let message =
        format!("the request could not be read ({reason}): its request line or headers are too long or malformed");
    Some(json_error_answer(status, &code, &message, ""))
}

impl AsyncWrite for TimedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.replace_bare_error(data);
        if self.replacement.is_some() {
            return self.poll_replacement(cx, data.len());
        }
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        self.on_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper's own error answers are one small head; look at them whole.
        let first = data.iter().find(|s| !s.is_empty()).map_or(&[][..], |s| &s[..]);
        if self.replacement.is_none()
            && first.starts_with(b"HTTP/1.1 ")
            && data.iter().map(|s| s.len()).sum::<usize>() < 1024
        {
            let whole: Vec<u8> = data.iter().flat_map(|s| s.iter().copied()).collect();
            self.replace_bare_error(&whole);
        }
        if self.replacement.is_some() {
            let total = data.iter().map(|s| s.len()).sum();
            return self.poll_replacement(cx, total);
        }
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, data);
        self.on_write(cx, result)
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

/// The router as one connection's hyper service: counts requests being
/// handled and hands the connection's state to the middleware.
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    state: Arc<ConnectionState>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    // Boxed, so the connection can be polled with `poll_without_shutdown` (needs Unpin).
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = BusyGuard::new(self.state.clone());
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectionHandle(self.state.clone()));
        let router = self.router.clone();
        Box::pin(async move {
            // The request counts as in progress until its answer's body is sent
            // (or dropped): a download is as much in flight as an inference.
            let response = router.oneshot(request).await;
            response.map(|r| {
                r.map(|body| {
                    Body::new(WatchedBody { inner: body, finished: None, connection: None, _busy: Some(guard) })
                })
            })
        })
    }
}

/// A body the connection layer watches: a request body records whether it
/// was read to its end; an answer's body keeps its request counted as in
/// progress while it lives.
struct WatchedBody {
    inner: Body,
    finished: Option<Arc<AtomicBool>>,
    /// A request body: its connection, which says when the body declared too much.
    connection: Option<Arc<ConnectionState>>,
    _busy: Option<BusyGuard>,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(state) = &self.connection {
            let declared = state.declared_oversize.load(Ordering::Acquire);
            if declared > 0 {
                return Poll::Ready(Some(Err(axum::Error::new(DeclaredBodyTooLarge(declared)))));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Pending, Some(state)) = (&polled, &self.connection) {
            if let Ok(mut reader) = state.body_reader.lock() {
                *reader = Some(cx.waker().clone());
            }
            // The connection task may have seen the chunk line while we registered.
            let declared = state.declared_oversize.load(Ordering::Acquire);
            if declared > 0 {
                return Poll::Ready(Some(Err(axum::Error::new(DeclaredBodyTooLarge(declared)))));
            }
        }
        if let Some(finished) = &self.finished {
            if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
                finished.store(true, Ordering::Release);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: an answer sent before its request body was read to the end
/// says `Connection: close`, and the connection lingers to discard the rest
/// of the body (so the client can read the answer) before it closes.
pub async fn close_after_unread_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let finished = Arc::new(AtomicBool::new(body.is_end_stream()));
    let connection = parts.extensions.get::<ConnectionHandle>().cloned();
    let watched = connection.as_ref().map(|ConnectionHandle(state)| state.clone());
    let body =
        Body::new(WatchedBody { inner: body, finished: Some(finished.clone()), connection: watched, _busy: None });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !finished.load(Ordering::Acquire) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Some(ConnectionHandle(state)) = connection {
            state.linger.store(true, Ordering::Release);
        }
    }
    response
}

/// Open connections, for the cap and for shutdown.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    accepted: Instant,
    state: Arc<ConnectionState>,
    abort: tokio::task::AbortHandle,
}

impl Registry {
    fn len(&self) -> usize {
        self.open.lock().expect("registry").len()
    }

    /// Closes the longest-open connection with no request being handled;
    /// false when every connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.open.lock().expect("registry");
        let oldest = open.iter().filter(|(_, e)| !e.state.is_busy()).min_by_key(|(_, e)| e.accepted).map(|(id, _)| *id);
        match oldest.and_then(|id| open.remove(&id)) {
            Some(entry) => {
                entry.abort.abort();
                true
            }
            None => false,
        }
    }

    /// Closes every connection with no request being handled; returns how many.
    fn close_idle(&self) -> usize {
        let mut open = self.open.lock().expect("registry");
        let idle: Vec<u64> = open.iter().filter(|(_, e)| !e.state.is_busy()).map(|(id, _)| *id).collect();
        for id in &idle {
            if let Some(entry) = open.remove(id) {
                entry.abort.abort();
            }
        }
        idle.len()
    }

    fn busy(&self) -> usize {
        self.open.lock().expect("registry").values().filter(|e| e.state.is_busy()).count()
    }
}

/// Counters of the connection layer, for logs and tests.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub accepted: AtomicU64,
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
    pub lingered: AtomicU64,
    /// Request heads hyper could not parse (a request line or headers too long, or malformed).
    pub malformed: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
}

/// Serves `router` on `listener` with `limits` until `shutdown` resolves, then
/// drains (see the module documentation) and returns.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let mut last_accept_error: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: say so once a second, back off, go on.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        warn!(error = %e, "accept failed");
                        last_accept_error = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if registry.len() >= limits.max_connections {
            if registry.evict_oldest_idle() {
                stats.evicted.fetch_add(1, Ordering::Relaxed);
                stats.open.store(registry.len(), Ordering::Relaxed);
            } else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(refuse_connection(stream));
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnectionState::default());
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        let connection =
            drive_connection(stream, router.clone(), state.clone(), limits, stats.clone(), stop_rx.clone());
        let (registry_for_task, stats_for_task) = (registry.clone(), stats.clone());
        // Registered under the lock the task takes to deregister, so a
        // connection that ends at once cannot leave a stale entry.
        let mut open = registry.open.lock().expect("registry");
        let abort = tasks.spawn(async move {
            connection.await;
            let mut open = registry_for_task.open.lock().expect("registry");
            open.remove(&id);
            stats_for_task.open.store(open.len(), Ordering::Relaxed);
        });
        open.insert(id, Entry { accepted: Instant::now(), state, abort });
        stats.open.store(open.len(), Ordering::Relaxed);
        drop(open);
        debug!(%peer, id, "connection accepted");
    }
    drop(listener);
    let closed = registry.close_idle();
    let in_flight = registry.busy();
    info!(idle_closed = closed, in_flight, deadline_s = limits.shutdown_timeout.as_secs_f64(), "draining connections");
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(limits.shutdown_timeout, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let cut = registry.busy();
        tasks.abort_all();
        warn!(
            cut_requests = cut,
            deadline_s = limits.shutdown_timeout.as_secs_f64(),
            "drain deadline reached: cut the requests still in flight"
        );
        while tasks.join_next().await.is_some() {}
    } else {
        info!("every connection drained");
    }
    Ok(())
}

/// Every connection is handling a request: answer 503 and close.
async fn refuse_connection(mut stream: TcpStream) {
    let answer = json_error_answer(
        503,
        "too_many_connections",
        "the server has too many open connections; retry shortly",
        "retry-after: 1\r\n",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await;
}

/// A whole answer with our JSON error object, for the answers this layer
/// writes itself (below the router, whose middleware writes all the others).
fn json_error_answer(status: u16, code: &str, message: &str, extra_headers: &str) -> Vec<u8> {
    let reason = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One connection from accept to close.
async fn drive_connection(
    stream: TcpStream,
    router: Router,
    state: Arc<ConnectionState>,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let io = TokioIo::new(TimedStream::new(stream, state.clone(), stats.clone(), limits));
    let service = ConnectionService { router, state: state.clone() };
    // Half-closures are allowed: a client that sends its whole request and then
    // shuts down its write side (as `nc -N` does) is waiting for the answer, not
    // cancelling; without this hyper closes the connection at the end of input.
    let mut connection = hyper::server::conn::http1::Builder::new().half_close(true).serve_connection(io, service);
    let mut draining = false;
    let outcome = loop {
        tokio::select! {
            outcome = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => break outcome,
            _ = stop.wait_for(|stop| *stop), if !draining => {
                if !state.is_busy() {
                    return; // idle or half-open: close now
                }
                // Finish the request in flight, then close.
                Pin::new(&mut connection).graceful_shutdown();
                draining = true;
            }
        }
    };
    if let Err(e) = outcome {
        debug!(error = %e, "connection ended with an error");
        return;
    }
    let parts = connection.into_parts();
    let mut stream = parts.io.into_inner();
    let takeover = state.takeover.lock().ok().and_then(|mut t| t.take());
    if let Some(sender) = takeover {
        let (done, finished) = tokio::sync::oneshot::channel();
        let busy = BusyGuard::new(state.clone());
        let taken = TakenOver { stream, read_ahead: parts.read_buf, stop: stop.clone(), _busy: busy, _done: done };
        if sender.send(taken).is_ok() {
            // The connection stays registered (and busy) until the new owner is done with it.
            let _ = finished.await;
        }
        return;
    }
    if state.linger.load(Ordering::Acquire) {
        stats.lingered.fetch_add(1, Ordering::Relaxed);
        linger(&mut stream).await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
}

/// Sends our FIN, then reads and discards what the client still sends, within
/// the linger bounds, so the answer already sent is not lost to a reset.
async fn linger(stream: &mut TimedStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.inner.shutdown()).await;
    let until = Instant::now() + LINGER_TIME;
    let mut discarded = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    while discarded < LINGER_BYTES {
        let wait = LINGER_IDLE.min(until.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, stream.inner.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => discarded += n as u64,
            _ => break,
        }
    }
    debug!(discarded, "lingering close done");
}

#[cfg(test)]
mod tests {
    use super::json_for_bare_error;

    #[test]
    fn hypers_bodiless_errors_become_json_and_ours_are_left_alone() {
        let bare = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let json = String::from_utf8(json_for_bare_error(bare).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\n"), "{json}");
        let body: serde_json::Value = serde_json::from_str(json.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "uri_too_long");
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(json_for_bare_error(ours).is_none());
        assert!(json_for_bare_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_for_bare_error(b"HTTP/1.1 204 No Content\r\n\r\n").is_none());
    }
}
